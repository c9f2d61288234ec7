"""Evaluation batches: every sample of one survey's split, in shard order, unaugmented, split across ranks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from loaders.augment import AugmentConfig, SampleDraw, apply_plan, make_plan
from loaders.batch import Batch, label_arrays, make_batch
from loaders.loader import LoaderConfig, check_image
from loaders.shards import SampleReader, SurveyShards, load_survey_shards
from loaders.torch_backend import decode_image

_PLAIN = AugmentConfig(enabled=False)


def eval_refs(info: SurveyShards, rank: int, world_size: int, max_samples: int | None) -> np.ndarray:
    """(0, shard, index) rows of the first `max_samples` samples in shard order; rank r takes rows r::W."""
    refs = np.array([(0, shard, index) for shard, count in enumerate(info.shard_counts) for index in range(count)],
                    dtype=np.int64).reshape(-1, 3)
    if max_samples is not None:
        refs = refs[:max_samples]
    return refs[rank::world_size]


def iter_eval_batches(cfg: LoaderConfig, survey: str, split: str = "val", rank: int = 0, world_size: int = 1,
                      batch_size: int = 64, max_samples: int | None = None) -> Iterator[Batch]:
    """Decode -> resize -> normalise, exactly the torch backend's path with augmentation off.

    An unreadable sample raises (an evaluation must not quietly change what it reports on; run
    sharding.verify). Batch.survey is 0: the batch holds one survey.
    """
    info = load_survey_shards(Path(cfg.shard_root) / survey, split)
    reader = SampleReader([info])
    mean = torch.tensor([255.0 * m for m in cfg.mean]).view(3, 1, 1)
    std = torch.tensor([255.0 * s for s in cfg.std]).view(3, 1, 1)
    refs = eval_refs(info, rank, world_size, max_samples)
    try:
        for start in range(0, len(refs), batch_size):
            chunk = refs[start:start + batch_size]
            images = []
            for _, shard, index in chunk:
                data = reader.read(0, int(shard), int(index))
                hw = check_image(data, info.image_ext)
                plan = make_plan(_PLAIN, SampleDraw(), hw, cfg.image_size, survey)
                images.append((apply_plan(decode_image(data), plan, cfg.image_size) - mean) / std)
            keys = [info.key(int(s), int(i)) for _, s, i in chunk]
            yield make_batch(torch.stack(images), label_arrays([info], chunk), chunk, keys)
    finally:
        reader.close()
