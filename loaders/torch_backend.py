"""The torch backend: a DataLoader over the sampler's worker slices, PIL decode, torch augmentation."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from loaders.augment import apply_plan

if TYPE_CHECKING:
    from loaders.loader import BatchSource, LoaderConfig

DecodedBatch = tuple[int, torch.Tensor, np.ndarray, list[str], np.ndarray]


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded 8-bit image -> (3, H, W) float32 in 0..255 (grey images are repeated to RGB)."""
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.array(image.convert("RGB"))  # a writable copy for torch
    return torch.from_numpy(pixels).permute(2, 0, 1).to(torch.float32)


class EpochBatches(IterableDataset):
    """The rest of one epoch for one rank; DataLoader worker k of K yields batches k, k + K, ..."""

    def __init__(self, source: BatchSource, epoch: int, start_sample: int, mean: tuple[float, ...],
                 std: tuple[float, ...]) -> None:
        super().__init__()
        self.source, self.epoch, self.start_sample = source, epoch, start_sample
        # Same arithmetic as DALI's crop_mirror_normalize: mean and std in 0..255 units.
        self.mean = torch.tensor([255.0 * m for m in mean]).view(3, 1, 1)
        self.std = torch.tensor([255.0 * s for s in std]).view(3, 1, 1)

    def __iter__(self) -> Iterator[DecodedBatch]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        size = self.source.image_size
        for batch_index, refs in self.source.rank_batches(self.epoch, self.start_sample, worker_id, num_workers):
            prepared = self.source.prepare(self.epoch, batch_index, refs)
            images = torch.stack([(apply_plan(decode_image(data), plan, size) - self.mean) / self.std
                                  for data, plan in zip(prepared.data, prepared.plans)])
            yield batch_index, images, prepared.refs, prepared.keys, prepared.num_skipped


def _as_is(batch: DecodedBatch) -> DecodedBatch:
    """Keep refs and counts as numpy arrays (DataLoader's default would turn them into tensors)."""
    return batch


class TorchBackend:
    """Decodes and augments with PIL and torch in DataLoader workers (or in-process with 0 workers)."""

    def __init__(self, source: BatchSource, cfg: LoaderConfig) -> None:
        self.source, self.cfg = source, cfg

    def iter_epoch(self, epoch: int, start_sample: int) -> Iterator[DecodedBatch]:
        dataset = EpochBatches(self.source, epoch, start_sample, self.cfg.mean, self.cfg.std)
        workers = self.cfg.num_workers
        # batch_size=None: the dataset yields whole batches, and the DataLoader takes them from its
        # workers round-robin - the order iter_rank_batches dealt them in.
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is,
                            prefetch_factor=self.cfg.prefetch if workers else None,
                            pin_memory=self.cfg.device == "gpu")
        iterator = iter(loader)
        try:
            yield from iterator
        finally:
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:  # stop the workers now, not whenever the iterator is collected
                shutdown()

    def close(self) -> None:
        pass
