"""Benchmark: false-alarm and detection rates of the drift tests (eval.drift) on the mock surveys.

A tiny randomly initialised model (tests/eval_cases.make_export, 32 px inputs) embeds mock SDSS, HST and UKIDSS
galaxies built into 64 px shards. Reference: `drift reference` on SDSS train. New samples, each a seeded draw:
- SDSS test (and val): the same survey, galaxies the reference never saw: any alarm is a false alarm;
- HST, UKIDSS (all splits): other surveys: an alarm is a detection.
Offline (`compare_embeddings`): the verdict over --repeats draws of n galaxies, at two n. Online (`DriftMonitor`,
window 256, min_count 32, the default thresholds): a stream of --stream images per draw, in batches of 16; a
stream alarms when any statistic crosses its threshold; the largest score each statistic reached is kept, so the
table shows how far the defaults sit from the null's extremes and from the other surveys.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bench.report import write_report  # noqa: E402
from eval import drift  # noqa: E402
from eval.drift_job import build_reference  # noqa: E402

SURVEYS = {"sdss": 2400, "hst": 400, "ukidss": 400}
BATCH = 16


def build_data(work: Path, sizes: dict[str, int], seed: int) -> dict:
    """Mock surveys built into shards, a tiny export, and the embeddings + image stats of each sample."""
    from sharding import build
    from sharding.mock import main as mock_main
    from sharding.registry import load_survey
    from eval_cases import make_export

    shards = work / "shards"
    for survey, num in sizes.items():
        raw = work / "raw" / survey
        if not (shards / survey / "manifest.json").is_file():
            assert mock_main(["--survey", survey, "--num-galaxies", str(num), "--out", str(raw), "--seed", str(seed),
                              "--no-progress", "--overwrite"]) == 0
            catalog = raw / Path(load_survey(survey).catalog).name
            assert build.main(["--survey", survey, "--catalog", str(catalog), "--images", str(raw / "images"),
                               "--out", str(shards), "--image-size", "64", "--no-progress"]) == 0
    export = make_export(work / "export", shards, "sdss=1.0", seed=seed)
    samples = {"reference": build_reference(export, shards, ["sdss"], "train", 10**6, seed)[0]}
    samples["sdss held-out"] = _joined([build_reference(export, shards, ["sdss"], split, 10**6, seed)[0]
                                        for split in ("test", "val")])
    for survey in sizes:
        if survey != "sdss":
            samples[survey] = _joined([build_reference(export, shards, [survey], split, 10**6, seed)[0]
                                       for split in ("train", "val", "test")])
    return samples


def _joined(parts: list[drift.Reference]) -> drift.Reference:
    stats = {name: np.concatenate([p.stats[name] for p in parts]) for name in parts[0].stats}
    return drift.Reference(np.concatenate([p.embeddings for p in parts]), stats,
                           np.concatenate([p.surveys for p in parts]))


def offline(samples: dict, n: int, repeats: int, permutations: int) -> list[dict]:
    rows = []
    reference = samples["reference"].embeddings
    for name, sample in samples.items():
        if name == "reference":
            continue
        verdicts, ratios, mmd_p, mw_p = [], [], [], []
        for rep in range(repeats):
            pick = drift.subsample(len(sample.embeddings), n, 1000 + rep)
            out = drift.compare_embeddings(reference, sample.embeddings[pick], permutations=permutations, seed=rep,
                                           mmd_samples=500)
            verdicts.append(out["drift"])
            ratios.append(out["knn_ratio"])
            mmd_p.append(out["mmd_p"])
            mw_p.append(out["mann_whitney_p"])
        rows.append({"test": "offline", "new": name, "n": n, "pool": len(sample.embeddings), "draws": repeats,
                     "alarm_rate": float(np.mean(verdicts)), "knn_ratio_median": float(np.median(ratios)),
                     "mmd_p_below_0.05": float(np.mean(np.array(mmd_p) < 0.05)),
                     "mann_whitney_p_below_0.05": float(np.mean(np.array(mw_p) < 0.05))})
    return rows


def online(samples: dict, stream: int, repeats: int) -> list[dict]:
    rows = []
    reference = samples["reference"]
    for name, sample in samples.items():
        if name == "reference":
            continue
        fired: list[str] = []
        monitor = drift.DriftMonitor(reference, window=256, min_count=32, alert=fired.append)
        alarms, peaks = [], []  # per draw: did it alarm; each statistic's largest score
        for rep in range(repeats):
            # Each draw is a fresh stream under its own survey name (no reference rows of that name: it is compared
            # to all reference rows, here all SDSS), so one monitor serves every draw.
            stream_name, before, peak = f"draw{rep}", len(fired), {}
            pick = np.random.default_rng(2000 + rep).permutation(len(sample.embeddings))[:stream]
            for start in range(0, len(pick), BATCH):
                rows_now = pick[start:start + BATCH]
                monitor.update(stream_name, sample.embeddings[rows_now],
                               {k: v[rows_now] for k, v in sample.stats.items()})
                for (name_now, stat), score in monitor.scores().items():
                    if name_now == stream_name and np.isfinite(score):
                        peak[stat] = max(peak.get(stat, -np.inf), score)
            alarms.append(len(fired) > before)
            peaks.append(peak)
        stats = [s for s in [drift.KNN, *drift.STAT_NAMES] if s in peaks[0]]
        rows.append({"test": "online", "new": name, "n": min(stream, len(sample.embeddings)), "pool":
                     len(sample.embeddings), "draws": repeats, "alarm_rate": float(np.mean(alarms)),
                     **{f"alarm_rate_{s}": float(np.mean([p[s] > drift.DEFAULT_THRESHOLDS[s] for p in peaks]))
                        for s in stats},
                     **{f"max_{s}": float(np.max([p[s] for p in peaks])) for s in stats},
                     **{f"median_peak_{s}": float(np.median([p[s] for p in peaks])) for s in stats}})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="folder for the mock shards (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=100, help="draws per new sample")
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--stream", type=int, default=256, help="images per online stream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "drift.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        samples = build_data(args.work or Path(tmp), SURVEYS, args.seed)
    built = time.perf_counter() - start
    rows = offline(samples, 100, args.repeats, args.permutations) + offline(samples, 25, args.repeats,
                                                                           args.permutations)
    rows += online(samples, args.stream, args.repeats)
    print(f"\nreference: sdss train, {len(samples['reference'].embeddings)} galaxies; tiny random-init model, 32 px; "
          f"data built in {built:.0f} s, tests in {time.perf_counter() - start - built:.0f} s")
    print(f"{'test':<8}{'new':<15}{'n':>5}{'pool':>6}{'draws':>6}{'alarm rate':>12}  details")
    for row in rows:
        if row["test"] == "offline":
            detail = (f"kNN ratio {row['knn_ratio_median']:.3f}; p<0.05: MMD {row['mmd_p_below_0.05']:.2f}, "
                      f"Mann-Whitney {row['mann_whitney_p_below_0.05']:.2f}")
        else:
            detail = "alarm rate by statistic [largest score]: " + ", ".join(
                f"{s} {row['alarm_rate_' + s]:.2f} [{row['max_' + s]:.2f}]" for s in [drift.KNN, *drift.STAT_NAMES]
                if "max_" + s in row)
        print(f"{row['test']:<8}{row['new']:<15}{row['n']:>5}{row.get('pool', row['n']):>6}{row['draws']:>6}"
              f"{row['alarm_rate']:>12.2f}  {detail}")
    print(f"thresholds: {drift.DEFAULT_THRESHOLDS}")
    write_report(args.json, "drift", rows, surveys=SURVEYS, repeats=args.repeats, permutations=args.permutations,
                 stream=args.stream, seed=args.seed, thresholds=drift.DEFAULT_THRESHOLDS,
                 seconds_data=built, seconds_total=time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
