"""SLURM -> torch.distributed: node-list expansion, the environment mapping and batch scripts (pure functions)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

PORT_BASE = 20000
PORT_SPAN = 20000
ENTRIES = {"train": "launch srun --", "eval": "eval", "shard": "sharding.build", "study": "launch study",
           "serve": "launch serve"}
SERVE_PORT = 8000  # launch/serve.py's default --port
# Written last into <out_dir>/export by a finished run: train/stages.py (head, full, lora), train/ssl_state.py (ssl).
EXPORT_MARKERS = ("export.json", "ssl_export.json")
# What SLURM takes in each directive: no whitespace, newlines or quotes, so no value can leave its #SBATCH line.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_LIST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*(,[A-Za-z0-9][A-Za-z0-9._+-]*)*")
_CONSTRAINT = re.compile(r"[A-Za-z0-9_.&|\[\]*:,()!-]+")
_TIME = re.compile(r"(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}"
                   r"|UNLIMITED|INFINITE)")
_PATH = re.compile(r"[^\s'\"`$\\;|&<>]+")


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _expand_host(expr: str) -> list[str]:
    """'gpu[01-02]-ib' -> gpu01-ib, gpu02-ib; several bracket groups expand as a product, left to right."""
    match = re.search(r"\[([^\]]*)\]", expr)
    if match is None:
        return [expr]
    head, tail = expr[:match.start()], expr[match.end():]
    out = []
    for part in match[1].split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"cannot parse SLURM node list range {part!r} in {expr!r}")
        numbers = range(int(lo), int(hi or lo) + 1)
        out += [f"{head}{n:0{len(lo)}d}{rest}" for n in numbers for rest in _expand_host(tail)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """'gpu[01-03,07],login1' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1'] (SLURM's compressed form)."""
    hosts = [host for expr in _split_top_level(nodelist.strip()) if expr for host in _expand_host(expr)]
    if not hosts or nodelist.count("[") != nodelist.count("]"):
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    return hosts


def torch_env_from_slurm(env: Mapping[str, str]) -> dict[str, str]:
    """RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT for one srun task (one process per GPU or CPU slot)."""
    required = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST")
    missing = [k for k in required if k not in env]
    if missing:
        raise ValueError(f"not inside an srun task: {missing} unset. Run `srun python -m launch srun ...` in an "
                         "allocation, or use `python -m launch torchrun` on one machine.")
    port = env.get("MASTER_PORT") or str(PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % PORT_SPAN)
    return {
        "RANK": env["SLURM_PROCID"], "LOCAL_RANK": env["SLURM_LOCALID"], "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_WORLD_SIZE": env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0].split(",")[0],
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


@dataclass(frozen=True)
class JobSpec:
    """The #SBATCH directives of a job; `check()` refuses anything SLURM would misread or a shell could run."""
    job_name: str = "sommelier"
    nodes: int = 1
    gpus_per_node: int = 4  # 0: CPU nodes, no GPU directive
    ntasks_per_node: int | None = None  # default: one per GPU, or 1 on CPU nodes
    cpus_per_task: int = 16
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    log_dir: str = "logs"
    array: str | None = None

    @property
    def tasks_per_node(self) -> int:
        return self.ntasks_per_node or max(self.gpus_per_node, 1)

    def check(self) -> None:
        for name, minimum in (("nodes", 1), ("gpus_per_node", 0), ("cpus_per_task", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
        if self.ntasks_per_node is not None and self.ntasks_per_node < 1:
            raise ValueError(f"--ntasks-per-node must be >= 1, got {self.ntasks_per_node}")
        rules = [("job-name", self.job_name, _NAME, "letters, digits, '.', '_', '+', '-'"),
                 ("time", self.time, _TIME, "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"),
                 ("partition", self.partition, _LIST, "names separated by commas"),
                 ("account", self.account, _NAME, "letters, digits, '.', '_', '+', '-'"),
                 ("qos", self.qos, _NAME, "letters, digits, '.', '_', '+', '-'"),
                 ("constraint", self.constraint, _CONSTRAINT, "features joined by & | , and brackets, no spaces"),
                 ("log-dir", self.log_dir, _PATH, "a path without spaces, quotes or shell characters"),
                 ("array", self.array, re.compile(r"[0-9,%:-]+"), "index ranges such as 1-8")]
        for flag, value, pattern, allowed in rules:
            if value is not None and not pattern.fullmatch(value):
                raise ValueError(f"--{flag} {value!r} is not something SLURM takes here ({allowed})")

    def directives(self) -> list[str]:
        self.check()
        out = [f"--job-name={self.job_name}", f"--nodes={self.nodes}", f"--ntasks-per-node={self.tasks_per_node}"]
        if self.gpus_per_node:
            out.append(f"--gpus-per-node={self.gpus_per_node}")
        name = "%x-%A_%a" if self.array else "%x-%j"
        out += [f"--cpus-per-task={self.cpus_per_task}", f"--time={self.time}",
                f"--output={self.log_dir}/{name}.out", "--open-mode=append"]
        out += [f"--{k}={v}" for k, v in (("partition", self.partition), ("account", self.account),
                                          ("qos", self.qos), ("constraint", self.constraint),
                                          ("array", self.array)) if v]
        return out


def serve_args(args: list[str]) -> list[str]:
    """A service replica on a cluster node listens on the node's interfaces unless --host says otherwise."""
    return args if any(a == "--host" or a.startswith("--host=") for a in args) else ["--host", "0.0.0.0", *args]


def _serve_lines(entry: str, args: list[str]) -> list[str]:
    if entry != "serve":
        return []
    port = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--port"), None)
    port = port or next((a.split("=", 1)[1] for a in args if a.startswith("--port=")), str(SERVE_PORT))
    if not port.isdigit():
        raise ValueError(f"--port must be a number, got {port!r}")
    return [f'echo "=== service replicas on ${{SLURM_JOB_NODELIST}}, port {port}: each logs its http://<node>:{port}; '
            'they are stateless: put any number behind a load balancer"']


def batch_script(spec: JobSpec, python: str, entry: str, args: list[str], out_dir: str | None = None,
                 shell_args: tuple[str, ...] = (), setup: tuple[str, ...] = ()) -> str:
    """An sbatch script running `python -m <entry> ARGS` in every task of the job.

    Training (entry "train") is pre-emption safe: SIGUSR1 five minutes before the time limit (and SIGTERM from
    `scontrol requeue`) make it save a checkpoint and exit cleanly; a run that stopped before its export then
    requeues itself, and `--resume auto` continues exactly where it stopped. A task that fails takes the whole
    job down (--kill-on-bad-exit) instead of leaving the others waiting in a collective. `shell_args` go in
    unquoted, for the job's own variables (e.g. "${SLURM_ARRAY_TASK_ID}/8"); `setup` commands (already quoted) run
    once on the job's first node before srun, and a failing one fails the job.
    """
    if entry not in ENTRIES:
        raise ValueError(f"--entry must be one of {sorted(ENTRIES)}, got {entry!r}")
    directives = spec.directives()
    training = entry == "train"
    if training:
        directives += ["--signal=USR1@300", "--requeue"]
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "", "set -euo pipefail",
             "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
             'echo "=== $(date -Is) job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}"',
             *setup, *_serve_lines(entry, args), f"srun --kill-on-bad-exit=1 {shlex.quote(python)} -m {ENTRIES[entry]} "
             + " ".join([*(shlex.quote(a) for a in args), *shell_args])]
    if training:
        if not out_dir:
            raise ValueError("a training job needs the run's out_dir to tell a pre-emption from the end")
        finished = " ] && [ ! -f ".join(shlex.quote(f"{out_dir}/export/{m}") for m in EXPORT_MARKERS)
        lines += ["# srun returned 0: the run ended, or a signal made it save a checkpoint and stop early.",
                  f"if [ ! -f {finished} ]; then",
                  '  echo "stopped before the end: requeueing job ${SLURM_JOB_ID}; it resumes from its checkpoint"',
                  '  scontrol requeue "${SLURM_JOB_ID}"', "fi"]
    return "\n".join(lines) + "\n"
