"""Benchmark: `python -m eval predict` img/s (CPU; GPU with DALI when present) next to training img/s, same machine."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.loaders import make_shards  # noqa: E402
from bench.report import write_report  # noqa: E402
from bench.train import measured_peak_flops, run_case, summarise  # noqa: E402
from eval import predict  # noqa: E402
from models.config import load_model_config  # noqa: E402
from models.head import MorphologyModel  # noqa: E402
from models.io import save_export  # noqa: E402


def make_export(folder: Path, model: str, image_size: int) -> Path:
    """Random weights with the provenance predict needs (what a finished training run exports)."""
    torch.manual_seed(0)
    metadata = {"stage": "full", "step": 0, "mix": [["sdss", 1.0]], "surveys": {},
                "input": {"image_size": image_size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
    return save_export(MorphologyModel(load_model_config(model)), folder, metadata=metadata)


def time_predict(export: Path, shards: Path, split: str, batch: int, device: str, work: Path) -> dict:
    out = work / f"{export.name}-{device}.parquet"
    argv = ["--model", str(export), "--shards", str(shards), "--surveys", "sdss", "--split", split, "--out", str(out),
            "--batch-size", str(batch), "--device", device, "--no-progress", "--overwrite"]
    started = time.perf_counter()
    summary = predict.run(predict.parse_args(argv))
    seconds = time.perf_counter() - started
    return {"galaxies": summary["rows"], "predict_seconds": seconds, "predict_img_per_s": summary["rows"] / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=Path, help="shard root with sdss/decals/hst at 256 px (default: build one)")
    parser.add_argument("--num-galaxies", type=int, default=700, help="per survey, when building shards")
    parser.add_argument("--train-steps", type=int, default=10, help="training steps per case (first 3 untimed)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "eval.json")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    shards = args.shards or work / "shards"
    if args.shards is None:
        make_shards(work, args.num_galaxies)  # writes <work>/raw and <work>/shards
    gpu = torch.cuda.is_available()
    # Predict covers sdss/all for the tiny model; ViT-S on a CPU reads sdss/val only (a few img/s).
    cases = [dict(name="tiny-224-cpu", model="tiny", image_size=224, batch=32, split="all", device="cpu"),
             dict(name="vit-s14-224-cpu", model="small", image_size=224, batch=8, split="val", device="cpu")]
    if gpu:
        cases.append(dict(name="vit-b14-224-gpu-dali", model="base", image_size=224, batch=128, split="all",
                          device="cuda"))
    rows = []
    try:
        for case in cases:
            export = make_export(work / case["name"], case["model"], case["image_size"])
            row = {**case, **time_predict(export, shards, case["split"], case["batch"], case["device"], work)}
            train_case = dict(name=case["name"], model=case["model"], image_size=case["image_size"],
                              batch=case["batch"], backend="dali" if case["device"] == "cuda" else "torch", workers=1,
                              precision="bf16" if case["device"] == "cuda" else "fp32", zero=2,
                              device="gpu" if case["device"] == "cuda" else "cpu")
            peak = measured_peak_flops(case["device"], torch.bfloat16 if case["device"] == "cuda" else torch.float32)
            trained = summarise(train_case, run_case(train_case, shards, work, args.train_steps, 1), peak, 3)
            row.update(train_img_per_s=trained["img_per_s"], predict_vs_train=row["predict_img_per_s"] /
                       trained["img_per_s"])
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nevaluation vs training throughput, 224 px, one process, {platform.machine()}, {os.cpu_count()} CPUs"
          f"{', CUDA' if gpu else ', no GPU'}")
    print(f"{'case':<24}{'galaxies':>9}{'predict img/s':>15}{'train img/s':>13}{'predict/train':>15}")
    for r in rows:
        print(f"{r['name']:<24}{r['galaxies']:>9}{r['predict_img_per_s']:>15.1f}{r['train_img_per_s']:>13.1f}"
              f"{r['predict_vs_train']:>14.2f}x")
    print("predict = the whole job (decode, resize, forward, Parquet parts and merge); train = stage full, "
          "forward + backward + optimizer (bench/train.py's runner).")
    write_report(args.json, "eval", rows, cuda=gpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
