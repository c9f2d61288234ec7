"""Where mock galaxies are and what they are called: sky positions, survey-style object ids, image paths."""

from __future__ import annotations

import math
import string

import numpy as np

from sharding.registry import SurveyConfig

PATTERN_FIELDS = {"id", "band"}


def draw_position(rng: np.random.Generator, survey: SurveyConfig) -> tuple[float, float]:
    """(ra, dec) in degrees, uniform on the sphere inside the survey's mock footprint."""
    (ra_lo, ra_hi), (dec_lo, dec_hi) = survey.mock.ra_range, survey.mock.dec_range
    if not (0 <= ra_lo < ra_hi <= 360 and -90 <= dec_lo < dec_hi <= 90):
        raise ValueError(f"survey {survey.name}: mock ra_range {survey.mock.ra_range} must lie in [0, 360] and "
                         f"dec_range {survey.mock.dec_range} in [-90, 90], each as (low, high)")
    u_ra, u_dec = rng.random(2)
    sin_lo, sin_hi = math.sin(math.radians(dec_lo)), math.sin(math.radians(dec_hi))
    dec = math.degrees(math.asin(sin_lo + u_dec * (sin_hi - sin_lo)))
    return ra_lo + u_ra * (ra_hi - ra_lo), dec


def iau_name(ra: float, dec: float) -> str:
    """IAU-style name Jhhmmss.ss+ddmmss.s; digits are truncated, not rounded, as the convention requires."""
    centisec = int(math.floor(ra / 15.0 * 3600.0 * 100.0 + 1e-6)) % (24 * 3600 * 100)
    hours, rest = divmod(centisec, 3600 * 100)
    minutes, rest = divmod(rest, 60 * 100)
    sign = "-" if dec < 0 else "+"
    deciarcsec = int(math.floor(abs(dec) * 3600.0 * 10.0 + 1e-6))
    degrees, drest = divmod(deciarcsec, 3600 * 10)
    arcmin, drest = divmod(drest, 60 * 10)
    return (f"J{hours:02d}{minutes:02d}{rest // 100:02d}.{rest % 100:02d}"
            f"{sign}{degrees:02d}{arcmin:02d}{drest // 10:02d}.{drest % 10:d}")


def object_id(index: int, rng: np.random.Generator, survey: SurveyConfig, ra: float, dec: float) -> int | str:
    """The survey's kind of id: an IAU name, or id_start + index * id_stride + a random offset (optionally
    with a string prefix). Offsets below the stride keep numbers unique and increasing."""
    spec = survey.mock
    if spec.id_style == "iauname":
        return iau_name(ra, dec)
    if spec.id_stride < 1:
        raise ValueError(f"survey {survey.name}: mock.id_stride must be >= 1, got {spec.id_stride}")
    number = spec.id_start + index * spec.id_stride + int(rng.integers(spec.id_stride))
    return f"{spec.id_prefix}{number}" if spec.id_prefix else number


def check_pattern(survey: SurveyConfig) -> None:
    fields = {f for _, f, _, _ in string.Formatter().parse(survey.image_pattern) if f is not None}
    if "id" not in fields or fields - PATTERN_FIELDS:
        raise ValueError(f"survey {survey.name}: image_pattern {survey.image_pattern!r} must contain {{id}} and "
                         f"may contain {{band}}; found fields {sorted(fields)}")
    if survey.mock.write_file_loc and "band" in fields:
        raise ValueError(f"survey {survey.name}: mock.write_file_loc needs one file per galaxy, but "
                         f"image_pattern {survey.image_pattern!r} has one per band")


def per_band_files(survey: SurveyConfig) -> bool:
    """True when image_pattern names one 2-D file per band; otherwise one (bands, H, W) cube per galaxy."""
    return "{band}" in survey.image_pattern


def relative_paths(survey: SurveyConfig, gal_id: int | str) -> list[str]:
    """Image paths relative to the images directory: one per band, or one cube (under a GZ DECaLS-style
    subdirectory named by the id's first 4 characters, e.g. J112/J112953.88-000427.4.fits, with file_loc)."""
    if per_band_files(survey):
        names = [survey.image_pattern.format(id=gal_id, band=band) for band in survey.bands]
    else:
        names = [survey.image_pattern.format(id=gal_id)]
    if survey.mock.write_file_loc:
        names = [f"{str(gal_id)[:4]}/{name}" for name in names]
    return names
