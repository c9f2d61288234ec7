"""Mock surveys: galaxies with known morphology rendered as survey FITS cutouts plus Galaxy Zoo vote catalogs."""

from sharding.mock.cli import main

__all__ = ["main"]
