"""Checkpoints: DeepSpeed state with the sampler position, resolved config, schema and git commit; resume planning.

A checkpoint is complete or absent: every rank saves into a `partial-` folder, rank 0 writes meta.json into it
and renames it to its tag (train.publish), then points `latest` at it. A resume on another world size loads
DeepSpeed's universal form of the checkpoint (converted once, next to it, as <tag>_universal). On a filesystem
shared by several nodes, every rank waits until it sees what rank 0 published before reading it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Protocol

import torch.distributed as dist

from sharding.config import REPO_ROOT
from train.publish import (META_NAME, PARTIAL_PREFIX, VISIBILITY_TIMEOUT_S, discard, is_complete, publish,
                           repair_publishes, set_pointer, wait_visible)
from train.world import World

CHECKPOINT_DIR = "checkpoints"
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
    update_pointers(out_dir, leaving={name for tag in removed for name in (tag, universal_tag(tag))})
    for tag in removed:
        discard(checkpoint_root(out_dir) / tag)
        discard(checkpoint_root(out_dir) / universal_tag(tag))
    return removed


def update_pointers(out_dir: Path, leaving: Collection[str] = ()) -> list[str]:
    """Point `latest` at the newest complete checkpoint (the one `--resume auto` takes) and `latest_universal` at the
    newest complete universal form, leaving out the folders about to move or go (rank 0). What changed."""
    root = checkpoint_root(out_dir)
    tags = complete_tags(out_dir)
    names = [t for t in tags if t not in leaving]
    universal = [u for u in map(universal_tag, tags) if u not in leaving and is_complete(root / u)]
    return (set_pointer(root, "latest", names[-1] if names else None)
            + set_pointer(root, "latest_universal", universal[-1] if universal else None))


def repair_checkpoints(out_dir: Path) -> list[str]:
    """Rank 0 at start-up, before any rank lists the checkpoints: finish or undo a publish that a crash cut short,
    and point the pointers at the newest complete folders. What was done, for the log."""
    if not checkpoint_root(out_dir).is_dir():
        return []
    return repair_publishes(checkpoint_root(out_dir)) + update_pointers(out_dir)


def shared_resolver(world: World, timeout_s: float = VISIBILITY_TIMEOUT_S) -> Callable[[Path, str | None], str | None]:
    """resolve_resume as a collective, for plan_resume: rank 0 repairs the checkpoints and resolves `resume`; every
    rank takes its answer and waits until it sees that checkpoint. Each rank resolving `auto` itself could pick a
    different checkpoint on a node that does not see the newest one yet."""
    def resolve(out_dir: Path, resume: str | None) -> str | None:
        answer: list[Any] = [None]
        if world.is_main:
            try:
                for line in repair_checkpoints(out_dir):
                    print(f"checkpoints: {line}", file=sys.stderr, flush=True)
                answer = [("tag", resolve_resume(out_dir, resume))]
            except (ValueError, OSError) as err:
                answer = [(type(err).__name__, str(err))]  # the other ranks raise too, rather than wait for ever
        if world.world_size > 1:
            dist.broadcast_object_list(answer, src=0)
        kind, value = answer[0]
        if kind != "tag":
            raise (ValueError if kind == "ValueError" else RuntimeError)(value)
        if value is not None:
            wait_visible(checkpoint_root(out_dir) / value, timeout_s)
        return value
    return resolve


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


def plan_resume(out_dir: Path, resume: str | None, identity: dict[str, Any], world_size: int, zero_stage: int,
                resolve: Callable[[Path, str | None], str | None] = resolve_resume) -> ResumePlan | None:
    """Which checkpoint to resume, and how; a ValueError (before any step) when it cannot be resumed here.

    `resolve`: resolve_resume, or shared_resolver(world) in a run of several processes."""
    tag = resolve(out_dir, resume)
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
    # Must not write a pointer to `tag` (DeepSpeed's `latest`): the folder is renamed after the save.
    def save(self, directory: Path, tag: str, client_state: dict[str, Any]) -> None: ...
    def load(self, directory: Path, tag: str) -> dict[str, Any]: ...


class Checkpointer:
    """Saves and restores a run's training state (in the manner of torchtitan's CheckpointManager).

    `engine` saves and loads DeepSpeed state; `convert` makes a checkpoint's universal form (DeepSpeed's
    ds_to_universal); `meta` is what meta.json records besides the step and sampler (config, schema, model,
    world size); `on_event` receives the checkpoint records for the run log (rank 0); `visibility_timeout_s` bounds
    how long a rank waits to see a folder that rank 0 published.
    """

    def __init__(self, engine: CheckpointEngine, out_dir: Path, world: World, keep: int, meta: dict[str, Any],
                 convert: Callable[[Path, Path], None], on_event: Callable[[dict], None],
                 visibility_timeout_s: float = VISIBILITY_TIMEOUT_S):
        self.engine, self.root, self.out_dir, self.world = engine, checkpoint_root(out_dir), Path(out_dir), world
        self.keep, self.meta, self.convert, self.on_event = keep, meta, convert, on_event
        self.visibility_timeout_s = visibility_timeout_s
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
            # An older save of this step moves aside while this one is published: no pointer may name it meanwhile.
            # Its universal form would be loaded in place of this save's: it goes first.
            update_pointers(self.out_dir, leaving={tag, universal_tag(tag)})
            discard(self.root / universal_tag(tag))
            publish(self.root, partial, tag)
            update_pointers(self.out_dir)
            prune(self.out_dir, self.keep)
            self.on_event({"event": "checkpoint", "step": step, "tag": tag, "reason": reason})
        dist.barrier()  # rank 0 has published it
        wait_visible(self.root / tag, self.visibility_timeout_s)
        self.last_saved_step = step
        return True

    def load(self, plan: ResumePlan) -> dict[str, Any]:
        """Collective: restores DeepSpeed state and returns the client state (step, sampler)."""
        tag = universal_tag(plan.tag) if plan.universal else plan.tag
        if plan.universal:
            if self.world.is_main and not is_complete(self.root / tag):
                self._convert(plan.tag, tag)
            dist.barrier()  # rank 0 has published the universal form
        wait_visible(self.root / tag, self.visibility_timeout_s)
        client = self.engine.load(self.root, tag)
        if "step" not in client:  # a universal load may not carry our client state; meta.json has it
            meta = read_meta(self.out_dir, plan.tag)
            client = {"step": meta["step"], "sampler": meta["sampler"]}
        self.last_saved_step = int(client["step"])
        return client

    def _convert(self, tag: str, universal: str) -> None:
        """Rank 0: publish the universal form of `tag` as `universal`, complete with a copy of tag's meta.json
        (a folder converted before it had one, or cut short, is converted again)."""
        partial = PARTIAL_PREFIX + universal
        shutil.rmtree(self.root / partial, ignore_errors=True)
        self.convert(self.root / tag, self.root / partial)
        shutil.copyfile(self.root / tag / META_NAME, self.root / partial / META_NAME)
        update_pointers(self.out_dir, leaving={universal})
        publish(self.root, partial, universal)
        update_pointers(self.out_dir)
