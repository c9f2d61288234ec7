"""Where mock galaxies are and what they are called: the one mock sky, survey-style object ids, image paths."""

from __future__ import annotations

import math
import string

import numpy as np

from sharding.registry import SkyRegion, SurveyConfig

PATTERN_FIELDS = {"id", "band"}


# The one mock sky: equal-area cells, 1 deg of RA by 1/90 in sin(dec) (0.64 deg^2), each holding an endless
# stream of galaxies ordered by "depth" u (galaxies per deg^2 down to that one). A survey with N galaxies takes
# the N shallowest inside its footprint, so a deeper survey holds every galaxy of a shallower one where they
# overlap, as a fainter magnitude limit does. Streams are drawn per band of cells and chunk, keyed by the seed
# alone: the sky never depends on which surveys are drawn, in which order, or how many galaxies each takes.
RA_CELLS, SIN_BANDS = 360, 180
CELL_AREA_DEG2 = 4 * math.pi * (180 / math.pi) ** 2 / (RA_CELLS * SIN_BANDS)
CHUNK = 64
SKY_STREAM = 2**32 - 2  # stream key of the sky itself; never a galaxy id
CELL_BITS = 24  # sky_id = cell << CELL_BITS | position in the cell's stream


def check_footprint(survey: SurveyConfig) -> list[SkyRegion]:
    regions = list(survey.mock.footprint)
    if not regions:
        raise ValueError(f"survey {survey.name}: mock.footprint is empty; give at least one {{ra: [lo, hi], "
                         f"dec: [lo, hi]}} region")
    for region in regions:
        (ra_lo, ra_hi), (dec_lo, dec_hi) = region.ra, region.dec
        if not (0 <= ra_lo <= 360 and 0 <= ra_hi <= 360 and ra_lo != ra_hi and -90 <= dec_lo < dec_hi <= 90):
            raise ValueError(f"survey {survey.name}: mock.footprint region {region.name or region} needs ra (low, "
                             f"high) in [0, 360] (low > high wraps through 0) and dec (low, high) in [-90, 90], "
                             f"got ra {region.ra}, dec {region.dec}")
    return regions


def _ra_spans(region: SkyRegion) -> list[tuple[float, float]]:
    lo, hi = region.ra
    return [(lo, hi)] if lo < hi else [(lo, 360.0), (0.0, hi)]


def region_area_deg2(region: SkyRegion) -> float:
    width = sum(hi - lo for lo, hi in _ra_spans(region))
    lo, hi = (math.sin(math.radians(d)) for d in region.dec)
    return width * (hi - lo) * 180 / math.pi


def in_footprint(ra: np.ndarray, dec: np.ndarray, regions: list[SkyRegion]) -> np.ndarray:
    inside = np.zeros(np.shape(ra), dtype=bool)
    for region in regions:
        ra_ok = np.zeros_like(inside)
        for lo, hi in _ra_spans(region):
            ra_ok |= (ra >= lo) & (ra < hi)
        inside |= ra_ok & (dec >= region.dec[0]) & (dec < region.dec[1])
    return inside


def _bands(region: SkyRegion) -> range:
    lo, hi = ((math.sin(math.radians(d)) + 1) * SIN_BANDS / 2 for d in region.dec)
    return range(max(0, math.floor(lo)), min(SIN_BANDS, math.ceil(hi)))


class SkyStreams:
    """The galaxies of each band of cells, drawn chunk by chunk as deeper selections need them."""

    def __init__(self, seed: int):
        self.seed = seed
        self.bands: dict[int, dict[str, np.ndarray]] = {}

    def band(self, j: int, depth: float) -> dict[str, np.ndarray]:
        """Every galaxy of band j's 360 cells down to at least `depth`: arrays of shape (360, drawn)."""
        band = self.bands.get(j)
        while band is None or band["u"][:, -1].min() < depth:
            band = self._extend(j, band)
            self.bands[j] = band
        return band

    def _extend(self, j: int, band: dict | None) -> dict[str, np.ndarray]:
        chunk = 0 if band is None else band["u"].shape[1] // CHUNK
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, SKY_STREAM, j, chunk]))
        gaps = rng.exponential(size=(RA_CELLS, CHUNK)) / CELL_AREA_DEG2
        x_ra, x_sin = rng.random((2, RA_CELLS, CHUNK))
        start = 0.0 if band is None else band["u"][:, -1:]
        new = {"u": start + np.cumsum(gaps, axis=1),
               "ra": (np.arange(RA_CELLS)[:, None] + x_ra) * (360.0 / RA_CELLS),
               "dec": np.degrees(np.arcsin(np.clip(-1 + (j + x_sin) * 2.0 / SIN_BANDS, -1, 1)))}
        return new if band is None else {k: np.concatenate([band[k], new[k]], axis=1) for k in new}


def select_galaxies(regions: list[SkyRegion], num: int, seed: int) -> dict[str, np.ndarray]:
    """The `num` shallowest galaxies of the sky inside the footprint, shallowest first: sky_id, depth, ra, dec."""
    streams, bands = SkyStreams(seed), sorted({j for r in regions for j in _bands(r)})
    depth = 1.1 * num / sum(region_area_deg2(r) for r in regions)
    while True:
        picked = {k: [] for k in ("sky_id", "depth", "ra", "dec")}
        for j in bands:
            band = streams.band(j, depth)
            keep = (band["u"] < depth) & in_footprint(band["ra"], band["dec"], regions)
            cell, k = np.nonzero(keep)
            picked["sky_id"].append(((j * RA_CELLS + cell).astype(np.int64) << CELL_BITS) + k)
            for name, key in (("depth", "u"), ("ra", "ra"), ("dec", "dec")):
                picked[name].append(band[key][keep])
        found = {k: np.concatenate(v) for k, v in picked.items()}
        if len(found["depth"]) >= num:
            order = np.argsort(found["depth"], kind="stable")[:num]
            return {k: v[order] for k, v in found.items()}
        depth *= max(1.2, 1.1 * num / max(len(found["depth"]), 1))


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
