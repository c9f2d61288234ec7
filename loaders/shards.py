"""Reading built shards: manifests, random access to samples by DALI index offsets, labels joined by key."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sharding.sky import unit_hash
from sharding.schema import FeatureSchema, load_schema, total_votes_column, votes_column


@dataclass(frozen=True)
class IndexEntry:
    """One sample of a shard, from its DALI index: member extension -> (offset, size), and the key."""
    key: str
    members: dict[str, tuple[int, int]]


def read_index(idx_path: str | Path) -> list[IndexEntry]:
    """Parse a DALI webdataset index (v1.2: `ext offset size name` repeated per sample)."""
    lines = Path(idx_path).read_text().splitlines()
    if not lines or not lines[0].startswith("v1."):
        raise ValueError(f"{idx_path}: not a DALI webdataset index (first line {lines[:1]})")
    entries = []
    for line_no, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if len(parts) % 4:
            raise ValueError(f"{idx_path}:{line_no}: malformed index line")
        members = {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)}
        name = parts[3]
        entries.append(IndexEntry(name[: name.find(".", name.rfind("/") + 1)], members))
    if len(entries) != int(lines[0].split()[1]):
        raise ValueError(f"{idx_path}: header says {lines[0].split()[1]} samples, found {len(entries)}")
    return entries


@dataclass(frozen=True)
class SurveyShards:
    """One survey's shards of one split, their indices and labels aligned to (shard, sample) order."""
    name: str
    directory: Path
    paths: list[Path]
    index: list[list[IndexEntry]]
    image_ext: str
    features: np.ndarray  # (num_samples, num_features) float32, NaN where absent
    votes: np.ndarray  # (num_samples, num_features) float32 vote counts, NaN where absent
    total_votes: np.ndarray  # (num_samples, num_questions) float32
    shard_starts: np.ndarray  # row of each shard's first sample in the arrays above
    labelled: bool = True
    """False for a survey built unlabeled (sharding.build --unlabeled): features all NaN, zero votes."""

    @property
    def shard_counts(self) -> list[int]:
        return [len(entries) for entries in self.index]

    @property
    def num_samples(self) -> int:
        return int(sum(self.shard_counts))

    def row(self, shard: int, index: int) -> int:
        return int(self.shard_starts[shard]) + index

    def key(self, shard: int, index: int) -> str:
        return self.index[shard][index].key


def load_survey_shards(directory: str | Path, split: str = "train",
                       schema: FeatureSchema | None = None) -> SurveyShards:
    """Manifest, index files and labels of one built survey; labels are joined by sample key."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{directory}: no manifest.json; build it with `python -m sharding.build --survey "
                         f"{directory.name} --out {directory.parent}`")
    manifest = json.loads(manifest_path.read_text())
    schema = schema or load_schema()
    missing = sorted(set(schema.names) - set(manifest["feature_schema"]["features"]))
    if missing:
        raise ValueError(f"{directory}: shards were built with a schema lacking features {missing}")
    shards = [s for s in manifest["shards"] if s["split"] == split]
    if not shards:
        raise ValueError(f"{directory}: no shards for split {split!r} "
                         f"(splits: {sorted(manifest['splits'])})")
    index = [read_index(directory / s["index"]) for s in shards]
    for s, entries in zip(shards, index):
        if len(entries) != s["num_samples"]:
            raise ValueError(f"{directory / s['index']}: {len(entries)} samples, manifest says {s['num_samples']}; "
                             "run `python -m sharding.verify` on it")
    columns = ["key", *schema.names, *(votes_column(f) for f in schema.names),
               *(total_votes_column(q) for q in schema.question_names)]
    labels = pd.read_parquet(directory / manifest["labels"], columns=columns).set_index("key")
    keys = [e.key for entries in index for e in entries]
    absent = list(pd.Index(keys).difference(labels.index))
    if absent:
        raise ValueError(f"{directory}: samples {absent[:3]} have no row in labels.parquet; run sharding.verify")
    labels = labels.loc[keys]
    starts = np.concatenate([[0], np.cumsum([len(e) for e in index])[:-1]]).astype(np.int64)
    return SurveyShards(
        name=manifest["survey"], directory=directory, paths=[directory / s["name"] for s in shards], index=index,
        image_ext=manifest["members"][0],
        features=labels[schema.names].to_numpy(np.float32),
        votes=labels[[votes_column(f) for f in schema.names]].to_numpy(np.float32),
        total_votes=labels[[total_votes_column(q) for q in schema.question_names]].to_numpy(np.float32),
        shard_starts=starts, labelled=bool(manifest.get("labelled", True)))


def load_shard_root(root: str | Path, surveys: list[str], split: str = "train",
                    schema: FeatureSchema | None = None) -> list[SurveyShards]:
    """The named surveys under a shard root (`<root>/<survey>/manifest.json`), in the given order."""
    root = Path(root)
    available = sorted(p.parent.name for p in root.glob("*/manifest.json"))
    unknown = [s for s in surveys if s not in available]
    if unknown:
        raise ValueError(f"{root}: no built shards for {unknown} (found {available}); "
                         f"run `python -m sharding.build --survey <name> --out {root}`")
    return [load_survey_shards(root / s, split, schema) for s in surveys]


def unlabeled_surveys(root: str | Path, surveys: Iterable[str]) -> list[str]:
    """The named surveys whose manifest under `root` says they were built unlabeled, in the given order.

    Manifests made before unlabeled builds existed have no "labelled" entry: they are labelled. A survey without a
    manifest is left to load_shard_root, which names it with the command that builds it.
    """
    out = []
    for survey in surveys:
        path = Path(root) / survey / "manifest.json"
        if path.is_file() and not json.loads(path.read_text()).get("labelled", True):
            out.append(survey)
    return out


def check_labelled(root: str | Path, surveys: Iterable[str], what: str) -> None:
    """Refuse, naming them, unlabeled surveys where `what` (e.g. "stage 'full'") needs labels."""
    unlabeled = unlabeled_surveys(root, surveys)
    if unlabeled:
        raise ValueError(f"{what} trains on labels, but survey(s) {unlabeled} under {root} were built unlabeled "
                         "(manifest.json says labelled: false); leave them out of data.mix and data.val_surveys, "
                         "or use them in the self-supervised stage")


LABEL_HASH_PREFIX = "label-fraction:"
"""Salt of the label-fraction hash: which galaxies keep labels is unrelated to any other hash of the key."""


def label_kept(key: str, fraction: float) -> bool:
    """Whether a sample is in the `fraction` of labelled training samples (a stable hash of its key).

    The same sample on any machine, world size or run; a larger fraction keeps every sample a smaller one keeps,
    so 10% of the labels is a subset of 50%.
    """
    return unit_hash(LABEL_HASH_PREFIX + key) < fraction


def keep_label_fraction(info: SurveyShards, fraction: float) -> SurveyShards:
    """The survey with only the samples label_kept at `fraction`, removed from its index (and label rows).

    The sampler sees the reduced shard counts, so exact mixing, drift and resume hold on the kept samples as on
    any survey; shards keep their positions (a shard may hold none). Readers still find each kept sample by its
    offset in the unchanged tar.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data.label_fraction must be in (0, 1], got {fraction!r}")
    if fraction == 1.0:
        return info
    keep = [[label_kept(e.key, fraction) for e in entries] for entries in info.index]
    if not any(any(kept) for kept in keep):
        raise ValueError(f"data.label_fraction {fraction} keeps none of {info.name}'s {info.num_samples} samples; "
                         "raise it or leave the survey out of the mix")
    return keep_samples(info, keep)


def keep_samples(info: SurveyShards, keep: list[list[bool]]) -> SurveyShards:
    """The survey with only the samples whose flag is set (one list of flags per shard, in index order).

    Shards keep their positions (a shard may hold none); the label rows follow the index order."""
    index = [[e for e, k in zip(entries, kept) if k] for entries, kept in zip(info.index, keep)]
    rows = np.flatnonzero(np.concatenate([np.asarray(k, bool) for k in keep]))
    starts = np.concatenate([[0], np.cumsum([len(e) for e in index])[:-1]]).astype(np.int64)
    return dataclasses.replace(info, index=index, features=info.features[rows], votes=info.votes[rows],
                               total_votes=info.total_votes[rows], shard_starts=starts)


MAX_OPEN_SHARDS = 64
"""Open shard files a SampleReader keeps (per process); the sampler reads a few shards per survey at a time."""


class SampleReader:
    """Reads sample members by offset with pread; one open file per shard, per process (fork-safe)."""

    def __init__(self, surveys: list[SurveyShards]):
        self.surveys = surveys
        self._fds: dict[tuple[int, int], int] = {}
        self._pid = os.getpid()

    def read(self, survey: int, shard: int, index: int, ext: str | None = None) -> bytes:
        info = self.surveys[survey]
        entry = info.index[shard][index]
        ext = ext or info.image_ext
        if ext not in entry.members:
            raise KeyError(f"{info.paths[shard]}: sample {entry.key} has no .{ext} member")
        offset, size = entry.members[ext]
        data = os.pread(self._fd(survey, shard), size, offset)
        if len(data) != size:
            raise OSError(f"{info.paths[shard]}: truncated shard, sample {entry.key} needs {size} bytes at "
                          f"offset {offset}, got {len(data)}")
        return data

    def _fd(self, survey: int, shard: int) -> int:
        if os.getpid() != self._pid:  # forked into a loader worker: do not share the parent's offsets/handles
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.pop((survey, shard), None)  # re-inserted below: least recently used stays first
        if fd is None:
            if len(self._fds) >= MAX_OPEN_SHARDS:  # an epoch visits every shard: bound the open files
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = os.open(self.surveys[survey].paths[shard], os.O_RDONLY)
        self._fds[(survey, shard)] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self):
        try:
            if os.getpid() == self._pid:
                self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
