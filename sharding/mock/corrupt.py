"""Realistic bad inputs: which galaxies get which corruption, and the harmless pixel defects of normal images."""

from __future__ import annotations

import numpy as np

IMAGE_KINDS = ("truncated_fits", "all_nan", "all_zero", "missing_file")
CATALOG_KINDS = ("nan_votes", "negative_votes", "duplicate_id")
KINDS = IMAGE_KINDS + CATALOG_KINDS


def plan_corruptions(num_galaxies: int, fraction: float, rng: np.random.Generator) -> dict[int, str]:
    """Galaxy index -> corruption kind for about `fraction` of the galaxies, every kind at least once when
    there are at least twice as many galaxies as kinds. Galaxy 0 stays clean: a duplicate needs an earlier id."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--corrupt-fraction must be in [0, 1], got {fraction}")
    if fraction == 0.0 or num_galaxies < 2:
        return {}
    count = round(fraction * num_galaxies)
    if num_galaxies >= 2 * len(KINDS):
        count = max(count, len(KINDS))
    count = max(1, min(count, num_galaxies - 1))
    chosen = np.sort(rng.choice(np.arange(1, num_galaxies), size=count, replace=False))
    kinds = rng.permutation([KINDS[k % len(KINDS)] for k in range(count)])
    return {int(i): str(kind) for i, kind in zip(chosen, kinds)}


def duplicate_sources(plan: dict[int, str], rng: np.random.Generator) -> dict[int, int]:
    """For each duplicate_id galaxy, the earlier clean galaxy whose id (and image) its catalog row reuses."""
    sources = {}
    for index in sorted(i for i, kind in plan.items() if kind == "duplicate_id"):
        clean = [i for i in range(index) if i not in plan]  # never empty: galaxy 0 is always clean
        sources[index] = clean[int(rng.integers(len(clean)))]
    return sources


def plan_defects(num_galaxies: int, fraction: float, plan: dict[int, str], rng: np.random.Generator) -> set[int]:
    """Clean galaxies whose images get a few NaN/inf/saturated pixels (valid inputs a builder must cope with)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--bad-pixel-fraction must be in [0, 1], got {fraction}")
    clean = np.array([i for i in range(num_galaxies) if i not in plan], dtype=np.int64)
    count = min(len(clean), max(1, round(fraction * num_galaxies))) if fraction > 0 else 0
    return {int(i) for i in rng.choice(clean, size=count, replace=False)} if count else set()


def sprinkle_defects(image: np.ndarray, saturation: float, rng: np.random.Generator) -> str:
    """Put a few bad pixels into `image` in place; returns what was done, e.g. 'nan:3;saturated:9'."""
    num_bands, size = image.shape[0], image.shape[-1]
    done = []
    kinds = rng.choice(["nan", "inf", "saturated"], size=int(rng.integers(1, 3)), replace=False)
    for kind in sorted(kinds):
        if kind == "saturated":
            # A bleeding star core: a small block at the saturation level in every band.
            side = int(rng.integers(2, 5))
            row, col = rng.integers(0, size - side, 2)
            image[:, row: row + side, col: col + side] = saturation
            done.append(f"saturated:{num_bands * side * side}")
            continue
        num = int(rng.integers(1, 5)) if kind == "nan" else int(rng.integers(1, 3))
        bands, rows, cols = rng.integers(num_bands, size=num), *rng.integers(size, size=(2, num))
        image[bands, rows, cols] = np.nan if kind == "nan" else np.inf * rng.choice([-1.0, 1.0], num)
        done.append(f"{kind}:{num}")
    return ";".join(done)


def corrupt_pixels(image: np.ndarray, kind: str) -> np.ndarray:
    if kind == "all_nan":
        return np.full_like(image, np.nan)
    if kind == "all_zero":
        return np.zeros_like(image)
    return image
