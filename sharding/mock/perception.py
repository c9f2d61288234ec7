"""What volunteers can see of a galaxy in one survey: resolution, signal-to-noise and a visibility factor."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sharding.mock.morphology import Morphology
from sharding.registry import SurveyConfig

RESOLUTION_SCALE = 2.0  # r_eff / PSF FWHM at which ~63% of fine structure survives
SNR_SCALE = 80.0  # half-light signal-to-noise at which ~63% of faint structure is above the noise


@dataclass(frozen=True)
class Perception:
    resolution: float  # r_eff / PSF FWHM
    snr: float  # signal-to-noise of the light inside the half-light ellipse, mean band
    visibility: float  # 0..1: how much fine structure (arms, bars, clumps) survives PSF and noise
    resolved: float  # 0..1: the resolution part of visibility alone
    axis_ratio_seen: float  # the axis ratio after the PSF rounds the image


def perceive(m: Morphology, survey: SurveyConfig) -> Perception:
    """Resolution and depth of `survey` applied to `m`: the same galaxy is seen differently in each survey."""
    spec = survey.mock
    fwhm = survey.psf_fwhm_arcsec
    resolution = m.r_eff_arcsec / fwhm
    # The PSF adds its own half-light radius (FWHM/2 for a Gaussian) in quadrature to both axes.
    major = math.hypot(m.r_eff_arcsec, fwhm / 2.0)
    minor = math.hypot(m.r_eff_arcsec * m.axis_ratio, fwhm / 2.0)
    area_px = math.pi * major * minor / survey.pixel_scale_arcsec ** 2
    signal = 0.5 * m.flux
    snr = signal / math.sqrt(area_px * spec.sky_noise ** 2 + signal / spec.gain)
    resolved = 1.0 - math.exp(-(resolution / RESOLUTION_SCALE) ** 2)
    deep = 1.0 - math.exp(-snr / SNR_SCALE)
    return Perception(resolution=resolution, snr=snr, visibility=resolved * deep, resolved=resolved,
                      axis_ratio_seen=minor / major)
