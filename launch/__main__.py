"""`python -m launch`: training under torchrun or srun, and SLURM batch jobs for training, evaluation and sharding."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from launch import slurm

EPILOG = """examples (Perlmutter: 4 A100 per node, constraint gpu, one task per GPU, NCCL):
  python -m launch sbatch --nodes 8 --account m1234 --time 12:00:00 -- --config configs/train/head.yaml
  python -m launch sbatch --nodes 2 --gpus-per-node 0 --ntasks-per-node 4 --cpus-per-task 8 --partition cpu \\
      -- --config configs/train/cpu.yaml                                  # CPU nodes
  python -m launch sbatch --entry eval --gpus-per-node 1 -- predict --model runs/mixed --shards data/shards \\
      --surveys ukidss --split all --out preds/ukidss.parquet
  python -m launch shard --survey hst --parts 16 --cpus-per-task 32 -- --catalog cat.fits --images cutouts/
  python -m launch torchrun --nproc-per-node 4 -- --config configs/train/tiny.yaml
  python -m launch study configs/studies/phase3.yaml     # arms and evaluations as a graph (study --help)
  python -m launch registry add runs/mixed --name morphology --metrics ukidss.json   # (registry --help)
  python -m launch serve --model models:/morphology@production --port 8000   # the service (serve --help)
  python -m launch sbatch --entry serve --nodes 2 --gpus-per-node 1 -- --model models:/morphology@production"""


def _rest(rest: list[str]) -> list[str]:
    return rest[1:] if rest[:1] == ["--"] else rest


def cmd_torchrun(args: argparse.Namespace) -> int:
    cmd = slurm.torchrun_command(sys.executable, args.nproc_per_node, _rest(args.args), master_port=args.master_port)
    print(" ".join(cmd), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(cmd)


def cmd_srun(args: argparse.Namespace) -> int:
    """Inside one srun task: map SLURM's variables to torch.distributed's, then train in this process."""
    mapped = slurm.torch_env_from_slurm(os.environ)
    if args.dry_run:
        print(" ".join(f"{k}={v}" for k, v in mapped.items()), "python -m train", *_rest(args.args), flush=True)
        return 0
    os.environ.update(mapped)
    from train.__main__ import main as train_main
    return train_main(_rest(args.args))


def _spec(args: argparse.Namespace, **extra) -> slurm.JobSpec:
    constraint = args.constraint if args.constraint is not None else ("gpu" if args.gpus_per_node else None)
    return slurm.JobSpec(job_name=args.job_name, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                         ntasks_per_node=args.ntasks_per_node, cpus_per_task=args.cpus_per_task, time=args.time,
                         partition=args.partition, account=args.account, qos=args.qos,
                         constraint=None if constraint == "none" else constraint, log_dir=args.log_dir, **extra)


def training_out_dir(train_args: list[str]) -> str:
    """The run folder the training arguments resolve to (config out_dir, --out-dir or an override)."""
    from train.__main__ import parse_args as train_parse
    from train.config import load_train_config

    parsed = train_parse(train_args)
    return parsed.out_dir or load_train_config(parsed.config, parsed.overrides).out_dir


def submit(script: Path, extra: list[str] | None = None) -> tuple[int, str]:
    """sbatch the script; (exit code, job id or '') with sbatch's own line printed."""
    if shutil.which("sbatch") is None:
        print(f"error: sbatch not found; submit {script} on the cluster's login node", file=sys.stderr)
        return 2, ""
    result = subprocess.run(["sbatch", *(extra or []), str(script)], capture_output=True, text=True)
    print((result.stdout + result.stderr).strip(), flush=True)
    match = re.search(r"Submitted batch job (\d+)", result.stdout)
    return result.returncode, match[1] if match else ""


def _write(script_path: str, text: str, log_dir: str, dry_run: bool) -> Path:
    path = Path(script_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    if dry_run:
        print(text)
    else:
        Path(log_dir).mkdir(parents=True, exist_ok=True)  # SLURM opens --output before the script runs
    return path


def cmd_sbatch(args: argparse.Namespace) -> int:
    rest = _rest(args.args)
    out_dir = None
    if args.entry == "serve":  # one replica per node, listening on the node's interfaces (slurm.serve_args)
        rest = slurm.serve_args(rest)
        args.ntasks_per_node = args.ntasks_per_node or 1
    if args.entry == "train":
        if "--resume" not in rest:  # a requeued job must continue, not start over
            rest = ["--resume", "auto", *rest]
        out_dir = training_out_dir(rest)
    spec = _spec(args)
    path = _write(args.script, slurm.batch_script(spec, sys.executable, args.entry, rest, out_dir), spec.log_dir,
                  args.dry_run)
    return 0 if args.dry_run else submit(path)[0]


def cmd_shard(args: argparse.Namespace) -> int:
    """An array job of --parts build parts, and a merge job that runs after all of them succeeded."""
    if args.parts < 1:
        raise ValueError(f"--parts must be >= 1, got {args.parts}")
    rest = _rest(args.args)
    if any(a in ("--part", "--merge", "--survey") for a in rest):
        raise ValueError("give the survey with --survey and leave --part/--merge to the launcher")
    build = ["--survey", args.survey, *rest]
    parts = slurm.batch_script(_spec(args, array=f"1-{args.parts}"), sys.executable, "shard", build,
                               shell_args=("--part", f'"${{SLURM_ARRAY_TASK_ID}}/{args.parts}"',
                                           "--workers", '"${SLURM_CPUS_PER_TASK}"'))
    stem = Path(args.script)
    part_path = _write(str(stem.with_name(stem.stem + "-parts.sbatch")), parts, args.log_dir, args.dry_run)
    merge = slurm.batch_script(_spec(args), sys.executable, "shard", [*build, "--merge"])
    merge_path = _write(str(stem.with_name(stem.stem + "-merge.sbatch")), merge, args.log_dir, args.dry_run)
    if args.dry_run:
        print("(the merge job is submitted with --dependency=afterok:<the array job>)")
        return 0
    code, job = submit(part_path)
    if code or not job:
        return code or 1
    return submit(merge_path, ["--dependency", f"afterok:{job}"])[0]


def _job_options(p: argparse.ArgumentParser, gpus: int, cpus: int) -> None:
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=gpus, help="0: CPU nodes (no GPU directive)")
    p.add_argument("--ntasks-per-node", type=int, help="tasks per node (default: one per GPU, or 1 on CPU nodes)")
    p.add_argument("--cpus-per-task", type=int, default=cpus)
    p.add_argument("--time", default="24:00:00", help="HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--job-name", default="sommelier")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint", help="node features (default with GPUs: gpu, Perlmutter's; 'none' for no constraint)")
    p.add_argument("--log-dir", default="logs", help="where each job's output goes (created before submission)")
    p.add_argument("--script", default="sommelier.sbatch", help="where the batch script is written")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Launch `python -m train` on one machine (torchrun) or inside SLURM tasks (srun), and write and "
                    "submit SLURM batch jobs for training (pre-emption safe, requeued), evaluation and sharding "
                    "(an array job of parts and a merge). Arguments after `--` go to the job's entry point.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("torchrun", help="N processes on this machine")
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("--master-port", type=int)
    p.set_defaults(func=cmd_torchrun)
    p = sub.add_parser("srun", help="inside one srun task: SLURM variables -> torch.distributed, then train")
    p.set_defaults(func=cmd_srun)
    p = sub.add_parser("sbatch", help="write (and submit) a batch job: training, evaluation or sharding")
    _job_options(p, gpus=4, cpus=16)
    p.add_argument("--entry", default="train", choices=sorted(slurm.ENTRIES),
                   help="train: python -m train in every task; eval: python -m eval; shard: python -m sharding.build; "
                        "study: python -m launch study (what a study's data and evaluation jobs run, in one task); "
                        "serve: python -m launch serve, one stateless replica per node (its log names host:port)")
    p.set_defaults(func=cmd_sbatch)
    p = sub.add_parser("shard", help="an array job building a survey in --parts parts, then a merge job")
    _job_options(p, gpus=0, cpus=16)
    p.add_argument("--survey", required=True)
    p.add_argument("--parts", type=int, required=True, help="array tasks, one part of every split each")
    p.set_defaults(func=cmd_shard)
    sub.add_parser("serve", help="the morphology service over HTTP (python -m launch serve --help)")
    sub.add_parser("registry", help="the model registry (MLflow): add, list, show, promote, rollback "
                                    "(python -m launch registry --help)")
    sub.add_parser("study", help="a study: training arms and evaluations as a graph, here or as SLURM jobs with "
                                 "dependencies (python -m launch study --help)")
    for p in sub.choices.values():
        p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
        p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the entry point's arguments")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # its own options (launch/serve.py); fastapi and uvicorn load only here
        return importlib.import_module("launch.serve").main(argv[1:])
    if argv[:1] == ["registry"]:  # its own commands (launch/registry.py); mlflow loads only here
        return importlib.import_module("launch.registry").main(argv[1:])
    if argv[:1] == ["study"]:  # its own commands and options (launch/study.py), imported by name as eval's jobs are
        return importlib.import_module("launch.study").main(argv[1:])
    args = parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
