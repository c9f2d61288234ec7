"""Checkpoint folders on a shared filesystem (NFS, Lustre): publishing, pointer files, start-up repair, visibility.

A folder is complete when its meta.json exists: rank 0 writes it last, once every rank has saved. Rank 0 publishes
a complete folder by renaming it from its `partial-` name, so it appears under its final name all at once.
Replacing an existing folder takes two renames; `repair_publishes` finishes or undoes one that a crash cut short.
Pointer files (`latest`) are replaced atomically and only ever name a complete folder. Other nodes may see a
rename late (their clients cache directory entries), so readers wait for what rank 0 announced: `wait_visible`.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

META_NAME = "meta.json"
PARTIAL_PREFIX = "partial-"
OLD_PREFIX = PARTIAL_PREFIX + "old-"  # a published folder being replaced
VISIBILITY_TIMEOUT_S = 120.0  # NFS clients cache directory attributes for up to 60 s (acdirmax) by default


def is_complete(folder: Path) -> bool:
    return (Path(folder) / META_NAME).is_file()


def discard(folder: Path) -> None:
    """Delete a folder; meta.json goes first, so a deletion cut short never leaves a folder that looks complete."""
    (Path(folder) / META_NAME).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def publish(root: Path, partial: str, final: str) -> None:
    """Rename a complete `partial` folder to `final`, replacing an older `final` (rank 0 only).

    A directory cannot replace a non-empty one in a single rename: the older one moves aside to partial-old-<final>
    first. A crash between the two renames leaves both under partial- names, for `repair_publishes` to resolve.
    """
    target, old = root / final, root / (OLD_PREFIX + final)
    if target.exists():
        discard(old)  # the remains of a replacement whose clean-up was cut short
        os.rename(target, old)
    os.rename(root / partial, target)
    discard(old)


def repair_publishes(root: Path) -> list[str]:
    """Finish or undo every publish a crash interrupted (rank 0, at start-up, before any rank lists checkpoints).

    partial-old-X is the folder X was replacing. If X is complete the crash came after the second rename and only
    the clean-up was left; if partial-X is complete it came between the renames, and the newer folder is
    published; otherwise the older folder is the newest complete copy of X and goes back. Returns what was done.
    """
    done = []
    for old in sorted(root.glob(OLD_PREFIX + "*")):
        name = old.name[len(OLD_PREFIX):]
        target, new = root / name, root / (PARTIAL_PREFIX + name)
        if is_complete(target):
            done.append(f"removed {old.name}: {name} was already published")
        elif is_complete(new) or is_complete(old):
            source = new if is_complete(new) else old
            discard(target)  # never a checkpoint: an incomplete folder under the final name
            os.rename(source, target)
            done.append(f"published {source.name} as {name}: a crash had interrupted its publish")
        else:
            done.append(f"removed {old.name}: neither it nor {new.name} is complete")
        discard(old)
    return done


def read_pointer(root: Path, name: str) -> str | None:
    try:
        return (root / name).read_text().strip() or None
    except FileNotFoundError:
        return None


def write_pointer(root: Path, name: str, tag: str) -> None:
    """Point `name` (DeepSpeed's `latest`, which its zero_to_fp32.py reads) at `tag`, by atomic replace: a reader
    sees the old tag or the new one, never an empty or half-written file."""
    tmp = root / f".{name}.tmp"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())  # the content reaches the server before the rename makes it the pointer
    os.replace(tmp, root / name)


def set_pointer(root: Path, name: str, tag: str | None) -> list[str]:
    """`name` -> `tag` (a complete folder), or no pointer when there is none; what changed, for the log."""
    current = read_pointer(root, name)
    if current == tag:
        return []
    if tag is None:
        (root / name).unlink(missing_ok=True)
        return [f"removed {name}: it named {current}, which is not a complete checkpoint"]
    write_pointer(root, name, tag)
    return [f"{name}: {current} -> {tag}"]


def _visible(folder: Path) -> bool:
    try:
        # Reading the parent makes an NFS client revalidate its cached entries for it, including a cached
        # "no such file" for the folder, instead of waiting for the attribute cache to expire.
        os.listdir(folder.parent)
    except OSError:
        pass
    return is_complete(folder)


def wait_visible(folder: Path, timeout_s: float, poll_s: float = 0.5) -> None:
    """Return once this node sees `folder` complete; a TimeoutError after `timeout_s` that says what to check.

    Rank 0 published the folder and announced it (a barrier or broadcast) before any rank calls this.
    """
    deadline = time.monotonic() + timeout_s
    while not _visible(folder):
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"checkpoint {folder} (with its {META_NAME}), published by rank 0, is not visible on "
                f"{socket.gethostname()} after {timeout_s:g} s. Every node must see out_dir on one shared "
                f"filesystem (NFS, Lustre, ...): check that out_dir is not on node-local disk and is mounted here; "
                f"on a slow filesystem raise checkpoint_visibility_timeout_s")
        time.sleep(poll_s)
