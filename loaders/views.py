"""Multi-crop views for self-supervised training: their config, per-view draws and per-view plans.

A global batch's views are drawn like its augmentation (loaders.augment.draw_batch): view v of every position
from one generator seeded by (seed, epoch, batch index, VIEWS_STREAM, v), then sliced by rank, so a sample's views
depend on neither the world size nor the loader worker. Each view is a random resized crop with astronomy
augmentations (flips, right-angle or free rotations, the survey-degradation transform). Brightness, contrast and
per-band gains are off unless a crop set asks for them (a galaxy's colours and surface brightness are physical); there
is no hue, greyscale or solarize operation.
The backends decode a sample once and run every view's SamplePlan on the decoded image.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from loaders.augment import AugmentConfig, SampleDraw, SamplePlan, draw_batch, make_plan

VIEWS_STREAM = 0x76696577
"""Extra seed word ("view") so view draws share a stream with neither the sampler nor single-image augmentation."""


@dataclass(frozen=True)
class CropSet:
    """`count` views of `size` px, each a random resized crop with its own draws. The defaults are DINOv2's
    global crops (two of 224 px from 32-100% of the image)."""

    count: int = 2
    size: int = 224
    """Output side in pixels (square)."""
    scale: tuple[float, float] = (0.32, 1.0)
    """Area of the crop window as a fraction of the image, drawn uniformly: the size jitter (the galaxy appears
    1 / sqrt(scale) times larger)."""
    center_range: float = 1.0
    """How far a window's centre may stray from the cutout's centre, as a fraction of the farthest it can go: 1
    anywhere (DINOv2's), 0 always centred (cutouts are centred on their galaxy). 0.25 on both crop sets made the SSL
    features worse on every survey (docs/BENCHMARKS.md): off-centre local crops are part of the task."""
    ratio: tuple[float, float] = (1.0, 1.0)
    """Width / height of the window, drawn log-uniformly; square keeps a galaxy's axis ratio."""
    rotation_deg: float = 180.0
    """Angle drawn uniformly in [-rotation_deg, rotation_deg]: galaxies have no preferred orientation."""
    rotation_step_deg: float = 0.0
    """0: free rotations; 90: right-angle turns only (exact pixel permutations, no interpolation blur)."""
    hflip_prob: float = 0.5
    vflip_prob: float = 0.5
    fit_rotation: bool = True
    """Shrink a rotated window until it lies inside the image (no invented border pixels)."""
    degrade_prob: tuple[float, ...] = (1.0, 0.1)
    """Probability of the survey-degradation transform (PSF blur, coarser pixels, noise) for the set's k-th view:
    degrade_prob[k % len(degrade_prob)]. DINOv2 blurs its first global crop always and its second one in ten."""
    degrade_surveys: tuple[str, ...] = ()
    """Surveys that may be degraded; empty means every survey."""
    psf_sigma_px: tuple[float, float] = (0.1, 2.0)
    """Extra Gaussian PSF sigma in pixels of the survey's image (DINOv2's blur radius range)."""
    resample_factor: tuple[float, float] = (1.0, 2.0)
    """Coarser pixel grid: 1 keeps the pixels, 2 halves the resolution."""
    noise_std: tuple[float, float] = (0.0, 4.0)
    """Additive Gaussian noise on the coarse grid, 0..255 pixel units."""
    degrade_pixels: str = "image"
    """"image": psf_sigma_px and resample_factor in the decoded image's pixels; "view": in the view's, so a 64 px
    crop of a 256 px image is blurred by as many of its own pixels as a full-size one."""
    brightness: float = 0.0
    """Brightness factor in [1 - brightness, 1 + brightness]; 0 (the default) keeps a galaxy's surface brightness."""
    contrast: float = 0.0
    """Contrast factor in [1 - contrast, 1 + contrast] about mid-grey; 0 keeps the stretch."""
    channel_gain: float = 0.0
    """R, G, B each scaled by its own factor in [1 - channel_gain, 1 + channel_gain]; 0 keeps the colours.
    The only colour operation: no hue rotation, greyscale or solarize. (0.3 did not help the SSL recipe.)"""

    def __post_init__(self) -> None:
        for name, minimum in (("count", 0), ("size", 8)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"views crop set: {name} must be an integer >= {minimum}, got {value!r}")
        probs = tuple(float(p) for p in self.degrade_prob)
        if not probs or not all(0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"views crop set: degrade_prob must be one or more probabilities in [0, 1] (one per "
                             f"view, repeating), got {list(self.degrade_prob)!r}")
        object.__setattr__(self, "degrade_prob", probs)
        for name in ("scale", "ratio", "psf_sigma_px", "resample_factor", "noise_std", "degrade_surveys"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        try:
            self.augment(0)  # AugmentConfig checks every range
        except ValueError as err:
            message = str(err).replace("augment.crop_scale", "scale").replace("augment.crop_ratio", "ratio")
            raise ValueError(f"views crop set: {message.replace('augment.', '')}") from None

    def augment(self, k: int) -> AugmentConfig:
        """The set's k-th view as a single-image augmentation."""
        return AugmentConfig(
            enabled=True, rotation_deg=self.rotation_deg, rotation_step_deg=self.rotation_step_deg,
            hflip_prob=self.hflip_prob, vflip_prob=self.vflip_prob, fit_rotation=self.fit_rotation,
            crop_scale=self.scale, center_range=self.center_range, crop_ratio=self.ratio, brightness=self.brightness,
            contrast=self.contrast, channel_gain=self.channel_gain,
            degrade_prob=self.degrade_prob[k % len(self.degrade_prob)], degrade_surveys=self.degrade_surveys,
            psf_sigma_px=self.psf_sigma_px, resample_factor=self.resample_factor, noise_std=self.noise_std,
            degrade_pixels=self.degrade_pixels)


@dataclass(frozen=True)
class LocalCrops(CropSet):
    """DINOv2's local crops: eight of 96 px from 5-32% of the image, degraded one time in two."""

    count: int = 8
    size: int = 96
    scale: tuple[float, float] = (0.05, 0.32)
    degrade_prob: tuple[float, ...] = (0.5,)


@dataclass(frozen=True)
class ViewsConfig:
    """Multi-crop views (data.loader.views): when enabled, Batch.views holds the global crops, then the local ones.

    Replaces data.loader.augment for the training batches (Batch.images is the first global crop).
    """

    enabled: bool = False
    global_crops: CropSet = CropSet()
    local_crops: LocalCrops = LocalCrops()

    def __post_init__(self) -> None:
        if self.enabled and self.global_crops.count < 1:
            raise ValueError("views.global_crops.count must be >= 1 (Batch.images is the first global crop)")

    @property
    def num_global_views(self) -> int:
        return self.global_crops.count if self.enabled else 0

    @property
    def num_views(self) -> int:
        return self.global_crops.count + self.local_crops.count if self.enabled else 0

    @property
    def sizes(self) -> list[int]:
        """Output side of every view, global crops first."""
        return [crop_set.size for crop_set, _ in self._views()]

    def augments(self) -> tuple[AugmentConfig, ...]:
        """Every view's augmentation, global crops first."""
        return _augments(self)

    def _views(self) -> list[tuple[CropSet, int]]:
        if not self.enabled:
            return []
        return [(self.global_crops, k) for k in range(self.global_crops.count)] + \
            [(self.local_crops, k) for k in range(self.local_crops.count)]


@functools.lru_cache(maxsize=8)
def _augments(views: ViewsConfig) -> tuple[AugmentConfig, ...]:
    return tuple(crop_set.augment(k) for crop_set, k in views._views())


def draw_views(views: ViewsConfig, seed: int, epoch: int, batch_index: int, global_batch_size: int,
               positions: slice) -> list[list[SampleDraw]]:
    """Per view, the draws of `positions` of one global batch, seeded by (seed, epoch, batch, view)."""
    return [draw_batch(cfg, seed, epoch, batch_index, global_batch_size, positions, stream=(VIEWS_STREAM, v))
            for v, cfg in enumerate(views.augments())]


def plan_views(views: ViewsConfig, draws: list[list[SampleDraw]], i: int, src_hw: tuple[int, int],
               survey: str) -> list[SamplePlan]:
    """Sample i's plan for every view, for its decoded image of `src_hw` pixels."""
    return [make_plan(cfg, view_draws[i], src_hw, size, survey)
            for cfg, view_draws, size in zip(views.augments(), draws, views.sizes)]
