"""Evaluation batches: every sample of one survey's split, in shard order, unaugmented, split across ranks.

The torch path decodes with PIL and resizes with the torch backend's ops; the DALI path (GPU decoding) runs the
training pipeline with augmentation off. Both produce the pixels training's plain path produces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from loaders.augment import AugmentConfig, SampleDraw, apply_plan, make_plan
from loaders.batch import Batch, label_arrays, make_batch
from loaders.source import LoaderConfig, PreparedBatch, check_image
from loaders.shards import SampleReader, SurveyShards, load_survey_shards
from loaders.torch_backend import decode_image

_PLAIN = AugmentConfig(enabled=False)

Perturb = Callable[[torch.Tensor, int], torch.Tensor]
"""(decoded (3, H, W) float image in 0..255, row number in the split) -> perturbed image, before resize."""


def eval_refs(info: SurveyShards, rank: int, world_size: int, max_samples: int | None, *,
              pad: bool = False) -> np.ndarray:
    """(0, shard, index) rows of the first `max_samples` samples in shard order; rank r takes rows r::W.

    `pad=True` gives every rank ceil(n / W) rows: a rank with fewer repeats the split's first row at its end, so
    ranks run equally many batches (a collective forward such as ZeRO-3's). The rank's real rows come first:
    as many as `eval_refs(..., pad=False)` returns.
    """
    refs = np.array([(0, shard, index) for shard, count in enumerate(info.shard_counts) for index in range(count)],
                    dtype=np.int64).reshape(-1, 3)
    if max_samples is not None:
        refs = refs[:max_samples]
    mine = refs[rank::world_size]
    if not pad or not len(refs):
        return mine
    padding = np.repeat(refs[:1], -(-len(refs) // world_size) - len(mine), axis=0)
    return np.concatenate([mine, padding])


def dali_unavailable() -> str | None:
    """Why DALI cannot decode here (not installed, or its import fails), or None when it can."""
    try:
        import loaders.dali  # noqa: F401 - the one DALI importer
    except ImportError as err:
        return f"{type(err).__name__}: {err}"
    return None


def choose_backend(requested: str, device_type: str) -> tuple[str, str]:
    """(backend, why) for an evaluation: `auto` is DALI on a CUDA device where DALI imports, else torch.

    DALI is an optional extra (a ~420 MB wheel that a GPU node without a package index may lack); the torch
    backend decodes the same pixels, so a GPU machine without DALI still evaluates, on its GPU.
    """
    if requested not in ("auto", "torch", "dali"):
        raise ValueError(f"unknown evaluation backend {requested!r}; expected auto, torch or dali")
    if requested == "torch":
        return "torch", "asked for"
    missing = dali_unavailable()
    if requested == "dali":
        if missing:
            raise ValueError(f"--backend dali needs nvidia-dali-cuda120 ({missing}); install the 'gpu' extra "
                             "(pip install 'galaxy-sommelier[gpu]') or use --backend torch")
        return "dali", "asked for"
    if device_type != "cuda":
        return "torch", "no CUDA device"
    if missing:
        return "torch", f"DALI is not importable ({missing}); the 'gpu' extra adds GPU decoding"
    return "dali", "CUDA device and DALI installed"


def iter_eval_batches(cfg: LoaderConfig, survey: str, split: str = "val", rank: int = 0, world_size: int = 1,
                      batch_size: int = 64, max_samples: int | None = None, *, start: int = 0,
                      perturb: Perturb | None = None, backend: str = "torch", pad: bool = False) -> Iterator[Batch]:
    """Decode -> resize -> normalise, exactly the training loaders' path with augmentation off.

    `start` skips this rank's first rows (a resumed prediction). `perturb` alters each decoded image before
    the resize (robustness studies; torch backend only). `backend="dali"` decodes with DALI on cfg.device.
    An unreadable sample raises (an evaluation must not quietly change what it reports on; run
    sharding.verify). Batch.survey is 0: the batch holds one survey. `pad`: as eval_refs (padding rows last).
    """
    info = load_survey_shards(Path(cfg.shard_root) / survey, split)
    refs = eval_refs(info, rank, world_size, max_samples, pad=pad)[start:]
    if backend == "dali":
        if perturb is not None:
            raise ValueError("perturbations run on the torch backend only")
        yield from dali_batches(cfg, info, refs, batch_size)
        return
    if backend != "torch":
        raise ValueError(f"unknown evaluation backend {backend!r}; expected torch or dali")
    reader = SampleReader([info])
    try:
        for first in range(0, len(refs), batch_size):
            chunk = refs[first:first + batch_size]
            images = []
            for row, (_, shard, index) in enumerate(chunk, start=start + first):
                hook = None if perturb is None else (lambda image, row=row: perturb(image, row))
                images.append(plain_image(_read_checked(reader, info, int(shard), int(index)), cfg, hook))
            keys = [info.key(int(s), int(i)) for _, s, i in chunk]
            yield make_batch(torch.stack(images), label_arrays([info], chunk), chunk, keys)
    finally:
        reader.close()


def plain_image(data: bytes, cfg: LoaderConfig,
                perturb: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Encoded 8-bit image -> (3, S, S) normalised float32: the torch backend's path with augmentation off."""
    image = decode_image(data)
    if perturb is not None:
        image = perturb(image)
    plan = make_plan(_PLAIN, SampleDraw(), tuple(image.shape[1:]), cfg.image_size, "")
    mean = torch.tensor([255.0 * m for m in cfg.mean]).view(3, 1, 1)
    std = torch.tensor([255.0 * s for s in cfg.std]).view(3, 1, 1)
    return (apply_plan(image, plan, cfg.image_size) - mean) / std


def _read_checked(reader: SampleReader, info: SurveyShards, shard: int, index: int) -> bytes:
    data = reader.read(0, shard, index)
    try:
        check_image(data, info.image_ext)
    except ValueError as err:
        raise ValueError(f"{info.paths[shard]}: sample {info.key(shard, index)} is unreadable ({err}); "
                         f"run `python -m sharding.verify {info.directory}` and rebuild the survey") from None
    return data


class PlainSource:
    """Sequential refs of one survey as the batches DaliSource asks for: no augmentation, the last batch padded."""

    def __init__(self, info: SurveyShards, refs: np.ndarray, batch_size: int, image_size: int) -> None:
        self.info, self.refs, self.batch_size, self.image_size = info, refs, batch_size, image_size
        self.key_length = max(len(e.key.encode()) for entries in info.index for e in entries)
        self.num_batches = -(-len(refs) // batch_size)
        self._reader: SampleReader | None = None

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _reader=None)

    def batch_refs(self, epoch: int, batch_index: int) -> np.ndarray:
        rows = np.arange(batch_index * self.batch_size, (batch_index + 1) * self.batch_size)
        return self.refs[np.minimum(rows, len(self.refs) - 1)]  # DALI batches are full: repeat the last sample

    def prepare(self, epoch: int, batch_index: int, refs: np.ndarray) -> PreparedBatch:
        if self._reader is None:
            self._reader = SampleReader([self.info])
        out = PreparedBatch(batch_index, refs.copy(), [], [], [], np.zeros(len(refs), np.int32))
        for _, shard, index in refs:
            data = _read_checked(self._reader, self.info, int(shard), int(index))
            out.keys.append(self.info.key(int(shard), int(index)))
            out.data.append(data)
            hw = check_image(data, self.info.image_ext)
            out.plans.append(make_plan(_PLAIN, SampleDraw(), hw, self.image_size, self.info.name))
        return out


def dali_batches(cfg: LoaderConfig, info: SurveyShards, refs: np.ndarray, batch_size: int) -> Iterator[Batch]:
    from loaders.dali import iter_plain_batches

    if not len(refs):
        return
    source = PlainSource(info, refs, batch_size, cfg.image_size)
    for batch_index, images in iter_plain_batches(source, cfg):
        chunk = refs[batch_index * batch_size:(batch_index + 1) * batch_size]
        keys = [info.key(int(s), int(i)) for _, s, i in chunk]
        yield make_batch(images[:len(chunk)], label_arrays([info], chunk), chunk, keys)
