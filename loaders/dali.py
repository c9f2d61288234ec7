"""The DALI backend (the only module importing nvidia.dali): external-source refs, DALI decode + augment."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from loaders.augment import CONTRAST_CENTER
from loaders.sampler import epoch_length
from loaders.source import BatchSource, LoaderConfig, PreparedBatch

DecodedBatch = tuple[int, torch.Tensor | list[torch.Tensor], np.ndarray, list[str], np.ndarray]

# Every external_source output: (name, dtype, ndim, layout). One row per sample of the batch.
SAMPLE_OUTPUTS = [
    ("encoded", types.UINT8, 1, ""),
    ("key", types.UINT8, 1, ""),  # utf-8, zero-padded to BatchSource.key_length
    ("ref", types.INT64, 1, ""),  # (survey, shard, index) actually read
    ("position", types.INT64, 1, ""),  # (epoch, batch index): checks the order at the other end
    ("num_skipped", types.INT32, 0, ""),
]
# A plan's outputs, once per image made from the decoded sample (one, or one per multi-crop view); the degradation's
# only for images that may be degraded.
CROP_OUTPUTS = [
    ("cropped", types.BOOL, 0, ""),  # SamplePlan.crop: cut the part of the decoded image the plan reads, first
    ("crop_start", types.INT32, 1, ""),  # (y, x)
    ("crop_shape", types.INT32, 1, ""),  # (height, width)
]
DEGRADE_OUTPUTS = [
    ("degrade", types.BOOL, 0, ""),
    ("degrade_sigma", types.FLOAT, 0, ""),
    ("small_hw", types.FLOAT, 1, ""),
    ("down_matrix", types.FLOAT, 2, ""),
    ("noise", types.FLOAT, 3, "HWC"),  # (1, 1, 3) zeros where not degraded: only degraded samples use it
]
RESAMPLE_OUTPUTS = [
    ("prefilter", types.BOOL, 0, ""),
    ("prefilter_sigma", types.FLOAT, 0, ""),
    ("matrix", types.FLOAT, 2, ""),
    ("axis_aligned", types.BOOL, 0, ""),  # matrix scales (or mirrors) each axis + shift: fn.resize of a window
    ("transposed", types.BOOL, 0, ""),  # the same with the axes swapped (a right-angle turn): resize, transpose
    ("roi_start", types.FLOAT, 1, ""),  # (y, x) of that window in input pixels (start > end mirrors an axis)
    ("roi_end", types.FLOAT, 1, ""),
    ("norm_mean", types.FLOAT, 1, ""),  # normalisation with brightness/contrast folded in, 0..255 units
    ("norm_std", types.FLOAT, 1, ""),
]
_NO_NOISE = np.zeros((1, 1, 3), np.float32)


def plan_outputs(may_degrade: bool) -> list[tuple]:
    return CROP_OUTPUTS + (DEGRADE_OUTPUTS if may_degrade else []) + RESAMPLE_OUTPUTS


def source_outputs(may_degrade: list[bool]) -> list[tuple]:
    """The sample's outputs, then every image's plan outputs (named <output>_<image>)."""
    return SAMPLE_OUTPUTS + [(f"{name}_{v}", *rest) for v, degrade in enumerate(may_degrade)
                             for name, *rest in plan_outputs(degrade)]


def pipeline_outputs(num_images: int) -> list[str]:
    return [f"images_{v}" for v in range(num_images)] + ["key", "ref", "position", "num_skipped"]


class DaliSource:
    """The parallel external_source callback: BatchInfo -> one rank's batch, from (epoch, batch) alone.

    A pipeline starts at (first_epoch, first_batch); DALI counts epochs from 0 at each reset, so
    epoch_idx k > 0 means epoch first_epoch + k from its first batch. Picklable, stateless per call.
    """

    def __init__(self, source: BatchSource, first_epoch: int, first_batch: int, num_batches: int,
                 mean: list[float], std: list[float], sizes: list[int], may_degrade: list[bool]) -> None:
        self.source, self.first_epoch, self.first_batch = source, first_epoch, first_batch
        self.num_batches, self.sizes, self.may_degrade = num_batches, sizes, may_degrade
        self.mean = np.array([255.0 * m for m in mean], np.float32)  # crop_mirror_normalize works in 0..255
        self.std = np.array([255.0 * v for v in std], np.float32)

    def __call__(self, info: types.BatchInfo) -> tuple[list[np.ndarray], ...]:
        epoch = self.first_epoch + info.epoch_idx
        batch_index = info.iteration + (self.first_batch if info.epoch_idx == 0 else 0)
        if batch_index >= self.num_batches:
            raise StopIteration
        prepared = self.source.prepare(epoch, batch_index, self.source.batch_refs(epoch, batch_index))
        return pack(prepared, epoch, self.source.key_length, self.sizes, self.may_degrade, self.mean, self.std)


def _resize_windows(matrices: np.ndarray, out_size: int) -> dict[str, np.ndarray]:
    """For matrices (N, 2, 3) that scale, mirror or swap the axes (no free rotation or shear), the input window
    fn.resize maps onto the output (to be transposed where the axes swap).

    fn.resize samples the same points as warp_affine then (pixel centres, bilinear, clamped borders; a window whose
    start lies beyond its end mirrors that axis), and DALI's CPU resize is about twice as fast as its CPU warp.
    """
    aligned = (matrices[:, 0, 1] == 0) & (matrices[:, 1, 0] == 0)
    transposed = (matrices[:, 0, 0] == 0) & (matrices[:, 1, 1] == 0) & ~aligned
    start = matrices[:, [1, 0], 2].astype(np.float32)
    # Output y walks input y (x) and output x walks input x (y) when aligned (transposed): the window's extents.
    extent_y = np.where(transposed, matrices[:, 1, 0], matrices[:, 1, 1])
    extent_x = np.where(transposed, matrices[:, 0, 1], matrices[:, 0, 0])
    end = start + out_size * np.stack([extent_y, extent_x], axis=1).astype(np.float32)
    return {"axis_aligned": aligned, "transposed": transposed, "roi_start": start, "roi_end": end}


def _normalisation(brightness: np.ndarray, contrast: np.ndarray, channel_gain: np.ndarray, mean: np.ndarray,
                   std: np.ndarray) -> dict[str, np.ndarray]:
    """gain_c * brightness * (C + contrast * (x - C)), then (y - mean) / std, as one (x - mean') / std' per sample.

    Folding the jitter into crop_mirror_normalize saves a float pass over every image and, unlike
    fn.brightness_contrast on uint8, never clamps, so it equals the torch backend's float arithmetic.
    """
    gain = (brightness * contrast)[:, None] * channel_gain
    offset = (brightness * CONTRAST_CENTER * (1.0 - contrast))[:, None] * channel_gain
    return {"norm_mean": ((mean - offset) / gain).astype(np.float32), "norm_std": (std / gain).astype(np.float32)}


def pack(prepared: PreparedBatch, epoch: int, key_length: int, sizes: list[int], may_degrade: list[bool],
         mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray | list[np.ndarray], ...]:
    """A PreparedBatch as external_source outputs, in source_outputs(may_degrade) order.

    Fixed-shape outputs go as one (N, ...) array each, which DALI copies in one piece; a list of per-sample
    arrays costs a conversion per sample and output (most of the feeding time).
    """
    n = len(prepared.plans)
    keys = np.zeros((n, key_length), np.uint8)
    for i, key in enumerate(prepared.keys):
        encoded_key = key.encode()
        keys[i, :len(encoded_key)] = np.frombuffer(encoded_key, np.uint8)
    columns = {
        "encoded": [np.frombuffer(data, np.uint8) for data in prepared.data], "key": keys,
        "ref": np.ascontiguousarray(prepared.refs, np.int64),
        "position": np.tile(np.array([epoch, prepared.batch_index], np.int64), (n, 1)),
        "num_skipped": np.asarray(prepared.num_skipped, np.int32)}
    out = [columns[name] for name, *_ in SAMPLE_OUTPUTS]
    plan_sets = prepared.views if prepared.views is not None else [prepared.plans]
    assert len(plan_sets) == len(sizes), "one output size per image"
    for plans, size, degrade in zip(plan_sets, sizes, may_degrade):
        plan_columns = _plan_columns(plans, size, mean, std)
        out += [plan_columns[name] for name, *_ in plan_outputs(degrade)]
    # Dense arrays only: DALI refuses strided views, and astype/fancy indexing may keep one.
    return tuple(c if isinstance(c, list) else np.ascontiguousarray(c) for c in out)


def _plan_columns(plans: list, out_size: int, mean: np.ndarray, std: np.ndarray) -> dict:
    """One image's plans as CROP_OUTPUTS + DEGRADE_OUTPUTS + RESAMPLE_OUTPUTS columns."""
    n = len(plans)
    matrices = np.stack([p.matrix for p in plans]).astype(np.float32)
    prefilter_sigma = np.array([p.prefilter_sigma for p in plans], np.float32)
    crops = np.array([p.crop or (0, 0, 1, 1) for p in plans], np.int32).reshape(n, 4)
    return {
        "cropped": np.array([p.crop is not None for p in plans], bool), "crop_start": crops[:, [1, 0]],
        "crop_shape": crops[:, [3, 2]] - crops[:, [1, 0]],
        "degrade": np.array([p.degrade for p in plans], bool),
        "degrade_sigma": np.array([p.degrade_sigma for p in plans], np.float32),
        "small_hw": np.array([p.small_hw for p in plans], np.float32).reshape(n, 2),
        "down_matrix": np.stack([p.down_matrix for p in plans]).astype(np.float32),
        "noise": [p.noise if p.noise is not None else _NO_NOISE for p in plans],
        "prefilter": prefilter_sigma > 0, "prefilter_sigma": prefilter_sigma,
        "matrix": matrices, **_resize_windows(matrices, out_size),
        **_normalisation(np.array([p.brightness for p in plans], np.float64),
                         np.array([p.contrast for p in plans], np.float64),
                         np.array([p.channel_gain for p in plans], np.float64).reshape(n, 3), mean, std)}


def _resample(images, s, out_size: int):
    """Resize (turned by a transpose where the axes swap) or warp, then normalise: float CHW out of every branch,
    so that the branches merge after the normalisation; uint8 input needs no cast pass (the resize keeps uint8,
    which crop_mirror_normalize reads directly; the warp reads uint8 and writes float)."""
    if s["prefilter"]:
        images = fn.gaussian_blur(images, sigma=s["prefilter_sigma"])
    if s["axis_aligned"]:
        out = _normalise(_resize_window(images, s, out_size), s)
    elif s["transposed"]:
        out = _normalise(fn.transpose(_resize_window(images, s, out_size), perm=[1, 0, 2], transpose_layout=False), s)
    else:
        out = _normalise(fn.warp_affine(images, matrix=s["matrix"], size=[out_size, out_size], dtype=types.FLOAT), s)
    return out


def _resize_window(images, s, out_size: int):
    return fn.resize(images, size=[out_size, out_size], roi_start=s["roi_start"], roi_end=s["roi_end"],
                     roi_relative=False, antialias=False, interp_type=types.INTERP_LINEAR)


def _normalise(images, s):
    # BFLOAT16 is not a DALI 2.4 type: the loader casts float32 in torch when dtype is bfloat16.
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=s["norm_mean"],
                                    std=s["norm_std"])


@pipeline_def(enable_conditionals=True)
def augment_pipeline(source: DaliSource, parallel: bool, prefetch: int, gpu: bool, sizes: tuple[int, ...],
                     may_degrade: tuple[bool, ...]):
    """Decode once -> per image (one, or one per multi-crop view): [degrade] -> [antialias blur] -> warp or
    resize -> normalise with brightness/contrast folded in.

    Degraded samples work in float (the noise must not be rounded); the rest stay uint8 until the
    final normalisation, which is about 30% faster on DALI's CPU operators and rounds by at most half a level.
    """
    outputs = source_outputs(list(may_degrade))
    parallel_args = {"prefetch_queue_depth": prefetch} if parallel else {}
    s = dict(zip([name for name, *_ in outputs], fn.external_source(
        source, num_outputs=len(outputs), batch=True, batch_info=True, parallel=parallel,
        dtype=[o[1] for o in outputs], ndim=[o[2] for o in outputs], layout=[o[3] for o in outputs],
        **parallel_args)))
    decoded = fn.decoders.image(s["encoded"], device="mixed" if gpu else "cpu", output_type=types.RGB)
    images = [_image(decoded, {name: s[f"{name}_{v}"] for name, *_ in plan_outputs(degrade)}, size, gpu, degrade)
              for v, (size, degrade) in enumerate(zip(sizes, may_degrade))]
    return (*images, s["key"], s["ref"], s["position"], s["num_skipped"])


def _image(images, s, out_size: int, gpu: bool, may_degrade: bool):
    """One plan's image from the decoded samples; without `may_degrade` (known when the pipeline is built) the
    degradation branch is left out of the graph."""
    if s["cropped"]:  # blur and degrade only the part a small crop reads
        images = fn.slice(images, start=s["crop_start"], shape=s["crop_shape"], axis_names="HW")
    if not may_degrade:
        return _resample(images, s, out_size)
    if s["degrade"]:
        images = fn.gaussian_blur(fn.cast(images, dtype=types.FLOAT), sigma=s["degrade_sigma"])
        images = fn.warp_affine(images, matrix=s["down_matrix"], size=s["small_hw"])
        images = images + (s["noise"].gpu() if gpu else s["noise"])
        images = _resample(images, s, out_size)
    else:
        images = _resample(images, s, out_size)
    return images


class DaliBackend:
    """Runs augment_pipeline; keeps one pipeline across epochs and rebuilds it only after a jump."""

    def __init__(self, source: BatchSource, cfg: LoaderConfig) -> None:
        self.source, self.cfg = source, cfg
        self.num_batches = epoch_length(source.shard_counts, source.mix)[0]
        self._iterator: DALIGenericIterator | None = None
        self._pipeline = None
        self._next: tuple[int, int] | None = None  # (epoch, batch) the live iterator yields next

    def iter_epoch(self, epoch: int, start_sample: int) -> Iterator[DecodedBatch]:
        first = start_sample // self.source.mix.global_batch_size
        if self._next == (epoch - 1, self.num_batches) and first == 0:
            self._finish_epoch(epoch - 1)  # the previous epoch's consumer stopped just before its end
        if self._next != (epoch, first):
            self._start(epoch, first)
        while self._next is not None and self._next[1] < self.num_batches:
            try:
                outputs = next(self._iterator)
            except Exception:
                self.close()  # a pipeline that raised is no longer valid: the next epoch builds a new one
                raise
            yield self._unpack(outputs)
        if self._next is not None:
            self._finish_epoch(epoch)

    def close(self) -> None:
        self._iterator = self._pipeline = self._next = None

    def _start(self, epoch: int, first_batch: int) -> None:
        self.close()
        augments = self.source.views.augments() if self.source.views.enabled else [self.source.augment]
        source = DaliSource(self.source, epoch, first_batch, self.num_batches, list(self.cfg.mean),
                            list(self.cfg.std), self.source.sizes, [a.enabled and a.degrade_prob > 0 for a in augments])
        self._pipeline, self._iterator = _build(source, self.cfg, self.source.batch_size_per_rank)
        self._next = (epoch, first_batch)

    def _finish_epoch(self, epoch: int) -> None:
        try:
            next(self._iterator)
        except StopIteration:
            self._iterator.reset()
            self._next = (epoch + 1, 0)
            return
        raise AssertionError("the DALI source produced a batch past the end of the epoch")

    def _unpack(self, outputs: list[dict[str, torch.Tensor]]) -> DecodedBatch:
        out = outputs[0]
        epoch, batch_index = (int(v) for v in out["position"][0])
        assert (epoch, batch_index) == self._next, "DALI returned batches out of order"
        self._next = (epoch, batch_index + 1)
        keys = [bytes(row.numpy()).rstrip(b"\0").decode() for row in out["key"].cpu()]
        images = [out[f"images_{v}"] for v in range(len(self.source.sizes))]
        return (batch_index, images if self.source.views.enabled else images[0], out["ref"].cpu().numpy(), keys,
                out["num_skipped"].cpu().numpy().reshape(-1))


def _build(source: DaliSource, cfg: LoaderConfig, batch_size: int):
    """(pipeline, iterator) of augment_pipeline over `source`, built."""
    gpu = cfg.device == "gpu"
    pipeline = augment_pipeline(
        source, cfg.num_workers > 0, cfg.prefetch, gpu, tuple(source.sizes), tuple(source.may_degrade),
        batch_size=batch_size,
        num_threads=cfg.num_threads, device_id=torch.cuda.current_device() if gpu else None,
        prefetch_queue_depth=cfg.prefetch, py_num_workers=max(cfg.num_workers, 1),
        # Forking a process that holds a CUDA context is unsupported: spawn once CUDA is up.
        py_start_method="spawn" if torch.cuda.is_available() and torch.cuda.is_initialized() else "fork")
    pipeline.build()
    iterator = DALIGenericIterator(pipeline, pipeline_outputs(len(source.sizes)), auto_reset=False,
                                   last_batch_policy=LastBatchPolicy.FILL)
    return pipeline, iterator


def iter_plain_batches(source, cfg: LoaderConfig) -> Iterator[tuple[int, torch.Tensor]]:
    """(batch index, images) of an evaluation source (loaders.evaluation.PlainSource), augmentation off.

    The training pipeline with identity plans, so GPU decoding gives the pixels training saw. Images are
    cloned: DALI's iterator refills the same tensors on the next call.
    """
    dali_source = DaliSource(source, 0, 0, source.num_batches, list(cfg.mean), list(cfg.std), [cfg.image_size],
                             [False])
    _, iterator = _build(dali_source, cfg, source.batch_size)
    for outputs in iterator:
        out = outputs[0]
        _, batch_index = (int(v) for v in out["position"][0])
        yield batch_index, out["images_0"].clone()
