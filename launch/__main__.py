"""`python -m launch`: run training under torchrun, inside srun tasks, or as an sbatch job (with dry runs)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from launch import slurm


def _train_args(rest: list[str]) -> list[str]:
    return rest[1:] if rest[:1] == ["--"] else rest


def cmd_torchrun(args: argparse.Namespace) -> int:
    cmd = slurm.torchrun_command(sys.executable, args.nproc_per_node, _train_args(args.train_args),
                                 master_port=args.master_port)
    print(" ".join(cmd), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(cmd)


def cmd_srun(args: argparse.Namespace) -> int:
    """Inside one srun task: map SLURM's variables to torch.distributed's, then train in this process."""
    mapped = slurm.torch_env_from_slurm(os.environ)
    if args.dry_run:
        print(" ".join(f"{k}={v}" for k, v in mapped.items()), "python -m train", *_train_args(args.train_args))
        return 0
    os.environ.update(mapped)
    from train.__main__ import main as train_main
    return train_main(_train_args(args.train_args))


def cmd_sbatch(args: argparse.Namespace) -> int:
    train_args = _train_args(args.train_args)
    if "--resume" not in train_args:  # a requeued job must continue, not start over
        train_args = ["--resume", "auto", *train_args]
    script = slurm.sbatch_script(job_name=args.job_name, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                 cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition,
                                 account=args.account, constraint=args.constraint,
                                 train_args=train_args)
    path = Path(args.script)
    path.write_text(script)
    print(f"wrote {path}")
    if args.dry_run:
        print(script)
        return 0
    if shutil.which("sbatch") is None:
        print("error: sbatch not found; submit the script on the cluster's login node", file=sys.stderr)
        return 2
    return subprocess.call(["sbatch", str(path)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch",
        description="Launch `python -m train` on one machine (torchrun), inside SLURM tasks (srun) or as a "
                    "batch job (sbatch). Arguments after `--` go to train, e.g. "
                    "`python -m launch torchrun --nproc-per-node 4 -- --config configs/train/head.yaml`.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("torchrun", help="N processes on this machine")
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("--master-port", type=int)
    p.set_defaults(func=cmd_torchrun)
    p = sub.add_parser("srun", help="inside one srun task: SLURM variables -> torch.distributed, then train")
    p.set_defaults(func=cmd_srun)
    p = sub.add_parser("sbatch", help="write (and submit) an sbatch script: one task per GPU, pre-emption-safe")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=4)
    p.add_argument("--cpus-per-task", type=int, default=16)
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--job-name", default="sommelier")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--constraint", help="e.g. gpu&hbm80g on Perlmutter")
    p.add_argument("--script", default="sommelier.sbatch")
    p.set_defaults(func=cmd_sbatch)
    for p in sub.choices.values():
        p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
        p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then python -m train arguments")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
