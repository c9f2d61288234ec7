"""Splits from the sky: a galaxy's split is a hash of the HEALPix cell it lies in, so its copies in every survey
share a split whatever order the surveys are built in, and adding galaxies never moves old ones."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd
from astropy import units as u
from astropy_healpix import HEALPix

# nside 256: cells of 0.23 deg (0.052 deg^2). Deep fields span a few deg^2 (COSMOS is 2), and 1-deg cells would
# put each in two or three cells, so a deep survey's test split would be one field or none. 0.23 deg is still
# ~30 times the widest mock cutout (25 arcsec), so neighbours whose cutouts overlap nearly always share a cell.
DEFAULT_NSIDE = 256
SPLIT_RULES = ("sky", "id")


def unit_hash(text: str) -> float:
    """A stable number in [0, 1) from a string (sha256): the same on every machine, process and run."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def split_of(object_id: str, splits: dict[str, float]) -> str:
    """Stable split by hash of the object id: adding galaxies to a catalog never moves old ones."""
    u = unit_hash(object_id)
    cumulative = 0.0
    for name, fraction in splits.items():
        cumulative += fraction
        if u < cumulative:
            return name
    return next(reversed(splits))


def nside_for(cell_deg: float) -> int:
    """The HEALPix nside (a power of 2) whose cells are closest to cell_deg on a side (sqrt of the cell area)."""
    if not cell_deg > 0:
        raise ValueError(f"--sky-cell-deg must be > 0, got {cell_deg}")
    order = round(math.log2(math.sqrt(4 * math.pi / 12) * 180 / math.pi / cell_deg))
    return 2 ** min(max(order, 0), 29)


def split_rule(split_by: str, nside: int = DEFAULT_NSIDE) -> dict:
    """What the manifest records: enough to recompute any galaxy's split from its id or position."""
    if split_by not in SPLIT_RULES:
        raise ValueError(f"--split-by {split_by!r}: choose one of {list(SPLIT_RULES)}")
    if split_by == "id":
        return {"split_by": "id", "hash": "sha256(object id)"}
    if nside < 1 or nside & (nside - 1):
        raise ValueError(f"HEALPix nside must be a power of 2, got {nside}")
    cell = math.degrees(math.sqrt(4 * math.pi / (12 * nside * nside)))
    return {"split_by": "sky", "healpix_nside": nside, "healpix_order": "nested", "cell_deg": round(cell, 4),
            "hash": "sha256('healpix<nside>:<nested pixel>')"}


def sky_cells(ra: np.ndarray, dec: np.ndarray, nside: int) -> np.ndarray:
    """Nested HEALPix pixel of each (ra, dec) in degrees; -1 where the position is not finite."""
    ra, dec = np.asarray(ra, dtype=float), np.asarray(dec, dtype=float)
    good = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90)
    cells = np.full(ra.shape, -1, dtype=np.int64)
    if good.any():
        grid = HEALPix(nside=nside, order="nested")
        cells[good] = grid.lonlat_to_healpix(ra[good] * u.deg, dec[good] * u.deg)
    return cells


def assign_splits(object_ids: pd.Series, ra, dec, splits: dict[str, float], rule: dict) -> pd.Series:
    """The split of every row under a manifest's rule; "" where a sky rule meets a row without a position."""
    if rule.get("split_by", "id") == "id":
        return object_ids.map(lambda oid: split_of(oid, splits))
    nside = int(rule["healpix_nside"])
    cells = sky_cells(np.asarray(ra), np.asarray(dec), nside)
    by_cell = {c: split_of(f"healpix{nside}:{c}", splits) for c in np.unique(cells[cells >= 0]).tolist()}
    return pd.Series([by_cell.get(c, "") for c in cells.tolist()], index=object_ids.index, dtype=object)


def valid_positions(ra, dec) -> np.ndarray:
    """Rows whose position can be matched: finite, and a declination on the sphere."""
    ra, dec = np.asarray(ra, np.float64), np.asarray(dec, np.float64)
    with np.errstate(invalid="ignore"):
        return np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90.0)


def match_positions(ra1, dec1, ra2, dec2, radius_arcsec: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one cross-match of two position lists in degrees: (idx1, idx2, sep_arcsec) of the pairs that are each
    other's nearest partner within the radius, sorted by idx1.

    astropy's search_around_sky finds every pair within the radius; a galaxy then keeps only its nearest, and a pair
    stands when that choice is mutual, so a galaxy is never paired twice with the same survey. Rows without a valid
    position never match (astropy refuses NaN, so they are set aside and the indices mapped back)."""
    from astropy.coordinates import SkyCoord, search_around_sky

    if not radius_arcsec > 0:
        raise ValueError(f"match radius must be > 0 arcsec, got {radius_arcsec}")
    ra1, dec1 = np.asarray(ra1, np.float64), np.asarray(dec1, np.float64)
    ra2, dec2 = np.asarray(ra2, np.float64), np.asarray(dec2, np.float64)
    ok1, ok2 = np.flatnonzero(valid_positions(ra1, dec1)), np.flatnonzero(valid_positions(ra2, dec2))
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0))
    if len(ok1) == 0 or len(ok2) == 0:
        return empty
    one = SkyCoord(ra1[ok1] * u.deg, dec1[ok1] * u.deg)
    two = SkyCoord(ra2[ok2] * u.deg, dec2[ok2] * u.deg)
    i1, i2, sep, _ = search_around_sky(one, two, radius_arcsec * u.arcsec)
    if len(i1) == 0:
        return empty
    pairs = pd.DataFrame({"i1": i1, "i2": i2, "sep": sep.to_value(u.arcsec)}).sort_values(["sep", "i1", "i2"])
    mutual = pairs.drop_duplicates("i1").merge(pairs.drop_duplicates("i2"), on=["i1", "i2", "sep"])
    mutual = mutual.sort_values("i1")
    return ok1[mutual["i1"].to_numpy(np.int64)], ok2[mutual["i2"].to_numpy(np.int64)], mutual["sep"].to_numpy()
