"""`python -m train`: train a morphology model on mixed survey shards under DeepSpeed (one CPU, torchrun, srun)."""

from __future__ import annotations

import argparse
import sys

from train import world as world_mod
from train.config import load_train_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train the DINOv2 morphology model on survey shards mixed at exact ratios, under DeepSpeed "
                    "ZeRO. The same command runs on one CPU, under `torchrun --nproc_per_node N -m train ...` "
                    "and under srun (see `python -m launch`). Writes <out_dir>/log.jsonl, TensorBoard scalars, "
                    "checkpoints/ (DeepSpeed state + sampler position) and export/ (safetensors for eval).",
        epilog="Overrides: any config key as key.sub=value, e.g. optim.lr=3e-4 data.mix=sdss=0.5,hst=0.5 "
               "data.loader.backend=dali zero_stage=3 precision=bf16",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", required=True, help="run YAML, e.g. configs/train/tiny.yaml")
    parser.add_argument("--out-dir", help="run directory (default: the config's out_dir)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps to train for")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    parser.add_argument("--resume", default="none",
                        help="'auto' continues from the latest complete checkpoint in out_dir (fresh start if "
                             "none), a tag like step00000040 from that one, 'none' starts fresh")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    for flag, key in (("out_dir", "out_dir"), ("max_steps", "max_steps"), ("checkpoint_every", "checkpoint_every")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    try:
        cfg = load_train_config(args.config, overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch.distributed

    from train import engine, loop  # heavy imports (deepspeed) only once the config is known to be valid
    world = world_mod.detect()
    joined = not torch.distributed.is_initialized()  # a caller's own process group is the caller's to end
    code = _run(loop, cfg, world, args.resume)
    if joined and torch.distributed.is_initialized():
        # Gloo's worker threads must stop while the interpreter is whole: left to interpreter exit, a rank can abort
        # ("terminate called without an active exception") after its work is done and saved. Not after an
        # exception: a rank that failed mid-collective must exit, not wait on peers in a shutdown.
        engine.end_distributed()
    return code


def _run(loop, cfg, world: world_mod.World, resume: str) -> int:
    try:
        run = loop.setup(cfg, world, resume)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        results = loop.train(run)
    finally:
        run.log.close()
        run.loader.close()
    if world.is_main and results and not results.get("preempted"):
        print(f"done: {run.step} steps; export in {run.out_dir / 'export'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
