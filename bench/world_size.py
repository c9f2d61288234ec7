"""Benchmark: does the training objective depend on how a global batch is split? (issue 16 §1)

Runs one config on the same shards as several layouts of the same global batch, each for the same steps: one
process, W processes (torchrun), and one process with A micro-batches (gradient accumulation). Every layout sees the
same global batches (the batch-key hash of every step is compared); the loss of a global batch is
sum(label losses) / global label count, and dropout is keyed per sample, so the logged losses may differ only
by the order of floating-point sums. Prints per-step relative differences to the one-process run (first step,
median, max, and the step of the max) and writes the curves as JSON.

    python bench/world_size.py --shards runs/demo/shards --config configs/train/cpu.yaml --steps 300
    python bench/world_size.py --shards data/shards --config configs/train/tiny.yaml --steps 60 -- loss=mse
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import write_report  # noqa: E402
from train.world import free_port  # noqa: E402


def command(config: str, out_dir: Path, steps: int, nproc: int, overrides: list[str]) -> list[str]:
    args = ["-m", "train", "--config", config, "--out-dir", str(out_dir), "--max-steps", str(steps), *overrides]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *args]


def logged_steps(out_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "event" not in r}


def run_layout(name: str, args: argparse.Namespace, nproc: int, accumulation: int) -> dict[int, dict]:
    out_dir = args.work / name
    overrides = [f"data.loader.shard_root={args.shards}", "log_every=1", f"val_every={10 ** 9}",
                 f"checkpoint_every={10 ** 9}", f"grad_accum_steps={accumulation}", *args.overrides]
    started = time.perf_counter()
    result = subprocess.run(command(args.config, out_dir, args.steps, nproc, overrides), cwd=REPO,
                            capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    print(f"{name}: {args.steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
    return logged_steps(out_dir)


def compare(reference: dict[int, dict], other: dict[int, dict], metric: str) -> dict:
    steps = sorted(reference)
    if sorted(other) != steps:
        raise RuntimeError("the layouts logged different steps")
    same_batches = all(reference[s]["batch_keys_hash"] == other[s]["batch_keys_hash"] for s in steps)
    a = np.array([reference[s][metric] for s in steps], np.float64)
    b = np.array([other[s][metric] for s in steps], np.float64)
    rel = np.abs(b - a) / np.maximum(np.abs(a), 1e-12)
    worst = int(np.argmax(rel))
    return {"same_batches": same_batches, "first": float(rel[0]), "median": float(np.median(rel)),
            "max": float(rel[worst]), "max_at_step": steps[worst], "relative": rel.tolist()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, required=True, help="shard root with the config's surveys")
    parser.add_argument("--config", default=str(REPO / "configs" / "train" / "cpu.yaml"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--nproc", type=int, default=2, help="processes of the distributed layout")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches of the accumulated layout")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_world_size")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "world_size.json")
    parser.add_argument("overrides", nargs="*", help="train overrides after --, e.g. loss=mse")
    args = parser.parse_args(argv)
    layouts = {"1 process": (1, 1), f"{args.nproc} processes": (args.nproc, 1),
               f"1 process x {args.accumulation} micro-batches": (1, args.accumulation)}
    logs = {name: run_layout(name.replace(" ", "_"), args, *layout) for name, layout in layouts.items()}
    reference = logs["1 process"]
    rows = []
    print(f"\nrelative difference to the 1-process run, {args.steps} steps of {Path(args.config).name} "
          f"{' '.join(args.overrides)}")
    print(f"{'layout':<32}{'metric':<11}{'same batches':>13}{'step 1':>10}{'median':>10}{'max':>10}{'at step':>9}")
    for name in list(logs)[1:]:
        for metric in ("loss", "grad_norm"):
            row = {"layout": name, "metric": metric, **compare(reference, logs[name], metric)}
            rows.append(row)
            print(f"{name:<32}{metric:<11}{str(row['same_batches']):>13}{row['first']:>10.1e}{row['median']:>10.1e}"
                  f"{row['max']:>10.1e}{row['max_at_step']:>9}")
    curves = {name: [logs[name][s]["loss"] for s in sorted(logs[name])] for name in logs}
    write_report(args.json, "world_size", rows, config=args.config, steps=args.steps, overrides=args.overrides,
                 losses=curves)
    return 0


if __name__ == "__main__":
    sys.exit(main())
