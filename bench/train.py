"""Benchmark: training img/s, step time split into data wait and compute, and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import write_report  # noqa: E402
from models.config import load_model_config  # noqa: E402


def forward_flops_per_image(model: str, image_size: int) -> float:
    """Analytic ViT forward FLOPs (multiply-add = 2): patch embedding, attention and MLP blocks."""
    b = load_model_config(model).backbone
    d, layers, patch = b.hidden_size, b.num_hidden_layers, b.patch_size
    tokens = (image_size // patch) ** 2 + 1
    per_layer = tokens * (8 * d * d + 4 * b.mlp_ratio * d * d + 4 * tokens * d)
    embed = tokens * 3 * patch * patch * d * 2
    return float(layers * per_layer + embed)


def measured_peak_flops(device: str, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Achievable dense matmul FLOP/s on this device and dtype: the denominator of MFU here."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def run_case(case: dict, shards: Path, work: Path, steps: int, nproc: int) -> list[dict]:
    out = work / case["name"]
    args = ["--config", str(REPO / "configs" / "train" / "tiny.yaml"), "--out-dir", str(out), "--max-steps",
            str(steps), f"model={case['model']}", "stage=full", f"data.loader.shard_root={shards}",
            f"data.loader.image_size={case['image_size']}", f"data.global_batch_size={case['batch']}",
            f"data.loader.backend={case['backend']}", f"data.loader.num_workers={case['workers']}",
            f"precision={case['precision']}", f"zero_stage={case['zero']}", f"data.loader.device={case['device']}",
            "val_every=1000000", "checkpoint_every=1000000", "data.val_max_samples=8", "data.loader.augment.enabled=true"]
    cmd = [sys.executable, "-m", "train", *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "train",
        *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{case['name']} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "event" not in r]


def summarise(case: dict, records: list[dict], peak: float, warmup: int) -> dict:
    timed = records[warmup:] or records
    step_s = statistics.median(r["step_seconds"] for r in timed)
    wait = statistics.median(r["data_wait_fraction"] for r in timed)
    img_s = case["batch"] / step_s
    flops = 3 * forward_flops_per_image(case["model"], case["image_size"])  # forward + backward
    return {**case, "img_per_s": img_s, "step_seconds": step_s, "data_wait_seconds": wait * step_s,
            "compute_seconds": (1 - wait) * step_s, "data_wait_fraction": wait,
            "train_gflops_per_image": flops / 1e9, "achieved_tflops": img_s * flops / 1e12,
            "peak_tflops_measured": peak / 1e12, "mfu": img_s * flops / peak, "steps_timed": len(timed)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=Path, default=REPO / "data" / "shards",
                        help="shard root with sdss/decals/hst (python -m launch.demo --train-steps 0 makes one)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "train.json")
    args = parser.parse_args(argv)
    if not all((args.shards / s / "manifest.json").is_file() for s in ("sdss", "decals", "hst")):
        print(f"error: no sdss/decals/hst shards under {args.shards}; run `python -m launch.demo --train-steps 0` "
              "or pass --shards", file=sys.stderr)
        return 2
    gpu = torch.cuda.is_available()
    cases = [dict(name="tiny-224-cpu", model="tiny", image_size=224, batch=32, backend="torch", workers=1,
                  precision="fp32", zero=2, device="cpu"),
             dict(name="vit-s14-224-cpu", model="small", image_size=224, batch=8, backend="torch", workers=1,
                  precision="fp32", zero=2, device="cpu")]
    if gpu:
        cases.append(dict(name="vit-b14-224-bf16-zero2-dali", model="base", image_size=224, batch=128,
                          backend="dali", workers=4, precision="bf16", zero=2, device="gpu"))
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    rows = []
    try:
        for case in cases:
            on_gpu = case["device"] == "gpu"
            peak = measured_peak_flops("cuda" if on_gpu else "cpu", torch.bfloat16 if on_gpu else torch.float32)
            rows.append(summarise(case, run_case(case, args.shards, work, args.steps, args.nproc), peak,
                                  args.warmup))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ntraining throughput, stage=full, {args.nproc} process(es), {platform.machine()}, "
          f"{os.cpu_count()} CPUs, median of steps {args.warmup + 1}..{args.steps}")
    print(f"{'case':<30}{'img/s':>8}{'step s':>8}{'wait s':>8}{'compute s':>10}{'wait %':>8}{'GF/img':>8}"
          f"{'TF/s':>7}{'MFU':>7}")
    for r in rows:
        print(f"{r['name']:<30}{r['img_per_s']:>8.1f}{r['step_seconds']:>8.3f}{r['data_wait_seconds']:>8.3f}"
              f"{r['compute_seconds']:>10.3f}{100 * r['data_wait_fraction']:>7.1f}%{r['train_gflops_per_image']:>8.2f}"
              f"{r['achieved_tflops']:>7.3f}{100 * r['mfu']:>6.1f}%")
    print("MFU = model training FLOPs (3 x analytic forward) per second / measured dense matmul FLOP/s on this "
          "device and dtype.")
    write_report(args.json, "train", rows, cuda=gpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
