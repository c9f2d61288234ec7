"""Benchmark: how much the project's training learns in a wall budget, against a plain PyTorch loop.

On the same shards and the same training-time budget it runs (1) `python -m train` under torchrun with the
given config and overrides, then predicts every evaluation survey's whole val split from the run's export
through the loader's evaluation path, and (2) bench/plain_loop.py, a reference loop that uses nothing of the
project but the shard files. It prints per-survey mean Pearson r over the features, with bootstrap 95%
intervals (resampling galaxies) and the paired difference, and writes the rows as JSON.

    python bench/learning.py --shards data/learn/shards --budget-s 180 --config configs/train/cpu.yaml
    python bench/learning.py --budget-s 90 --methods pipeline --name lr3e-3 -- optim.lr=3e-3   # one factor
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import plain_loop  # noqa: E402
from bench.report import write_report  # noqa: E402

PROBE_STEPS = 24
"""Steps of the calibration run that measures a pipeline step's wall time (the first 8 are left out)."""


def weighted_mean_r(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, weights: np.ndarray,
                    min_count: int = 3) -> np.ndarray:
    """Mean over features of Pearson r, for each row of `weights` (B, N) (bootstrap counts); (B,) values.

    With weights of ones this is models.metrics.summary's mean r: NaN-free features with >= min_count labels
    and non-constant predictions and targets.
    """
    m = mask.astype(np.float64)
    p, t = np.where(mask, pred, 0.0).astype(np.float64), np.where(mask, target, 0.0).astype(np.float64)
    w = weights.astype(np.float64)
    n = w @ m
    with np.errstate(invalid="ignore", divide="ignore"):
        mp, mt = (w @ (m * p)) / n, (w @ (m * t)) / n
        cov = (w @ (m * p * t)) / n - mp * mt
        vp, vt = (w @ (m * p * p)) / n - mp ** 2, (w @ (m * t * t)) / n - mt ** 2
        r = cov / np.sqrt(vp * vt)
    r = np.where((n >= min_count) & (vp > 1e-12) & (vt > 1e-12), r, np.nan)
    return np.nanmean(r, axis=1)


def bootstrap_weights(num: int, num_resamples: int, seed: int) -> np.ndarray:
    """(1 + B, N) galaxy counts: the sample itself, then B resamples with replacement."""
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, num, num), minlength=num) for _ in range(num_resamples)])
    return np.vstack([np.ones(num), counts])


def interval(values: np.ndarray) -> dict:
    """Point value (row 0) and the 2.5/97.5 percentiles of the resamples."""
    rest = values[1:][np.isfinite(values[1:])]
    return {"r": float(values[0]), "lo": float(np.percentile(rest, 2.5)), "hi": float(np.percentile(rest, 97.5))}


def per_feature_r(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, names: list[str]) -> dict[str, float]:
    out = {}
    for j, name in enumerate(names):
        r = weighted_mean_r(pred[:, j:j + 1], target[:, j:j + 1], mask[:, j:j + 1], np.ones((1, len(pred))))[0]
        out[name] = None if not np.isfinite(r) else round(float(r), 4)
    return out


# --- the project's pipeline ---

def _train_command(args: argparse.Namespace, out_dir: Path, steps: int, overrides: list[str]) -> list[str]:
    from train.world import free_port
    train_args = ["--config", args.config, "--out-dir", str(out_dir), "--max-steps", str(steps),
                  f"data.loader.shard_root={args.shards}", f"data.mix={args.mix}", "data.val_max_samples=1000000",
                  f"val_every={10 ** 9}", f"checkpoint_every={10 ** 9}", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), "-m", "train", *train_args]


def _run_train(cmd: list[str], out_dir: Path) -> tuple[list[dict], float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(f"training failed ({' '.join(cmd)}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    (out_dir / "stdout.txt").write_text(result.stdout + result.stderr)
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()], wall


def calibrate_steps(args: argparse.Namespace, work: Path, overrides: list[str]) -> tuple[int, float]:
    """Steps that fit the budget, from the median step time of a short run of the same recipe."""
    out = work / "probe"
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    records, _ = _run_train(_train_command(args, out, PROBE_STEPS, overrides + ["data.val_max_samples=1"]), out)
    step_s = statistics.median(r["step_seconds"] for r in records if "event" not in r and r["step"] > 8)
    return max(1, int(args.budget_s / step_s)), step_s


@torch.no_grad()
def pipeline_predictions(run_dir: Path, surveys: list[str]) -> dict[str, tuple[list[str], np.ndarray]]:
    """Val-split fractions per survey from the run's export, through the resolved config's evaluation inputs."""
    from loaders.evaluation import iter_eval_batches
    from models.io import load_export
    from train.config import load_train_config
    cfg = load_train_config(run_dir / "config.yaml")
    model = load_export(run_dir / "export")
    out = {}
    for survey in surveys:
        keys, preds = [], []
        for batch in iter_eval_batches(cfg.data.loader, survey, "val", batch_size=64):
            preds.append(model.fractions(model(batch.images)).numpy())
            keys += batch.keys
        out[survey] = (keys, np.concatenate(preds))
    return out


def run_pipeline(args: argparse.Namespace, work: Path) -> dict:
    torch.set_num_threads(2)
    if args.steps or args.budget_s is None:
        from train.config import load_train_config
        steps, step_s = args.steps or load_train_config(args.config, args.overrides).max_steps, None
    else:
        steps, step_s = calibrate_steps(args, work, args.overrides)
    out = work / "pipeline"
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    records, wall = _run_train(_train_command(args, out, steps, args.overrides), out)
    train_s = sum(r["step_seconds"] for r in records if "event" not in r)
    logged = [r for r in records if r.get("event") == "validation"][-1]["surveys"]
    return {"steps": steps, "probe_step_seconds": step_s, "train_seconds": train_s, "wall_seconds": wall,
            "in_run_val_r": {s: v["r"] for s, v in logged.items()},
            "predictions": pipeline_predictions(out, args.eval_surveys)}


def run_plain(args: argparse.Namespace, val: dict[str, plain_loop.SplitData], budget_s: float) -> dict:
    cfg = plain_loop.PlainConfig(seed=args.seed)
    train_sets = [plain_loop.read_split(Path(args.shards) / s, "train", cfg.image_size) for s in args.mix_surveys]
    model, info = plain_loop.train(train_sets, budget_s, cfg)
    info["predictions"] = {s: (val[s].keys, plain_loop.predict(model, plain_loop.read_split(
        Path(args.shards) / s, "val", cfg.image_size))) for s in args.eval_surveys}
    return info


# --- tables ---

def score(method: str, result: dict, val: dict[str, plain_loop.SplitData], names: list[str],
          weights: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for survey in val:
        keys, pred = result["predictions"][survey]
        order = {k: i for i, k in enumerate(keys)}
        pred = pred[[order[k] for k in val[survey].keys]]  # align to the labels' key order
        target = val[survey].labels
        mask = np.isfinite(target)
        values = weighted_mean_r(pred, target, mask, weights[survey])
        rows.append({"method": method, "survey": survey, "n": len(target), **interval(values),
                     "resampled": values, "features": per_feature_r(pred, target, mask, names),
                     **{k: v for k, v in result.items() if k != "predictions"}})
    return rows


def print_tables(rows: list[dict], surveys: list[str], show: list[str]) -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["survey"]): r for r in rows}
    head = f"{'survey':<9}{'n':>5}" + "".join(f"{m + ' r [95% CI]':>28}" for m in methods)
    if len(methods) == 2:
        head += f"{'difference [95% CI]':>28}"
    print(head)
    for survey in surveys:
        cells = [by[(m, survey)] for m in methods]
        line = f"{survey:<9}{cells[0]['n']:>5}" + "".join(
            f"{c['r']:>12.3f} [{c['lo']:.3f}, {c['hi']:.3f}]" for c in cells)
        if len(methods) == 2:
            diff = interval(cells[0]["resampled"] - cells[1]["resampled"])
            line += f"{diff['r']:>+12.3f} [{diff['lo']:+.3f}, {diff['hi']:+.3f}]"
        print(line)
    for feature in show:
        print(f"{feature:<14}" + "".join(
            f"  {s}: " + " / ".join(f"{by[(m, s)]['features'][feature]}" for m in methods) for s in surveys))
    for m in methods:
        r = by[(m, surveys[0])]
        print(f"{m}: {r.get('steps')} steps, {r.get('train_seconds', 0):.0f} s training"
              + (f", {r['wall_seconds']:.0f} s wall with start-up and export" if "wall_seconds" in r else ""))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=str(REPO / "data" / "learn" / "shards"),
                        help="shard root with the mixed and evaluated surveys (see docs/BENCHMARKS.md)")
    parser.add_argument("--config", default=str(REPO / "configs" / "train" / "cpu.yaml"))
    parser.add_argument("--mix", default="sdss=0.33,decals=0.33,hst=0.34")
    parser.add_argument("--eval-surveys", default="sdss,decals,hst,ukidss")
    parser.add_argument("--budget-s", type=float,
                        help="training seconds for each method; the pipeline's steps then come from a short probe run "
                             "(approximate). Default: the pipeline runs its config's max_steps (or --steps) and the "
                             "plain loop trains for as long as the pipeline's steps took")
    parser.add_argument("--steps", type=int, help="pipeline steps (overrides max_steps and the budget's estimate)")
    parser.add_argument("--methods", default="pipeline,plain")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes for the pipeline")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the val galaxies")
    parser.add_argument("--seed", type=int, default=0, help="plain loop seed (the pipeline's is `seed=`)")
    parser.add_argument("--show", default="how-rounded_round", help="features whose r is printed too")
    parser.add_argument("--name", default="learning", help="run label, used in the work and JSON paths")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench_learning"))
    parser.add_argument("--json", help="default: bench/results/<name>.json")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides for python -m train")
    args = parser.parse_args(argv)
    args.mix_surveys = [part.split("=")[0] for part in args.mix.split(",")]
    args.eval_surveys = args.eval_surveys.split(",")
    args.methods = args.methods.split(",")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [s for s in {*args.mix_surveys, *args.eval_surveys} if not (Path(args.shards) / s / "manifest.json").is_file()]
    if missing:
        print(f"error: no shards for {missing} under {args.shards} (see docs/BENCHMARKS.md, Learning)", file=sys.stderr)
        return 2
    work = Path(args.work) / args.name
    work.mkdir(parents=True, exist_ok=True)
    names = plain_loop.feature_names(Path(args.shards) / args.eval_surveys[0])
    val = {s: plain_loop.read_split(Path(args.shards) / s, "val", 16) for s in args.eval_surveys}
    weights = {s: bootstrap_weights(len(v.keys), args.bootstrap, seed=i) for i, (s, v) in enumerate(val.items())}
    rows, budget_s = [], args.budget_s
    for method in args.methods:
        if method == "pipeline":
            result = run_pipeline(args, work)
            budget_s = budget_s or result["train_seconds"]  # the plain loop gets the time the pipeline took
        elif budget_s is None:
            print("error: the plain loop alone needs --budget-s", file=sys.stderr)
            return 2
        else:
            result = run_plain(args, val, budget_s)
        rows += score(method, result, val, names, weights)
    print(f"\nmean Pearson r over the features, whole val split, {budget_s:.0f} s training budget, "
          f"trained on {args.mix}; overrides: {' '.join(args.overrides) or 'none'}")
    print_tables(rows, args.eval_surveys, [f for f in args.show.split(",") if f])
    for row in rows:
        row.pop("resampled")
    write_report(Path(args.json) if args.json else REPO / "bench" / "results" / f"{args.name}.json", "learning",
                 rows, name=args.name, config=args.config, overrides=args.overrides, budget_s=budget_s,
                 mix=args.mix, bootstrap=args.bootstrap, shards=str(args.shards))
    return 0


if __name__ == "__main__":
    sys.exit(main())
