"""Checkpoints: DeepSpeed state with the sampler position, resolved config, schema and git commit; resume planning.

A checkpoint is complete or absent: every rank saves into a `partial-` folder, rank 0 writes meta.json into it
and renames it to its tag. A resume on another world size loads DeepSpeed's universal form of the checkpoint
(converted once, next to it, as <tag>_universal).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch.distributed as dist

from sharding.config import REPO_ROOT
from train.world import World

CHECKPOINT_DIR = "checkpoints"
META_NAME = "meta.json"
PARTIAL_PREFIX = "partial-"
UNIVERSAL_SUFFIX = "_universal"
_TAG = re.compile(r"step\d{8}")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def universal_tag(tag: str) -> str:
    return tag + UNIVERSAL_SUFFIX


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def complete_tags(out_dir: Path) -> list[str]:
    """Tags whose meta.json was written, i.e. every rank finished saving; oldest first."""
    root = checkpoint_root(out_dir)
    return sorted(p.parent.name for p in root.glob(f"step*/{META_NAME}") if _TAG.fullmatch(p.parent.name))


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


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Rank 0, after every rank saved: makes the checkpoint self-describing (and, once renamed, complete)."""
    path = Path(folder) / META_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**meta, "git_commit": git_commit()}, indent=2) + "\n")
    tmp.replace(path)


def read_meta(out_dir: Path, tag: str) -> dict[str, Any]:
    return json.loads((checkpoint_root(out_dir) / tag / META_NAME).read_text())


def prune(out_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints and their universal forms (rank 0 only)."""
    tags = complete_tags(out_dir)
    removed = tags[:-keep] if keep > 0 else []
    for tag in removed:
        shutil.rmtree(checkpoint_root(out_dir) / tag, ignore_errors=True)
        shutil.rmtree(checkpoint_root(out_dir) / universal_tag(tag), ignore_errors=True)
    return removed


def publish(root: Path, partial: str, final: str) -> None:
    """Rename a finished `partial` folder to `final`, replacing an older `final` (rank 0 only)."""
    target, old = root / final, root / f"{PARTIAL_PREFIX}old-{final}"
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    (root / partial).rename(target)
    shutil.rmtree(old, ignore_errors=True)


# ---- what a resumed run must share with the run that saved ----------------------------------------------------

def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for every entry of the run identity (schema, model, stage, LoRA) that differs."""
    differences = []
    for part, value in current.items():
        if part not in saved:
            continue  # written by an older version
        if part == "schema":
            old, new = list(saved[part]), list(value)
            if old != new:
                gone, added = [n for n in old if n not in new], [n for n in new if n not in old]
                detail = (f"missing {gone[:5]}" if gone else "") + (f" added {added[:5]}" if added else "")
                differences.append(f"schema: {detail.strip() or 'the feature order changed'}")
            continue
        old_flat, new_flat = _flatten(saved[part], part), _flatten(value, part)
        for key in sorted(set(old_flat) | set(new_flat)):
            if old_flat.get(key) != new_flat.get(key):
                differences.append(f"{key}: {old_flat.get(key)!r} -> {new_flat.get(key)!r}")
    return differences


@dataclass(frozen=True)
class ResumePlan:
    tag: str
    step: int
    saved_world_size: int
    universal: bool  # the world size changed: load the universal form of the checkpoint


def plan_resume(out_dir: Path, resume: str | None, identity: dict[str, Any], world_size: int,
                zero_stage: int) -> ResumePlan | None:
    """Which checkpoint to resume, and how; a ValueError (before any step) when it cannot be resumed here."""
    tag = resolve_resume(out_dir, resume)
    if tag is None:
        return None
    meta = read_meta(out_dir, tag)
    differences = identity_differences(meta, identity)
    if differences:
        raise ValueError(f"--resume {resume}: checkpoint {tag} in {checkpoint_root(out_dir)} was trained with a "
                         f"different model or schema ({'; '.join(differences[:8])}); start a new out_dir instead")
    saved = int(meta.get("world_size", world_size))
    universal = saved != world_size
    if universal and zero_stage == 0:
        raise ValueError(f"--resume {resume}: checkpoint {tag} was written by {saved} processes and this run has "
                         f"{world_size}; a change of world size needs ZeRO stage 1-3 (DeepSpeed's universal "
                         f"checkpoints), this run has zero_stage=0. Resume with {saved} processes.")
    return ResumePlan(tag, int(meta["step"]), saved, universal)


# ---- the checkpointer --------------------------------------------------------------------------------------------

class CheckpointEngine(Protocol):
    def save(self, directory: Path, tag: str, client_state: dict[str, Any]) -> None: ...
    def load(self, directory: Path, tag: str) -> dict[str, Any]: ...


class Checkpointer:
    """Saves and restores a run's training state (in the manner of torchtitan's CheckpointManager).

    `engine` saves and loads DeepSpeed state; `convert` makes a checkpoint's universal form (DeepSpeed's
    ds_to_universal); `meta` is what meta.json records besides the step and sampler (config, schema, model,
    world size); `on_event` receives the checkpoint records for the run log (rank 0).
    """

    def __init__(self, engine: CheckpointEngine, out_dir: Path, world: World, keep: int, meta: dict[str, Any],
                 convert: Callable[[Path, Path], None], on_event: Callable[[dict], None]):
        self.engine, self.root, self.out_dir, self.world = engine, checkpoint_root(out_dir), Path(out_dir), world
        self.keep, self.meta, self.convert, self.on_event = keep, meta, convert, on_event
        self.last_saved_step: int | None = None

    def save(self, step: int, client_state: dict[str, Any], reason: str) -> bool:
        """Collective. False when this step is already saved (a signal at a periodic-checkpoint step)."""
        if step == self.last_saved_step:
            return False
        tag = tag_for(step)
        partial = PARTIAL_PREFIX + tag
        if self.world.is_main:
            shutil.rmtree(self.root / partial, ignore_errors=True)  # what a killed save left
        dist.barrier()
        self.engine.save(self.root, partial, client_state)
        dist.barrier()
        if self.world.is_main:
            write_meta(self.root / partial, {"step": step, "sampler": client_state.get("sampler"), "reason": reason,
                                             **self.meta})
            publish(self.root, partial, tag)
            shutil.rmtree(self.root / universal_tag(tag), ignore_errors=True)  # converted from an older save
            (self.root / "latest").write_text(tag)  # DeepSpeed's pointer, for its zero_to_fp32.py
            prune(self.out_dir, self.keep)
            self.on_event({"event": "checkpoint", "step": step, "tag": tag, "reason": reason})
        dist.barrier()
        self.last_saved_step = step
        return True

    def load(self, plan: ResumePlan) -> dict[str, Any]:
        """Collective: restores DeepSpeed state and returns the client state (step, sampler)."""
        tag = plan.tag
        if plan.universal:
            tag = universal_tag(plan.tag)
            if self.world.is_main and not (self.root / tag).is_dir():
                partial = PARTIAL_PREFIX + tag
                shutil.rmtree(self.root / partial, ignore_errors=True)
                self.convert(self.root / plan.tag, self.root / partial)
                publish(self.root, partial, tag)
                (self.root / "latest_universal").write_text(tag)
            dist.barrier()
        client = self.engine.load(self.root, tag)
        if "step" not in client:  # a universal load may not carry our client state; meta.json has it
            meta = read_meta(self.out_dir, plan.tag)
            client = {"step": meta["step"], "sampler": meta["sampler"]}
        self.last_saved_step = int(client["step"])
        return client
