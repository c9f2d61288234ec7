"""Flux-space image operations, before any stretch: PSF matching, flux-conserving resampling, noise to a depth.

Pixel values are fluxes per pixel (nanomaggy, electron/s, adu), as survey cutouts store them. `sharding.derive`
chains these to show one survey's galaxies as another survey would see them; `sharding.mock` renders its PSFs with
them; `eval robustness` uses them for its noise and PSF perturbations where it has float pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import scipy.signal
from astropy.convolution import Gaussian2DKernel, Moffat2DKernel
from astropy.stats import sigma_clipped_stats

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
PSF_RADIUS_FWHM = 2.5  # PSF images reach this many FWHM from the centre (sharding.mock truncates the same way)
MATCH_REGULARISATION = 1e-6  # Wiener term of the matching kernel, relative to the source PSF's peak power
# AB magnitude of one unit of flux per pixel: m_AB = ZP - 2.5 log10(value). electron/s is HST ACS/WFC F814W
# (8 e/s = 23.7 AB, as configs/surveys/hst.yaml says; F606W's is 0.55 mag larger, so one number per unit is an
# approximation of ~0.5 mag for the bluer HST band). adu has no universal zero point: pass a flux scale.
AB_ZEROPOINTS = {"nanomaggy": 22.5, "maggy": 0.0, "electron/s": 25.94, "Jy": 8.90, "uJy": 23.90, "nJy": 31.40}


@dataclass(frozen=True)
class PSF:
    """A circular PSF: Gaussian, or Moffat of wing index moffat_beta, with the given FWHM."""
    fwhm_arcsec: float
    profile: Literal["gaussian", "moffat"] = "gaussian"
    moffat_beta: float = 3.5

    @classmethod
    def of_survey(cls, survey) -> "PSF":
        """A SurveyConfig's PSF: psf_fwhm_arcsec with the profile its mock spec describes."""
        return cls(survey.psf_fwhm_arcsec, survey.mock.psf_profile, survey.mock.moffat_beta)

    def describe(self) -> str:
        shape = f"Moffat beta {self.moffat_beta:g}" if self.profile == "moffat" else "Gaussian"
        return f'{self.fwhm_arcsec:g}" {shape}'


def psf_size_px(fwhm_px: float) -> int:
    """Odd side of a PSF image reaching PSF_RADIUS_FWHM from the centre."""
    return max(9, 2 * int(math.ceil(PSF_RADIUS_FWHM * fwhm_px)) + 1)


@lru_cache(maxsize=32)
def psf_image(psf: PSF, pixel_scale_arcsec: float, size: int | None = None) -> np.ndarray:
    """The PSF integrated over pixels of pixel_scale_arcsec on a size x size grid (odd), centred, unit sum."""
    fwhm_px = psf.fwhm_arcsec / pixel_scale_arcsec
    size = size or psf_size_px(fwhm_px)
    if size % 2 == 0:
        raise ValueError(f"PSF image size must be odd, got {size}")
    if psf.profile == "moffat":
        gamma = fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / psf.moffat_beta) - 1.0))
        kernel = Moffat2DKernel(gamma, psf.moffat_beta, x_size=size, y_size=size, mode="oversample", factor=10)
    else:
        kernel = Gaussian2DKernel(fwhm_px / FWHM_PER_SIGMA, x_size=size, y_size=size, mode="oversample", factor=10)
    array = kernel.array.astype(np.float64)
    array /= array.sum()
    array.setflags(write=False)
    return array


def check_psf_order(source: PSF, target: PSF, source_name: str = "source", target_name: str = "target") -> None:
    """Blurring can only widen a PSF: refuse a target sharper than the source."""
    if target.fwhm_arcsec < source.fwhm_arcsec:
        raise ValueError(f"the {target_name} PSF ({target.describe()} FWHM) is sharper than the {source_name} PSF "
                         f"({source.describe()} FWHM): convolution can only widen a PSF, so {source_name} images "
                         f"cannot be made to look like {target_name}'s")


@lru_cache(maxsize=32)
def psf_matching_kernel(source: PSF, target: PSF, pixel_scale_arcsec: float,
                        regularisation: float = MATCH_REGULARISATION) -> np.ndarray:
    """The kernel K, on pixels of pixel_scale_arcsec, with source PSF * K = target PSF (unit sum).

    Fourier ratio of the two pixel-integrated PSFs with a Wiener term: K^ = T^ S^* / (|S^|^2 + eps), eps =
    regularisation x |S^(0)|^2, so frequencies the source PSF has all but erased are not amplified. Raises
    ValueError when the target is sharper than the source.
    """
    check_psf_order(source, target)
    size = psf_size_px(max(target.fwhm_arcsec, source.fwhm_arcsec) / pixel_scale_arcsec)
    source_ft = np.fft.rfft2(np.fft.ifftshift(psf_image(source, pixel_scale_arcsec, size)))
    target_ft = np.fft.rfft2(np.fft.ifftshift(psf_image(target, pixel_scale_arcsec, size)))
    power = np.abs(source_ft) ** 2
    kernel_ft = target_ft * np.conj(source_ft) / (power + regularisation * power.flat[0])
    kernel = np.fft.fftshift(np.fft.irfft2(kernel_ft, s=(size, size)))
    kernel /= kernel.sum()
    kernel.setflags(write=False)
    return kernel


def convolve_kernel(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """(..., H, W) finite images convolved with a kernel, zero beyond the cutout edge (as a cutout of a larger sky),
    same shape, float64: astropy's convolve_fft(boundary="fill", normalize_kernel=False), but real FFTs over all
    bands in one call (3x faster). The kernel is used as given (not renormalised)."""
    data = np.asarray(image)
    kernel = np.asarray(kernel).reshape((1,) * (data.ndim - 2) + kernel.shape[-2:])
    return scipy.signal.fftconvolve(data, kernel, mode="same", axes=(-2, -1))


def convolve_to_psf(image: np.ndarray, source: PSF, target: PSF, pixel_scale_arcsec: float) -> np.ndarray:
    """Images of PSF `source` on pixels of pixel_scale_arcsec, convolved to PSF `target` (see psf_matching_kernel)."""
    return convolve_kernel(image, psf_matching_kernel(source, target, pixel_scale_arcsec))


def resampled_shape(shape: tuple[int, ...], from_scale_arcsec: float, to_scale_arcsec: float) -> tuple[int, ...]:
    """(..., H', W'): the most whole target pixels that fit inside the source cutout's angular size."""
    ratio = from_scale_arcsec / to_scale_arcsec
    return tuple(shape[:-2]) + tuple(max(1, int(math.floor(n * ratio + 1e-9))) for n in shape[-2:])


def overlap_matrix(num_in: int, num_out: int, ratio: float) -> np.ndarray:
    """(num_out, num_in): the fraction of each input pixel inside each output pixel, output pixels `ratio` input
    pixels wide, both grids centred on the same point. Columns of fully covered input pixels sum to 1."""
    edges_in = np.arange(num_in + 1, dtype=np.float64)
    edges_out = num_in / 2.0 + (np.arange(num_out + 1) - num_out / 2.0) * ratio
    low = np.maximum(edges_out[:-1, None], edges_in[None, :-1])
    high = np.minimum(edges_out[1:, None], edges_in[None, 1:])
    return np.clip(high - low, 0.0, None)


def resample_to_scale(image: np.ndarray, from_scale_arcsec: float, to_scale_arcsec: float,
                      shape: tuple[int, int] | None = None) -> np.ndarray:
    """(..., H, W) fluxes per pixel onto pixels of to_scale_arcsec about the same centre, conserving flux.

    Each output pixel sums the input flux it covers, splitting input pixels by overlapping area (exact for this
    axis-aligned change of scale; an integer ratio is a block sum). `shape` (H', W') defaults to
    resampled_shape, which keeps the angular size; input flux outside the output grid is dropped.
    """
    data = np.asarray(image, dtype=np.float64)
    height, width = shape or resampled_shape(data.shape, from_scale_arcsec, to_scale_arcsec)[-2:]
    ratio = to_scale_arcsec / from_scale_arcsec
    rows = overlap_matrix(data.shape[-2], height, ratio)
    cols = overlap_matrix(data.shape[-1], width, ratio)
    return np.einsum("ij,...jk,lk->...il", rows, data, cols, optimize=True)


def noise_gain(kernel: np.ndarray, shape: tuple[int, int], from_scale_arcsec: float, to_scale_arcsec: float) -> float:
    """Std of the centre output pixel of convolve_kernel(., kernel) then resample_to_scale(., from, to), per unit
    std of white input noise: the norm of that pixel's weights over the input pixels."""
    height, width = resampled_shape(shape, from_scale_arcsec, to_scale_arcsec)
    ratio = to_scale_arcsec / from_scale_arcsec
    weights = np.outer(overlap_matrix(shape[0], height, ratio)[height // 2],
                       overlap_matrix(shape[1], width, ratio)[width // 2])
    # The centre pixel is sum(w * (x conv K)) = sum(x * (w conv flipped K)) over the cutout.
    return float(np.sqrt(np.sum(convolve_kernel(weights, kernel[::-1, ::-1]) ** 2)))


def measure_sky_noise(band: np.ndarray) -> float:
    """Robust per-pixel sky noise of one 2-D band: the MAD std after 3-sigma clipping (the galaxy is clipped)."""
    _, _, std = sigma_clipped_stats(np.asarray(band, dtype=np.float64), sigma=3.0, maxiters=5, stdfunc="mad_std")
    return float(std)


def flux_scale(from_bunit: str, to_bunit: str) -> float:
    """Target units per source unit from AB_ZEROPOINTS (1 for the same unit); ValueError when either is unknown."""
    if from_bunit == to_bunit:
        return 1.0
    missing = [u for u in (from_bunit, to_bunit) if u not in AB_ZEROPOINTS]
    if missing:
        raise ValueError(f"no AB zero point for bunit {missing} (known: {sorted(AB_ZEROPOINTS)}): give the flux "
                         f"scale from {from_bunit} to {to_bunit} (target units per source unit) with --flux-scale")
    return 10.0 ** ((AB_ZEROPOINTS[to_bunit] - AB_ZEROPOINTS[from_bunit]) / 2.5)


def added_noise_sigma(target_sigma: float, present_sigma: float) -> float:
    """The Gaussian noise that brings `present_sigma` of noise to `target_sigma` (quadrature); 0 if already there."""
    return math.sqrt(max(target_sigma ** 2 - present_sigma ** 2, 0.0))


def add_noise_to_depth(image: np.ndarray, target_sigma, present_sigma,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(..., H, W) images plus white Gaussian noise so that their sky noise becomes target_sigma.

    target_sigma and present_sigma are scalars or one value per band (the leading axis); present_sigma is the
    noise already there, in the same units per pixel, subtracted in quadrature. Returns (noisy image, the sigma
    added per band). A band already noisier than the target gets nothing (it stays shallower than asked).
    """
    data = np.asarray(image, dtype=np.float64)
    num_bands = data.shape[0] if data.ndim == 3 else 1
    target = np.broadcast_to(np.asarray(target_sigma, dtype=np.float64), (num_bands,))
    present = np.broadcast_to(np.asarray(present_sigma, dtype=np.float64), (num_bands,))
    added = np.array([added_noise_sigma(t, p) for t, p in zip(target, present)])
    scale = added.reshape((num_bands, 1, 1)) if data.ndim == 3 else added[0]
    return data + scale * rng.standard_normal(data.shape), added
