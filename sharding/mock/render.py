"""Rendering a morphology into survey pixels: Sersic components, bar, arms, PSF convolution and noise."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from astropy.modeling.models import Sersic2D
from astropy.nddata import block_reduce

from sharding import flux
from sharding.mock.morphology import Morphology
from sharding.registry import SurveyConfig

FWHM_PER_SIGMA = flux.FWHM_PER_SIGMA
ARM_PROFILE_MEAN = 0.3125  # mean of ((1 + cos)/2)^3, so arm modulation keeps the disk's flux


def band_seds(survey: SurveyConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-band (bulge, disk) flux relative to the mean; bands are listed blue to red, bulges are redder."""
    num_bands = len(survey.bands)
    ramp = np.linspace(-1.0, 1.0, num_bands) if num_bands > 1 else np.zeros(1)
    seds = []
    for given, default in ((survey.mock.bulge_sed, 1.0 + 0.35 * ramp), (survey.mock.disk_sed, 1.0 - 0.08 * ramp)):
        if given and len(given) != num_bands:
            raise ValueError(f"survey {survey.name}: mock SED {list(given)} must give one value per band "
                             f"{survey.bands}")
        sed = np.asarray(given if given else default, dtype=np.float64)
        if np.any(sed <= 0):
            raise ValueError(f"survey {survey.name}: mock SED values must be positive, got {sed.tolist()}")
        seds.append(sed / sed.mean())
    return seds[0], seds[1]


def psf_kernel(survey: SurveyConfig) -> np.ndarray:
    """The survey PSF sampled at its pixel scale, unit sum (FWHM = psf_fwhm_arcsec / pixel_scale_arcsec px)."""
    return flux.psf_image(flux.PSF.of_survey(survey), survey.pixel_scale_arcsec)


@lru_cache(maxsize=16)
def _grid(num_px: int, oversample: int, pixel_scale: float) -> tuple[np.ndarray, np.ndarray]:
    num = num_px * oversample
    axis = (np.arange(num) - (num - 1) / 2.0) * (pixel_scale / oversample)
    # float32 halves the cost of the transcendental functions; images are stored as float32 anyway.
    x, y = np.meshgrid(axis.astype(np.float32), axis.astype(np.float32))
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _unit(image: np.ndarray) -> np.ndarray:
    total = image.sum()
    return image / total if total > 0 else image


def _sersic(x, y, r_eff: float, n: float, q: float, theta: float, c: float = 0.0) -> np.ndarray:
    return _unit(Sersic2D.evaluate(x, y, 1.0, r_eff, n, 0.0, 0.0, 1.0 - q, theta, c))


def _disk_frame(m: Morphology, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in the disk plane: rotate to the major axis, stretch the minor axis by 1/axis ratio."""
    theta = math.radians(m.position_angle_deg)
    major = x * math.cos(theta) + y * math.sin(theta)
    minor = -x * math.sin(theta) + y * math.cos(theta)
    return major, minor / m.axis_ratio


def _spiral_disk(m: Morphology, xd, yd) -> np.ndarray:
    """Exponential disk with a logarithmic-spiral density wave (in the disk plane) of m.arm_count arms."""
    disk = Sersic2D.evaluate(xd, yd, 1.0, m.r_eff_arcsec, 1.0, 0.0, 0.0, 0.0, 0.0)
    if not m.has_spiral:
        return _unit(disk)
    radius = np.hypot(xd, yd) + 1e-6 * m.r_eff_arcsec
    phase = np.arctan2(yd, xd) - np.log(radius / m.r_eff_arcsec) / math.tan(math.radians(m.pitch_angle_deg))
    # The arm phase offset reuses the position angle so that it needs no extra random draw.
    wave = ((1.0 + np.cos(m.arm_count * phase + math.radians(m.position_angle_deg))) / 2.0) ** 3
    strength = m.arm_strength * (1.0 - np.exp(-(radius / (0.5 * m.r_eff_arcsec)) ** 2))
    return _unit(disk * (1.0 - strength + strength * wave / ARM_PROFILE_MEAN))


def _clumps(m: Morphology, xd, yd, rng: np.random.Generator, min_sigma: float) -> np.ndarray:
    """Compact star-forming knots in the disk plane (clumpy high-redshift disks)."""
    num = int(rng.integers(3, 9))
    radius = 1.3 * m.r_eff_arcsec * np.sqrt(rng.random(num))
    angle = rng.uniform(0, 2 * np.pi, num)
    if m.clump_symmetric:
        angle[num // 2:] = angle[: num - num // 2] + np.pi
    weights = rng.uniform(0.5, 1.5, num)
    sigma = max(0.07 * m.r_eff_arcsec, min_sigma)
    image = np.zeros_like(xd)
    for r, a, w in zip(radius, angle, weights):
        # Distances in the disk plane: a knot projects to an ellipse like the disk itself.
        image += w * np.exp(-((xd - r * np.cos(a)) ** 2 + (yd - r * np.sin(a)) ** 2) / (2 * sigma ** 2))
    return _unit(image)


def _disk_components(m: Morphology, x, y, rng, min_sigma: float) -> list[tuple[float, str, np.ndarray]]:
    """(flux fraction, sed name, unit image) for the disk, bar and clumps of a featured galaxy."""
    xd, yd = _disk_frame(m, x, y)
    disk_share = 1.0 - m.bulge_to_total
    parts = []
    if m.has_bar:
        bar_share = disk_share * (0.08 + 0.22 * m.bar_strength)
        r_bar = (0.5 + 0.3 * m.bar_strength) * m.r_eff_arcsec
        parts.append((bar_share, "disk", _sersic(xd, yd, r_bar, 0.5, 0.25, math.radians(m.bar_angle_deg))))
        disk_share -= bar_share
    if m.clumpy:
        clump_share = 0.3 * disk_share
        parts.append((clump_share, "blue", _clumps(m, xd, yd, rng, min_sigma)))
        disk_share -= clump_share
    parts.append((disk_share, "disk", _spiral_disk(m, xd, yd)))
    return parts


def _bulge(m: Morphology, x, y, min_r: float) -> np.ndarray:
    theta = math.radians(m.position_angle_deg)
    r_eff = max(m.r_eff_arcsec * m.bulge_r_frac, min_r)
    boxiness = 1.5 if m.edge_on_bulge == "boxy" else 0.0
    return _sersic(x, y, r_eff, m.sersic_n, m.bulge_axis_ratio, theta, boxiness)


def _companion(m: Morphology, x, y, rng) -> tuple[float, np.ndarray]:
    near = m.disturbance == "merger"
    distance = m.r_eff_arcsec * (rng.uniform(0.9, 1.6) if near else rng.uniform(2.0, 3.5))
    angle = rng.uniform(0, 2 * np.pi)
    share = rng.uniform(0.3, 0.7) if near else rng.uniform(0.15, 0.4)
    image = _sersic(x - distance * math.cos(angle), y - distance * math.sin(angle), 0.6 * m.r_eff_arcsec,
                    1.5, rng.uniform(0.5, 1.0), rng.uniform(0, np.pi))
    return share, image


def model_components(m: Morphology, survey: SurveyConfig, rng) -> list[tuple[float, str, np.ndarray]]:
    """All light of the galaxy on the oversampled grid as (flux fraction, sed, unit image)."""
    spec = survey.mock
    x, y = _grid(spec.cutout_px, spec.oversample, survey.pixel_scale_arcsec)
    sub_px = survey.pixel_scale_arcsec / spec.oversample
    parts: list[tuple[float, str, np.ndarray]] = []
    if m.kind == "artifact":
        # The faint compact source behind an artifact; the artifact itself is added in pixels.
        return [(0.15, "bulge", _sersic(x, y, max(0.4 * m.r_eff_arcsec, sub_px), m.sersic_n, m.axis_ratio,
                                        math.radians(m.position_angle_deg)))]
    if m.bulge_to_total > 0:
        parts.append((m.bulge_to_total, "bulge", _bulge(m, x, y, sub_px)))
    if m.is_disk:
        parts.extend(_disk_components(m, x, y, rng, min_sigma=sub_px))
    if m.disturbance == "minor":
        theta = rng.uniform(0, 2 * np.pi)
        lopsided = 1.0 + 0.4 * np.tanh(np.hypot(x, y) / m.r_eff_arcsec) * np.cos(np.arctan2(y, x) - theta)
        parts = [(share, sed, _unit(image * lopsided)) for share, sed, image in parts]
    elif m.disturbance in ("major", "merger"):
        share, image = _companion(m, x, y, rng)
        parts = [(s * (1 - share), sed, image_) for s, sed, image_ in parts] + [(share, "disk", image)]
    return parts


def _band_fluxes(m: Morphology, survey: SurveyConfig, sed: str) -> np.ndarray:
    bulge, disk = band_seds(survey)
    if sed == "bulge":
        # Per-galaxy colour jitter scales how much redder than the mean the bulge is.
        return 1.0 + m.colour * (bulge - 1.0)
    if sed == "blue":
        return np.clip(2.0 * disk - bulge, 0.2, None)
    return disk


def noiseless_model(m: Morphology, survey: SurveyConfig, rng) -> np.ndarray:
    """(bands, H, W) PSF-convolved model in bunit, before artifacts and noise."""
    spec = survey.mock
    parts = model_components(m, survey, rng)
    num_bands = len(survey.bands)
    sub = np.zeros((num_bands,) + parts[0][2].shape, dtype=np.float32)
    for share, sed, image in parts:
        weights = m.flux * share * _band_fluxes(m, survey, sed)
        sub += weights[:, None, None] * image[None]
    if m.dust_lane:
        x, y = _grid(spec.cutout_px, spec.oversample, survey.pixel_scale_arcsec)
        _, yd = _disk_frame(m, x, y)
        lane = np.exp(-(yd * m.axis_ratio / (0.12 * m.r_eff_arcsec)) ** 2)
        # Dust dims blue bands more than red ones.
        tau = np.linspace(0.7, 0.4, num_bands)
        sub *= 1.0 - tau[:, None, None] * lane[None]
    pixels = block_reduce(sub, (1, spec.oversample, spec.oversample))
    if m.artifact == "star":
        _add_star(pixels, m, rng)
    return convolve_psf(pixels, survey)


def convolve_psf(image: np.ndarray, survey: SurveyConfig) -> np.ndarray:
    """Linear convolution of (..., H, W) images with the PSF, zero beyond the cutout edge."""
    return flux.convolve_kernel(image, psf_kernel(survey))


def _add_star(pixels: np.ndarray, m: Morphology, rng) -> None:
    size = pixels.shape[-1]
    row, col = rng.integers(size // 6, size - size // 6, 2)
    colour = rng.uniform(0.7, 1.3, pixels.shape[0])
    pixels[:, row, col] += m.flux * rng.uniform(3.0, 30.0) * colour / colour.mean()


def _add_trail(image: np.ndarray, survey: SurveyConfig, rng) -> None:
    """A satellite trail crosses one band's exposure: a PSF-wide line over the whole cutout."""
    num_bands, size = image.shape[0], image.shape[-1]
    band = int(rng.integers(num_bands))
    axis = np.arange(size) - (size - 1) / 2.0
    x, y = np.meshgrid(axis, axis)
    angle, offset = rng.uniform(0, np.pi), rng.uniform(-0.3, 0.3) * size
    distance = x * math.sin(angle) - y * math.cos(angle) - offset
    sigma = max(survey.psf_fwhm_px / FWHM_PER_SIGMA, 0.5)
    amplitude = max(30.0 * survey.mock.sky_noise, rng.uniform(0.5, 2.0) * float(image[band].max()))
    image[band] += amplitude * np.exp(-distance ** 2 / (2 * sigma ** 2))


def _add_hot_pixels(image: np.ndarray, survey: SurveyConfig, rng) -> None:
    num = int(rng.integers(15, 60))
    bands = rng.integers(image.shape[0], size=num)
    rows, cols = rng.integers(image.shape[-1], size=(2, num))
    image[bands, rows, cols] = survey.mock.saturation * rng.uniform(0.3, 1.0, num)


def render_galaxy(m: Morphology, survey: SurveyConfig, rng: np.random.Generator) -> np.ndarray:
    """The observed (bands, H, W) float32 cutout: model, PSF, artifacts, sky + source noise, saturation."""
    spec = survey.mock
    image = noiseless_model(m, survey, rng)
    if m.artifact == "satellite_trail":
        _add_trail(image, survey, rng)
    variance = spec.sky_noise ** 2 + np.clip(image, 0.0, None) / spec.gain
    image = image + np.sqrt(variance) * rng.standard_normal(image.shape)
    if m.artifact == "hot_pixels":
        _add_hot_pixels(image, survey, rng)
    return np.minimum(image, spec.saturation).astype(np.float32)


def point_source(survey: SurveyConfig, flux: float = 1.0) -> np.ndarray:
    """A noiseless centred point source through the survey PSF, for checks of the PSF size in pixels."""
    size = survey.mock.cutout_px
    image = np.zeros((size, size))
    image[size // 2, size // 2] = flux
    return convolve_psf(image, survey)
