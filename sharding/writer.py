"""Shard files: webdataset tars written under a temporary name, DALI index files, checksums, atomic renames."""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

INDEX_VERSION = "v1.2"
TMP_SUFFIX = ".tmp"
# A fixed mtime (and webdataset's fixed user/group/mode) makes the same samples give byte-identical tars.
TAR_MTIME = 0  # an int: a float mtime makes tarfile add a 1 KiB PAX header to every member


@dataclass(frozen=True)
class ShardRecord:
    name: str
    split: str
    num_samples: int
    bytes: int
    sha256: str
    keys: tuple[str, ...] = field(repr=False)

    def manifest_entry(self) -> dict:
        return {"name": self.name, "split": self.split, "num_samples": self.num_samples, "bytes": self.bytes,
                "sha256": self.sha256, "index": index_name(self.name)}


def shard_name(survey: str, split: str, number: int) -> str:
    return f"{survey}-{split}-{number:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx"


def tar_members(tar_path: str | Path) -> list[tuple[str, int, int]]:
    """(member name, data offset, size) of every regular file in a tar, in order."""
    with tarfile.open(tar_path, "r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isreg()]


def index_text(tar_path: str | Path) -> str:
    """The DALI webdataset index (the format of DALI's wds2idx, v1.2) of a tar.

    Written here rather than by calling DALI's wds2idx so that building shards does not need
    DALI installed; tests check the text is identical to wds2idx's.
    """
    samples: list[list[str]] = []
    last_base = None
    for name, offset, size in tar_members(tar_path):
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)
        base, ext = name[:dot], name[dot + 1:]
        if not base or base.endswith("/"):
            continue
        entry = f"{ext} {offset} {size} {name}"
        if base != last_base:
            samples.append([entry])
            last_base = base
        else:
            samples[-1].append(entry)
    if not samples:
        raise ValueError(f"{tar_path}: empty webdataset tar, nothing to index")
    lines = [f"{INDEX_VERSION} {len(samples)}"] + [" ".join(s) for s in samples]
    return "\n".join(lines) + "\n"


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _replace_durably(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


class ShardPacker:
    """Packs samples of one split into fixed-size shards; a shard appears under its final name only when complete."""

    def __init__(self, out_dir: Path, survey: str, split: str, samples_per_shard: int, first_shard: int = 0):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be at least 1")
        self.out_dir = Path(out_dir)
        self.survey, self.split = survey, split
        self.samples_per_shard = samples_per_shard
        self.next_shard = first_shard
        self._writer: wds.TarWriter | None = None
        self._file = None
        self._keys: list[str] = []

    def _open(self) -> None:
        tmp = self.out_dir / (shard_name(self.survey, self.split, self.next_shard) + TMP_SUFFIX)
        self._file = open(tmp, "wb")
        self._writer = wds.TarWriter(self._file, mtime=TAR_MTIME, encoder=False)

    def add(self, key: str, members: dict[str, bytes]) -> ShardRecord | None:
        """Append one sample; returns the shard's record when this sample completed it."""
        if self._writer is None:
            self._open()
        self._writer.write({"__key__": key, **members})
        self._keys.append(key)
        if len(self._keys) == self.samples_per_shard:
            return self.flush()
        return None

    def flush(self) -> ShardRecord | None:
        """Close the open shard (possibly short, at the end of a split), index it and give it its final name."""
        if self._writer is None:
            return None
        self._writer.close()
        self._file.close()
        name = shard_name(self.survey, self.split, self.next_shard)
        tmp_tar = self.out_dir / (name + TMP_SUFFIX)
        tmp_idx = self.out_dir / (index_name(name) + TMP_SUFFIX)
        tmp_idx.write_text(index_text(tmp_tar))
        record = ShardRecord(name, self.split, len(self._keys), tmp_tar.stat().st_size, sha256_of(tmp_tar),
                             tuple(self._keys))
        # The index goes first: a tar under its final name always has its index beside it.
        _replace_durably(tmp_idx, self.out_dir / index_name(name))
        _replace_durably(tmp_tar, self.out_dir / name)
        self._writer, self._file, self._keys = None, None, []
        self.next_shard += 1
        return record

    def abandon(self) -> None:
        """Drop a partly written shard (its samples will be redone on resume)."""
        if self._writer is not None:
            # Finish the tar stream into the doomed temporary file, or tarfile writes to a closed file when collected.
            self._writer.close()
            self._file.close()
            self._writer = None
            self._keys = []
