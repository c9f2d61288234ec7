"""A private SLURM cluster on this machine for the launch tests: munge, slurmctld and two slurmd "nodes".

Debian's slurm-wlm runs several slurmd on one host (`slurmd -N name`, one NodeName line with a port range).
Everything lives in a temporary folder and is stopped afterwards; clients find it through SLURM_CONF.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

NODES = ("gsnode1", "gsnode2")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")


def unavailable() -> str | None:
    """Why no cluster can start here (None when it can)."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"SLURM binaries {missing} not installed (apt-get install slurm-wlm munge; .ci/run does it as root)"
    if os.geteuid() != 0:
        return "the private SLURM cluster needs root (munge key, slurmd)"
    return None


def _free_ports(count: int) -> list[int]:
    """`count` consecutive free TCP ports (slurmd takes a port range)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count >= 65000:
            continue
        ok = True
        for port in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return list(range(base, base + count))
    raise RuntimeError("no free port range for the SLURM daemons")


def _ensure_munge() -> None:
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)


def _ensure_hosts() -> None:
    """The node names resolve to this machine (MASTER_ADDR is the first node's name)."""
    hosts = Path("/etc/hosts")
    text = hosts.read_text()
    if not all(re.search(rf"\b{n}\b", text) for n in NODES):
        hosts.write_text(text.rstrip("\n") + f"\n127.0.0.1 {' '.join(NODES)}\n")


class Cluster:
    def __init__(self, root: Path, cpus_per_node: int = 2):
        self.root = root
        self.conf = root / "slurm.conf"
        ctld, node_lo, node_hi = _free_ports(3)[0], *_free_ports(2)
        host = socket.gethostname()
        spool = root / "spool"
        spool.mkdir(parents=True, exist_ok=True)
        self.conf.write_text("\n".join([
            "ClusterName=sommelier-test", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ctld}",
            "SlurmUser=root", "AuthType=auth/munge", "CredType=cred/munge", "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "ReturnToService=2",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/backfill",
            "JobRequeue=1", "KillWait=30", "MinJobAge=600", "InactiveLimit=0", "Waittime=0",
            f"StateSaveLocation={spool}/ctld", f"SlurmdSpoolDir={spool}/slurmd-%n",
            f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd-%n.pid",
            f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd-%n.log",
            "SlurmctldDebug=info", "SlurmdDebug=info", "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
            f"NodeName=gsnode[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port={node_lo}-{node_hi} "
            f"CPUs={cpus_per_node} State=UNKNOWN",
            "PartitionName=debug Nodes=gsnode[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES", ""]))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 60) -> None:
        _ensure_munge()
        _ensure_hosts()
        (self.root / "spool" / "ctld").mkdir(parents=True, exist_ok=True)
        self._procs.append(subprocess.Popen(["slurmctld", "-D", "-c", "-f", str(self.conf)], env=self.env,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1)
        for node in NODES:
            self._procs.append(subprocess.Popen(["slurmd", "-D", "-c", "-f", str(self.conf), "-N", node],
                                                env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if all(states.get(n, "").startswith(("idle", "mix", "alloc")) for n in NODES):
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SLURM nodes did not come up: {out!r}; see {self.root}/*.log")

    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              check=check, **kw)

    def job_state(self, job: str) -> dict[str, str]:
        out = self.run(["scontrol", "show", "job", "-o", job], check=False).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait(self, job: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
             timeout: float = 300, restarts: int | None = None) -> dict[str, str]:
        """Poll until the job is in one of `states` (and has restarted `restarts` times, if given)."""
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job_state(job)
            if info.get("JobState") in states and (restarts is None or int(info.get("Restarts", 0)) >= restarts):
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still {info.get('JobState')} after {timeout} s: {info}")

    def release_requeued(self, job: str, timeout: float = 240) -> None:
        """Start a requeued job soon: slurmctld holds requeued jobs for ~2 minutes (BeginTime), as it should on a
        busy cluster, which would only make the tests wait.

        Not at once: slurmd revokes the killed attempt's job credential with one-second resolution and refuses
        ("Job credential revoked", the job then FAILS) a relaunch within the same second; 3 s is clear of that.
        """
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job_state(job)
            if info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) >= 1:
                self.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], check=False)
                return
            time.sleep(0.3)
        raise TimeoutError(f"job {job} was not requeued within {timeout} s: {self.job_state(job)}")

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        for proc in reversed(self._procs):
            proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._procs = []
