"""SLURM -> torch.distributed: node-list expansion, the environment mapping and sbatch scripts (pure functions)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping

PORT_BASE = 20000
PORT_SPAN = 20000


def expand_nodelist(nodelist: str) -> list[str]:
    """'gpu[01-03,07],login1' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1'] (SLURM's compressed form)."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(prefix + part)
    if not hosts:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    return hosts


def torch_env_from_slurm(env: Mapping[str, str]) -> dict[str, str]:
    """RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT for one srun task (one process per GPU)."""
    required = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST")
    missing = [k for k in required if k not in env]
    if missing:
        raise ValueError(f"not inside an srun task: {missing} unset. Run `srun python -m launch srun ...` in an "
                         "allocation, or use `python -m launch torchrun` on one machine.")
    port = env.get("MASTER_PORT") or str(PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % PORT_SPAN)
    return {
        "RANK": env["SLURM_PROCID"], "LOCAL_RANK": env["SLURM_LOCALID"], "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_WORLD_SIZE": env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0],
        "MASTER_ADDR": env.get("MASTER_ADDR") or expand_nodelist(env["SLURM_JOB_NODELIST"])[0],
        "MASTER_PORT": port,
    }


def torchrun_command(python: str, nproc_per_node: int, train_args: list[str], nnodes: int = 1,
                     master_port: int | None = None) -> list[str]:
    cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc_per_node), "--nnodes", str(nnodes)]
    if nnodes == 1:
        cmd += ["--standalone"] if master_port is None else ["--master_addr", "127.0.0.1",
                                                             "--master_port", str(master_port)]
    return cmd + ["-m", "train", *train_args]


def sbatch_script(*, job_name: str, nodes: int, gpus_per_node: int, cpus_per_task: int, time: str,
                  train_args: list[str], partition: str | None = None, account: str | None = None,
                  constraint: str | None = None, python: str = "python", log_dir: str = "logs") -> str:
    """An sbatch script: one srun task per GPU, each mapping SLURM's variables with `python -m launch srun`."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError("nodes and gpus_per_node must be >= 1")
    directives = [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={gpus_per_node}",
                  f"--gpus-per-node={gpus_per_node}", f"--cpus-per-task={cpus_per_task}", f"--time={time}",
                  f"--output={log_dir}/%x-%j.out", "--signal=USR1@300", "--requeue"]
    directives += [f"--{k}={v}" for k, v in (("partition", partition), ("account", account),
                                             ("constraint", constraint)) if v]
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "",
             "# SIGUSR1 arrives 5 minutes before the time limit; train saves a checkpoint and exits cleanly,",
             "# and --requeue with --resume auto continues exactly where it stopped.",
             "set -euo pipefail", f"mkdir -p {log_dir}", "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK}",
             f"srun --kill-on-bad-exit=1 {shlex.quote(python)} -m launch srun -- "
             + " ".join(shlex.quote(a) for a in train_args), ""]
    return "\n".join(lines)
