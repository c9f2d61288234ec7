"""Checkpoints: DeepSpeed state with the sampler position, resolved config, schema and git commit; resume lookup."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from sharding.config import REPO_ROOT

CHECKPOINT_DIR = "checkpoints"
META_NAME = "meta.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def complete_tags(out_dir: Path) -> list[str]:
    """Tags whose meta.json was written, i.e. every rank finished saving; oldest first."""
    root = checkpoint_root(out_dir)
    return sorted(p.parent.name for p in root.glob(f"step*/{META_NAME}"))


def resolve_resume(out_dir: Path, resume: str | None) -> str | None:
    """`auto` -> the latest complete checkpoint or None (fresh start); a tag or a path -> that tag."""
    if resume in (None, "", "none"):
        return None
    tags = complete_tags(out_dir)
    if resume == "auto":
        return tags[-1] if tags else None
    tag = Path(resume).name
    if tag not in tags:
        raise ValueError(f"--resume {resume}: no complete checkpoint {tag} in {checkpoint_root(out_dir)} "
                         f"(found {tags or 'none'})")
    return tag


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_meta(out_dir: Path, tag: str, meta: dict[str, Any]) -> None:
    """Rank 0, after every rank saved: marks the checkpoint complete and self-describing."""
    path = checkpoint_root(out_dir) / tag / META_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**meta, "git_commit": git_commit()}, indent=2) + "\n")
    tmp.replace(path)


def read_meta(out_dir: Path, tag: str) -> dict[str, Any]:
    return json.loads((checkpoint_root(out_dir) / tag / META_NAME).read_text())


def prune(out_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints (rank 0 only)."""
    tags = complete_tags(out_dir)
    removed = tags[:-keep] if keep > 0 else []
    for tag in removed:
        shutil.rmtree(checkpoint_root(out_dir) / tag, ignore_errors=True)
    return removed
