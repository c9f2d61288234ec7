"""Drift: do the images arriving still look like the training surveys? Statistics, offline tests, an online monitor.

numpy/scipy (no torch), so the service imports it cheaply:
- `image_stats` (from eval.image_stats): sky, noise, S/N and size of each 8-bit cutout (what the model sees,
  before normalisation);
- `EmbeddingSpace`: the k-nearest-neighbour distance of pooled backbone embeddings to a reference sample;
- `compare_embeddings`: the offline two-sample tests (MMD permutation test, Mann-Whitney on kNN distances);
- `Reference`, `load_reference`, `save_reference`: the reference sample (embeddings + image statistics);
- `DriftMonitor`: rolling per-survey scores with thresholds and alerts, for the service.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import stats as scistats

from eval.image_stats import NOISE_FLOOR, STAT_NAMES, adaptive_size, image_stats, unnormalise  # noqa: F401

KNN = "knn_ratio"
K_NEIGHBOURS = 10
MAX_REFERENCE = 5000
QUERY_BLOCK = 512  # embeddings compared with the reference at a time: bounded memory
BASELINE_ROWS = 1000  # reference rows per survey whose leave-one-out distances set its kNN baseline
# The reference spread a median shift is divided by never falls below these (display levels, -, pixels): an
# all-black rendered sky has an IQR of 0, and a shift of half a level must not read as an infinite drift.
SCALE_FLOOR = {"sky": 1.0, "noise": 0.5, "snr": 1.0, "size": 0.5}
# Defaults from bench/drift.py (bench/results/drift.json; tiny random-init model, mock surveys, window 256 from 32
# images on): no alarm in 100 streams of held-out SDSS against an SDSS reference (largest scores: kNN 1.18, image
# statistics 0.65), an alarm in every HST and UKIDSS stream (sky, noise, size up to 1.2-2.6).
DEFAULT_THRESHOLDS = {KNN: 1.25, "sky": 0.8, "noise": 0.8, "snr": 0.8, "size": 0.8}
log = logging.getLogger(__name__)


# --- embedding distances and two-sample tests -------------------------------------------------------------------

class EmbeddingSpace:
    """A reference sample's embeddings, centred on their mean and scaled to unit length (cosine distance about the
    reference mean: an undertrained backbone puts every embedding near one direction), for k-nearest-neighbour
    distances. Brute force in blocks of matrix products: pooled DINOv2 features have hundreds of dimensions, where
    a k-d tree (scipy's cKDTree, which the tests compare against) visits every point anyway and is 10-100x slower.
    """

    def __init__(self, reference: np.ndarray, k: int = K_NEIGHBOURS) -> None:
        reference = np.asarray(reference, np.float64)
        if reference.ndim != 2 or len(reference) < 2:
            raise ValueError(f"a drift reference needs at least 2 embeddings as an (n, D) array, got shape "
                             f"{reference.shape}")
        if not np.isfinite(reference).all():
            raise ValueError("the drift reference holds non-finite embeddings; rebuild it")
        self.centre = reference.mean(axis=0)
        self.points = self.prepare(reference).astype(np.float32)
        self.k = min(k, len(reference) - 1)

    @property
    def dims(self) -> int:
        return self.points.shape[1]

    def prepare(self, vectors: np.ndarray) -> np.ndarray:
        centred = np.asarray(vectors, np.float64) - self.centre
        return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)

    def _nearest(self, prepared: np.ndarray, count: int) -> np.ndarray:
        """(n, count) Euclidean distances of unit vectors to their `count` nearest reference points, unsorted."""
        out = np.empty((len(prepared), count))
        for start in range(0, len(prepared), QUERY_BLOCK):
            block = prepared[start:start + QUERY_BLOCK].astype(np.float32)
            sq = np.maximum(2.0 - 2.0 * (block @ self.points.T), 0.0)  # |a - b|^2 of unit vectors
            out[start:start + len(block)] = np.sqrt(np.partition(sq, count - 1, axis=1)[:, :count])
        return out

    def distances(self, vectors: np.ndarray) -> np.ndarray:
        """(n,) mean Euclidean distance of each (unprepared) vector to its k nearest reference points."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dims:
            raise ValueError(f"embeddings of shape {vectors.shape} do not match the reference's {self.dims} "
                             "dimensions (another model?); use a reference made with the same model")
        out = np.full(len(vectors), np.nan)
        finite = np.isfinite(vectors).all(axis=1)  # a broken embedding counts as missing, not as far away
        if finite.any():
            out[finite] = self._nearest(self.prepare(vectors[finite]), self.k).mean(axis=1)
        return out

    def leave_one_out(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Distances of reference points (`rows`, default all) to their k nearest other reference points."""
        chosen = self.points if rows is None else self.points[rows]
        found = np.sort(self._nearest(chosen, self.k + 1), axis=1)
        return found[:, 1:].mean(axis=1)  # the nearest is the point itself (or an exact duplicate: also 0 away)


def mmd_permutation_test(x: np.ndarray, y: np.ndarray, permutations: int = 500,
                         seed: int = 0) -> tuple[float, float, float]:
    """(unbiased MMD^2, permutation p-value, RBF bandwidth) of two samples of unit vectors; Gaussian kernel with the
    median pairwise distance of the pooled sample as its bandwidth (Gretton et al. 2012). The p-value is
    (1 + #permuted >= observed) / (1 + permutations), valid for any sample sizes."""
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"the MMD test needs at least 2 embeddings on each side, got {n} and {m}")
    pooled = np.concatenate([x, y])
    sq = np.maximum(2.0 - 2.0 * pooled @ pooled.T, 0.0)  # squared distances of unit vectors
    off_diagonal = sq[~np.eye(len(pooled), dtype=bool)]
    bandwidth = math.sqrt(float(np.median(off_diagonal)))
    if bandwidth == 0:
        return 0.0, 1.0, 0.0
    kernel = np.exp(-sq / (2 * bandwidth**2))
    total, row_sums = kernel.sum(), kernel.sum(axis=1)
    rng = np.random.default_rng(seed)
    labels = np.zeros((len(pooled), permutations + 1))
    labels[:n, 0] = 1.0  # column 0: the observed split; the others: random splits of the same sizes
    for column in range(1, permutations + 1):
        labels[rng.permutation(len(pooled))[:n], column] = 1.0
    within_x = np.einsum("ip,ip->p", labels, kernel @ labels)  # z' K z
    x_to_all = row_sums @ labels  # 1' K z
    # Unbiased MMD^2 with the diagonal (k(a, a) = 1) left out of both within-sample sums.
    mmd2 = ((within_x - n) / (n * (n - 1)) + (total - 2 * x_to_all + within_x - m) / (m * (m - 1))
            - 2 * (x_to_all - within_x) / (n * m))
    p_value = (1 + np.sum(mmd2[1:] >= mmd2[0])) / (1 + permutations)
    return float(mmd2[0]), float(p_value), bandwidth


def subsample(count: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted row numbers of a seeded uniform subset of at most `limit` of `count` rows (all of them if fewer)."""
    if limit is None or count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))


def compare_embeddings(reference: np.ndarray, new: np.ndarray, *, k: int = K_NEIGHBOURS, permutations: int = 500,
                       seed: int = 0, alpha: float = 0.01, holdout: float = 0.2, mmd_samples: int = 1000) -> dict:
    """The offline drift tests of new embeddings against a reference sample, as a JSON-ready dict.

    A seeded `holdout` share of the reference is set aside; the rest is searched for neighbours. `knn_ratio` is the
    median kNN distance of the new embeddings over that of the held-out reference (1 without drift), and the
    one-sided Mann-Whitney test (new farther) and the two-sample KS test compare the two distance samples, which
    are exchangeable without drift. The MMD permutation test compares up to `mmd_samples` embeddings of each side.
    Verdict: drift when either the MMD or the Mann-Whitney p-value is below alpha / 2 (Bonferroni over the two).
    """
    if permutations < 1 or not 0 < holdout < 1 or not 0 < alpha < 1:
        raise ValueError(f"need --permutations >= 1, 0 < holdout < 1 and 0 < --alpha < 1, got {permutations}, "
                         f"{holdout}, {alpha}")
    if 1 / (1 + permutations) >= alpha / 2:
        raise ValueError(f"{permutations} permutations cannot give a p-value below alpha / 2 = {alpha / 2:g}; use "
                         f"--permutations {math.ceil(2 / alpha)} or more")
    reference, new = np.asarray(reference, np.float64), np.asarray(new, np.float64)
    finite = np.isfinite(new).all(axis=1)
    new = new[finite]  # a broken embedding is no evidence either way
    held_count = max(2, round(holdout * len(reference)))
    if len(reference) - held_count < 2 or len(new) < 2:
        raise ValueError(f"too few embeddings to test: {len(reference)} in the reference (needs >= 5) and "
                         f"{len(new)} new (needs >= 2)")
    order = np.random.default_rng(seed).permutation(len(reference))
    space = EmbeddingSpace(reference[order[held_count:]], k)
    held_d, new_d = space.distances(reference[order[:held_count]]), space.distances(new)
    mann_whitney = scistats.mannwhitneyu(new_d, held_d, alternative="greater")
    ks = scistats.ks_2samp(new_d, held_d)
    x = space.prepare(reference[subsample(len(reference), mmd_samples, seed + 1)])
    y = space.prepare(new[subsample(len(new), mmd_samples, seed + 2)])
    mmd2, mmd_p, bandwidth = mmd_permutation_test(x, y, permutations, seed + 3)
    drift = bool(min(mmd_p, float(mann_whitney.pvalue)) < alpha / 2)
    return {"num_reference": len(reference), "num_new": len(new), "num_new_not_finite": int((~finite).sum()),
            "num_reference_searched": len(space.points),
            "num_reference_held_out": held_count, "k": space.k,
            "knn_ratio": float(np.median(new_d) / max(np.median(held_d), 1e-12)),
            "knn_median_new": float(np.median(new_d)), "knn_median_reference": float(np.median(held_d)),
            "mann_whitney_u": float(mann_whitney.statistic), "mann_whitney_p": float(mann_whitney.pvalue),
            "ks_statistic": float(ks.statistic), "ks_p": float(ks.pvalue),
            "mmd2": mmd2, "mmd_p": mmd_p, "mmd_bandwidth": bandwidth, "mmd_num_reference": len(x),
            "mmd_num_new": len(y), "permutations": permutations, "alpha": alpha, "drift": drift,
            "verdict": "drift" if drift else "no drift"}


# --- the reference sample ---------------------------------------------------------------------------------------

@dataclass
class Reference:
    embeddings: np.ndarray  # (n, D) pooled backbone embeddings
    stats: dict[str, np.ndarray]  # per-stat reference values (sample): image_stats of the same n galaxies
    surveys: np.ndarray | None = None  # (n,) survey of each row, where known
    meta: dict | None = None  # provenance: model, shards, split, seed


def save_reference(path: str | Path, reference: Reference, keys: list[str] | None = None) -> Path:
    """Write a reference as .npz (no pickles): embeddings, stat_<name>, surveys, keys, meta (JSON)."""
    path = Path(path)
    arrays = {"embeddings": np.asarray(reference.embeddings, np.float32),
              "meta": np.array(json.dumps(reference.meta or {}, sort_keys=True))}
    arrays.update({f"stat_{name}": np.asarray(values, np.float64) for name, values in reference.stats.items()})
    if reference.surveys is not None:
        arrays["surveys"] = np.asarray(reference.surveys, dtype=str)
    if keys is not None:
        arrays["keys"] = np.asarray(keys, dtype=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def load_reference(path: str | Path, max_rows: int | None = MAX_REFERENCE, seed: int = 0,
                   surveys: list[str] | None = None) -> Reference:
    """A reference written by `python -m eval drift reference` (.npz), or an embedding store of `eval predict
    --embeddings` (zarr; no image statistics). Only the rows of `surveys` when given; of more than `max_rows` rows,
    a seeded uniform subset (None: all)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"drift reference {path} does not exist; write one with `python -m eval drift reference` "
                         "or `python -m eval predict --embeddings`")
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                files = dict(data)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is not a drift reference .npz ({err})") from None
        if "embeddings" not in files:
            raise ValueError(f"{path} holds no `embeddings` array: not a drift reference")
        owner = files.get("surveys")
        rows = _chosen_rows(path, owner, len(files["embeddings"]), surveys, max_rows, seed)
        stats = {name[5:]: files[name][rows] for name in files if name.startswith("stat_")}
        meta = json.loads(str(files["meta"])) if "meta" in files else {}
        return Reference(files["embeddings"][rows], stats, None if owner is None else owner[rows], meta)
    from eval.store import open_embeddings
    from eval.thumbnails import survey_of

    array, keys, attrs = open_embeddings(path)
    known = sorted(set(store_surveys(attrs)) | set(surveys or []))
    owner = np.array([survey_of(key, known) or "" for key in keys], dtype=str) if known else None
    rows = _chosen_rows(path, owner, len(keys), surveys, max_rows, seed)
    return Reference(np.asarray(array.oindex[rows], np.float32), {}, None if owner is None else owner[rows],
                     {"store": str(path)})


def _chosen_rows(path: Path, owner: np.ndarray | None, count: int, surveys: list[str] | None, max_rows: int | None,
                 seed: int) -> np.ndarray:
    rows = np.arange(count)
    if surveys:
        if owner is None:
            raise ValueError(f"{path} does not say which survey each row is; leave out the survey filter")
        missing = sorted(set(surveys) - set(owner.tolist()))
        if missing:
            raise ValueError(f"{path} has no rows of {missing} (it has {sorted(set(owner.tolist()) - {''})})")
        rows = np.flatnonzero(np.isin(owner, surveys))
    return rows[subsample(len(rows), max_rows, seed)]


def store_surveys(attrs: dict) -> list[str]:
    """The surveys an embedding store's predictions covered (from the provenance of each run it holds)."""
    found = set()
    for run in attrs.get("runs", []):
        inputs = run.get("inputs", {})
        found |= set(inputs.get("manifests", {})) | ({inputs["survey"]} if "survey" in inputs else set())
    return sorted(found)


# --- the online monitor -----------------------------------------------------------------------------------------

@dataclass
class _Baseline:
    label: str  # which reference rows: the survey's own, or all
    knn_median: float
    stats: dict[str, tuple[float, float]]  # name -> (median, spread)


def _log_alert(message: str) -> None:
    log.warning(message)


class DriftMonitor:
    """Rolling drift scores per survey over its last `window` images, with alerts; thread-safe.

    Scores, once `min_count` images of a survey are in its window (NaN before):
    - `knn_ratio`: median kNN distance of the window's embeddings over the reference's own leave-one-out
      median (1 without drift); the reference rows of the same survey set the denominator where the reference
      has them, all its rows otherwise (a survey it never saw);
    - each image statistic (`image_stats`): |window median - reference median| / reference IQR (floored at
      SCALE_FLOOR), against the same reference rows: how many reference spreads the typical image has moved.
    A score first above its threshold calls `alert` once (default: logging.warning) with the survey, statistic,
    score and threshold; it re-arms when the score falls back to the threshold or below.
    """

    def __init__(self, reference: Reference, window: int = 256, thresholds: dict[str, float] | None = None,
                 min_count: int = 32, alert: Callable[[str], None] | None = None) -> None:
        if not 1 <= min_count <= window:
            raise ValueError(f"need 1 <= min_count <= window, got min_count {min_count} and window {window}")
        unknown = set(thresholds or {}) - set(DEFAULT_THRESHOLDS)
        if unknown:
            raise ValueError(f"unknown drift statistics {sorted(unknown)} in thresholds; known: "
                             f"{sorted(DEFAULT_THRESHOLDS)}")
        self.reference, self.window, self.min_count = reference, window, min_count
        self.thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
        self.alert = alert or _log_alert
        self.space = EmbeddingSpace(reference.embeddings)
        self.stat_names = [s for s in STAT_NAMES if s in reference.stats]
        owners = reference.surveys if reference.surveys is not None else np.full(len(reference.embeddings), "")
        self._pooled = self._make_baseline(np.ones(len(owners), bool), "all reference rows")
        self._baselines = {s: self._make_baseline(owners == s, f"the reference's {s} rows")
                           for s in sorted(set(owners.tolist()) - {""})}
        self._windows: dict[str, dict[str, deque]] = {}
        self._scores: dict[tuple[str, str], float] = {}
        self._firing: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def _make_baseline(self, rows: np.ndarray, label: str) -> _Baseline:
        """The reference's kNN median (leave-one-out, from a seeded sample of BASELINE_ROWS rows) and each image
        statistic's median and IQR, over `rows`."""
        where = np.flatnonzero(rows)
        loo = self.space.leave_one_out(where[subsample(len(where), BASELINE_ROWS, 0)])
        spreads = {}
        for name in self.stat_names:
            values = np.asarray(self.reference.stats[name], np.float64)[rows]
            values = values[np.isfinite(values)]
            if len(values):
                q25, q50, q75 = np.percentile(values, [25, 50, 75])
                spreads[name] = (float(q50), max(float(q75 - q25), SCALE_FLOOR.get(name, 0.0), 1e-12))
        return _Baseline(label, float(np.median(loo)), spreads)

    def _baseline(self, survey: str) -> _Baseline:
        """The survey's own reference rows where the reference has them, else all rows (a survey it never saw)."""
        return self._baselines.get(survey) or replace(self._pooled, label=f"all reference rows ({survey} is not "
                                                                         "in the reference)")

    def update(self, survey: str, embeddings: np.ndarray, stats: dict[str, np.ndarray]) -> None:
        """Add a batch of one survey's images: their (n, D) embeddings and image_stats (names not in the reference
        are ignored; a missing one just gets no new values)."""
        distances = self.space.distances(embeddings)  # outside the lock: the slow part; the reference is read-only
        columns = {KNN: distances}
        for name in self.stat_names:
            if name in stats:
                values = np.asarray(stats[name], np.float64).reshape(-1)
                if len(values) != len(distances):
                    raise ValueError(f"stats[{name!r}] has {len(values)} values for {len(distances)} embeddings")
                columns[name] = values
        messages = []
        with self._lock:
            windows = self._windows.setdefault(survey, {})
            for name, values in columns.items():
                windows.setdefault(name, deque(maxlen=self.window)).extend(values.tolist())
            for name in columns:
                messages += self._rescore(survey, name)
        for message in messages:
            self.alert(message)

    def _rescore(self, survey: str, name: str) -> list[str]:
        values = np.fromiter(self._windows[survey][name], np.float64)
        values = values[np.isfinite(values)]
        base = self._baseline(survey)
        if len(values) < self.min_count or (name != KNN and name not in base.stats):
            score = math.nan
        elif name == KNN:
            score = float(np.median(values) / max(base.knn_median, 1e-12))
        else:
            median, spread = base.stats[name]
            score = abs(float(np.median(values)) - median) / spread
        self._scores[(survey, name)] = score
        threshold, key = self.thresholds[name], (survey, name)
        if score > threshold and key not in self._firing:
            self._firing.add(key)
            return [f"drift alert: survey {survey!r} statistic {name} score {score:.3g} is above its threshold "
                    f"{threshold:.3g} over the last {len(values)} images (against {base.label})"]
        if not score > threshold and key in self._firing and not math.isnan(score):
            self._firing.discard(key)
            log.info("drift: survey %r statistic %s back to %.3g (threshold %.3g)", survey, name, score, threshold)
        return []

    def scores(self) -> dict[tuple[str, str], float]:
        """(survey, statistic) -> the current score over its rolling window (NaN until min_count images)."""
        with self._lock:
            return dict(self._scores)

    def firing(self) -> set[tuple[str, str]]:
        """The (survey, statistic) pairs above their threshold now."""
        with self._lock:
            return set(self._firing)
