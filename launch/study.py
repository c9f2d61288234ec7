"""`python -m launch study`: a study (configs/studies/*.yaml) run as a graph of training arms and evaluations, here
one node at a time or as SLURM jobs with dependencies; its status, report, and the two commands its jobs run."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from launch import study_state as st
from launch.study_config import StudyConfig, load_study, study_file
from launch.study_graph import Node, default_shards, plan
from launch.study_report import INPUT_FILE, write_report

ACTIONS = ("status", "report", "node", "stamp")
DESCRIPTION = """Run a study: named training arms (a train config with overrides; `init_from` another arm starts from
its export, an ssl arm's backbone included) and evaluations of their exports (eval ood on a held-out survey with
paired differences and a progressive curve; a matrix of arms x surveys), optionally after a `data:` node that makes
the mock surveys. An arm starts when the arm it starts from has exported; an evaluation when its arms have.

Locally (the default without SLURM) one node at a time: a re-run skips every node whose output is finished and
whose provenance (the resolved training config, the shard manifests it reads, the weights of the exports it starts
from; kept in <node>/study_provenance.json) still matches, continues an interrupted arm from its checkpoint, and
runs again what changed and everything after it. With --slurm one batch job per node that is not done, with
--dependency=afterok on the jobs it needs (names <study>-<arm>, <study>-eval-<name>, <study>-data); a re-submit
submits only what is neither done nor already queued. Writes <out>/study.json, report.md and report.html.

other commands:
  python -m launch study status STUDY|FOLDER   each node: job, SLURM state and reason, start, end, output done?
  python -m launch study report STUDY|FOLDER   rebuild study.json and the report from what has finished
  python -m launch study node SPEC             (inside a job) stamp and run one data or evaluation node
  python -m launch study stamp SPEC            (inside an arm's job, before srun) its provenance record"""
EPILOG = """examples:
  python -m launch study configs/studies/tiny.yaml --shards data/shards --out runs/studies/tiny
  python -m launch study phase3                    # configs/studies/phase3.yaml: mock data, 12 arms, 2 evaluations
  python -m launch study phase3 --dry-run          # what is done and what would run, nothing run
  python -m launch study phase3 --slurm --nodes 1 --gpus-per-node 0 --cpus-per-task 8 --partition cpu --time 2:00:00
  python -m launch study status phase3             # or: python -m launch study status runs/studies/phase3
  python -m launch study report runs/studies/phase3"""


def _run_parser() -> argparse.ArgumentParser:
    from launch.__main__ import _job_options

    parser = argparse.ArgumentParser(prog="python -m launch study", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="configs/studies/<name>.yaml, a path, or a bare name")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run here, one node at a time (default without SLURM)")
    where.add_argument("--slurm", action="store_true", help="one batch job per node (default where sbatch works)")
    parser.add_argument("--shards", help="every arm's shard root (default: the study's `shards:`, else <out>/shards "
                                         "with a `data:` section, else data/shards)")
    parser.add_argument("--out", help="the study folder (default runs/studies/<name>)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and what would run; run nothing")
    jobs = parser.add_argument_group("SLURM jobs (--slurm): each arm gets these; evaluations one task on one node")
    _job_options(jobs, gpus=4, cpus=16)
    parser.set_defaults(job_name=None, log_dir=None, script=None)
    for action in jobs._group_actions:
        action.help = {"job_name": "job name prefix (default: the study's name)",
                       "log_dir": "job logs (default <out>/logs)",
                       "script": "folder of the batch scripts (default <out>/slurm)"}.get(action.dest, action.help)
    return parser


ACTION_HELP = {
    "status": "Each node of the study: its SLURM job (the id from <out>/study_jobs.json; state, reason, start and end "
              "from scontrol, or sacct for a job SLURM has forgotten) and whether its output is done (finished, with "
              "a matching provenance). A failed node is named with its log and the dependants that can never run.",
    "report": "Rebuild <out>/study.json, report.md and report.html from the evaluations that have finished.",
    "node": "Inside a study's batch job: stamp one data or evaluation node's folder, run it, rebuild the report.",
    "stamp": "Inside an arm's batch job, before srun: keep its folder if its provenance still matches (an interrupted "
             "run continues), else empty it; then record the provenance."}


def _action_parser(action: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m launch study {action}", description=ACTION_HELP[action],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    if action in ("node", "stamp"):
        parser.add_argument("spec", help="a node's study_node.json (or its folder)")
        return parser
    parser.add_argument("study", help="the study YAML (or bare name) or its folder")
    parser.add_argument("--out", help="the study folder, with a YAML (default runs/studies/<name>)")
    parser.add_argument("--shards", help="shard root (default: the one the study last ran with)")
    return parser


def open_study(arg: str, out: str | None, shards: str | None, recorded: bool) -> tuple[StudyConfig, Path, Path, Path]:
    """(study, folder, shard root, YAML) from a YAML or a study folder. The shard root defaults to the one the study
    folder records when it is given, or with `recorded`, to the one the YAML's folder records."""
    folder = Path(arg) if Path(arg).is_dir() else None
    info = _read_input(folder) if folder else {}
    if folder and not info:
        raise ValueError(f"{folder} is not a study folder (no {INPUT_FILE}): give the study's YAML")
    source = Path(info["source"]) if info else study_file(arg)
    study = load_study(source)
    folder = Path(out) if out else folder or Path("runs") / "studies" / study.name
    info = info or (_read_input(folder) if recorded else {})
    root = shards or info.get("shards") or default_shards(study, folder)
    return study, folder.resolve(), Path(root).resolve(), source.resolve()


def _read_input(folder: Path) -> dict:
    try:
        return json.loads((folder / INPUT_FILE).read_text())
    except (OSError, ValueError):
        return {}


def slurm_available() -> bool:
    """sbatch works here and this is not already a SLURM job (inside one, the study runs in its allocation)."""
    if shutil.which("sbatch") is None or "SLURM_JOB_ID" in os.environ:
        return False
    try:
        return subprocess.run(["scontrol", "ping"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def write_input(study: StudyConfig, nodes: list[Node], out: Path, shards: Path, source: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    info = {"study": study.name, "source": str(source), "out": str(out), "shards": str(shards),
            "nodes": [{"name": n.name, "kind": n.kind, "deps": list(n.deps), "dir": str(n.dir)} for n in nodes]}
    st.write_atomically(out / INPUT_FILE, json.dumps(info, indent=2) + "\n")


def cmd_run(args: argparse.Namespace) -> int:
    study, out, shards, source = open_study(args.study, args.out, args.shards, recorded=False)
    nodes = plan(study, out, shards)
    slurm = args.slurm or (not args.local and slurm_available())
    kinds = [n.kind for n in nodes]
    print(f"study {study.name}: {_count(kinds, 'arm', 'arm')}, {_count(kinds, 'eval', 'evaluation')}"
          f"{', data first' if 'data' in kinds else ''} -> {out}\n  shards {shards}; "
          f"{'SLURM jobs' if slurm else 'here, one node at a time'}", flush=True)
    if not args.dry_run:
        write_input(study, nodes, out, shards, source)
    if slurm:
        return _submit(args, study, nodes, out)
    if args.dry_run:
        return _dry_run_local(nodes)
    from launch.study_run import run_local

    outcome = run_local(nodes, log=lambda text: print(text, flush=True))
    path = write_report(out)
    failed = [n for n, o in outcome.items() if o in ("failed", "blocked")]
    print(f"\nstudy {study.name}: {sum(o == 'ran' for o in outcome.values())} ran, "
          f"{sum(o == 'done' for o in outcome.values())} up to date"
          + (f", not finished: {', '.join(failed)}" if failed else "")
          + f"\n  {path}\n  {out / 'report.html'}\n  {out / 'report.md'}")
    return 1 if failed else 0


def _count(kinds: list[str], kind: str, noun: str) -> str:
    return f"{kinds.count(kind)} {noun}{'' if kinds.count(kind) == 1 else 's'}"


def _dry_run_local(nodes: list[Node]) -> int:
    from launch.study_run import train_command

    done: set[str] = set()
    for i, node in enumerate(nodes, 1):
        ok, why = st.state(node.spec, [d for d in node.deps if d not in done])
        done |= {node.name} if ok else set()
        would = (" ".join(train_command(node.spec)) if node.kind == "arm" else
                 f"python -m launch study node {node.dir / st.NODE_FILE}")
        print(f"[{i}/{len(nodes)}] {node.label} (needs {', '.join(node.deps) or 'nothing'}): {why}"
              + ("" if ok else f"\n    would run: {would}"))
    return 0


def _submit(args: argparse.Namespace, study: StudyConfig, nodes: list[Node], out: Path) -> int:
    from launch.__main__ import _spec, submit
    from launch.study_slurm import submit_plan

    args.log_dir = args.log_dir or str(out / "logs")
    base = _spec(args)
    scripts = Path(args.script) if args.script else out / "slurm"
    code = submit_plan(nodes, base, args.job_name or study.name, out, scripts, submit, args.dry_run,
                       log=lambda text: print(text, flush=True))
    if not code and not args.dry_run:
        print(f"follow it with: python -m launch study status {out}")
    return code


def cmd_status(args: argparse.Namespace) -> int:
    from launch.study_slurm import format_status, status_rows

    study, out, shards, _ = open_study(args.study, args.out, args.shards, recorded=True)
    nodes = plan(study, out, shards)
    print(f"study {study.name} ({out}); shards {shards}")
    print(format_status(nodes, status_rows(nodes, out)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    _, out, _, _ = open_study(args.study, args.out, args.shards, recorded=True)
    print(f"wrote {write_report(out)}, {out / 'report.html'} and {out / 'report.md'}")
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    """Inside a job: stamp and run one data or evaluation node, then rebuild the report (an evaluation's)."""
    from launch.study_run import run_node

    spec = st.read_spec(args.spec)
    print(f"study {spec['study']}: {spec['kind']} {spec['name']}", flush=True)
    try:
        run_node(spec, log=lambda text: print(text, flush=True))
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if spec["kind"] == "eval":
        print(f"wrote {write_report(Path(spec['study_dir']))}")
    return 0


def cmd_stamp(args: argparse.Namespace) -> int:
    spec = st.read_spec(args.spec)
    print(f"study {spec['study']}: {spec['kind']} {spec['name']} {st.stamp(spec)}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    action = argv[0] if argv and argv[0] in ACTIONS else "run"
    args = (_run_parser().parse_args(argv) if action == "run" else _action_parser(action).parse_args(argv[1:]))
    try:
        return {"run": cmd_run, "status": cmd_status, "report": cmd_report, "node": cmd_node,
                "stamp": cmd_stamp}[action](args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
