"""Synthetic FITS/PNG/JPEG galaxies and helpers shared by the image tests."""

import io
from pathlib import Path

import numpy as np
from astropy.io import fits
from PIL import Image


ASTROPY_DATA = Path(fits.__file__).parent / "hdu" / "compressed" / "tests" / "data"


def galaxy_cube(size: int = 48, colours=(0.3, 1.0, 3.0), noise: float = 0.01, flux: float = 50.0,
                seed: int = 0, scale_px: float | None = None) -> np.ndarray:
    """(bands, size, size) float32: an inclined exponential disk, brighter per band by `colours`, plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    disk = np.exp(-np.hypot(x, y / 0.6) / (scale_px or size / 10))
    disk /= disk.sum()
    return np.stack([flux * c * disk + rng.normal(0, noise, disk.shape) for c in colours]).astype(np.float32)


def write_fits(path: Path, data: np.ndarray) -> Path:
    fits.PrimaryHDU(data).writeto(path)
    return path


def write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def decode(member: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(member)))


def load_npy(member: bytes) -> np.ndarray:
    return np.load(io.BytesIO(member), allow_pickle=False)


def reason_of(excinfo) -> str:
    return excinfo.value.reason


# --- locate_images ---------------------------------------------------------------------------------------------
