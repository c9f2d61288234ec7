"""Torch image operations both the torch backend and evaluation run: bilinear warps as DALI's, Gaussian blur with
DALI's kernel, right-angle turns. float32 CHW images in 0..255 units."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

Turn = tuple[bool, list[int]]
"""(transpose, dims to flip): a right-angle turn and/or mirror of a (C, S, S) image."""


def apply_turn(image: torch.Tensor, turn: Turn) -> torch.Tensor:
    transpose, flips = turn
    image = image.transpose(1, 2) if transpose else image
    return image.flip(flips) if flips else image


def whole_image_turn(matrix: np.ndarray, src_hw: tuple[int, int], out_hw: tuple[int, int]) -> Turn | None:
    """The turn of the plain resize that `matrix` (output -> input pixels) samples, when it maps the output onto
    the whole (h, w) image turned by a right angle and/or mirrored; else None."""
    (a, b, c), (d, e, f) = np.asarray(matrix, dtype=np.float64).tolist()
    (h, w), (out_h, out_w) = src_hw, out_hw
    tol = 1e-5 * max(w, h)  # plans hold float32 matrices: sampling points within 1e-5 px of the warp's
    transpose = bool(abs(a) <= tol and abs(e) <= tol)
    if transpose:  # output x walks the input's rows, output y its columns: a square output's transpose
        a, b, c, d, e, f = b, a, c, e, d, f
        if out_h != out_w:
            return None
    # Now a scales x to input columns and e scales y to input rows; a mirrored axis starts at the far edge.
    if abs(b) > tol or abs(d) > tol or abs(abs(a) - w / out_w) > 1e-6 * w / out_w \
            or abs(abs(e) - h / out_h) > 1e-6 * h / out_h:
        return None
    if abs(c - (w if a < 0 else 0.0)) > tol or abs(f - (h if e < 0 else 0.0)) > tol:
        return None
    return transpose, [dim for dim, flipped in ((2, e < 0 if transpose else a < 0),
                                                (1, a < 0 if transpose else e < 0)) if flipped]


def warp_affine(image: torch.Tensor, matrix: np.ndarray, out_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear warp with clamped borders, as DALI's fn.warp_affine without fill_value."""
    _, h, w = image.shape
    turn = whole_image_turn(matrix, (h, w), out_hw)
    if turn is not None:
        # The whole image scaled, turned or mirrored: F.interpolate samples the same points as the warp (pixel
        # centres, clamped borders) 2x faster than grid_sample, and the turn only reorders them.
        return apply_turn(F.interpolate(image[None], size=out_hw, mode="bilinear", align_corners=False)[0], turn)
    # The matrix in grid_sample's normalised coordinates (align_corners=False puts -1 and 1 on the outer pixel edges,
    # DALI's convention, at both ends): source = p x + q y + r with x = (xn + 1) out_w / 2 and y = (yn + 1) out_h / 2,
    # divided by the size. Written as a row term plus a column term per coordinate: 5x faster on CPU than
    # F.affine_grid's matrix product; float32 keeps the sampling points within 1e-4 px.
    out_h, out_w = out_hw
    xn, yn = _normalised_centres(out_h, out_w)
    grid = torch.empty(1, out_h, out_w, 2)
    for k, ((p, q, r), size) in enumerate(zip(np.asarray(matrix, dtype=np.float64).tolist(), (w, h))):
        row = xn * (p * out_w / size)
        column = yn * (q * out_h / size) + ((p * out_w + q * out_h + 2 * r) / size - 1)
        torch.add(row[None, :], column[:, None], out=grid[0, :, :, k])
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


@functools.lru_cache(maxsize=16)
def _normalised_centres(out_h: int, out_w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Output pixel centres in grid_sample's [-1, 1] coordinates (align_corners=False): x, then y."""
    return ((torch.arange(out_w, dtype=torch.float64) * 2 + 1) / out_w - 1).float(), \
        ((torch.arange(out_h, dtype=torch.float64) * 2 + 1) / out_h - 1).float()


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with DALI's kernel (radius ceil(3 sigma)) and reflect-101 borders."""
    radius = math.ceil(3 * sigma)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (weights / weights.sum()).tolist()
    _, h, w = image.shape
    # Each 1-D pass is a weighted sum of shifted views of a padded copy: on CPU 2-7x faster than conv2d with a
    # 1-D kernel, and torch's "reflect" padding (reflect-101) is 3x faster than gathering by index.
    if radius < min(h, w):
        padded = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")[0]
    else:  # the kernel is wider than the image: reflect more than once
        padded = image.index_select(1, _reflect101(torch.arange(-radius, h + radius), h))
        padded = padded.index_select(2, _reflect101(torch.arange(-radius, w + radius), w))
    rows = _weighted_shifts(padded, kernel, dim=1, size=h)
    return _weighted_shifts(rows, kernel, dim=2, size=w)


def _weighted_shifts(padded: torch.Tensor, kernel: list[float], dim: int, size: int) -> torch.Tensor:
    out = padded.narrow(dim, 0, size) * kernel[0]
    for offset in range(1, len(kernel)):
        out.add_(padded.narrow(dim, offset, size), alpha=kernel[offset])
    return out


def _reflect101(index: torch.Tensor, size: int) -> torch.Tensor:
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = torch.remainder(index, period)
    return torch.where(index >= size, period - index, index)
