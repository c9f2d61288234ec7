"""`python -m launch.demo`: the main job end to end on the embedded mock surveys."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import subprocess

from launch.slurm import torchrun_command
from sharding import build, mock, verify
from sharding.registry import list_surveys, load_survey
from train.world import free_port


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch.demo",
        description="Run the main job on mock surveys: generate realistic mock survey cutouts and Galaxy Zoo "
                    "catalogs, shard every survey into one shard root (with a few corrupt inputs that end up in "
                    "rejects.parquet), verify the shards, then train the tiny DINOv2 model on the 33/33/34 mix "
                    "under torchrun with 2 CPU processes and DeepSpeed, ending with the validation table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--surveys", default="sdss,decals,hst,ukidss", help="comma-separated survey names")
    parser.add_argument("--num-galaxies", type=int, default=400, help="galaxies per mock survey")
    parser.add_argument("--corrupt-fraction", type=float, default=0.02, help="share of deliberately bad inputs")
    parser.add_argument("--raw", default="data/raw", help="where mock surveys are written (<raw>/<survey>/)")
    parser.add_argument("--shards", default="data/shards", help="shard root")
    parser.add_argument("--workers", type=int, default=2, help="processes for rendering and sharding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-config", default="configs/train/tiny.yaml", help="run YAML for the training step")
    parser.add_argument("--train-steps", type=int, default=120, help="optimizer steps (0 skips training)")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes")
    parser.add_argument("--run-dir", default="runs/demo", help="training output directory")
    return parser.parse_args(argv)


def _step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    surveys = [s.strip() for s in args.surveys.split(",") if s.strip()]
    unknown = sorted(set(surveys) - set(list_surveys()))
    if unknown:
        print(f"error: unknown survey(s) {unknown}; known: {list_surveys()}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    for name in surveys:
        raw = Path(args.raw) / name
        _step(f"mock survey {name}: {args.num_galaxies} galaxies -> {raw}")
        code = mock.main(["--survey", name, "--num-galaxies", str(args.num_galaxies), "--out", str(raw),
                          "--seed", str(args.seed), "--corrupt-fraction", str(args.corrupt_fraction),
                          "--workers", str(args.workers), "--overwrite"])
        if code:
            return code
        survey = load_survey(name)
        _step(f"shard {name} -> {Path(args.shards) / name}")
        code = build.main(["--survey", name, "--catalog", str(raw / Path(survey.catalog).name),
                           "--images", str(raw / "images"), "--out", args.shards, "--workers", str(args.workers),
                           "--overwrite"])
        if code:
            return code
    _step(f"verify {args.shards}")
    code = verify.main([args.shards])
    if code or args.train_steps == 0:
        return code
    _step(f"train the tiny model on the 33/33/34 mix: torchrun, {args.nproc} CPU processes -> {args.run_dir}")
    train_args = ["--config", args.train_config, "--out-dir", args.run_dir, "--max-steps", str(args.train_steps),
                  f"data.loader.shard_root={args.shards}", "val_at_start=true",
                  f"val_every={max(args.train_steps // 2, 1)}", f"checkpoint_every={max(args.train_steps // 2, 1)}"]
    code = subprocess.call(torchrun_command(sys.executable, args.nproc, train_args, master_port=free_port()))
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s: shards in {args.shards}/, run in "
          f"{args.run_dir}/ (log.jsonl, tensorboard/, checkpoints/, export/)")
    return code


if __name__ == "__main__":
    sys.exit(main())
