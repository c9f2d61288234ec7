"""The torch backend: a DataLoader over the sampler's worker slices, PIL decode, torch augmentation."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from loaders.augment import AugmentConfig, SampleDraw, SamplePlan, adjust, apply_plan, apply_turn, make_plan, plain_turn
from loaders.source import BatchSource, LoaderConfig, PreparedBatch

DecodedBatch = tuple[int, torch.Tensor | list[torch.Tensor], np.ndarray, list[str], np.ndarray]
"""(batch index, images or every view's images, refs, keys, num_skipped)."""


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded 8-bit image -> (3, H, W) float32 in 0..255 (grey images are repeated to RGB)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode != "RGB":
            image = image.convert("RGB")
        pixels = np.asarray(image)
    # Converted in PIL's pixel order and viewed as CHW (channels-last strides): one pass instead of a transposing
    # copy, and F.interpolate's channels-last kernel is the faster one on CPU.
    return torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)


class ResizeCache:
    """Plainly resized images by sample ref, within a memory budget, for one loading process.

    A plan that only turns or flips the plain resize (plain_turn: right-angle rotations and flips, no
    crop, no degradation) needs no decode and no resampling once its sample's resized image is cached: its
    pixels are those of apply_plan up to float rounding. Other plans run apply_plan as always.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.num_bytes = max_bytes, 0
        self.images: dict[tuple[int, int, int], torch.Tensor] = {}

    def image(self, ref: tuple[int, int, int], data: bytes, plan: SamplePlan, size: int) -> torch.Tensor:
        turn = plain_turn(plan, size) if self.max_bytes else None
        if turn is None:
            return apply_plan(decode_image(data), plan, size)
        plain = self.images.get(ref)
        if plain is None:
            plain = apply_plan(decode_image(data), make_plan(_PLAIN, SampleDraw(), plan.src_hw, size, ""), size)
            if self.num_bytes + plain.nbytes <= self.max_bytes:
                self.images[ref] = plain
                self.num_bytes += plain.nbytes
        return adjust(apply_turn(plain, turn), plan)


_PLAIN = AugmentConfig(enabled=False)


class EpochBatches(IterableDataset):
    """The rest of one epoch for one rank; DataLoader worker k of K yields batches k, k + K, ..."""

    def __init__(self, source: BatchSource, epoch: int, start_sample: int, mean: tuple[float, ...],
                 std: tuple[float, ...], cache: ResizeCache) -> None:
        super().__init__()
        self.source, self.epoch, self.start_sample, self.cache = source, epoch, start_sample, cache
        # Same arithmetic as DALI's crop_mirror_normalize: mean and std in 0..255 units.
        self.mean = torch.tensor([255.0 * m for m in mean]).view(3, 1, 1)
        self.std = torch.tensor([255.0 * s for s in std]).view(3, 1, 1)

    def __iter__(self) -> Iterator[DecodedBatch]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for batch_index, refs in self.source.rank_batches(self.epoch, self.start_sample, worker_id, num_workers):
            prepared = self.source.prepare(self.epoch, batch_index, refs)
            images = self._views(prepared) if prepared.views is not None else self._images(prepared)
            yield batch_index, images, prepared.refs, prepared.keys, prepared.num_skipped

    def _images(self, prepared: PreparedBatch) -> torch.Tensor:
        size = self.source.image_size
        images = torch.empty(len(prepared.data), 3, size, size)
        for i, (ref, data, plan) in enumerate(zip(prepared.refs.tolist(), prepared.data, prepared.plans)):
            torch.sub(self.cache.image(tuple(ref), data, plan, size), self.mean, out=images[i])
        return images.div_(self.std)

    def _views(self, prepared: PreparedBatch) -> list[torch.Tensor]:
        """Every view of every sample, each sample decoded once."""
        sizes = self.source.sizes
        views = [torch.empty(len(prepared.data), 3, size, size) for size in sizes]
        for i, data in enumerate(prepared.data):
            image = decode_image(data)
            for out, plans, size in zip(views, prepared.views, sizes):
                torch.sub(apply_plan(image, plans[i], size), self.mean, out=out[i])
        return [v.div_(self.std) for v in views]


def _as_is(batch: DecodedBatch) -> DecodedBatch:
    """Keep refs and counts as numpy arrays (DataLoader's default would turn them into tensors)."""
    return batch


class TorchBackend:
    """Decodes and augments with PIL and torch in DataLoader workers (or in-process with 0 workers)."""

    def __init__(self, source: BatchSource, cfg: LoaderConfig) -> None:
        self.source, self.cfg = source, cfg
        self.cache = ResizeCache(cfg.resize_cache_mb << 20)

    def iter_epoch(self, epoch: int, start_sample: int) -> Iterator[DecodedBatch]:
        workers = self.cfg.num_workers
        # In-process loading keeps one cache for the whole run; a worker process (new every epoch) gets an empty
        # one rather than a pickled copy.
        cache = self.cache if workers == 0 else ResizeCache(self.cache.max_bytes)
        dataset = EpochBatches(self.source, epoch, start_sample, self.cfg.mean, self.cfg.std, cache)
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
