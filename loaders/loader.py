"""The loader's config and entry point: reading samples by offset with bad-sample replacement, MixedLoader."""

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
from loaders.batch import Batch, label_arrays, make_batch
from loaders.sampler import MixConfig, MixingSampler, iter_rank_batches
from loaders.shards import SampleReader, SurveyShards, load_shard_root

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
    max_error_rate: float = 0.01
    """Unreadable samples / samples read, per survey, above which the loader stops."""
    error_rate_min_reads: int = 50
    """Samples of a survey read before max_error_rate is enforced (one early bad sample is no trend)."""
    prefetch: int = 2
    """Batches prepared ahead: DALI prefetch_queue_depth / DataLoader prefetch_factor."""

    def __post_init__(self) -> None:
        if self.backend not in ("dali", "torch"):
            raise ValueError(f"loader.backend must be 'dali' or 'torch', got {self.backend!r}")
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"loader.device must be 'cpu' or 'gpu', got {self.device!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"loader.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        for name, minimum in (("image_size", 8), ("num_workers", 0), ("num_threads", 1), ("prefetch", 1),
                              ("error_rate_min_reads", 1)):
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
    headers, PNG signature and chunk CRCs. Damage inside JPEG entropy-coded data passes (decoders
    then produce garbled pixels) - sharding.verify's checksums catch that.
    """
    if ext in ("jpg", "jpeg") and not (data[:3] == b"\xff\xd8\xff" and data.rstrip(b"\0")[-2:] == b"\xff\xd9"):
        raise CorruptSample("no JPEG start or end marker")
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
        raise CorruptSample(f"unreadable header ({type(err).__name__}: {err})") from None
    if width < 1 or height < 1:
        raise CorruptSample(f"empty image {width}x{height}")
    return height, width


@dataclass
class PreparedBatch:
    """One rank's share of a global batch, read and planned, ready for a backend to decode."""
    batch_index: int
    refs: np.ndarray  # (n, 3) int64 (survey, shard, index) actually read, after replacements
    keys: list[str]
    data: list[bytes]
    plans: list[SamplePlan]
    num_skipped: np.ndarray  # (n,) int32: unreadable samples replaced to fill each slot


class BatchSource:
    """Turns (epoch, batch index) into this rank's PreparedBatch; picklable, the same in any process."""

    def __init__(self, surveys: list[SurveyShards], mix: MixConfig, augment: AugmentConfig, image_size: int,
                 rank: int, world_size: int) -> None:
        if mix.global_batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world_size {world_size}: need 0 <= rank < world_size and a "
                             f"global_batch_size ({mix.global_batch_size}) divisible by the world size")
        self.surveys, self.mix, self.augment, self.image_size = surveys, mix, augment, image_size
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
        draws = draw_batch(self.augment, self.mix.seed, epoch, batch_index, self.mix.global_batch_size, slots)
        out = PreparedBatch(batch_index, np.empty_like(refs), [], [], [], np.zeros(len(refs), np.int32))
        for i, (ref, draw) in enumerate(zip(refs, draws)):
            out.refs[i], data, hw, out.num_skipped[i] = self._read_valid(tuple(int(v) for v in ref))
            info = self.surveys[int(ref[0])]
            out.keys.append(info.key(int(out.refs[i, 1]), int(out.refs[i, 2])))
            out.data.append(data)
            out.plans.append(make_plan(self.augment, draw, hw, self.image_size, info.name))
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
            tuple[int, torch.Tensor, np.ndarray, list[str], np.ndarray]]:
        """(batch index, images (N, 3, S, S) float32, refs, keys, num_skipped) per batch, in order."""

    def close(self) -> None: ...


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
                batch = make_batch(self._cast(images), label_arrays(self._source.surveys, refs), refs, keys)
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
                 sampler_state: dict | None = None) -> MixedLoader:
    """The loader for one rank: shards of the mix's surveys under cfg.shard_root, sampler, backend."""
    surveys = load_shard_root(cfg.shard_root, list(mix.ratios), cfg.split)
    sampler = MixingSampler({s.name: s.shard_counts for s in surveys}, mix)
    if sampler_state is not None:
        sampler.load_state_dict(sampler_state)
    source = BatchSource(surveys, mix, cfg.augment, cfg.image_size, rank, world_size)
    return MixedLoader(cfg, source, sampler, _make_backend(cfg, source))


def _make_backend(cfg: LoaderConfig, source: BatchSource) -> Backend:
    if cfg.device == "gpu" and not torch.cuda.is_available():
        raise ValueError("loader.device='gpu' needs a CUDA GPU and none is visible; use device='cpu'")
    if cfg.backend == "torch":
        from loaders.torch_backend import TorchBackend
        return TorchBackend(source, cfg)
    try:
        from loaders.dali import DaliBackend
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("nvidia"):
            raise
        raise ValueError(f"loader.backend='dali' needs nvidia-dali-cuda120 ({err}); install the 'gpu' extra "
                         "or use backend='torch'") from err
    return DaliBackend(source, cfg)
