"""Augmentation: its config, per-sample parameters drawn in Python, the per-sample plan, and the torch ops."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from loaders.warp import Turn, apply_turn, gaussian_blur, warp_affine, whole_image_turn  # noqa: F401 - re-exported

CONTRAST_CENTER = 128.0
"""Pixel level (0..255) that contrast jitter leaves unchanged: mid-grey, DALI's default for 8-bit data."""

AUGMENT_STREAM = 0x6175676D
"""Extra seed word ("augm") so augmentation draws never share a stream with the sampler's shuffles."""

MIN_SIGMA = 1e-3
"""A blur this narrow is the identity (its 3-tap kernel is [0, 1, 0]); used where an op needs sigma > 0."""


@dataclass(frozen=True)
class AugmentConfig:
    """What to randomise per sample; every number is drawn in Python so both backends see the same."""

    enabled: bool = False
    """Master switch; off gives the plain decode -> resize -> normalise path (evaluation)."""
    rotation_deg: float = 180.0
    """Rotation angle drawn uniformly in [-rotation_deg, rotation_deg]; galaxies have no preferred angle."""
    rotation_step_deg: float = 0.0
    """0: any angle. 90: the angle rounded to a multiple of 90 degrees (uniform over the four with
    rotation_deg 180): an exact pixel permutation, without the interpolation blur and the up to 1.41x zoom
    (fit_rotation) that other angles cost."""
    hflip_prob: float = 0.5
    vflip_prob: float = 0.5
    fit_rotation: bool = True
    """Shrink a rotated crop window until it lies inside the image, so no border pixels are invented
    (costs up to 1.41x zoom at 45 degrees); False keeps the window and repeats edge pixels at corners."""
    crop_scale: tuple[float, float] = (0.64, 1.0)
    """Random resized crop: area of the window as a fraction of the image."""
    center_range: float = 1.0
    """How far the window's centre may move from the image's centre, as a fraction of the farthest it can go inside
    the image: 1 anywhere (torchvision's random resized crop), 0 always centred: survey cutouts are centred on their
    galaxy. (For SSL views, 0.25 made the features worse on every survey: docs/BENCHMARKS.md.)"""
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    """Random resized crop: width / height of the window, drawn log-uniformly. Square by default: a window
    of another shape stretches the galaxy, changing its axis ratio, which is a label (how-rounded, edge-on)."""
    brightness: float = 0.1
    """Brightness factor drawn in [1 - brightness, 1 + brightness]."""
    contrast: float = 0.1
    """Contrast factor drawn in [1 - contrast, 1 + contrast], about CONTRAST_CENTER."""
    channel_gain: float = 0.0
    """Each of R, G, B scaled by its own factor drawn in [1 - channel_gain, 1 + channel_gain]: a galaxy's colours
    change (as dust, redshift and another survey's filters change them) and its structure does not. 0: colours kept."""
    degrade_prob: float = 0.0
    """Probability of the survey-degradation transform (PSF blur, coarser pixels, noise) per sample."""
    degrade_surveys: tuple[str, ...] = ()
    """Surveys that may be degraded (e.g. [hst]); empty means every survey."""
    psf_sigma_px: tuple[float, float] = (0.5, 2.0)
    """Extra Gaussian PSF sigma, in pixels of the survey's image."""
    resample_factor: tuple[float, float] = (1.0, 2.0)
    """Down-then-up resampling factor (1 keeps the pixel grid; 2 halves the resolution)."""
    noise_std: tuple[float, float] = (0.0, 4.0)
    """Standard deviation of additive Gaussian noise on the coarse grid, in 0..255 pixel units."""
    degrade_pixels: str = "image"
    """Whose pixels psf_sigma_px and resample_factor count: "image", the decoded image's (a survey's own PSF and pixel
    scale), or "view", the output's (an image cut to a view a quarter of its size sees a quarter of the blur in
    "image" pixels; "view" keeps the degradation as visible at any crop size)."""

    def __post_init__(self) -> None:
        if self.degrade_pixels not in ("image", "view"):
            raise ValueError(f"augment.degrade_pixels must be 'image' or 'view', got {self.degrade_pixels!r}")
        for name in ("hflip_prob", "vflip_prob", "degrade_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name} must be a probability in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 <= self.center_range <= 1.0:
            raise ValueError(f"augment.center_range must be in [0, 1] (1: anywhere, 0: centred), "
                             f"got {self.center_range!r}")
        for name in ("rotation_deg", "rotation_step_deg", "brightness", "contrast", "channel_gain"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)!r}")
        if max(self.brightness, self.contrast, self.channel_gain) >= 1.0:
            raise ValueError("augment.brightness, augment.contrast and augment.channel_gain must be < 1 (factors stay "
                             "positive)")
        _check_range("crop_scale", self.crop_scale, 0.0, 1.0, open_low=True)
        _check_range("crop_ratio", self.crop_ratio, 0.0, math.inf, open_low=True)
        _check_range("psf_sigma_px", self.psf_sigma_px, 0.0, math.inf)
        _check_range("resample_factor", self.resample_factor, 1.0, math.inf)
        _check_range("noise_std", self.noise_std, 0.0, math.inf)
        object.__setattr__(self, "crop_scale", tuple(self.crop_scale))
        object.__setattr__(self, "crop_ratio", tuple(self.crop_ratio))
        object.__setattr__(self, "degrade_surveys", tuple(self.degrade_surveys))


def _check_range(name: str, value: tuple[float, float], low: float, high: float, open_low: bool = False) -> None:
    if len(value) != 2 or not (low <= value[0] <= value[1] <= high) or (open_low and value[0] <= low):
        relation = "<" if open_low else "<="
        raise ValueError(f"augment.{name} must be [min, max] with {low} {relation} min <= max <= {high}, "
                         f"got {list(value)!r}")


@dataclass(frozen=True)
class SampleDraw:
    """The random numbers of one global sample position, before the image size is known."""

    angle_deg: float = 0.0
    hflip: bool = False
    vflip: bool = False
    crop_scale: float = 1.0
    crop_log_ratio: float = 0.0
    crop_u: float = 0.5
    """Window centre between its leftmost (0) and rightmost (1) position."""
    crop_v: float = 0.5
    brightness: float = 1.0
    contrast: float = 1.0
    channel_gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    degrade_u: float = 1.0
    """Compared with degrade_prob: the transform applies when degrade_u < degrade_prob."""
    psf_sigma_px: float = 0.0
    resample_factor: float = 1.0
    noise_std: float = 0.0
    noise_seed: int = 0


def draw_batch(cfg: AugmentConfig, seed: int, epoch: int, batch_index: int, global_batch_size: int,
               positions: slice, stream: tuple[int, ...] = (AUGMENT_STREAM,)) -> list[SampleDraw]:
    """Draws for `positions` of one global batch, seeded by (seed, epoch, batch, *stream): the same on any rank split.

    The whole batch is drawn at once and then sliced, so a position's numbers depend on neither the
    world size nor the loader worker; a resumed run redraws exactly what it would have seen. `stream` keeps
    other users of these draws (multi-crop views, loaders.views) on generators of their own.
    """
    if not cfg.enabled:
        return [SampleDraw() for _ in range(positions.stop - positions.start)]
    rng = np.random.default_rng([seed, epoch, batch_index, *stream])
    n = global_batch_size
    log_ratio = np.log(cfg.crop_ratio)
    angle = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, n)
    if cfg.rotation_step_deg > 0:
        # Rounding (not a separate draw) leaves every other column's numbers as they were.
        angle = np.round(angle / cfg.rotation_step_deg) * cfg.rotation_step_deg
    columns = {
        "angle_deg": angle,
        "hflip": rng.random(n) < cfg.hflip_prob,
        "vflip": rng.random(n) < cfg.vflip_prob,
        "crop_scale": rng.uniform(*cfg.crop_scale, n),
        "crop_log_ratio": rng.uniform(log_ratio[0], log_ratio[1], n),
        "crop_u": rng.random(n),
        "crop_v": rng.random(n),
        "brightness": rng.uniform(1 - cfg.brightness, 1 + cfg.brightness, n),
        "contrast": rng.uniform(1 - cfg.contrast, 1 + cfg.contrast, n),
        "degrade_u": rng.random(n),
        "psf_sigma_px": rng.uniform(*cfg.psf_sigma_px, n),
        "resample_factor": rng.uniform(*cfg.resample_factor, n),
        "noise_std": rng.uniform(*cfg.noise_std, n),
        "noise_seed": rng.integers(0, 2**63 - 1, n),
    }
    # Drawn last, so that a run with channel_gain on sees the same crops, flips and noise as one without.
    gains = rng.uniform(1 - cfg.channel_gain, 1 + cfg.channel_gain, (n, 3))
    names, rows = list(columns), zip(*(values[positions].tolist() for values in columns.values()))
    return [SampleDraw(**dict(zip(names, row)), channel_gain=tuple(gain))
            for row, gain in zip(rows, gains[positions].tolist())]


@dataclass(frozen=True, eq=False)
class SamplePlan:
    """Concrete operations for one decoded image; dali.py and apply_plan run exactly these.

    Order: [degrade: Gaussian blur (PSF + antialias) -> bilinear warp onto a coarser grid -> add noise]
    -> [antialias blur when the final warp shrinks] -> bilinear warp to the output -> brightness/contrast.
    Matrices map destination pixel coordinates to source ones, (0, 0) being the first pixel's corner.
    """

    degrade: bool
    degrade_sigma: float
    small_hw: tuple[int, int]
    down_matrix: np.ndarray  # (2, 3) float32
    noise: np.ndarray | None  # (h_small, w_small, 3) float32 when degraded
    prefilter_sigma: float
    matrix: np.ndarray  # (2, 3) float32, output -> (degraded) image
    brightness: float
    contrast: float
    src_hw: tuple[int, int] = (0, 0)
    """(height, width) of the decoded image the plan was made for."""
    channel_gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """R, G, B factors applied with brightness."""
    crop: tuple[int, int, int, int] | None = None
    """(x0, y0, x1, y1): the part of the decoded image the plan reads, to be cut out before anything else (its
    matrices are relative to it), when a degradation or prefilter blur would otherwise run on far more of the image
    than a small crop (a multi-crop local view) reads. None: the whole image."""


def make_plan(cfg: AugmentConfig, draw: SampleDraw, src_hw: tuple[int, int], out_size: int,
              survey: str) -> SamplePlan:
    """Turn one position's draws into operations for an image of `src_hw` (height, width) pixels."""
    h, w = src_hw
    matrix = _crop_matrix(cfg, draw, h, w, out_size) if cfg.enabled else _scale_matrix(w / out_size, h / out_size)
    common = {"brightness": draw.brightness, "contrast": draw.contrast, "src_hw": (h, w),
              "channel_gain": draw.channel_gain}
    if (cfg.enabled and draw.degrade_u < cfg.degrade_prob
            and (not cfg.degrade_surveys or survey in cfg.degrade_surveys)):
        (a, b), (c, d) = matrix[:, :2].tolist()
        per_view = math.sqrt(abs(a * d - b * c)) if cfg.degrade_pixels == "view" else 1.0  # image px per view px
        return _degraded_plan(draw, matrix, (h, w), out_size, common, per_view)
    prefilter_sigma = antialias_sigma(_spectral_norm(matrix[:, :2]))  # of input pixels per output pixel
    crop = read_window(matrix, out_size, (h, w), blur_margin(prefilter_sigma)) if prefilter_sigma else None
    return SamplePlan(degrade=False, degrade_sigma=MIN_SIGMA, small_hw=(h, w),
                      down_matrix=_scale_matrix(1.0, 1.0).astype(np.float32), noise=None,
                      prefilter_sigma=prefilter_sigma, matrix=_shifted(matrix, crop), crop=crop, **common)


def _degraded_plan(draw: SampleDraw, matrix: np.ndarray, src_hw: tuple[int, int], out_size: int,
                   common: dict, pixel: float = 1.0) -> SamplePlan:
    """Degradation: the coarser grid (of the whole image, or of the window of it the output reads), its noise, and
    the source pixels it needs. `pixel`: source pixels per pixel of the draws' PSF and grid (1: the image's)."""
    h, w = src_hw
    factor = max(1.0, draw.resample_factor * pixel)  # never a grid finer than the image's own
    grid_hw = (max(1, round(h / factor)), max(1, round(w / factor)))
    sx, sy = w / grid_hw[1], h / grid_hw[0]  # source pixels per coarse pixel
    # One blur does both the extra PSF and the antialiasing of the coarser grid (variances add).
    degrade_sigma = max(math.hypot(draw.psf_sigma_px * pixel, antialias_sigma(max(sx, sy))), MIN_SIGMA)
    matrix = _scale_matrix(1 / sx, 1 / sy) @ np.vstack([matrix, [0, 0, 1]])  # output -> coarse grid
    prefilter_sigma = antialias_sigma(_spectral_norm(matrix[:, :2]))
    window = read_window(matrix, out_size, grid_hw, blur_margin(prefilter_sigma))
    crop, small_hw, down = None, grid_hw, _scale_matrix(sx, sy)
    if window is not None:  # the coarse window only, made from the source pixels its samples blur
        x0, y0, x1, y1 = window
        margin = blur_margin(degrade_sigma)
        crop = (max(0, math.floor(sx * x0) - margin), max(0, math.floor(sy * y0) - margin),
                min(w, math.ceil(sx * x1) + margin), min(h, math.ceil(sy * y1) + margin))
        small_hw = (y1 - y0, x1 - x0)
        down = np.array([[sx, 0.0, sx * x0 - crop[0]], [0.0, sy, sy * y0 - crop[1]]])
    noise_rng = np.random.default_rng([draw.noise_seed, AUGMENT_STREAM])
    noise = noise_rng.standard_normal((*small_hw, 3), dtype=np.float32) * np.float32(draw.noise_std)
    return SamplePlan(degrade=True, degrade_sigma=degrade_sigma, small_hw=small_hw, down_matrix=down.astype(np.float32),
                      noise=noise, prefilter_sigma=prefilter_sigma, matrix=_shifted(matrix, window), crop=crop,
                      **common)


def blur_margin(sigma: float) -> int:
    """Pixels around what a bilinear warp reads that keep a Gaussian blur of `sigma` exact there (radius + 2)."""
    return math.ceil(3 * sigma) + 2


def _shifted(matrix: np.ndarray, window: tuple[int, int, int, int] | None) -> np.ndarray:
    """A float32 matrix into `window` (x0, y0, ...) of its image rather than the whole image."""
    out = np.array(matrix, np.float32)
    if window is not None:
        out[:, 2] -= (window[0], window[1])
    return out


def read_window(matrix: np.ndarray, out_size: int, src_hw: tuple[int, int],
                margin: int) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the image pixels a warp to `out_size` reads, `margin` pixels around them; None when that
    is most of the image.

    Blurring only this window (a multi-crop local view's) gives the same pixels: a margin of the blur radius + 2
    keeps every blurred value the bilinear taps use exact, and the image's own edges stay where they were
    (clamped by the warp, reflected by the blur).
    """
    h, w = src_hw
    corners = np.array([[0, 0, 1], [out_size, 0, 1], [0, out_size, 1], [out_size, out_size, 1]], np.float64)
    points = corners @ np.asarray(matrix, np.float64).T
    x0, y0 = (max(0, math.floor(v) - margin) for v in points.min(axis=0))
    x1, y1 = (min(size, math.ceil(v) + margin) for v, size in zip(points.max(axis=0), (w, h)))
    if x1 <= x0 or y1 <= y0 or (x1 - x0) * (y1 - y0) > 0.7 * h * w:
        return None
    return x0, y0, x1, y1


def _spectral_norm(m: np.ndarray) -> float:
    """Largest singular value of a 2 x 2 matrix in closed form (np.linalg.norm(m, 2) runs an SVD: 10x slower)."""
    (a, b), (c, d) = np.asarray(m, dtype=np.float64).tolist()
    frob2, det = a * a + b * b + c * c + d * d, a * d - b * c
    return math.sqrt(max(0.0, (frob2 + math.sqrt(max(0.0, frob2 * frob2 - 4.0 * det * det))) / 2.0))


MIN_PREFILTER_SIGMA = 0.35


def antialias_sigma(shrink: float) -> float:
    """Gaussian prefilter sigma (input pixels) before bilinear resampling by `shrink` input px per output px.

    Bilinear sampling already averages with variance 1/6 px^2; an antialiasing triangle filter as wide
    as the output pixel has variance shrink^2 / 6, so the blur adds the difference. 0 when enlarging.
    """
    sigma = math.sqrt((shrink * shrink - 1.0) / 6.0) if shrink > 1.0 + 1e-6 else 0.0
    # Below this the kernel's side taps weigh < 2%: a near-identity blur that would cost a full pass.
    return sigma if sigma >= MIN_PREFILTER_SIGMA else 0.0


def _scale_matrix(sx: float, sy: float) -> np.ndarray:
    return np.array([[sx, 0.0, 0.0], [0.0, sy, 0.0]])


def _crop_matrix(cfg: AugmentConfig, draw: SampleDraw, h: int, w: int, out_size: int) -> np.ndarray:
    area, ratio = draw.crop_scale * h * w, math.exp(draw.crop_log_ratio)
    crop_w, crop_h = min(math.sqrt(area * ratio), w), min(math.sqrt(area / ratio), h)
    cos, sin = _cos_sin(draw.angle_deg)
    box_w, box_h = crop_w, crop_h
    if cfg.fit_rotation:
        box_w, box_h = crop_w * abs(cos) + crop_h * abs(sin), crop_w * abs(sin) + crop_h * abs(cos)
        shrink = min(1.0, w / box_w, h / box_h)
        crop_w, crop_h, box_w, box_h = crop_w * shrink, crop_h * shrink, box_w * shrink, box_h * shrink
    # The draws stay uniform in [0, 1] and are pulled towards 0.5, so center_range changes no other draw.
    u, v = (0.5 + (d - 0.5) * cfg.center_range for d in (draw.crop_u, draw.crop_v))
    centre_x, centre_y = box_w / 2 + u * (w - box_w), box_h / 2 + v * (h - box_h)
    # Output pixel -> window coordinates (flipped about the window centre) -> rotated into the image:
    # rotation @ diag(window px per output px) @ diag(flips), written out (numpy costs more for 2 x 2 than the math).
    sx = crop_w / out_size * (-1.0 if draw.hflip else 1.0)
    sy = crop_h / out_size * (-1.0 if draw.vflip else 1.0)
    (a, b), (c, d) = (cos * sx, -sin * sy), (sin * sx, cos * sy)
    half = out_size / 2
    return np.array([[a, b, centre_x - (a * half + b * half)], [c, d, centre_y - (c * half + d * half)]])


def _cos_sin(angle_deg: float) -> tuple[float, float]:
    """Exact for right angles (cos 90 is 6e-17 in floating point), so those warps are pixel permutations."""
    if angle_deg % 90 == 0:
        return ((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))[int(angle_deg // 90) % 4]
    theta = math.radians(angle_deg)
    return math.cos(theta), math.sin(theta)


# --- torch implementation (the torch backend; float32 CHW images in 0..255 units) ---

def apply_plan(image: torch.Tensor, plan: SamplePlan, out_size: int) -> torch.Tensor:
    """Run a plan on one (3, H, W) float32 image; returns (3, out_size, out_size)."""
    if plan.crop is not None:
        x0, y0, x1, y1 = plan.crop
        image = image[:, y0:y1, x0:x1]
    if plan.degrade:
        image = gaussian_blur(image, plan.degrade_sigma)
        image = warp_affine(image, plan.down_matrix, plan.small_hw)
        image = image + torch.from_numpy(plan.noise).permute(2, 0, 1)
    if plan.prefilter_sigma > 0:
        image = gaussian_blur(image, plan.prefilter_sigma)
    return adjust(warp_affine(image, plan.matrix, (out_size, out_size)), plan)


def adjust(image: torch.Tensor, plan: SamplePlan) -> torch.Tensor:
    """The plan's brightness, contrast and channel gains, the last step of apply_plan."""
    if plan.brightness != 1.0 or plan.contrast != 1.0:
        image = plan.brightness * (CONTRAST_CENTER + plan.contrast * (image - CONTRAST_CENTER))
    if plan.channel_gain != (1.0, 1.0, 1.0):
        image = image * torch.tensor(plan.channel_gain, dtype=image.dtype).view(3, 1, 1)
    return image


def plain_turn(plan: SamplePlan, out_size: int) -> Turn | None:
    """The turn with apply_plan(image) == adjust(apply_turn(plain, turn)), where plain is the unaugmented resize;
    None unless the plan's warp is that resize turned by a right angle or mirrored (no crop, no degradation).

    Such a warp samples the image where the plain resize does, only in another order, so a loader may reuse
    one resized image for all eight of them.
    """
    return None if plan.degrade else whole_image_turn(plan.matrix, plan.src_hw, (out_size, out_size))


