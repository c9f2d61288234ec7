"""Durable, resumable prediction outputs: Parquet parts merged into one file, and an appendable zarr embedding store.

A prediction writes one part per block of inputs (atomically, after its embeddings), so a killed job resumes at
the first missing part and the merged file is byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

METADATA_KEY = b"galaxy_sommelier"
PARTIAL_SUFFIX = ".partial"
TMP_SUFFIX = ".tmp"


def read_metadata(path: str | Path) -> dict:
    """The provenance JSON a prediction file carries in its Parquet metadata ({} when it has none)."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}


class PartStore:
    """<out>.partial/: meta.json (the job's arguments) and part-SSS-CCCCCC.parquet files, one per block."""

    def __init__(self, out: Path, signature: dict, overwrite: bool) -> None:
        self.out, self.dir = Path(out), Path(str(out) + PARTIAL_SUFFIX)
        signature = json.loads(json.dumps(signature))  # as it reads back from meta.json (tuples become lists)
        if overwrite:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.out.unlink(missing_ok=True)
        if self.out.exists() and not self.dir.exists():
            raise ValueError(f"{self.out} exists; pass --overwrite to replace it or choose another --out")
        meta = self.dir / "meta.json"
        if meta.exists():
            old = json.loads(meta.read_text())
            if old["signature"] != signature:
                changed = sorted(k for k in set(old["signature"]) | set(signature)
                                 if old["signature"].get(k) != signature.get(k))
                raise ValueError(f"{self.dir} holds an interrupted prediction with other arguments (differs in "
                                 f"{changed}); re-run with the same arguments to resume, or pass --overwrite")
            self.state = old
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.state = {"signature": signature}
            self._write_meta()
        for stale in self.dir.glob("*" + TMP_SUFFIX):
            stale.unlink()

    def _write_meta(self) -> None:
        tmp = self.dir / ("meta.json" + TMP_SUFFIX)
        tmp.write_text(json.dumps(self.state, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.dir / "meta.json")

    def remember(self, key: str, value) -> object:
        """A value fixed at the first start (e.g. where the embedding rows begin), the same on every resume."""
        if key not in self.state:
            self.state[key] = value
            self._write_meta()
        return self.state[key]

    @staticmethod
    def _name(stream: int, block: int) -> str:
        return f"part-{stream:03d}-{block:06d}.parquet"

    def done_blocks(self, stream: int) -> int:
        """Blocks of a stream written so far (they are written in order, so a count says which)."""
        count = 0
        while (self.dir / self._name(stream, count)).exists():
            count += 1
        return count

    def _rejects_listing(self, stream: int, block: int) -> Path:
        return self.dir / (Path(self._name(stream, block)).stem + ".rejects.json")

    def num_rejects(self, stream: int) -> int:
        """Rejects recorded with the stream's finished parts (a resumed job counts them toward its error rate)."""
        listings = [self._rejects_listing(stream, block) for block in range(self.done_blocks(stream))]
        return sum(len(json.loads(path.read_text())) for path in listings if path.exists())

    def rows_done(self) -> int:
        return sum(pq.read_metadata(p).num_rows for p in sorted(self.dir.glob("part-*.parquet")))

    def write(self, stream: int, block: int, frame: pd.DataFrame, rejects: list[dict]) -> None:
        path = self.dir / self._name(stream, block)
        listing = self._rejects_listing(stream, block)
        listing.unlink(missing_ok=True)  # a block redone after a kill lists its rejects anew
        if rejects:
            listing.write_text(json.dumps(rejects, sort_keys=True) + "\n")
        tmp = path.with_name(path.name + TMP_SUFFIX)
        frame.to_parquet(tmp, index=False, engine="pyarrow")
        os.replace(tmp, path)

    def finish(self, metadata: dict, rejects_out: Path, reject_columns: list[str]) -> int:
        """Merge the parts (one row group each, bounded memory) into the output, their rejects into `rejects_out`
        (a table with `reject_columns`, empty when every input was read); returns the output's row count."""
        parts = sorted(self.dir.glob("part-*.parquet"))
        tmp = self.out.with_name(self.out.name + TMP_SUFFIX)
        blob = json.dumps(metadata, sort_keys=True).encode()
        rows, writer = 0, None
        for part in parts:
            table = pq.read_table(part)
            if writer is None:
                schema = table.schema.with_metadata({**(table.schema.metadata or {}), METADATA_KEY: blob})
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(table.replace_schema_metadata(writer.schema.metadata))
            rows += table.num_rows
        if writer is None:
            raise ValueError("nothing was predicted: no galaxies matched the surveys and split")
        writer.close()
        rejects = [r for p in sorted(self.dir.glob("part-*.rejects.json")) for r in json.loads(p.read_text())]
        frame = pd.DataFrame(rejects, columns=reject_columns)
        frame.to_parquet(rejects_out, index=False, engine="pyarrow")
        os.replace(tmp, self.out)
        shutil.rmtree(self.dir)
        return rows


class EmbeddingStore:
    """A zarr group: `embeddings` (galaxies x dims), `keys` (galaxies,) and provenance in its attributes.

    Appendable: a later prediction adds rows after the existing ones (a key already in the store is an
    error). Resumable: rows past what the prediction's finished parts cover are cut off on restart. `new`: the
    store at `path`, if any, is deleted first (what --overwrite means).
    """

    def __init__(self, path: Path, dims: int, dtype: str, chunk_rows: int = 4096, new: bool = False) -> None:
        import zarr

        if dtype not in ("float16", "float32"):
            raise ValueError(f"--embeddings-dtype must be float16 or float32, got {dtype!r}")
        self.path = Path(path)
        if new and self.path.exists():
            if not (self.path / "zarr.json").is_file() and not (self.path / ".zgroup").is_file():
                raise ValueError(f"{self.path} is not a zarr store; --overwrite replaces only an embedding store")
            shutil.rmtree(self.path)
        self.group = zarr.open_group(str(self.path), mode="a")
        if "embeddings" not in self.group:
            self.group.create_array("embeddings", shape=(0, dims), chunks=(chunk_rows, dims), dtype=dtype)
            self.group.create_array("keys", shape=(0,), chunks=(chunk_rows,), dtype=str)
            self.group.attrs["runs"] = []
        self.array, self.keys = self.group["embeddings"], self.group["keys"]
        if self.array.shape[1] != dims or str(self.array.dtype) != dtype:
            raise ValueError(f"{self.path} holds {self.array.shape[1]}-d {self.array.dtype} embeddings; this model "
                             f"gives {dims}-d {dtype}: use another --embeddings store")

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def truncate(self, rows: int) -> None:
        if len(self) > rows:
            self.array.resize((rows, self.array.shape[1]))
            self.keys.resize((rows,))

    def keys_before(self, row: int) -> set[str]:
        return set(self.keys[:row].tolist()) if row else set()

    def write(self, start: int, keys: list[str], vectors: np.ndarray) -> None:
        stop = start + len(keys)
        if len(self) < stop:
            self.array.resize((stop, self.array.shape[1]))
            self.keys.resize((stop,))
        self.array[start:stop] = vectors.astype(self.array.dtype)
        self.keys[start:stop] = np.asarray(keys, dtype=str)

    def add_run(self, record: dict) -> None:
        self.group.attrs["runs"] = [*self.group.attrs.get("runs", []), record]


def open_embeddings(path: str | Path) -> tuple[np.ndarray, list[str], dict]:
    """(embeddings as a lazily read zarr array, keys, attributes) of a store written by predict."""
    import zarr

    if not Path(path).exists():
        raise ValueError(f"embedding store {path} does not exist; write one with `python -m eval predict ... "
                         "--embeddings PATH`")
    group = zarr.open_group(str(path), mode="r")
    return group["embeddings"], group["keys"][:].tolist(), dict(group.attrs)


def frame_from_columns(columns: dict[str, np.ndarray | list]) -> pd.DataFrame:
    """A part's DataFrame with fixed dtypes (strings, float32), so every part shares one Arrow schema."""
    frame = pd.DataFrame(columns)
    for name in frame.columns:
        if frame[name].dtype == object or name in ("key", "survey", "object_id", "split"):
            frame[name] = frame[name].astype(str)
    return frame

