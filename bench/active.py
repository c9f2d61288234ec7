"""Benchmark: how many volunteer labels active learning saves (issue 20), simulated with the mock votes as oracle.

The scenario is a survey team starting on a new survey (DECaLS here) with a model of earlier surveys:
1. mock SDSS, DECaLS, HST (launch.demo's); a base model (configs/train/cpu.yaml) trained on all SDSS+HST labels;
2. for each seed: a start set of 5% of DECaLS's train split (a seeded hash of the key); then rounds of
   fine-tune (the CPU recipe from the base backbone, `data.include_keys` = the labelled set, head dropout 0.2 for
   the MC passes) -> score on the fixed DECaLS test split -> `python -m eval select` picks the next batch from
   the rest of the train split (--exclude the labelled set) -> the picks join the labelled set;
   every strategy (random, uncertainty, diversity, hybrid) runs its own chain from the same start set;
3. the reference: the same fine-tuning with every train label (random selection's end point), per seed.
Labels saved by a strategy = 1 - L / N: L the labels at which its seed-averaged curve (linear between rounds) first
reaches the seed-averaged reference, N the train split (per seed too). A curve that never reaches it within the rounds gives only a bound
(saved < 1 - L_max / N). Every mean r has a 95% bootstrap interval over test galaxies; the saved share has one too
(the same resamples for the curve and the reference), and so has each strategy's paired difference from random at
the same labels. Runs are kept under --out; a re-run skips what is done.

    python bench/active.py --out runs/bench_active                   # 1,500 galaxies per survey, 3 seeds
    python bench/active.py --out /tmp/a --num-galaxies 300 --base-steps 40 --ft-steps 30 --seeds 0 \\
        --fractions 0.1,0.2 --bootstrap 50                            # smoke test, ~3 minutes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.learning import bootstrap_weights, interval, weighted_mean_r  # noqa: E402
from bench.report import write_report  # noqa: E402
from bench.probes import CPU, labels, model_predictions  # noqa: E402
from bench.ssl_bench import train  # noqa: E402
from bench.ssl_data import fingerprint_shards, fresh_shards  # noqa: E402

STRATEGIES = ("random", "uncertainty", "diversity", "hybrid")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_active"))
    parser.add_argument("--num-galaxies", type=int, default=1500, help="per mock survey")
    parser.add_argument("--survey", default="decals", help="the new survey whose labels are chosen")
    parser.add_argument("--base-mix", default="sdss=0.5,hst=0.5", help="the earlier surveys' model")
    parser.add_argument("--base-steps", type=int, default=800)
    parser.add_argument("--ft-steps", type=int, default=300, help="fine-tuning steps of every round")
    parser.add_argument("--ft-batch", type=int, default=32,
                        help="fine-tuning global batch (capped at the start set: a batch never repeats a galaxy)")
    parser.add_argument("--fractions", default="0.05,0.1,0.2,0.4",
                        help="labelled share of the train split after each round (the first: the random start)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--mc-samples", type=int, default=10)
    parser.add_argument("--dropout", type=float, default=0.2, help="head dropout of the fine-tuned models (MC)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "active.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "images" / "active_learning.png")
    args = parser.parse_args(argv)
    args.seed = 0  # train()'s run seed; each chain's own seed goes in its overrides
    return args


def make_data(args: argparse.Namespace) -> Path:
    shards = fresh_shards(args)
    fingerprint_shards(args, shards)
    return shards


def train_keys(shards: Path, survey: str) -> list[str]:
    table = pd.read_parquet(shards / survey / "labels.parquet", columns=["key", "split"])
    return sorted(table.loc[table["split"] == "train", "key"])


def start_set(keys: list[str], count: int, seed: int) -> list[str]:
    from eval.select import random_scores
    return [keys[i] for i in np.argsort(random_scores(keys, seed + 7919), kind="stable")[:count]]


def finetune(name: str, shards: Path, base: Path, seed: int, keys_file: Path | None,
             args: argparse.Namespace) -> Path:
    overrides = ["stage=full", f"data.mix={args.survey}=1.0", f"data.loader.shard_root={shards}",
                 f"max_steps={args.ft_steps}", f"seed={seed}", "val_every=1000000",
                 f"data.global_batch_size={args.ft_batch}",
                 f"model_overrides=[pretrained={base / 'export' / 'backbone'},head.dropout={args.dropout}]"]
    if keys_file is not None:
        overrides.append(f"data.include_keys=[{keys_file}]")
    return train(name, CPU, overrides, args)


def select(run: Path, shards: Path, strategy: str, budget: int, labelled: Path, out: Path, seed: int,
           args: argparse.Namespace) -> list[str]:
    from eval import select_job
    argv = ["--model", str(run), "--pool", str(shards), "--surveys", args.survey, "--split", "train",
            "--budget", str(budget), "--strategy", strategy, "--exclude", str(labelled), "--out", str(out),
            "--mc-samples", str(args.mc_samples), "--seed", str(seed), "--device", "cpu", "--no-progress",
            "--sheet-size", "0"]
    if select_job.main(argv):
        raise RuntimeError(f"eval select failed: {' '.join(argv)}")
    return pd.read_parquet(out)["key"].tolist()


def chain(strategy: str, seed: int, shards: Path, base: Path, counts: list[int], args: argparse.Namespace) -> list:
    """[(labels, run folder)] of one strategy's rounds; round 0 (the random start) is shared by all strategies."""
    keys = train_keys(shards, args.survey)
    work = args.out / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    labelled = start_set(keys, counts[0], seed)
    start = work / "labelled_0.txt"
    start.write_text("\n".join(labelled) + "\n")
    rounds = [(len(labelled), finetune(f"seed{seed}/round0", shards, base, seed, start, args))]
    for r, count in enumerate(counts[1:], start=1):
        before = work / strategy / f"labelled_{r - 1}.txt"
        before.parent.mkdir(parents=True, exist_ok=True)
        before.write_text("\n".join(labelled) + "\n")
        picks = select(rounds[-1][1], shards, strategy, count - len(labelled), before,
                       work / strategy / f"picks_{r}.parquet", seed * 100 + r, args)
        assert not set(picks) & set(labelled)
        labelled = labelled + picks
        now = work / strategy / f"labelled_{r}.txt"
        now.write_text("\n".join(labelled) + "\n")
        rounds.append((len(labelled), finetune(f"seed{seed}/{strategy}/round{r}", shards, base, seed, now, args)))
    return rounds


def resampled_r(run: Path, shards: Path, args: argparse.Namespace, weights: np.ndarray) -> np.ndarray:
    """Mean r on the test split for the point estimate and every bootstrap resample (rows of `weights`)."""
    keys, target = labels(shards, args.survey, "test")
    pred_keys, pred = model_predictions(run, shards, args.survey, "test")
    order = {k: i for i, k in enumerate(pred_keys)}
    return weighted_mean_r(pred[[order[k] for k in keys]], np.nan_to_num(target), np.isfinite(target), weights)


def labels_to_reach(counts: list[int], values: np.ndarray, target: float) -> float:
    """Labels at which the piecewise-linear curve first reaches target; inf if it never does."""
    if values[0] >= target:
        return float(counts[0])
    for (n0, v0), (n1, v1) in zip(zip(counts, values), zip(counts[1:], values[1:])):
        if v1 >= target:
            return float(n0 + (n1 - n0) * (target - v0) / (v1 - v0))
    return float("inf")


def saved(counts: list[int], curve: np.ndarray, reference: np.ndarray, total: int) -> np.ndarray:
    """1 - L / N for the point estimate and each resample; -inf where the curve never reaches the reference."""
    needed = np.array([labels_to_reach(counts, curve[:, b], reference[b]) for b in range(curve.shape[1])])
    return 1.0 - needed / total


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None  # JSON has no -inf: None is "never reached"


def _share(value: float | None) -> str:
    return "n.r." if value is None else f"{value:.0%}"


def summarise(curves: dict, references: dict, counts: list[int], total: int) -> list[dict]:
    """Rows: each strategy's curve (mean r over seeds, per round), its paired difference from random at the same
    labels, the labels it saves (on the seed-averaged curve against the seed-averaged reference; per seed too),
    and the reference. Intervals: 95% over the bootstrap resamples of test galaxies, the same for every arm."""
    rows, seeds = [], sorted(references)
    ref = np.stack([references[s] for s in seeds]).mean(0)  # (1 + B,)
    mean_curves = {name: np.stack([per_seed[s] for s in seeds]).mean(0) for name, per_seed in curves.items()}
    for strategy, per_seed in curves.items():
        curve = mean_curves[strategy]  # (rounds, 1 + B)
        for r, count in enumerate(counts):
            rows.append({"kind": "curve", "strategy": strategy, "labels": count, "share": count / total,
                         **interval(curve[r]), "per_seed": [float(per_seed[s][r, 0]) for s in seeds]})
            if strategy != "random" and "random" in mean_curves and r:
                diff = curve[r] - mean_curves["random"][r]
                rows.append({"kind": "vs_random", "strategy": strategy, "labels": count, **interval(diff),
                             "p_gt0": float((diff[1:] > 0).mean())})
        shares = saved(counts, curve, ref, total)
        # No interpolation between order statistics: a bound may be -inf (resamples that never reach the reference).
        lo, hi = np.quantile(shares[1:], [0.025, 0.975], method="inverted_cdf")
        per_seed_saved = [saved(counts, per_seed[s][:, :1], references[s][:1], total)[0] for s in seeds]
        rows.append({"kind": "saved", "strategy": strategy, "saved": _finite(shares[0]), "lo": _finite(lo),
                     "hi": _finite(hi), "reached_share": float(np.isfinite(shares[1:]).mean()),
                     "per_seed": [_finite(v) for v in per_seed_saved],
                     "bound_if_not_reached": 1.0 - counts[-1] / total})
    rows.append({"kind": "reference", "strategy": "random, every label", "labels": total, **interval(ref),
                 "per_seed": [float(references[s][0]) for s in seeds]})
    return rows


def print_tables(rows: list[dict], counts: list[int]) -> None:
    curves = [r for r in rows if r["kind"] == "curve"]
    print("\nmean r on the test split (mean of seeds, 95% bootstrap interval over test galaxies)")
    print("| strategy | " + " | ".join(f"{n} labels" for n in counts) + " |")
    print("| --- |" + " ---: |" * len(counts))
    for strategy in dict.fromkeys(r["strategy"] for r in curves):
        cells = [f"{r['r']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]" for r in curves if r["strategy"] == strategy]
        print(f"| {strategy} | " + " | ".join(cells) + " |")
    ref = next(r for r in rows if r["kind"] == "reference")
    print(f"| random, all {ref['labels']} labels | {ref['r']:.3f} [{ref['lo']:.3f}, {ref['hi']:.3f}] |")
    print("\nstrategy - random at the same labels (mean of seeds; 95% interval; share of resamples > 0)")
    print("| strategy | " + " | ".join(f"{n} labels" for n in counts[1:]) + " |")
    print("| --- |" + " ---: |" * len(counts[1:]))
    diffs = [r for r in rows if r["kind"] == "vs_random"]
    for strategy in dict.fromkeys(r["strategy"] for r in diffs):
        cells = [f"{r['r']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] ({r['p_gt0']:.0%})" for r in diffs
                 if r["strategy"] == strategy]
        print(f"| {strategy} | " + " | ".join(cells) + " |")
    print("\nlabels saved to reach the all-label r (target 80%; the seed-averaged curve against the seed-averaged "
          "reference)")
    print("| strategy | saved | 95% interval (n.r.: not reached) | resamples reaching it | per seed |")
    print("| --- | ---: | ---: | ---: | --- |")
    for r in (r for r in rows if r["kind"] == "saved"):
        value = _share(r["saved"]) if r["saved"] is not None else f"< {r['bound_if_not_reached']:.0%} (not reached)"
        span = f"[{_share(r['lo'])}, {_share(r['hi'])}]"
        seeds = ", ".join(_share(v) for v in r["per_seed"])
        print(f"| {r['strategy']} | {value} | {span} | {r['reached_share']:.0%} | {seeds} |")


def plot(rows: list[dict], path: Path, survey: str) -> None:
    from eval import plots
    series = {}
    for r in (r for r in rows if r["kind"] == "curve"):
        x, v, ci = series.setdefault(r["strategy"], ([], [], []))
        x.append(r["labels"]), v.append(r["r"]), ci.append([r["lo"], r["hi"]])
    ref = next(r for r in rows if r["kind"] == "reference")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(plots.labels_curve(series, (ref["r"], [ref["lo"], ref["hi"]]),
                                        f"random, all {ref['labels']} labels",
                                        f"active learning on mock {survey}: mean r on the test split"))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    shards = make_data(args)
    keys = train_keys(shards, args.survey)
    fractions = [float(f) for f in args.fractions.split(",")]
    counts = [max(1, round(f * len(keys))) for f in fractions]
    if counts != sorted(set(counts)) or counts[-1] > len(keys):
        raise ValueError(f"--fractions must rise and stay within the train split: {counts} of {len(keys)}")
    args.ft_batch = min(args.ft_batch, counts[0] - counts[0] % args.nproc)
    strategies = [s for s in args.strategies.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{args.survey}: {len(keys)} train galaxies; rounds at {counts} labels; strategies {strategies}; "
          f"seeds {seeds}", flush=True)
    base = train("base", CPU, [f"data.mix={args.base_mix}", f"data.loader.shard_root={shards}",
                               f"max_steps={args.base_steps}", "val_every=1000000"], args)
    weights = bootstrap_weights(len(labels(shards, args.survey, "test")[0]), args.bootstrap, 12345)
    curves: dict[str, dict[int, np.ndarray]] = {s: {} for s in strategies}
    references = {}
    for seed in seeds:
        references[seed] = resampled_r(finetune(f"seed{seed}/all", shards, base, seed, None, args), shards, args,
                                       weights)
        for strategy in strategies:
            rounds = chain(strategy, seed, shards, base, counts, args)
            curves[strategy][seed] = np.stack([resampled_r(run, shards, args, weights) for _, run in rounds])
            print(f"  seed {seed} {strategy}: " + ", ".join(f"{n}: {v[0]:.3f}" for (n, _), v in
                                                             zip(rounds, curves[strategy][seed])), flush=True)
    rows = summarise(curves, references, counts, len(keys))
    print_tables(rows, counts)
    plot(rows, args.plot, args.survey)
    write_report(args.json, "active", rows, survey=args.survey, train_galaxies=len(keys), counts=counts,
                 seeds=seeds, ft_steps=args.ft_steps, ft_batch=args.ft_batch, base_steps=args.base_steps,
                 base_mix=args.base_mix,
                 mc_samples=args.mc_samples, dropout=args.dropout, num_galaxies=args.num_galaxies,
                 bootstrap=args.bootstrap, minutes=round((time.perf_counter() - started) / 60, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
