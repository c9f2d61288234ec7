"""What the loader and both backends share: the config, the batch source and the backend protocol.

A BatchSource turns (epoch, batch index) into one rank's PreparedBatch (samples read by offset, unreadable ones
replaced, augmentation planned); a backend (loaders.torch_backend, loaders.dali) decodes and augments it.
loaders.loader assembles them, so the backends import this module and never the loader.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image

from loaders.augment import AugmentConfig, SamplePlan, draw_batch, make_plan
from loaders.sampler import MixConfig, iter_rank_batches
from loaders.shards import SampleReader, SurveyShards
from loaders.views import ViewsConfig, draw_views, plan_views
from sharding.images import without_addresses

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderConfig:
    shard_root: str = "data/shards"
    backend: Literal["dali", "torch"] = "dali"
    split: str = "train"
    image_size: int = 224
    """Output side in pixels (square)."""
    device: str = "cpu"
    """"cpu", or "gpu" for DALI mixed decode and GPU ops (the torch backend then only pins memory)."""
    num_workers: int = 2
    """torch DataLoader workers / DALI parallel external_source py_num_workers (0 = in-process)."""
    num_threads: int = 2
    """DALI CPU threads."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel mean on 0..1 pixels (ImageNet's, which DINOv2 was trained with)."""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    augment: AugmentConfig = AugmentConfig()
    views: ViewsConfig = ViewsConfig()
    """Multi-crop views (self-supervised training); when enabled they replace `augment` for training batches."""
    max_error_rate: float = 0.01
    """Unreadable samples / samples read, per survey, above which the loader stops."""
    error_rate_min_reads: int = 50
    """Samples of a survey read before max_error_rate is enforced (one early bad sample is no trend)."""
    prefetch: int = 2
    """Batches prepared ahead: DALI prefetch_queue_depth / DataLoader prefetch_factor."""
    resize_cache_mb: int = 0
    """Torch backend: memory per loading process for plainly resized images, so that samples whose augmentation
    is only a right-angle turn or flip (rotation_step_deg 90, no crop, no degradation) are decoded and resized
    once per run, not once per epoch. Pixels are unchanged; it pays with num_workers 0 (workers restart every
    epoch). 0 turns it off."""

    def __post_init__(self) -> None:
        if self.backend not in ("dali", "torch"):
            raise ValueError(f"loader.backend must be 'dali' or 'torch', got {self.backend!r}")
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"loader.device must be 'cpu' or 'gpu', got {self.device!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"loader.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        for name, minimum in (("image_size", 8), ("num_workers", 0), ("num_threads", 1), ("prefetch", 1),
                              ("error_rate_min_reads", 1), ("resize_cache_mb", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"loader.{name} must be an integer >= {minimum}, got {value!r}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"loader.max_error_rate must be in [0, 1], got {self.max_error_rate!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"loader.mean and loader.std need 3 values, std > 0; got {self.mean}, {self.std}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))


class CorruptSample(ValueError):
    """Encoded image bytes that no decoder should be given."""


def check_image(data: bytes, ext: str) -> tuple[int, int]:
    """(height, width) of an encoded image whose structure is intact; raises CorruptSample otherwise.

    Runs before either backend decodes, so both replace the same samples: JPEG start/end markers and
    headers (jpeg_size), PNG signature and chunk CRCs (PIL). Damage inside JPEG entropy-coded data passes (decoders
    then produce garbled pixels) - sharding.verify's checksums catch that.
    """
    if ext in ("jpg", "jpeg"):
        if not (data[:3] == b"\xff\xd8\xff" and data.rstrip(b"\0")[-2:] == b"\xff\xd9"):
            raise CorruptSample("no JPEG start or end marker")
        return jpeg_size(data)
    if ext == "png" and not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise CorruptSample("no PNG signature")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if image.mode not in ("RGB", "L"):
                raise CorruptSample(f"image mode {image.mode}, expected 8-bit RGB or grey")
            if ext == "png":
                image.verify()
    except CorruptSample:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad headers
        raise CorruptSample(without_addresses(f"unreadable header ({type(err).__name__}: {err})")) from None
    if width < 1 or height < 1:
        raise CorruptSample(f"empty image {width}x{height}")
    return height, width


# Frame headers of the JPEG processes PIL and DALI decode: baseline, extended sequential, progressive.
_SOF_DECODED = {0xC0, 0xC1, 0xC2}
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) from a JPEG's frame header, walking its marker segments up to the scan.

    What PIL's header parse checks, at a tenth of its cost (this runs for every sample read): segment
    structure and lengths, an 8-bit frame of 1 (grey) or 3 (colour) components, a non-empty size.
    """
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise CorruptSample(f"unreadable header (no JPEG marker at byte {i})")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a segment
            i += 2
            continue
        if marker in (0xDA, 0xD9):
            break
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2 or i + 2 + length > n:
            raise CorruptSample(f"unreadable header (JPEG segment 0x{marker:02X} at byte {i} overruns the data)")
        if marker in _SOF_OTHER:
            raise CorruptSample(f"unreadable header (JPEG process 0x{marker:02X} that decoders do not take)")
        if marker in _SOF_DECODED:
            if length < 8:
                raise CorruptSample("unreadable header (short JPEG frame header)")
            precision, components = data[i + 4], data[i + 9]
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            if precision != 8 or components not in (1, 3) or length < 8 + 3 * components:
                mode = {4: "CMYK"}.get(components, f"{components} components")
                raise CorruptSample(f"image mode {mode} at {precision} bits, expected 8-bit RGB or grey")
            if width < 1 or height < 1:
                raise CorruptSample(f"empty image {width}x{height}")
            return height, width
        i += 2 + length
    raise CorruptSample("unreadable header (no JPEG frame header before the scan)")


@dataclass
class PreparedBatch:
    """One rank's share of a global batch, read and planned, ready for a backend to decode."""
    batch_index: int
    refs: np.ndarray  # (n, 3) int64 (survey, shard, index) actually read, after replacements
    keys: list[str]
    data: list[bytes]
    plans: list[SamplePlan]
    num_skipped: np.ndarray  # (n,) int32: unreadable samples replaced to fill each slot
    views: list[list[SamplePlan]] | None = None
    """With multi-crop views: per view (global crops first), every sample's plan; `plans` is views[0]."""


class BatchSource:
    """Turns (epoch, batch index) into this rank's PreparedBatch; picklable, the same in any process."""

    def __init__(self, surveys: list[SurveyShards], mix: MixConfig, augment: AugmentConfig, image_size: int,
                 rank: int, world_size: int, views: ViewsConfig = ViewsConfig()) -> None:
        if mix.global_batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world_size {world_size}: need 0 <= rank < world_size and a "
                             f"global_batch_size ({mix.global_batch_size}) divisible by the world size")
        self.surveys, self.mix, self.augment, self.image_size = surveys, mix, augment, image_size
        self.views = views
        self.sizes = views.sizes if views.enabled else [image_size]
        """Output side of each image a backend makes per sample: every view's, or the one image's."""
        self.rank, self.world_size = rank, world_size
        self.shard_counts = {s.name: s.shard_counts for s in surveys}
        self.batch_size_per_rank = mix.global_batch_size // world_size
        self.key_length = max(len(e.key.encode()) for s in surveys for entries in s.index for e in entries)
        self._reader: SampleReader | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes only read bytes: leave the label tables and open files behind.
        state = dict(self.__dict__, _reader=None)
        empty = np.empty((0, 0), np.float32)
        state["surveys"] = [dataclasses.replace(s, features=empty, votes=empty, total_votes=empty)
                            for s in self.surveys]
        return state

    def rank_batches(self, epoch: int, start_sample: int, worker_id: int = 0,
                     num_workers: int = 1) -> Iterator[tuple[int, np.ndarray]]:
        """(batch index, refs) of the rest of an epoch for one loader worker, as iter_rank_batches."""
        return iter_rank_batches(self.shard_counts, self.mix, epoch, self.rank, self.world_size, worker_id,
                                 num_workers, start_sample)

    def batch_refs(self, epoch: int, batch_index: int) -> np.ndarray:
        """This rank's refs of one global batch, computed without any state (for DALI's workers)."""
        start = batch_index * self.mix.global_batch_size
        return next(self.rank_batches(epoch, start))[1]

    def prepare(self, epoch: int, batch_index: int, refs: np.ndarray) -> PreparedBatch:
        """Read every ref (replacing unreadable ones), draw its augmentation and plan it."""
        slots = slice(self.rank * self.batch_size_per_rank, (self.rank + 1) * self.batch_size_per_rank)
        seed, batch_size = self.mix.seed, self.mix.global_batch_size
        if self.views.enabled:
            view_draws = draw_views(self.views, seed, epoch, batch_index, batch_size, slots)
        else:
            draws = draw_batch(self.augment, seed, epoch, batch_index, batch_size, slots)
        out = PreparedBatch(batch_index, np.empty_like(refs), [], [], [], np.zeros(len(refs), np.int32),
                            [[] for _ in self.sizes] if self.views.enabled else None)
        for i, ref in enumerate(refs):
            out.refs[i], data, hw, out.num_skipped[i] = self._read_valid(tuple(int(v) for v in ref))
            info = self.surveys[int(ref[0])]
            out.keys.append(info.key(int(out.refs[i, 1]), int(out.refs[i, 2])))
            out.data.append(data)
            if out.views is None:
                out.plans.append(make_plan(self.augment, draws[i], hw, self.image_size, info.name))
                continue
            for view_plans, plan in zip(out.views, plan_views(self.views, view_draws, i, hw, info.name)):
                view_plans.append(plan)
        if out.views is not None:
            out.plans = out.views[0]
        return out

    def _read_valid(self, ref: tuple[int, int, int]) -> tuple[tuple[int, int, int], bytes, tuple[int, int], int]:
        # Replacement = the next sample of the same survey, so every batch keeps its survey counts.
        if self._reader is None:
            self._reader = SampleReader(self.surveys)
        survey, shard, index = ref
        info = self.surveys[survey]
        for num_skipped in range(info.num_samples):
            try:
                data = self._reader.read(survey, shard, index)
                return (survey, shard, index), data, check_image(data, info.image_ext), num_skipped
            except (OSError, CorruptSample) as err:
                logger.warning("%s: replacing unreadable sample %s of shard %s by the next sample (%s)",
                               info.name, info.key(shard, index), info.paths[shard], err)
            shard, index = _next_sample(info, shard, index)
        raise RuntimeError(f"{info.name}: no readable sample in any of its {len(info.paths)} shards "
                           f"({info.directory}); run `python -m sharding.verify` on it")


def _next_sample(info: SurveyShards, shard: int, index: int) -> tuple[int, int]:
    index += 1
    while index >= info.shard_counts[shard]:
        shard, index = (shard + 1) % len(info.paths), 0
    return shard, index


class Backend(Protocol):
    def iter_epoch(self, epoch: int, start_sample: int) -> Iterator[
            tuple[int, torch.Tensor | list[torch.Tensor], np.ndarray, list[str], np.ndarray]]:
        """(batch index, images (N, 3, S, S) float32, refs, keys, num_skipped) per batch, in order; with
        multi-crop views a list of every view's (N, 3, S_v, S_v) images in place of the images."""

    def close(self) -> None: ...
