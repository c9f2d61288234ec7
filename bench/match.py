"""Benchmark: `eval.match.match_positions` (one-to-one mutual nearest partners) against plain astropy matching.

Two lists of N random positions on the whole sky; a share of list 2 are planted twins of list-1 galaxies at
sub-arcsec offsets. Methods, each from degree arrays (SkyCoord construction and the k-d tree included, fresh objects
every repeat so no cached tree is reused):
- `eval.match.match_positions`: astropy search_around_sky, then mutual nearest partners (what `eval match` runs);
- astropy `search_around_sky` alone: every pair within the radius, the first step of the above;
- astropy `match_coordinates_sky`: each list-1 position's nearest list-2 neighbour (not one-to-one), then the cut.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import write_report  # noqa: E402
from eval.match import match_positions  # noqa: E402


def sky(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform positions on the sphere, degrees."""
    return rng.uniform(0.0, 360.0, n), np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))


def offset_by(ra, dec, bearing_deg, distance_arcsec):
    """Destination (degrees) from (ra, dec) along a bearing east of north."""
    ra1, dec1, theta = np.radians(ra), np.radians(dec), np.radians(bearing_deg)
    d = np.radians(distance_arcsec / 3600.0)
    dec2 = np.arcsin(np.sin(dec1) * np.cos(d) + np.cos(dec1) * np.sin(d) * np.cos(theta))
    ra2 = ra1 + np.arctan2(np.sin(theta) * np.sin(d) * np.cos(dec1), np.cos(d) - np.sin(dec1) * np.sin(dec2))
    return np.degrees(ra2) % 360.0, np.degrees(dec2)


def catalogues(n: int, twin_fraction: float, max_offset_arcsec: float, seed: int):
    """(ra1, dec1, ra2, dec2, twin_of): list 2 row k < num_twins is a twin of list-1 row twin_of[k]."""
    rng = np.random.default_rng(seed)
    ra1, dec1 = sky(rng, n)
    ra2, dec2 = sky(rng, n)
    num_twins = int(round(twin_fraction * n))
    twin_of = rng.choice(n, num_twins, replace=False)
    ra2[:num_twins], dec2[:num_twins] = offset_by(ra1[twin_of], dec1[twin_of], rng.uniform(0, 360, num_twins),
                                                  rng.uniform(0.0, max_offset_arcsec, num_twins))
    return ra1, dec1, ra2, dec2, twin_of


def search_around(ra1, dec1, ra2, dec2, radius_arcsec):
    from astropy import units as u
    from astropy.coordinates import SkyCoord, search_around_sky

    one, two = SkyCoord(ra1 * u.deg, dec1 * u.deg), SkyCoord(ra2 * u.deg, dec2 * u.deg)
    i1, i2, sep, _ = search_around_sky(one, two, radius_arcsec * u.arcsec)
    return i1, i2, sep.to_value(u.arcsec)


def nearest_neighbour(ra1, dec1, ra2, dec2, radius_arcsec):
    from astropy import units as u
    from astropy.coordinates import SkyCoord, match_coordinates_sky

    one, two = SkyCoord(ra1 * u.deg, dec1 * u.deg), SkyCoord(ra2 * u.deg, dec2 * u.deg)
    idx, sep, _ = match_coordinates_sky(one, two)
    within = sep.to_value(u.arcsec) <= radius_arcsec
    return np.flatnonzero(within), idx[within], sep.to_value(u.arcsec)[within]


METHODS = {"eval.match.match_positions (one-to-one)": match_positions,
           "astropy search_around_sky (all pairs)": search_around,
           "astropy match_coordinates_sky (nearest, not 1-1)": nearest_neighbour}


def run(data, radius_arcsec: float, repeats: int) -> list[dict]:
    """Best-of-repeats row per method; the methods take turns within each repeat, so a slower spell of the shared
    machine does not fall on one method only."""
    ra1, dec1, ra2, dec2, twin_of = data
    best, results = {name: float("inf") for name in METHODS}, {}
    for _ in range(repeats):
        for name, method in METHODS.items():
            start = time.perf_counter()
            results[name] = method(ra1, dec1, ra2, dec2, radius_arcsec)
            best[name] = min(best[name], time.perf_counter() - start)
    planted = set(zip(twin_of.tolist(), range(len(twin_of))))
    rows = []
    for name, (i1, i2, _) in results.items():
        found = set(zip(np.asarray(i1).tolist(), np.asarray(i2).tolist()))
        rows.append({"method": name, "seconds": best[name], "pairs": len(i1),
                     "twins_recovered": len(planted & found) / max(len(planted), 1),
                     "list2_claimed_twice": int(len(i2) - len(np.unique(i2))),
                     "positions_per_s": (len(ra1) + len(ra2)) / best[name]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="positions in each list")
    parser.add_argument("--twin-fraction", type=float, default=0.3, help="share of list 2 planted as twins")
    parser.add_argument("--max-offset", type=float, default=0.8, help="largest twin offset, arcsec")
    parser.add_argument("--radius", type=float, default=1.0, help="match radius, arcsec")
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings per method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "match.json")
    args = parser.parse_args(argv)
    data = catalogues(args.n, args.twin_fraction, args.max_offset, args.seed)
    rows = run(data, args.radius, args.repeats)
    base = rows[-1]["seconds"]
    print(f"\n{args.n:,} x {args.n:,} positions, {args.twin_fraction:.0%} of list 2 planted twins within "
          f"{args.max_offset:g} arcsec, radius {args.radius:g} arcsec; {os.cpu_count()} CPUs, {platform.machine()}, "
          f"best of {args.repeats}")
    print(f"{'method':<50}{'seconds':>9}{'M pos/s':>9}{'vs NN':>7}{'pairs':>10}{'twins found':>13}"
          f"{'claimed 2x':>12}")
    for row in rows:
        row["relative_to_nearest_neighbour"] = row["seconds"] / base
        print(f"{row['method']:<50}{row['seconds']:>9.2f}{row['positions_per_s'] / 1e6:>9.2f}"
              f"{row['relative_to_nearest_neighbour']:>6.2f}x{row['pairs']:>10,}{row['twins_recovered']:>12.2%}"
              f"{row['list2_claimed_twice']:>12,}")
    print("M pos/s: both lists' positions per second; vs NN: time relative to match_coordinates_sky; claimed 2x: "
          "list-2 rows in more than one pair")
    write_report(args.json, "match", rows, n=args.n, twin_fraction=args.twin_fraction,
                 max_offset_arcsec=args.max_offset, radius_arcsec=args.radius, repeats=args.repeats, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
