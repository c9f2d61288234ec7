"""A study on SLURM: one batch job per node that is not done, each submitted with --dependency=afterok on the jobs
of the nodes it needs; and its status, read back from the scheduler (scontrol, and sacct where the cluster keeps
accounting). <out>/study_jobs.json holds only the job ids submitted (and the spec each was asked to run), so a
re-submit finds the jobs already queued; their states always come from SLURM."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from launch import study_state as st
from launch.slurm import JobSpec, batch_script
from launch.study_graph import Node, dependants

JOBS_FILE = "study_jobs.json"
LIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED",
        "RESIZING", "SIGNALING", "STAGE_OUT"}
FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
NEVER = "DependencyNeverSatisfied"


def read_jobs(out: Path) -> dict[str, dict]:
    try:
        return json.loads((out / JOBS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a mapping; empty when SLURM no longer knows the job."""
    result = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    if result.returncode:
        return {}
    return dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)


def accounting(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """sacct's record of finished jobs SLURM has forgotten; empty where the cluster keeps no accounting."""
    if not job_ids:
        return {}
    fields = ["JobID", "State", "ExitCode", "Start", "End"]
    try:
        result = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", ",".join(fields)],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if result.returncode:
        return {}
    rows = [dict(zip(fields, line.split("|"))) for line in result.stdout.splitlines() if line.count("|") == 4]
    return {r["JobID"]: {"JobState": r["State"].split()[0], "ExitCode": r["ExitCode"], "StartTime": r["Start"],
                         "EndTime": r["End"], "Reason": "(sacct)"} for r in rows}


def node_job(base: JobSpec, prefix: str, node: Node) -> JobSpec:
    """An arm gets the study's allocation; the data node and evaluations one task on one node."""
    name = f"{prefix}-{node.name}"
    if node.kind == "arm":
        return replace(base, job_name=name)
    return replace(base, job_name=name, nodes=1, ntasks_per_node=1, gpus_per_node=min(base.gpus_per_node, 1))


def node_script(node: Node, spec: JobSpec) -> str:
    """An arm: the stamp (provenance, computed once its parents have exported) then training, pre-emption safe;
    the data node and evaluations: `python -m launch study node <spec>`."""
    node_file = str(node.dir / st.NODE_FILE)
    if node.kind == "arm":
        stamp = f"{shlex.quote(sys.executable)} -m launch study stamp {shlex.quote(node_file)}"
        return batch_script(spec, sys.executable, "train", ["--config", str(node.dir / st.CONFIG_FILE), "--resume",
                                                            "auto"], out_dir=str(node.dir), setup=(stamp,))
    return batch_script(spec, sys.executable, "study", ["node", node_file])


def submit_plan(nodes: list[Node], base: JobSpec, prefix: str, out: Path, scripts: Path, submit, dry_run: bool,
                log=print) -> int:
    """Submit every node that is not done and not already queued with the same spec, after the jobs it needs. A
    queued job is replaced (scancel, then a new one) when its spec changed, when a node it needs is submitted anew,
    or when it waits on a dependency that can never be satisfied."""
    jobs = read_jobs(out)
    queued: dict[str, str] = {}  # node -> the job its dependants wait for
    done: set[str] = set()
    fresh: set[str] = set()
    for node in nodes:
        is_done, why = st.state(node.spec, [d for d in node.deps if d not in done])
        if is_done:
            log(f"{node.label}: {why}")
            done.add(node.name)
            continue
        digest = st.spec_digest(node.spec)
        old = jobs.get(node.name, {})
        info = job_info(old["job_id"]) if old and not dry_run else {}
        if info.get("JobState") in LIVE:
            stale = ("its spec changed" if old.get("spec") != digest else
                     "a job it needs was submitted anew" if fresh & set(node.deps) else
                     "it waits on a failed job" if info.get("Reason") == NEVER else None)
            if stale is None:
                log(f"{node.label}: already {info['JobState'].lower()} as job {old['job_id']}, not submitted again")
                queued[node.name] = old["job_id"]
                continue
            subprocess.run(["scancel", old["job_id"]], capture_output=True)
            log(f"{node.label}: cancelled job {old['job_id']} ({stale})")
        job = _submit_node(node, base, prefix, scripts, [queued[d] for d in node.deps if d in queued], submit,
                           dry_run, log, why)
        if job is None:
            return 1
        jobs[node.name] = {"job_id": job, "spec": digest, "log": f"{base.log_dir}/{prefix}-{node.name}-{job}.out"}
        if not dry_run:
            st.write_atomically(out / JOBS_FILE, json.dumps(jobs, indent=2) + "\n")
        queued[node.name] = job
        fresh.add(node.name)
    return 0


def _submit_node(node: Node, base: JobSpec, prefix: str, scripts: Path, after: list[str], submit, dry_run: bool,
                 log, why: str) -> str | None:
    spec = node_job(base, prefix, node)
    text = node_script(node, spec)
    extra = ["--dependency", "afterok:" + ":".join(after)] if after else []
    if dry_run:
        log(f"{node.label}: {why}; would submit {spec.job_name} {' '.join(extra)}\n{text}")
        return f"<{node.name}>"
    st.write_spec(node.spec)
    path = scripts / f"{node.name}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    Path(spec.log_dir).mkdir(parents=True, exist_ok=True)  # SLURM opens --output before the script runs
    log(f"{node.label}: {why}; submitting {path}" + (f" after jobs {', '.join(after)}" if after else ""))
    code, job = submit(path, extra)
    if code or not job:
        log(f"{node.label}: sbatch failed (exit code {code}); nothing after it was submitted")
        return None
    return job


def status_rows(nodes: list[Node], out: Path) -> list[dict]:
    """Per node: its job (id, state, reason, start and end from SLURM) and whether its output is done."""
    jobs = read_jobs(out)
    infos = {name: job_info(rec["job_id"]) for name, rec in jobs.items()}
    gone = {rec["job_id"]: name for name, rec in jobs.items() if not infos[name]}
    for job_id, info in accounting(list(gone)).items():
        infos[gone[job_id]] = info
    rows, done = [], set()
    for node in nodes:
        is_done, why = st.state(node.spec, [d for d in node.deps if d not in done])
        if is_done:
            done.add(node.name)
        rec, info = jobs.get(node.name, {}), infos.get(node.name, {})
        rows.append({"node": node.name, "kind": node.kind, "job": rec.get("job_id", "-"), "log": rec.get("log"),
                     "state": info.get("JobState", "-" if not rec else "gone"), "reason": info.get("Reason", ""),
                     "start": info.get("StartTime", ""), "end": info.get("EndTime", ""),
                     "exit": info.get("ExitCode", ""), "done": is_done, "why": why})
    return rows


def format_status(nodes: list[Node], rows: list[dict]) -> str:
    lines = [f"{'node':<22}{'job':>8}  {'state':<11}{'reason':<26}{'start':<21}{'end':<21}output"]
    for r in rows:
        end = r["end"] if r["end"] not in ("Unknown", "None") else ""
        start = r["start"] if r["start"] not in ("Unknown", "None") and r["state"] != "PENDING" else ""
        lines.append(f"{r['node']:<22}{r['job']:>8}  {r['state']:<11}{r['reason'] if r['reason'] != 'None' else '':<26}"
                     f"{start:<21}{end:<21}{'done' if r['done'] else r['why']}")
    by_name = {r["node"]: r for r in rows}
    for r in rows:
        if r["state"] in FAILED and not r["done"]:
            stuck = [n for n in dependants(nodes, r["node"]) if by_name[n]["reason"] == NEVER]
            lines.append(f"\n{r['node']} {r['state'].lower()} (job {r['job']}, exit code {r['exit'] or '?'}; log "
                         f"{r['log']})")
            if stuck:
                lines.append(f"  never run: {', '.join(stuck)} (pending, Reason={NEVER}); fix {r['node']} and "
                             "re-submit the study: only what is not done is submitted, and those jobs are replaced")
    if any(r["state"] == "gone" for r in rows):
        lines.append("\ngone: SLURM no longer lists the job and the cluster keeps no accounting (sacct)")
    return "\n".join(lines)
