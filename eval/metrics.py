"""Regression metrics by feature with bootstrap intervals, noise ceilings, accuracy, predictive calibration.

Pure numpy/scipy over (galaxies x features) arrays with a validity mask. The bootstrap resamples galaxies:
a resample is a row of count weights (how often each galaxy was drawn), so every statistic of a resample is a
weighted statistic of the original arrays, all features and all models of one resample share the same draw
(paired comparisons), and an absent label simply carries no weight.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy.stats import betabinom, binom

METRICS = ("r", "spearman", "r2", "mae", "mse")
CONFIDENT_FRACTION = 0.8  # Walmsley et al. 2022: volunteers agree on one answer at > 80%
MIN_COUNT = 3  # fewer labelled galaxies than this: correlations are undefined (NaN)
MIN_VOTES = 2  # a fraction from fewer votes is 0 or 1 and gives no estimate of its own binomial noise
MAX_CHUNK_CELLS = 4_000_000  # bootstrap rows x galaxies held at once: bounds memory for big surveys


def bootstrap_weights(num_galaxies: int, num_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """(b, n) float64 count matrices, b rows per chunk, num_resamples rows in all; seeded, so reproducible."""
    rng = np.random.default_rng(seed)
    chunk = max(1, MAX_CHUNK_CELLS // max(num_galaxies, 1))
    for start in range(0, num_resamples, chunk):
        b = min(chunk, num_resamples - start)
        draws = rng.integers(0, num_galaxies, size=(b, num_galaxies))
        draws += (np.arange(b) * num_galaxies)[:, None]
        yield np.bincount(draws.ravel(), minlength=b * num_galaxies).reshape(b, num_galaxies).astype(np.float64)


def _moment_metrics(w: np.ndarray, pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Weighted r, R^2, MAE, MSE for weights (b, n) over (n, F) arrays: each (b, F), NaN where undefined."""
    m = mask.astype(np.float64)
    p, t = np.where(mask, pred, 0.0), np.where(mask, target, 0.0)
    n = w @ m
    sp, st = w @ p, w @ t
    spp, stt, spt = w @ (p * p), w @ (t * t), w @ (p * t)
    err = p - t
    sae, sse = w @ np.abs(err), w @ (err * err)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = spt - sp * st / n
        var_p, var_t = spp - sp * sp / n, stt - st * st / n
        scale = np.maximum(np.abs(stt), 1.0)  # variances below float64 noise of the sums count as zero
        defined = (n >= MIN_COUNT) & (var_p > 1e-12 * np.maximum(np.abs(spp), 1.0)) & (var_t > 1e-12 * scale)
        r = np.where(defined, cov / np.sqrt(np.abs(var_p * var_t)), np.nan)
        r2 = np.where(defined, 1.0 - sse / var_t, np.nan)
        has = n > 0
        return {"r": np.clip(r, -1.0, 1.0), "r2": r2, "mae": np.where(has, sae / n, np.nan),
                "mse": np.where(has, sse / n, np.nan), "n": n}


def _mid_ranks(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(b, n) average ranks of `values` within each weighted resample (ties share their mean rank)."""
    groups, inverse = np.unique(values, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0])
    group_weight = np.add.reduceat(w[:, order], starts, axis=1)  # (b, groups)
    before = np.cumsum(group_weight, axis=1) - group_weight
    assert group_weight.shape[1] == len(groups)
    return before[:, inverse] + (group_weight[:, inverse] + 1.0) / 2.0


def _weighted_pearson(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    n = w.sum(axis=1)
    mx, my = (w * x).sum(axis=1) / n, (w * y).sum(axis=1) / n
    dx, dy = x - mx[:, None], y - my[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (w * dx * dy).sum(axis=1) / np.sqrt((w * dx * dx).sum(axis=1) * (w * dy * dy).sum(axis=1))
    return np.where(n >= MIN_COUNT, np.clip(r, -1.0, 1.0), np.nan)


def _spearman(w: np.ndarray, pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(b, F) weighted Spearman rho: Pearson r of mid-ranks within each resample."""
    out = np.full((w.shape[0], pred.shape[1]), np.nan)
    for j in range(pred.shape[1]):
        rows = mask[:, j]
        if rows.sum() < MIN_COUNT:
            continue
        wj = w[:, rows]
        out[:, j] = _weighted_pearson(wj, _mid_ranks(pred[rows, j], wj), _mid_ranks(target[rows, j], wj))
    return out


def metric_arrays(w: np.ndarray, pred: np.ndarray, target: np.ndarray, mask: np.ndarray,
                  spearman: bool = True) -> dict[str, np.ndarray]:
    """Every metric of METRICS (and n) for each resample row of `w` and each feature: (b, F) arrays.

    Spearman needs ranks within every resample, the costly part: `spearman=False` leaves it out."""
    mask = mask & np.isfinite(pred) & np.isfinite(target)
    out = _moment_metrics(w, pred, target, mask)
    if spearman:
        out["spearman"] = _spearman(w, pred, target, mask)
    return out


def interval(samples: np.ndarray, level: float = 0.95) -> list[float]:
    """Percentile interval of bootstrap samples (NaN when most resamples are undefined)."""
    return _interval(np.asarray(samples, np.float64), level)


def _interval(samples: np.ndarray, level: float) -> list[float]:
    finite = samples[np.isfinite(samples)]
    if len(finite) < max(10, 0.5 * len(samples)):  # mostly undefined resamples: no honest interval
        return [float("nan"), float("nan")]
    tail = 100 * (1 - level) / 2
    return [float(v) for v in np.percentile(finite, [tail, 100 - tail])]


def _mean_over_features(values: np.ndarray) -> np.ndarray:
    """Row means over the features that are defined (NaN where none is)."""
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(values)
        return np.where(finite.any(axis=1), np.nansum(values, axis=1) / np.maximum(finite.sum(axis=1), 1), np.nan)


def mean_over_defined(values: np.ndarray) -> np.ndarray:
    """(b, k) to (b,): each row's mean over its finite entries (NaN where none is), e.g. over surveys."""
    return _mean_over_features(np.asarray(values, np.float64))


def bootstrap(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, *, num_resamples: int = 1000, seed: int = 0,
              metrics: tuple[str, ...] = METRICS) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(point, samples): each metric as (F,) on all galaxies and (num_resamples, F) over the seeded resamples.

    The same seed and galaxy count give the same resamples, so samples of two models (or two feature groups)
    taken with one seed are paired."""
    spearman = "spearman" in metrics
    point = {k: v[0] for k, v in metric_arrays(np.ones((1, len(pred))), pred, target, mask, spearman).items()}
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in metrics}
    if num_resamples > 0 and len(pred):
        for w in bootstrap_weights(len(pred), num_resamples, seed):
            arrays = metric_arrays(w, pred, target, mask, spearman)
            for k in metrics:
                chunks[k].append(arrays[k])
    samples = {k: np.concatenate(v) if v else np.full((0, pred.shape[1]), np.nan) for k, v in chunks.items()}
    return point, samples


def summarise(point: dict[str, np.ndarray], samples: dict[str, np.ndarray], columns: list[int] | None = None,
              level: float = 0.95) -> dict:
    """Mean over features (all, or the given columns) of each metric, with its interval: {m, m_ci, num_features}."""
    cols = slice(None) if columns is None else columns
    out: dict = {"num_features": int(np.isfinite(point["r"][cols]).sum())}
    for k in samples:
        out[k] = _float(_mean_over_features(point[k][None, cols])[0])
        out[f"{k}_ci"] = _interval(_mean_over_features(samples[k][:, cols]), level) if len(samples[k]) \
            else [float("nan")] * 2
    return out


def feature_table(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, names: list[str], *,
                  num_resamples: int = 1000, seed: int = 0, level: float = 0.95,
                  groups: dict[str, list[str]] | None = None, metrics: tuple[str, ...] = METRICS) -> dict:
    """{"features": {name: {n, r, r_ci, spearman, spearman_ci, r2, r2_ci, mae, mae_ci, mse, mse_ci}},
    "mean": {metric, metric_ci, num_features}, "groups": {group: mean over its features}}: point estimates on all
    galaxies, percentile bootstrap intervals; "samples" holds the resampled mean over features of each metric,
    "feature_point" and "feature_samples" each metric per feature ((F,) and (num_resamples, F) arrays)."""
    pred, target, mask = _check(pred, target, mask, names)
    point, samples = bootstrap(pred, target, mask, num_resamples=num_resamples, seed=seed, metrics=metrics)
    features = {}
    for j, name in enumerate(names):
        row: dict = {"n": int(point["n"][j])}
        for k in metrics:
            row[k] = _float(point[k][j])
            row[f"{k}_ci"] = _interval(samples[k][:, j], level) if num_resamples else [float("nan")] * 2
        features[name] = row
    out = {"features": features, "mean": summarise(point, samples, level=level),
           "samples": {k: _mean_over_features(v) for k, v in samples.items()},
           "feature_point": point, "feature_samples": samples}
    if groups:
        index = {name: j for j, name in enumerate(names)}
        out["groups"] = {g: summarise(point, samples, [index[f] for f in fs if f in index], level)
                         for g, fs in groups.items() if any(f in index for f in fs)}
    return out


def paired_differences(preds: list[np.ndarray], target: np.ndarray, mask: np.ndarray, *, num_resamples: int = 1000,
                       seed: int = 0, level: float = 0.95, metrics: tuple[str, ...] = ("r", "mae"),
                       groups: dict[str, list[int]] | None = None) -> dict:
    """Mean-over-features metric of model i minus model j on the same resamples, for every pair i < j.

    Each difference averages the features both models define in that resample (a feature whose r is undefined
    for one of them, e.g. a constant prediction, leaves the pair's mean), so it never compares two feature sets.

    {(i, j): {metric: {"diff": x, "ci": [lo, hi], "p_gt0": share of resamples with a positive difference},
    "groups": {group: {metric: ...}}}} (groups: columns whose mean is compared, e.g. a question's answers).
    """
    runs = [bootstrap(p, target, mask, num_resamples=num_resamples, seed=seed, metrics=metrics) for p in preds]
    sets = {None: None, **(groups or {})}
    out = {}
    for i in range(len(preds)):
        for j in range(i + 1, len(preds)):
            result: dict = {"groups": {}}
            for group, cols in sets.items():
                c = slice(None) if cols is None else cols
                entry = {}
                for k in metrics:
                    diff = _shared_mean_difference(runs[i][1][k][:, c], runs[j][1][k][:, c])
                    d0 = _shared_mean_difference(runs[i][0][k][None, c], runs[j][0][k][None, c])[0]
                    finite = diff[np.isfinite(diff)]
                    entry[k] = {"diff": _float(d0), "ci": _interval(diff, level),
                                "p_gt0": float(np.mean(finite > 0)) if len(finite) else float("nan")}
                if group is None:
                    result.update(entry)
                else:
                    result["groups"][group] = entry
            out[(i, j)] = result
    return out


def _shared_mean_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row means of a - b over the features defined (finite) in both a and b: (b, F) arrays to (b,)."""
    both = np.isfinite(a) & np.isfinite(b)
    return _mean_over_features(np.where(both, a - b, np.nan))


def shared_mean_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Public form of the paired rule: (b, F) per-feature metrics of two sides to (b,) mean differences over the
    features both define (e.g. in-distribution minus held-out r, resample by resample)."""
    return _shared_mean_difference(np.atleast_2d(a), np.atleast_2d(b))


def noise_ceiling_r(fraction: np.ndarray, total_votes: np.ndarray) -> float:
    """The highest Pearson r any model can reach against vote fractions from a finite number of volunteers.

    With f_obs = k / N and k ~ Binomial(N, f_true), the best prediction is f_true and
    corr(f_true, f_obs)^2 = var(f_true) / var(f_obs) = 1 - E[f_true (1 - f_true) / N] / var(f_obs), where
    f_obs (1 - f_obs) / (N - 1) estimates f_true (1 - f_true) / N without bias. Needs only fractions and vote
    totals, so it works on real catalogs. Real volunteers are over-dispersed relative to the binomial, so this is an
    upper bound on what is reachable. It is the ceiling of r on exactly the galaxies given: give it the galaxies r
    was computed on. A galaxy with fewer than MIN_VOTES votes (or none recorded) carries no estimate of its own
    noise, so its presence makes the ceiling undefined (NaN) rather than one over other galaxies.
    """
    f = np.asarray(fraction, np.float64)
    n = np.asarray(total_votes, np.float64)
    if not (np.isfinite(f).all() and np.isfinite(n).all() and (n >= MIN_VOTES).all()) or len(f) < MIN_COUNT:
        return float("nan")
    var = f.var()
    if var <= 1e-12:  # constant labels (up to rounding): no correlation is defined
        return float("nan")
    noise = np.mean(f * (1.0 - f) / (n - 1.0))
    return float(np.sqrt(max(0.0, 1.0 - noise / var)))


def confident_accuracy(pred: np.ndarray, target: np.ndarray, threshold: float = CONFIDENT_FRACTION) -> tuple[float, int]:
    """Share of galaxies whose volunteers agree on one answer (fraction > threshold) where the model's most
    likely answer is that one; and how many such galaxies there are. (n, k) fractions of one question;
    a predicted "other" share (1 - sum) counts as one more answer the model may pick."""
    pred = np.asarray(pred, np.float64)
    target = np.asarray(target, np.float64)
    ok = np.isfinite(target).all(axis=1) & np.isfinite(pred).all(axis=1)
    confident = ok & (np.nan_to_num(target, nan=0.0).max(axis=1) > threshold)
    if not confident.any():
        return float("nan"), 0
    other = np.clip(1.0 - pred.sum(axis=1, keepdims=True), 0.0, None)
    choice = np.argmax(np.hstack([pred, other]), axis=1)
    agree = choice[confident] == np.argmax(target[confident], axis=1)
    return float(agree.mean()), int(confident.sum())


COVERAGE_LEVELS = (0.5, 0.68, 0.8, 0.9, 0.95, 0.99)


def binomial_mixture_cdf(votes: np.ndarray, total: np.ndarray, p_samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P(K < k), P(K <= k)) of the votes K an answer gets from `total` volunteers, K ~ Binomial(total, p) with p
    one of the model's MC samples (S, ...) at random: the model's spread plus each galaxy's own vote noise."""
    p = np.clip(np.asarray(p_samples, np.float64), 0.0, 1.0)
    return binom.cdf(votes - 1, total, p).mean(axis=0), binom.cdf(votes, total, p).mean(axis=0)


def beta_binomial_mixture_cdf(votes: np.ndarray, total: np.ndarray, alpha: np.ndarray,
                              alpha_total: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P(K < k), P(K <= k)) under the Dirichlet-multinomial predictive of a Dirichlet model: an answer's votes are
    BetaBinomial(total, alpha_j, A - alpha_j) (its marginal), mixed over the MC samples (S, ...) of alpha_j and A."""
    a = np.asarray(alpha, np.float64)
    b = np.maximum(np.asarray(alpha_total, np.float64) - a, 1e-30)
    return betabinom.cdf(votes - 1, total, a, b).mean(axis=0), betabinom.cdf(votes, total, a, b).mean(axis=0)


def predictive_coverage(below: np.ndarray, at: np.ndarray,
                        levels: tuple[float, ...] = COVERAGE_LEVELS) -> list[dict]:
    """Share of observed vote counts inside the central predictive interval of each nominal level.

    `below`, `at` are P(K < k) and P(K <= k) of each observed count k under its predictive distribution. Counts are
    discrete, so an interval edge can fall inside the step at k: the randomised PIT u ~ U(below, at) splits that
    step, and each galaxy counts with the probability that u lies in [(1 - level) / 2, (1 + level) / 2]. A
    predictive equal to the truth makes u uniform, so its coverage is the nominal level, whatever the vote counts.
    """
    below, at = np.asarray(below, np.float64).ravel(), np.asarray(at, np.float64).ravel()
    ok = np.isfinite(below) & np.isfinite(at)
    below, at = below[ok], at[ok]
    width = at - below
    out = []
    for level in levels:
        lo, hi = (1 - level) / 2, (1 + level) / 2
        overlap = np.clip(np.minimum(at, hi) - np.maximum(below, lo), 0.0, None)
        inside = np.where(width > 0, overlap / np.where(width > 0, width, 1.0), 0.0)
        out.append({"nominal": level, "coverage": float(inside.mean()) if len(inside) else float("nan")})
    return out


def _check(pred, target, mask, names) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    mask = np.asarray(mask, bool)
    if pred.ndim != 2 or pred.shape != target.shape or pred.shape != mask.shape or pred.shape[1] != len(names):
        raise ValueError(f"shapes differ: pred {pred.shape}, target {target.shape}, mask {mask.shape}, "
                         f"{len(names)} names")
    return pred, target, mask


def _float(value) -> float:
    return float(value) if value is not None and np.isfinite(value) else float("nan")
