"""Build progress on disk: an append-only log of completed shards that lets an interrupted build resume."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sharding.catalog import Reject
from sharding.writer import TMP_SUFFIX, ShardRecord

BUILD_DIR = "_build"
LOG_NAME = "progress.jsonl"
OUTPUT_FILES = ("labels.parquet", "rejects.parquet", "manifest.json", "survey.yaml")


@dataclass
class SplitState:
    records: list[ShardRecord] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    next_position: int = 0  # rows of this split already packed or rejected
    done: bool = False


def _plain(obj) -> object:
    return json.loads(json.dumps(obj))


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    df.to_parquet(tmp, index=False, engine="pyarrow")
    os.replace(tmp, path)


def rejects_frame(rejects: list[Reject], survey: str) -> pd.DataFrame:
    columns = ["survey", *(f.name for f in dataclasses.fields(Reject))]
    rows = [{"survey": survey, **dataclasses.asdict(r)} for r in rejects]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.astype({c: "int64" if c == "row" else "string" for c in columns})


def _differences(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _remove_outputs(out_dir: Path) -> None:
    for path in out_dir.glob("*"):
        if path.name == BUILD_DIR:
            shutil.rmtree(path)
        elif path.suffix in (".tar", ".idx") or path.name.endswith(TMP_SUFFIX) or path.name in OUTPUT_FILES:
            path.unlink()


def prepare(out_dir: Path, params: dict, overwrite: bool) -> dict[str, SplitState] | None:
    """Split states to continue from; None when a finished build with the same arguments is already there."""
    params = _plain(params)
    if overwrite and out_dir.exists():
        _remove_outputs(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.json"
    log = out_dir / BUILD_DIR / LOG_NAME
    if manifest.exists() and not log.exists():
        old = json.loads(manifest.read_text()).get("build", {})
        if old == params:
            return None
        raise ValueError(f"{out_dir} holds a finished build made with different arguments "
                         f"(differs in: {_differences(old, params)}); use --overwrite to rebuild it")
    for stale in out_dir.glob("*" + TMP_SUFFIX):
        stale.unlink()
    if log.exists():
        return load_states(out_dir, params)
    if any(out_dir.glob("*.tar")):
        raise ValueError(f"{out_dir} holds shards but no build log or manifest; use --overwrite to replace them")
    log.parent.mkdir(exist_ok=True)
    with open(log, "w") as f:
        f.write(json.dumps({"params": params}) + "\n")
    return {split: SplitState() for split in params["splits"]}


def _read_log(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    entries = []
    for i, line in enumerate(lines):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: corrupt line {i + 1}; use --overwrite to start the build again") from None
            # A torn last line is a kill mid-write: that shard is simply redone.
    return entries


def load_states(out_dir: Path, params: dict) -> dict[str, SplitState]:
    """Replay the progress log into per-split states, checking it belongs to the same arguments."""
    path = out_dir / BUILD_DIR / LOG_NAME
    entries = _read_log(path)
    old = entries[0].get("params", {}) if entries else {}
    params = _plain(params)
    if old != params:
        raise ValueError(f"{out_dir} holds an interrupted build made with different arguments "
                         f"(differs in: {_differences(old, params)}). Re-run with the same arguments to resume, "
                         "or use --overwrite to start again.")
    states = {split: SplitState() for split in params["splits"]}
    for entry in entries[1:]:
        state = states[entry["split"]]
        if entry.get("record"):
            rec = entry["record"]
            state.records.append(ShardRecord(rec["name"], rec["split"], rec["num_samples"], rec["bytes"],
                                             rec["sha256"], tuple(rec["keys"])))
        state.rejects.extend(Reject(**r) for r in entry["rejects"])
        state.next_position = entry["next_position"]
        state.done = state.done or entry["event"] == "split-done"
    return states


class ProgressLog:
    """Appends one durable line per completed shard (and per finished split)."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / BUILD_DIR / LOG_NAME
        self._file = None

    def __enter__(self) -> "ProgressLog":
        self._file = open(self.path, "a")
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def _append(self, entry: dict) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def _entry(self, event: str, split: str, record: ShardRecord | None, next_position: int,
               rejects: list[Reject]) -> dict:
        rec = None if record is None else {**record.manifest_entry(), "keys": list(record.keys)}
        return {"event": event, "split": split, "record": rec, "next_position": next_position,
                "rejects": [dataclasses.asdict(r) for r in rejects]}

    def shard_done(self, split: str, record: ShardRecord, next_position: int, rejects: list[Reject]) -> None:
        self._append(self._entry("shard", split, record, next_position, rejects))

    def split_done(self, split: str, record: ShardRecord | None, next_position: int,
                   rejects: list[Reject]) -> None:
        self._append(self._entry("split-done", split, record, next_position, rejects))


def cleanup(out_dir: Path) -> None:
    shutil.rmtree(out_dir / BUILD_DIR, ignore_errors=True)
