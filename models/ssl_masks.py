"""iBOT block masks drawn per sample from (seed, step, global position), so they do not depend on the world size.

dinov2 (data/collate.py, data/masking.py) masks a share of the global crops of a batch, with ratios spread over a
range, in rectangular blocks of patches, drawing from Python's global `random`: a crop's mask then depends on which
rank it landed on. Here every (sample, global crop) draws from its own generator, keyed by the sample's hash seed
(models.sample_noise.sample_seeds: seed, step, place in the global batch) and the crop's index: masked with
probability `sample_probability`, ratio uniform in `ratio_min_max`, blocks as dinov2's MaskingGenerator places
them, topped up with single patches if the blocks stall, so a masked crop has exactly int(P * ratio) patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from models.sample_noise import random_bits

MASK_SALT = 0x1B07_0000  # + crop index: a key path of its own, apart from dropout's salts and the crop draws
_UNIT = float(2 ** 32)


@dataclass(frozen=True)
class MaskConfig:
    """DINOv2's defaults (ibot.mask_sample_probability, ibot.mask_ratio_min_max; MaskingGenerator's blocks)."""
    sample_probability: float = 0.5  # share of global crops that are masked
    ratio_min_max: tuple[float, float] = (0.1, 0.5)  # masked share of a masked crop's patches
    min_block_patches: int = 4
    min_aspect: float = 0.3  # block aspect ratio in [min_aspect, 1 / min_aspect]
    max_block_fraction: float = 0.5  # one block covers at most this share of the patches

    def __post_init__(self):
        low, high = self.ratio_min_max
        if not 0.0 <= self.sample_probability <= 1.0:
            raise ValueError(f"mask sample_probability must be in [0, 1], got {self.sample_probability}")
        if not 0.0 <= low <= high < 1.0:
            raise ValueError(f"mask ratio_min_max must satisfy 0 <= min <= max < 1, got {self.ratio_min_max}")
        if not 0.0 < self.min_aspect <= 1.0 or self.min_block_patches < 1 or not 0 < self.max_block_fraction <= 1:
            raise ValueError(f"mask blocks: min_aspect in (0, 1], min_block_patches >= 1, max_block_fraction in "
                             f"(0, 1]; got {self.min_aspect}, {self.min_block_patches}, {self.max_block_fraction}")


def _add_block(mask: np.ndarray, rng: np.random.Generator, max_patches: int, cfg: MaskConfig) -> int:
    """One block of at most `max_patches` new patches (dinov2 MaskingGenerator._mask); how many were added."""
    height, width = mask.shape
    log_aspect = (math.log(cfg.min_aspect), math.log(1.0 / cfg.min_aspect))
    for _ in range(10):
        area = rng.uniform(cfg.min_block_patches, max_patches)
        aspect = math.exp(rng.uniform(*log_aspect))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if w < width and h < height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            block = mask[top:top + h, left:left + w]
            new = h * w - int(block.sum())
            if 0 < new <= max_patches:
                block[...] = True
                return new
    return 0


def block_mask(rng: np.random.Generator, height: int, width: int, num_masked: int, cfg: MaskConfig) -> np.ndarray:
    """(height, width) bool with exactly `num_masked` True, in blocks where they fit."""
    mask = np.zeros((height, width), dtype=bool)
    max_block = max(1, int(cfg.max_block_fraction * height * width))
    count = 0
    while count < num_masked:
        budget = min(num_masked - count, max_block)
        added = _add_block(mask, rng, budget, cfg) if budget >= cfg.min_block_patches else 0
        if added == 0:
            break
        count += added
    if count < num_masked:  # the blocks stalled (a crowded grid, or fewer left than a block): single patches
        free = np.flatnonzero(~mask.reshape(-1))
        mask.reshape(-1)[rng.choice(free, size=num_masked - count, replace=False)] = True
    return mask


def draw_masks(seeds: torch.Tensor, num_crops: int, grid: tuple[int, int], cfg: MaskConfig) -> torch.Tensor:
    """(num_crops * n, P) bool masks of the n samples' global crops, crop-major (crop 0 of every sample first, as
    the global crops are stacked), P = grid[0] * grid[1]; a function of each sample's seed and the crop only."""
    height, width = grid
    num_patches = height * width
    low, high = cfg.ratio_min_max
    out = np.zeros((num_crops, len(seeds), num_patches), dtype=bool)
    for crop in range(num_crops):
        bits = random_bits(seeds.cpu(), MASK_SALT + crop, (4,), torch.device("cpu")).numpy()
        for i, (u_mask, u_ratio, seed_low, seed_high) in enumerate(bits.tolist()):
            if u_mask / _UNIT >= cfg.sample_probability:
                continue
            ratio = low + (high - low) * u_ratio / _UNIT
            rng = np.random.Generator(np.random.PCG64(seed_low | (seed_high << 32)))
            out[crop, i] = block_mask(rng, height, width, int(num_patches * ratio), cfg).reshape(-1)
    return torch.from_numpy(out.reshape(num_crops * len(seeds), num_patches))
