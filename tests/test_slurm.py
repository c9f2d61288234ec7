"""launch against a real SLURM (a private 2-node cluster): training jobs, rank mapping, pre-emption, failures,
sharding as an array job."""

import contextlib
import io
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from launch.__main__ import main as launch_main
from sharding import build
from sharding.config import CONFIG_ROOT
from sharding.mock import main as mock_main

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[1]
TINY = str(CONFIG_ROOT / "train" / "tiny.yaml")


def _train_args(shard_root: Path, out: Path, steps: int) -> list[str]:
    return ["--config", TINY, "--out-dir", str(out), "--max-steps", str(steps), "stage=full",
            f"data.loader.shard_root={shard_root}", "data.loader.image_size=56", "data.loader.num_workers=0",
            "data.global_batch_size=12", "data.val_max_samples=8", "val_every=1000", f"checkpoint_every={steps}"]


def _submit(cluster, tmp_path: Path, name: str, *args) -> str:
    """launch sbatch as a user runs it; returns the job id from sbatch's own 'Submitted batch job N' line."""
    env = {"SLURM_CONF": str(cluster.conf), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as printed:
        for key, value in env.items():
            mp.setenv(key, value)
        code = launch_main(["sbatch", "--job-name", name, "--time", "15", "--log-dir", str(tmp_path / "logs"),
                            "--script", str(tmp_path / f"{name}.sbatch"), *args])
    assert code == 0, printed.getvalue()
    return re.search(r"Submitted batch job (\d+)", printed.getvalue())[1]


def _cpu_job(shard_root, out, steps):
    return ["--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--", *_train_args(shard_root, out, steps)]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _steps(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in _records(out) if "event" not in r}


@pytest.fixture(scope="module")
def reference(slurm_cluster, shard_root, tmp_path_factory):
    """An uninterrupted 2-node CPU training job: what every interrupted run must reproduce."""
    tmp = tmp_path_factory.mktemp("slurm_reference")
    job = _submit(slurm_cluster, tmp, "reference", *_cpu_job(shard_root, tmp / "run", 12))
    return job, slurm_cluster.wait(job), tmp


def test_sbatch_runs_a_two_node_cpu_training_job_to_its_export(reference):
    job, info, tmp = reference
    assert info["JobState"] == "COMPLETED", info
    out = tmp / "run"
    assert (out / "export" / "export.json").is_file()
    meta = json.loads((out / "checkpoints" / "step00000012" / "meta.json").read_text())
    assert meta["world_size"] == 2
    script = (tmp / "reference.sbatch").read_text()
    assert "--gpus-per-node" not in script and "#SBATCH --ntasks-per-node=1" in script
    assert f"srun --kill-on-bad-exit=1 {sys.executable} -m launch srun" in script
    log = tmp / "logs" / f"reference-{job}.out"
    assert log.is_file() and f"job {job} (restart 0)" in log.read_text(errors="replace")


def test_srun_maps_ranks_on_both_nodes(slurm_cluster):
    result = slurm_cluster.run(["srun", "-N2", "--ntasks-per-node=2", sys.executable, "-m", "launch", "srun",
                                "--dry-run", "--", "--config", "x.yaml"], cwd=REPO)
    rows = [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in result.stdout.splitlines()]
    ranks = sorted((int(r["RANK"]), int(r["LOCAL_RANK"])) for r in rows)
    assert ranks == [(0, 0), (1, 1), (2, 0), (3, 1)]
    assert {r["WORLD_SIZE"] for r in rows} == {"4"} and {r["MASTER_ADDR"] for r in rows} == {"gsnode1"}
    assert len({r["MASTER_PORT"] for r in rows}) == 1


@pytest.mark.parametrize("how", ["requeue", "usr1"])
def test_preemption_saves_requeues_and_resumes_exactly(reference, slurm_cluster, shard_root, tmp_path, how):
    _, _, ref_tmp = reference
    out = tmp_path / "run"
    job = _submit(slurm_cluster, tmp_path, how, *_cpu_job(shard_root, out, 12))
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "log.jsonl").exists() and len(_steps(out)) >= 2):
        time.sleep(0.2)
    assert len(_steps(out)) >= 2, slurm_cluster.job_state(job)
    if how == "requeue":
        slurm_cluster.run(["scontrol", "requeue", job])
    else:
        slurm_cluster.run(["scancel", "--signal=USR1", job])
    slurm_cluster.release_requeued(job)
    info = slurm_cluster.wait(job, restarts=1, timeout=300)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, info
    reasons = [r["reason"] for r in _records(out) if r.get("event") == "checkpoint"]
    assert any(r.startswith("signal") for r in reasons), reasons
    ref, res = _steps(ref_tmp / "run"), _steps(out)
    assert [res[s]["batch_keys_hash"] for s in range(1, 13)] == [ref[s]["batch_keys_hash"] for s in range(1, 13)]
    assert res[12]["loss"] == pytest.approx(ref[12]["loss"], rel=1e-5)
    log = (tmp_path / "logs" / f"{how}-{job}.out").read_text(errors="replace")  # two tasks' progress bars
    assert f"job {job} (restart 0)" in log and f"job {job} (restart 1)" in log  # one log, appended


def test_a_task_that_dies_takes_the_job_down(slurm_cluster, shard_root, tmp_path):
    out = tmp_path / "run"
    job = _submit(slurm_cluster, tmp_path, "dies", *_cpu_job(shard_root, out, 400))
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "log.jsonl").exists() and len(_steps(out)) >= 1):
        time.sleep(0.2)
    victims = [pid for pid in _pids() if _environ(pid).get("SLURM_JOB_ID") == job
               and _environ(pid).get("SLURM_PROCID") == "1" and "launch" in _cmdline(pid)]
    assert victims, "rank 1's process was not found"
    os.kill(victims[0], signal.SIGKILL)  # a node or process lost mid-run
    info = slurm_cluster.wait(job, timeout=120)
    assert info["JobState"] in ("FAILED", "CANCELLED") and not (out / "export").exists(), info


def test_sharding_array_job_matches_a_one_process_build(slurm_cluster, tmp_path, monkeypatch, capsys):
    raw = tmp_path / "raw"
    assert mock_main(["--survey", "sdss", "--num-galaxies", "48", "--out", str(raw), "--seed", "4",
                      "--corrupt-fraction", "0.1", "--no-progress"]) == 0
    common = ["--catalog", str(raw / "gz2_hart16.csv"), "--images", str(raw / "images"), "--image-size", "64",
              "--samples-per-shard", "5", "--no-progress"]
    assert build.main(["--survey", "sdss", *common, "--out", str(tmp_path / "one")]) == 0
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    capsys.readouterr()
    assert launch_main(["shard", "--survey", "sdss", "--parts", "3", "--cpus-per-task", "1", "--time", "15",
                        "--log-dir", str(tmp_path / "logs"), "--script", str(tmp_path / "shard.sbatch"), "--",
                        *common, "--out", str(tmp_path / "parts")]) == 0
    array, merge = re.findall(r"Submitted batch job (\d+)", capsys.readouterr().out)
    assert slurm_cluster.wait(merge, timeout=300)["JobState"] == "COMPLETED"
    for task in range(1, 4):
        assert slurm_cluster.job_state(f"{array}_{task}").get("JobState") == "COMPLETED"
    one, parts = tmp_path / "one" / "sdss", tmp_path / "parts" / "sdss"
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in parts.iterdir())
    for path in one.iterdir():
        assert path.read_bytes() == (parts / path.name).read_bytes(), path.name


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_serve_job_answers_on_its_node_and_stops_on_scancel(slurm_cluster, eval_exports, eval_shards, tmp_path):
    """launch sbatch --entry serve: the replica starts on a node, says where it listens, answers a cutout, and
    scancel ends it."""
    import httpx

    from loaders.shards import SampleReader, load_survey_shards
    from train.world import free_port

    port = free_port()
    job = _submit(slurm_cluster, tmp_path, "serve", "--entry", "serve", "--nodes", "1", "--gpus-per-node", "0",
                  "--cpus-per-task", "1", "--", "--model", str(eval_exports["mixed"]), "--port", str(port),
                  "--device", "cpu")
    info = load_survey_shards(eval_shards[1] / "decals", "test")
    reader = SampleReader([info])
    image = reader.read(0, 0, 0)
    reader.close()
    url, deadline, answer = f"http://127.0.0.1:{port}", time.time() + 120, None
    while time.time() < deadline and answer is None:
        with contextlib.suppress(httpx.HTTPError):
            answer = httpx.get(f"{url}/healthz", timeout=2).status_code
        time.sleep(0.5)
    assert answer == 200, slurm_cluster.job_state(job)
    reply = httpx.post(f"{url}/v1/predict", files={"file": ("g.jpg", image, "image/jpeg")},
                       data={"survey": "decals"}, timeout=30)
    assert reply.status_code == 200 and reply.json()["model"]["version"] == "local", reply.text
    log = (tmp_path / "logs" / "serve.out").read_text() if (tmp_path / "logs" / "serve.out").exists() else \
        "\n".join(p.read_text() for p in (tmp_path / "logs").glob("*"))
    assert f":{port}" in log and "http://" in log, log
    slurm_cluster.run(["scancel", job])
    assert slurm_cluster.wait(job, timeout=60)["JobState"] == "CANCELLED"
