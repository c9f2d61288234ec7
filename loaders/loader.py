"""The loader's entry point: build_loader assembles shards, sampler, batch source and backend into a MixedLoader."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from loaders.batch import Batch, label_arrays, make_batch
from loaders.include import restrict_to_keys
from loaders.sampler import MixConfig, MixingSampler
from loaders.shards import keep_label_fraction, load_shard_root
from loaders.source import Backend, BatchSource, LoaderConfig
from loaders.torch_backend import TorchBackend

__all__ = ["LoaderConfig", "MixedLoader", "build_loader"]  # LoaderConfig lives in loaders.source

logger = logging.getLogger(__name__)


class MixedLoader:
    """The one stateful object a training loop holds: iterate for batches, state_dict() to checkpoint."""

    def __init__(self, cfg: LoaderConfig, source: BatchSource, sampler: MixingSampler, backend: Backend) -> None:
        self.cfg, self.sampler = cfg, sampler
        self.surveys: list[str] = [s.name for s in source.surveys]
        self.errors: dict[str, int] = {name: 0 for name in self.surveys}
        """Unreadable samples replaced so far, by survey (the log lines name key and shard)."""
        self.samples_read: dict[str, int] = {name: 0 for name in self.surveys}
        self._source, self._backend = source, backend

    def __len__(self) -> int:
        return self.sampler.num_batches

    def __iter__(self) -> Iterator[Batch]:
        """This rank's batches for the rest of the current epoch; each one advances the sampler."""
        epoch, start = self.sampler.epoch, self.sampler.samples_consumed
        stream = self._backend.iter_epoch(epoch, start)
        try:
            for batch_index, images, refs, keys, num_skipped in stream:
                assert (epoch, batch_index) == (self.sampler.epoch, self.sampler.batch_index), \
                    "backend yielded batches out of order"
                self._count(refs, num_skipped)
                labels = label_arrays(self._source.surveys, refs)
                if isinstance(images, list):  # multi-crop views: images is the first global crop
                    views = [self._cast(v) for v in images]
                    batch = make_batch(views[0], labels, refs, keys, views, self.cfg.views.num_global_views)
                else:
                    batch = make_batch(self._cast(images), labels, refs, keys)
                self.sampler.advance(1)  # before yielding: a state_dict() taken now resumes after this batch
                yield batch
        finally:
            stream.close()

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def close(self) -> None:
        """Stop worker processes and pipelines now rather than at garbage collection."""
        self._backend.close()

    def _cast(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(torch.bfloat16) if self.cfg.dtype == "bfloat16" else images

    def _count(self, refs: np.ndarray, num_skipped: np.ndarray) -> None:
        for s, name in enumerate(self.surveys):
            mine = refs[:, 0] == s
            bad = int(num_skipped[mine].sum())
            self.errors[name] += bad
            self.samples_read[name] += int(mine.sum()) + bad
            read, rate = self.samples_read[name], self.errors[name] / max(self.samples_read[name], 1)
            if read >= self.cfg.error_rate_min_reads and rate > self.cfg.max_error_rate:
                raise RuntimeError(
                    f"loader stopped: {self.errors[name]} of {read} {name} samples read were unreadable "
                    f"(error rate {rate:.2%} for survey {name!r}) > max_error_rate {self.cfg.max_error_rate:.2%}; "
                    f"check its shards with `python -m sharding.verify` (log lines name each key and shard)")


def build_loader(cfg: LoaderConfig, mix: MixConfig, rank: int = 0, world_size: int = 1,
                 sampler_state: dict | None = None, label_fraction: float = 1.0,
                 include_keys: set[str] | None = None) -> MixedLoader:
    """The loader for one rank: shards of the mix's surveys under cfg.shard_root, sampler, backend.

    `label_fraction` < 1 keeps each survey's samples whose stable key hash is below it (loaders.shards.label_kept),
    the same set on any world size; the sampler mixes the kept samples exactly. `include_keys` first restricts each
    survey with a listed key to its listed samples (loaders.include.restrict_to_keys).
    """
    surveys = restrict_to_keys(load_shard_root(cfg.shard_root, list(mix.ratios), cfg.split), include_keys or set(),
                               cfg.split)
    surveys = [keep_label_fraction(s, label_fraction) for s in surveys]
    sampler = MixingSampler({s.name: s.shard_counts for s in surveys}, mix)
    if sampler_state is not None:
        sampler.load_state_dict(sampler_state)
    if cfg.views.enabled and cfg.augment.enabled:
        logger.warning("loader: views are enabled, so augment (enabled too) is not used: each view has its own "
                       "augmentation (data.loader.views.global_crops / local_crops)")
    source = BatchSource(surveys, mix, cfg.augment, cfg.image_size, rank, world_size, cfg.views)
    return MixedLoader(cfg, source, sampler, _make_backend(cfg, source))


def _make_backend(cfg: LoaderConfig, source: BatchSource) -> Backend:
    if cfg.device == "gpu" and not torch.cuda.is_available():
        raise ValueError("loader.device='gpu' needs a CUDA GPU and none is visible; use device='cpu'")
    if cfg.backend == "torch":
        return TorchBackend(source, cfg)
    try:
        from loaders.dali import DaliBackend
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("nvidia"):
            raise
        raise ValueError(f"loader.backend='dali' needs nvidia-dali-cuda120 ({err}); install the 'gpu' extra "
                         "or use backend='torch'") from err
    return DaliBackend(source, cfg)
