"""Shard samples for evaluation jobs, as training reads them: an unreadable sample is recorded and skipped.

Each unreadable sample (a truncated shard, a damaged image) becomes a reject row (key, survey, split, shard, row,
reason) and the job goes on; past an error rate (training's loader.max_error_rate, once enough samples were
read) it stops with an error that names `python -m sharding.verify`. Reject reasons hold no object addresses, so
two runs over the same shards write the same rejects.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from loaders.evaluation import dali_batches, eval_refs, plain_image
from loaders.shards import SampleReader, SurveyShards
from loaders.source import LoaderConfig, check_image
from sharding.images import without_addresses

MAX_ERROR_RATE = LoaderConfig.max_error_rate
MIN_READS = LoaderConfig.error_rate_min_reads
CHECK_ROWS = 4096  # samples read (encoded bytes held) at a time
REJECT_COLUMNS = ["key", "survey", "split", "shard", "row", "reason"]


class UnreadableShards(ValueError):
    """Too many unreadable samples: the shards need checking before an evaluation can mean anything."""


def reject_reason(err: BaseException) -> str:
    """The error as reject text: its type and message, without object addresses ('<_io.BytesIO object at 0x..>')."""
    return without_addresses(f"{type(err).__name__}: {err}")


@dataclass
class Rejects:
    """The unreadable samples of one survey split, and the error-rate stop (as training's loader has)."""
    info: SurveyShards
    split: str
    max_error_rate: float = MAX_ERROR_RATE
    min_reads: int = MIN_READS
    num_read: int = 0  # samples attempted, readable or not
    num_bad: int = 0
    rows: list[dict] = field(default_factory=list)  # this job's rejects not yet taken
    examples: list[dict] = field(default_factory=list)  # the first few, for the error message

    def add(self, shard: int, index: int, row: int, err: BaseException) -> None:
        self.num_bad += 1
        self.rows.append({"key": self.info.key(shard, index), "survey": self.info.name, "split": self.split,
                          "shard": self.info.paths[shard].name, "row": int(row), "reason": reject_reason(err)})
        if len(self.examples) < 2:
            self.examples.append(self.rows[-1])

    def take(self) -> list[dict]:
        rows, self.rows = self.rows, []
        return rows

    def check(self) -> None:
        rate = self.num_bad / max(self.num_read, 1)
        if self.num_read >= self.min_reads and rate > self.max_error_rate:
            seen = "; ".join(f"{r['key']} in {r['shard']} ({r['reason']})" for r in self.examples)
            raise UnreadableShards(
                f"{self.num_bad} of {self.num_read} {self.info.name} {self.split} samples read were unreadable (error "
                f"rate {rate:.2%} > --max-error-rate {self.max_error_rate:.2%}), e.g. {seen or 'in earlier parts'}; "
                f"check the shards with `python -m sharding.verify {self.info.directory}` and rebuild the damaged "
                "ones, or raise --max-error-rate to score what can be read")


@dataclass
class ImageBatch:
    keys: list[str]
    images: torch.Tensor  # (n, 3, S, S) model inputs
    rows: np.ndarray  # (n,) each sample's row in the split (shard order)


def split_refs(info: SurveyShards, max_samples: int | None = None) -> np.ndarray:
    """(0, shard, index) rows of a split's first max_samples samples, in shard order."""
    return eval_refs(info, 0, 1, max_samples)


def _readable(reader: SampleReader, info: SurveyShards, refs: np.ndarray, rows: np.ndarray,
              rejects: Rejects) -> list[tuple[np.ndarray, int, bytes]]:
    good = []
    for ref, row in zip(refs, rows):
        shard, index = int(ref[1]), int(ref[2])
        try:
            data = reader.read(0, shard, index)
            check_image(data, info.image_ext)
        except (OSError, ValueError) as err:  # a truncated shard; CorruptSample is a ValueError
            rejects.add(shard, index, int(row), err)
            continue
        good.append((ref, int(row), data))
    rejects.num_read += len(refs)
    rejects.check()
    return good


def _torch_batches(cfg: LoaderConfig, info: SurveyShards, good: list, batch_size: int, perturb,
                   rejects: Rejects) -> Iterator[ImageBatch]:
    for start in range(0, len(good), batch_size):
        keys, images, rows = [], [], []
        for ref, row, data in good[start:start + batch_size]:
            hook = None if perturb is None else (lambda image, row=row: perturb(image, row))
            try:
                images.append(plain_image(data, cfg, hook))
            except (OSError, ValueError) as err:  # intact headers, damaged image data
                rejects.add(int(ref[1]), int(ref[2]), row, err)
                continue
            keys.append(info.key(int(ref[1]), int(ref[2])))
            rows.append(row)
        rejects.check()
        if keys:
            yield ImageBatch(keys, torch.stack(images), np.asarray(rows, np.int64))


def iter_batches(cfg: LoaderConfig, info: SurveyShards, refs: np.ndarray, rows: np.ndarray, *, batch_size: int,
                 rejects: Rejects, backend: str = "torch", perturb=None) -> Iterator[ImageBatch]:
    """Model inputs of the readable samples among `refs` (rows: their rows in the split), batch_size at a time.

    The unreadable ones go to `rejects`, which raises UnreadableShards past its error rate. `perturb(image, row)`
    alters each decoded image before the resize (torch backend only); `backend="dali"` decodes with DALI.
    """
    if backend not in ("torch", "dali"):
        raise ValueError(f"unknown evaluation backend {backend!r}; expected torch or dali")
    if backend == "dali" and perturb is not None:
        raise ValueError("perturbations run on the torch backend only")
    reader = SampleReader([info])
    try:
        for start in range(0, len(refs), CHECK_ROWS):
            good = _readable(reader, info, refs[start:start + CHECK_ROWS], rows[start:start + CHECK_ROWS], rejects)
            if backend == "torch":
                yield from _torch_batches(cfg, info, good, batch_size, perturb, rejects)
                continue
            if not good:
                continue
            good_refs = np.stack([ref for ref, _, _ in good])
            good_rows = np.array([row for _, row, _ in good], np.int64)
            for number, batch in enumerate(dali_batches(cfg, info, good_refs, batch_size)):
                yield ImageBatch(batch.keys, batch.images, good_rows[number * batch_size:][:len(batch.keys)])
    finally:
        reader.close()


def write_rejects(rows: list[dict], path) -> None:
    """A rejects table (REJECT_COLUMNS), empty when every sample was read."""
    import pandas as pd

    pd.DataFrame(rows, columns=REJECT_COLUMNS).to_parquet(path, index=False, engine="pyarrow")
