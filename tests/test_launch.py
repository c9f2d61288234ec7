"""launch: SLURM node lists and environment mapping, sbatch scripts, and real srun-style tasks on gloo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.__main__ import main as launch_main
from launch.slurm import JobSpec, batch_script, expand_nodelist, torch_env_from_slurm
from sharding.config import CONFIG_ROOT
from train.world import free_port, world_from_env

REPO = Path(__file__).resolve().parents[1]


def test_expand_nodelist():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("nid[001000-001001]") == ["nid001000", "nid001001"]
    assert expand_nodelist("localhost") == ["localhost"]
    assert expand_nodelist("gpu[01-02]-ib") == ["gpu01-ib", "gpu02-ib"]  # a suffix after the range is real
    assert expand_nodelist("r[1-2]n[3,5],x1") == ["r1n3", "r1n5", "r2n3", "r2n5", "x1"]
    for bad in ("gpu[01-02", "gpu[a-b]", ""):
        with pytest.raises(ValueError):
            expand_nodelist(bad)


def test_slurm_to_torch_env_and_world():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[10-13]",
           "SLURM_JOB_ID": "123456", "SLURM_NTASKS_PER_NODE": "2(x4)"}
    mapped = torch_env_from_slurm(env)
    assert mapped["MASTER_ADDR"] == "gpu10" and mapped["LOCAL_WORLD_SIZE"] == "2"
    assert mapped["MASTER_PORT"] == str(20000 + 123456 % 20000)
    world = world_from_env(mapped)
    assert (world.rank, world.local_rank, world.world_size) == (5, 1, 8)
    with pytest.raises(ValueError, match="not inside an srun task"):
        torch_env_from_slurm({})


GOLDEN = Path(__file__).parent / "golden"
PY = "/opt/venv/bin/python"


@pytest.mark.parametrize("name, spec, args, out_dir", [
    ("gpu_1node.sbatch", JobSpec(job_name="head", nodes=1, gpus_per_node=4, cpus_per_task=32, time="12:00:00",
                                 account="m1234", constraint="gpu"),
     ["--resume", "auto", "--config", "configs/train/head.yaml"], "runs/head_triple"),
    ("gpu_8nodes.sbatch", JobSpec(job_name="full", nodes=8, gpus_per_node=4, cpus_per_task=32, time="2-00:00:00",
                                  account="m1234", qos="regular", constraint="gpu&hbm80g"),
     ["--resume", "auto", "--config", "configs/train/full.yaml", "optim.lr=5e-5"], "runs/full_triple"),
    ("cpu_2nodes.sbatch", JobSpec(job_name="cpu", nodes=2, gpus_per_node=0, ntasks_per_node=4, cpus_per_task=8,
                                  time="4:00:00", partition="cpu"),
     ["--resume", "auto", "--config", "configs/train/tiny.yaml"], "runs/tiny"),
])
def test_batch_scripts_match_the_golden_files(name, spec, args, out_dir):
    assert batch_script(spec, PY, "train", args, out_dir) == (GOLDEN / name).read_text()


def test_sbatch_dry_run_writes_the_script_the_cli_describes(tmp_path, capsys):
    path = tmp_path / "job.sbatch"
    assert launch_main(["sbatch", "--dry-run", "--nodes", "8", "--account", "m1234", "--time", "12:00:00",
                        "--log-dir", str(tmp_path / "logs"), "--script", str(path), "--", "--config",
                        str(CONFIG_ROOT / "train" / "head.yaml")]) == 0
    script = path.read_text()
    assert script == batch_script(JobSpec(nodes=8, account="m1234", time="12:00:00", constraint="gpu",
                                          log_dir=str(tmp_path / "logs")), sys.executable, "train",
                                  ["--resume", "auto", "--config", str(CONFIG_ROOT / "train" / "head.yaml")],
                                  "runs/head_triple")
    assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --ntasks-per-node=4" in script
    assert not (tmp_path / "logs").exists()  # a dry run creates nothing but the script
    assert launch_main(["sbatch", "--dry-run", "--gpus-per-node", "0", "--ntasks-per-node", "3", "--script",
                        str(path), "--", "--config", str(CONFIG_ROOT / "train" / "tiny.yaml")]) == 0
    cpu = path.read_text()
    assert "gpus" not in cpu and "constraint" not in cpu and "#SBATCH --ntasks-per-node=3" in cpu
    assert launch_main(["sbatch", "--dry-run", "--entry", "eval", "--gpus-per-node", "1", "--script", str(path),
                        "--", "predict", "--model", "runs/x"]) == 0
    evaluation = path.read_text()
    assert "-m eval predict --model runs/x" in evaluation and "requeue" not in evaluation


@pytest.mark.parametrize("flag, value", [("--job-name", "evil\nrm -rf /"), ("--job-name", "a b"),
                                         ("--partition", "gpu;ls"), ("--account", "$(id)"), ("--time", "tomorrow"),
                                         ("--constraint", "gpu\n#SBATCH --x"), ("--log-dir", "my logs")])
def test_values_that_could_leave_their_directive_are_refused(flag, value, tmp_path, capsys):
    assert launch_main(["sbatch", "--dry-run", flag, value, "--script", str(tmp_path / "j.sbatch"), "--",
                        "--config", str(CONFIG_ROOT / "train" / "tiny.yaml")]) == 2
    assert flag in capsys.readouterr().err and not (tmp_path / "j.sbatch").exists()


def test_torchrun_dry_run(capsys):
    assert launch_main(["torchrun", "--nproc-per-node", "4", "--dry-run", "--", "--config", "x.yaml"]) == 0
    out = capsys.readouterr().out
    assert "torch.distributed.run --nproc_per_node 4" in out and "-m train --config x.yaml" in out


@pytest.mark.slow
def test_two_srun_tasks_train_together(shard_root, tmp_path):
    """Two processes with only SLURM variables (as srun starts them) form one gloo job and train."""
    out = tmp_path / "run"
    port = free_port()
    args = ["--config", str(CONFIG_ROOT / "train" / "tiny.yaml"), "--out-dir", str(out), "--max-steps", "2",
            f"data.loader.shard_root={shard_root}", "data.loader.image_size=56", "data.global_batch_size=12",
            "val_every=1000", "data.val_max_samples=8"]
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
        env.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2", SLURM_JOB_ID="1",
                   SLURM_JOB_NODELIST="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "launch", "srun", "--", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    assert [s["step"] for s in steps] == [1, 2]
    assert (out / "export" / "model.safetensors").is_file()
    meta = json.loads((out / "checkpoints" / "step00000002" / "meta.json").read_text())
    assert meta["world_size"] == 2
