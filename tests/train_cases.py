"""Shared helpers of the training tests: commands for `python -m train` (one process or torchrun), its logs, and
a world of one process for unit-testing collectives."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sharding.config import CONFIG_ROOT
from train.world import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = str(CONFIG_ROOT / "train" / "tiny.yaml")


def _overrides(shard_root: Path, **extra) -> list[str]:
    base = {"data.loader.shard_root": str(shard_root), "data.loader.image_size": 56, "data.loader.num_workers": 0,
            "data.global_batch_size": 12, "data.val_max_samples": 16, "val_every": 1000, "log_every": 1}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _command(nproc: int, out_dir: Path, max_steps: int, overrides: list[str], resume: str = "none") -> list[str]:
    train_args = ["--config", TINY, "--out-dir", str(out_dir), "--max-steps", str(max_steps), "--resume", resume,
                  *overrides]
    if nproc == 1:
        return [sys.executable, "-m", "train", *train_args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), "-m", "train", *train_args]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _steps(out_dir: Path) -> dict[int, dict]:
    """The last record of every step (a killed run may have logged steps that the resumed run redoes)."""
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "event" not in r}


def _events(out_dir: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("event") == kind]



def _kill_after_checkpoint(cmd: list[str], out_dir: Path, tag: str, timeout: float = 240) -> None:
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    meta = out_dir / "checkpoints" / tag / "meta.json"
    deadline = time.time() + timeout
    while time.time() < deadline and not meta.exists() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert meta.exists(), "the run died before its checkpoint"
    assert not (out_dir / "export").exists(), "the run finished before it could be killed"



def _run_status(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _pretrained_tiny(folder: Path) -> dict:
    """A saved random tiny DINOv2 (the frozen weights' original fp32 values) -> its state dict."""
    import torch
    from transformers import Dinov2Model

    from models.backbone import dinov2_config
    from models.config import load_model_config
    if not folder.exists():
        torch.manual_seed(5)
        Dinov2Model(dinov2_config(load_model_config("tiny").backbone)).save_pretrained(folder)
    return {k: v for k, v in Dinov2Model.from_pretrained(folder).state_dict().items()}
