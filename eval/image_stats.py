"""Statistics of 8-bit galaxy cutouts for drift monitoring: sky, noise, aperture S/N and adaptive-moment size.

numpy and astropy only; `eval.drift` re-exports these, so the service finds everything drift needs there.
"""

from __future__ import annotations

import math

import numpy as np

STAT_NAMES = ("sky", "noise", "snr", "size")
NOISE_FLOOR = 1.0 / math.sqrt(12.0)  # 8-bit levels: an 8-bit image cannot show a noise below its quantisation


def unnormalise(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Model inputs (n, 3, S, S) normalised with mean/std on 0..1 pixels -> the same pixels in 0..255 levels."""
    m = 255.0 * np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = 255.0 * np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return np.asarray(images, np.float32) * s + m


def _border_width(height: int, width: int) -> int:
    return max(2, round(min(height, width) / 8))


def image_stats(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image statistics of (n, C, H, W) cutouts in 8-bit display levels (uint8, or float on 0..255), measured
    on the channel mean, as float64 arrays of length n (NaN where undefined):

    - `sky`: the sigma-clipped (3 sigma) median of the border annulus, the outer max(2, min(H, W) / 8) pixels;
    - `noise`: the MAD-based standard deviation (1.4826 MAD) of the clipped border, floored at the 8-bit
      quantisation noise 1/sqrt(12);
    - `snr`: the summed light above `sky` inside the central disc the border encloses (radius min(H, W)/2 minus
      the border width) over noise * sqrt(pixels in the disc): the aperture S/N of a sky-noise-limited image;
    - `size`: the adaptive second-moment radius in pixels (Bernstein & Jarvis 2002): the sigma of the circular
      Gaussian weight whose weighted second moment of the sky-subtracted light matches it, iterated with the
      weighted centroid from the image centre. It equals sigma for a Gaussian galaxy and, unlike plain moments,
      is not swamped by the noise of the wide aperture.
    Compute them on what the model sees (`unnormalise` of its inputs) so that images of any upload size compare.
    """
    from astropy.stats import sigma_clipped_stats

    x = np.asarray(pixels, np.float64)
    if x.ndim != 4 or min(x.shape) < 1:
        raise ValueError(f"image_stats takes a (n, C, H, W) batch, got shape {x.shape}")
    grey = x.mean(axis=1)
    n, height, width = grey.shape
    band = _border_width(height, width)
    if min(height, width) < 4 * band:
        raise ValueError(f"image_stats needs images of at least 8 x 8 pixels, got {height} x {width}")
    rows, cols = np.mgrid[:height, :width]
    border = (rows < band) | (rows >= height - band) | (cols < band) | (cols >= width - band)
    _, sky, noise = sigma_clipped_stats(grey[:, border], sigma=3.0, maxiters=5, stdfunc="mad_std", axis=1)
    sky = np.asarray(sky, np.float64)
    noise = np.maximum(np.asarray(noise, np.float64), NOISE_FLOOR)
    radius = min(height, width) / 2 - band
    disc = (rows - (height - 1) / 2) ** 2 + (cols - (width - 1) / 2) ** 2 <= radius**2
    light = grey - sky[:, None, None]
    snr = light[:, disc].sum(axis=1) / (noise * math.sqrt(disc.sum()))
    return {"sky": sky, "noise": noise, "snr": snr, "size": adaptive_size(light)}


def adaptive_size(light: np.ndarray, max_iter: int = 60, tol: float = 1e-5) -> np.ndarray:
    """(n,) adaptive Gaussian sigma in pixels of sky-subtracted (n, H, W) images; NaN where the weighted light is
    not positive (no source). The weight is separable, so each step is two small matrix products per image."""
    n, height, width = light.shape
    ys, xs = np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64)
    cy, cx = np.full(n, (height - 1) / 2), np.full(n, (width - 1) / 2)
    sigma = np.full(n, min(height, width) / 8)
    top = min(height, width) / 2
    ok = np.ones(n, bool)
    for _ in range(max_iter):
        dy, dx = ys[None] - cy[:, None], xs[None] - cx[:, None]
        wy, wx = np.exp(-0.5 * (dy / sigma[:, None]) ** 2), np.exp(-0.5 * (dx / sigma[:, None]) ** 2)
        along_x = light @ np.stack([wx, wx * dx, wx * dx * dx], axis=2)  # (n, H, 3)
        by_y = np.stack([wy, wy * dy, wy * dy * dy], axis=2)  # (n, H, 3)
        m = np.einsum("nhk,nhj->nkj", by_y, along_x)  # m[k, j] = sum of weight * light * dy^k * dx^j
        total = m[:, 0, 0]
        ok &= total > 0
        safe = np.where(ok, total, 1.0)
        my, mx = m[:, 1, 0] / safe, m[:, 0, 1] / safe
        second = 0.5 * (m[:, 2, 0] / safe - my**2 + m[:, 0, 2] / safe - mx**2)
        ok &= second > 0
        # Light of sigma s under a weight of sigma w has per-axis second moment s^2 w^2 / (s^2 + w^2); w^2 <- 2 *
        # that moment has its fixed point at w = s, approached at half the remaining error per step.
        new = np.clip(np.sqrt(2 * np.where(ok, second, 1.0)), 0.5, top)
        cy, cx = np.clip(cy + np.where(ok, my, 0), 0, height - 1), np.clip(cx + np.where(ok, mx, 0), 0, width - 1)
        done = np.all(np.abs(new - sigma) <= tol * sigma)
        sigma = new
        if done:
            break
    return np.where(ok, sigma, np.nan)
