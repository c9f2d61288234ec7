"""Builds split into parts: each part renders a slice of every split; a merge packs the final shards in order.

Rendering is the expensive step, so N parts (an array job on N nodes) render in parallel, each into its own
folder under <out>/<survey>/_parts/. The merge then reads the rendered samples back in catalog order and packs
them with the same code a one-process build uses, so the survey's shards, index files, labels, rejects and
manifest are byte-identical to a one-process build's for any N. A part, and the merge, resume like a build.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd

from sharding.catalog import Reject
from sharding.writer import index_name

PARTS_DIR = "_parts"
MERGE_LOCK = "merge.lock"
_PART_NAME = re.compile(r"part-(\d+)-of-(\d+)$")


def parse_part(text: str) -> tuple[int, int]:
    """'2/8' -> (2, 8): the second of eight parts (1-based)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise ValueError(f"--part {text!r}: expected i/N with 1 <= i <= N, e.g. --part 1/4")
    return int(match[1]), int(match[2])


def part_dir(survey_dir: Path, index: int, count: int) -> Path:
    return survey_dir / PARTS_DIR / f"part-{index:03d}-of-{count:03d}"


def part_rows(labels: pd.DataFrame, splits: list[str], index: int, count: int) -> pd.DataFrame:
    """The i-th of N contiguous slices of every split's rows (catalog order kept within a split)."""
    pieces = []
    for split in splits:
        rows = labels[labels["split"] == split]
        lo, hi = (index - 1) * len(rows) // count, index * len(rows) // count
        pieces.append(rows.iloc[lo:hi])
    return pd.concat(pieces).sort_index() if pieces else labels.iloc[:0]


def finished_parts(survey_dir: Path) -> dict[int, Path]:
    """{part index: folder} of parts whose build finished (it wrote its manifest), for the one N found."""
    root = survey_dir / PARTS_DIR
    found: dict[int, dict[int, Path]] = {}
    for folder in sorted(root.glob("part-*-of-*")) if root.is_dir() else []:
        match = _PART_NAME.fullmatch(folder.name)
        if match and (folder / "manifest.json").is_file():
            found.setdefault(int(match[2]), {})[int(match[1])] = folder
    if len(found) > 1:
        raise ValueError(f"{root} holds parts of builds split {sorted(found)} ways; remove the stale ones")
    return next(iter(found.values()), {})


def expected_parts(survey_dir: Path) -> int | None:
    """N of the parts under _parts/ (finished or not), None when there are none."""
    root = survey_dir / PARTS_DIR
    counts = {int(m[2]) for f in (root.glob("part-*-of-*") if root.is_dir() else [])
              if (m := _PART_NAME.fullmatch(f.name))}
    if len(counts) > 1:
        raise ValueError(f"{root} holds parts of builds split {sorted(counts)} ways; remove the stale ones")
    return next(iter(counts), None)


def all_parts(survey_dir: Path) -> list[Path]:
    """Every part's folder, in order; ValueError naming the parts that have not finished."""
    count = expected_parts(survey_dir)
    if count is None:
        raise ValueError(f"{survey_dir / PARTS_DIR}: no parts to merge; build them with --part i/N first")
    done = finished_parts(survey_dir)
    missing = [i for i in range(1, count + 1) if i not in done]
    if missing:
        raise ValueError(f"cannot merge {survey_dir.name}: part(s) {missing} of {count} have not finished; run "
                         f"`python -m sharding.build ... --part i/{count}` for each")
    return [done[i] for i in range(1, count + 1)]


def try_lock(survey_dir: Path) -> bool:
    """Claim the merge (the last part to finish does it); False when another process already has."""
    try:
        os.close(os.open(survey_dir / PARTS_DIR / MERGE_LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


class PartReader:
    """The rendering step of a merge: each task's members (read back from its part's shards) or its reject."""

    def __init__(self, folders: list[Path]):
        self._where: dict[str, tuple[Path, dict[str, tuple[int, int]]]] = {}
        self._rejects: dict[int, Reject] = {}
        for folder in folders:
            for tar in sorted(folder.glob("*.tar")):
                for entry in _read_index(folder / index_name(tar.name)):
                    self._where[entry[0]] = (tar, entry[1])
            rejects = pd.read_parquet(folder / "rejects.parquet")
            for row in rejects[rejects["stage"] == "image"].itertuples(index=False):
                self._rejects[int(row.row)] = Reject(row.stage, row.reason, row.detail, int(row.row), row.object_id,
                                                     row.file)

    def __call__(self, tasks: list[tuple]) -> Iterator[tuple]:
        files: dict[Path, object] = {}
        try:
            for position, key, _object_id, row, _file_loc in tasks:
                if key in self._where:
                    tar, members = self._where[key]
                    handle = files.get(tar) or files.setdefault(tar, open(tar, "rb"))
                    yield position, key, {ext: _pread(handle, *span) for ext, span in members.items()}, None
                elif int(row) in self._rejects:
                    yield position, key, None, self._rejects[int(row)]
                else:
                    raise ValueError(f"row {row} ({key}) is in no part's shards or rejects: were the parts built from "
                                     "this catalog with these arguments?")
        finally:
            for handle in files.values():
                handle.close()


def _pread(handle, offset: int, size: int) -> bytes:
    return os.pread(handle.fileno(), size, offset)


def _read_index(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {ext: (offset, size)}) per sample of a DALI index written by ShardPacker."""
    out = []
    for line in path.read_text().splitlines()[1:]:
        parts = line.split()
        members = {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)}
        name = parts[3]
        out.append((name[:name.index(".")], members))
    return out


RenderAll = Callable[[list[tuple]], Iterator[tuple]]
