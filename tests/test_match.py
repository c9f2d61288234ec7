"""eval match: one-to-one cross-matching against an independent brute-force match, the CLI, its error messages."""

import json

import numpy as np
import pandas as pd
import pytest

from eval import match
from eval.__main__ import main as eval_main
from eval.store import read_metadata

RADIUS = 2.0  # arcsec; the clusters below hold ~5 galaxies of the other list within it, so choices conflict


def offset_by(ra, dec, bearing_deg, distance_arcsec):
    """Destination on the sphere (degrees) from (ra, dec) along a bearing (east of north): plain trigonometry."""
    ra1, dec1, theta = np.radians(ra), np.radians(dec), np.radians(bearing_deg)
    d = np.radians(np.asarray(distance_arcsec) / 3600.0)
    dec2 = np.arcsin(np.sin(dec1) * np.cos(d) + np.cos(dec1) * np.sin(d) * np.cos(theta))
    ra2 = ra1 + np.arctan2(np.sin(theta) * np.sin(d) * np.cos(dec1), np.cos(d) - np.sin(dec1) * np.sin(dec2))
    return np.degrees(ra2) % 360.0, np.degrees(dec2)


def clustered(rng, n_per_cluster, spread_arcsec=20.0):
    """Positions in small disks around RA 0 (both sides of the wrap), near both poles and on the pole itself."""
    centres = [(0.0, 0.0), (359.9999, -30.0), (0.0, 89.9), (180.0, -89.9), (45.0, 90.0), (300.0, -90.0)]
    ra, dec = [], []
    for c_ra, c_dec in centres:
        dist = spread_arcsec * np.sqrt(rng.random(n_per_cluster))
        bearing = rng.uniform(0, 360, n_per_cluster)
        r, d = offset_by(np.full(n_per_cluster, c_ra), np.full(n_per_cluster, c_dec), bearing, dist)
        ra.append(r)
        dec.append(d)
    return np.concatenate(ra), np.concatenate(dec)


def brute_force(ra1, dec1, ra2, dec2, radius_arcsec):
    """Mutual nearest partners within the radius from every angular distance (haversine)."""
    a1, d1, a2, d2 = (np.radians(np.asarray(v, np.float64)) for v in (ra1, dec1, ra2, dec2))
    hav = (np.sin((d2[None, :] - d1[:, None]) / 2) ** 2
           + np.cos(d1[:, None]) * np.cos(d2[None, :]) * np.sin((a2[None, :] - a1[:, None]) / 2) ** 2)
    sep = np.degrees(2 * np.arcsin(np.sqrt(np.clip(hav, 0, 1)))) * 3600
    nearest2, nearest1 = sep.argmin(axis=1), sep.argmin(axis=0)
    pairs = {(i, j): sep[i, j] for i, j in enumerate(nearest2) if nearest1[j] == i and sep[i, j] <= radius_arcsec}
    return pairs


def planted(rng, num):
    """Isolated galaxies (all sky, plus three near each pole) and their twins at known offsets and bearings."""
    ra = np.concatenate([rng.uniform(0, 360, num), [0.0, 120.0, 240.0, 10.0, 130.0, 250.0]])
    dec = np.concatenate([np.degrees(np.arcsin(rng.uniform(-0.9, 0.9, num))), [89.95] * 3, [-89.95] * 3])
    offsets = rng.uniform(0.05, 0.95, len(ra)) * RADIUS
    twin_ra, twin_dec = offset_by(ra, dec, rng.uniform(0, 360, len(ra)), offsets)
    return ra, dec, twin_ra, twin_dec, offsets


def test_one_to_one_matches_brute_force_near_the_wrap_and_the_poles():
    rng = np.random.default_rng(7)
    ra1, dec1 = clustered(rng, 120)
    ra2, dec2 = clustered(rng, 100)
    p_ra, p_dec, t_ra, t_dec, offsets = planted(rng, 30)
    ra1, dec1 = np.concatenate([ra1, p_ra]), np.concatenate([dec1, p_dec])
    ra2, dec2 = np.concatenate([t_ra, ra2]), np.concatenate([t_dec, dec2])  # twins first: indices 0..k-1
    i1, i2, sep = match.match_positions(ra1, dec1, ra2, dec2, RADIUS)
    expected = brute_force(ra1, dec1, ra2, dec2, RADIUS)
    assert set(zip(i1.tolist(), i2.tolist())) == set(expected)
    assert len(expected) > 200  # the clusters really produce matches, and conflicts resolved by nearest partner
    assert np.allclose(sep, [expected[(i, j)] for i, j in zip(i1, i2)], atol=1e-6)
    assert len(set(i1)) == len(i1) and len(set(i2)) == len(i2)  # one-to-one
    assert list(i1) == sorted(i1)
    # Every planted twin is found, at its planted separation.
    first = len(ra1) - len(p_ra)
    found = {int(a): (int(b), s) for a, b, s in zip(i1, i2, sep)}
    for k, offset in enumerate(offsets):
        assert found[first + k][0] == k
        assert found[first + k][1] == pytest.approx(offset, abs=1e-6)


def test_nearest_partner_only_and_positions_without_a_value_never_match():
    # a0 sits between b0 (0.4") and b1 (0.6"); b1's nearest is a0 too, so only a0-b0 stands and b1 stays unpaired.
    ra1, dec1 = np.array([10.0, np.nan, 10.0, 20.0]), np.array([0.0, 0.0, np.nan, 95.0])
    b_ra, b_dec = offset_by(np.array([10.0, 10.0]), np.array([0.0, 0.0]), np.array([90.0, 270.0]),
                            np.array([0.4, 0.6]))
    i1, i2, sep = match.match_positions(ra1, dec1, np.r_[b_ra, np.nan], np.r_[b_dec, 1.0], 1.0)
    assert i1.tolist() == [0] and i2.tolist() == [0] and sep[0] == pytest.approx(0.4, abs=1e-6)
    empty = match.match_positions([], [], [1.0], [1.0], 1.0)
    assert all(len(v) == 0 for v in empty)
    with pytest.raises(ValueError, match="radius must be > 0"):
        match.match_positions([1.0], [1.0], [1.0], [1.0], 0.0)


def _labels(survey, ra, dec):
    n = len(ra)
    return pd.DataFrame({"key": [f"{survey}_{i}" for i in range(n)], "object_id": [str(i) for i in range(n)],
                         "survey": survey, "ra": ra, "dec": dec, "split": "train", "shard": f"{survey}-train-000000",
                         "bar_yes": np.float32(0.5)})


@pytest.fixture
def shard_root(tmp_path):
    """Three surveys: 12 shared galaxies (b and c 0.3" and 0.6" away from a), 5 own ones each, NaN positions."""
    rng = np.random.default_rng(1)
    ra, dec = rng.uniform(0, 360, 12), rng.uniform(-60, 60, 12)
    ra[0], dec[0] = 359.99999, 10.0  # across the RA wrap
    own = {s: (rng.uniform(0, 360, 5), rng.uniform(-60, 60, 5)) for s in "abc"}
    b_ra, b_dec = offset_by(ra, dec, 30.0, 0.3)
    c_ra, c_dec = offset_by(ra, dec, 200.0, 0.6)
    tables = {"sdss": (np.r_[ra, own["a"][0], np.nan], np.r_[dec, own["a"][1], 1.0]),
              "decals": (np.r_[own["b"][0], b_ra], np.r_[own["b"][1], b_dec]),
              "ukidss": (np.r_[c_ra, own["c"][0], 1.0, np.nan], np.r_[c_dec, own["c"][1], np.nan, np.nan])}
    for survey, (r, d) in tables.items():
        (tmp_path / survey).mkdir()
        _labels(survey, r, d).to_parquet(tmp_path / survey / "labels.parquet")
    (tmp_path / "notes").mkdir()  # a folder without labels is not a survey
    return tmp_path


def test_cli_writes_pairs_summary_and_settings(shard_root, tmp_path, capsys):
    out = tmp_path / "out" / "pairs.parquet"
    assert eval_main(["match", "--shards", str(shard_root), "--surveys", "sdss,decals,ukidss", "--out", str(out)]) == 0
    pairs = pd.read_parquet(out)
    assert list(pairs.columns) == list(match.PAIR_COLUMNS)
    counts = pairs.groupby(["survey_a", "survey_b"]).size().to_dict()
    assert counts == {("sdss", "decals"): 12, ("sdss", "ukidss"): 12, ("decals", "ukidss"): 12}
    ab = pairs[(pairs.survey_a == "sdss") & (pairs.survey_b == "decals")]
    assert ab["key_a"].tolist() == [f"sdss_{i}" for i in range(12)]
    assert ab["key_b"].tolist() == [f"decals_{i + 5}" for i in range(12)]
    assert np.allclose(ab["sep_arcsec"], 0.3, atol=1e-6)
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["radius_arcsec"] == 1.0 and summary["surveys"] == ["sdss", "decals", "ukidss"]
    first = summary["survey_pairs"][0]
    assert (first["n_a"], first["n_b"], first["no_position_a"], first["no_position_b"]) == (18, 17, 1, 0)
    assert first["within"] == {"<0.25r": 0, "<0.5r": 12, "<=1r": 12}
    assert first["median_sep_arcsec"] == pytest.approx(0.3, abs=1e-6)
    assert summary["survey_pairs"][1]["no_position_b"] == 2
    assert read_metadata(out)["shards"] == str(shard_root)
    printed = capsys.readouterr().out
    assert "sdss - decals" in printed and "wrote" in printed
    assert match.match_surveys(shard_root, ["sdss", "decals"], 1.0).equals(ab.reset_index(drop=True))


def test_errors_name_the_problem(shard_root, tmp_path, capsys):
    with pytest.raises(ValueError) as err:
        match.match_surveys(shard_root, ["sdss", "hst"], 1.0)
    assert str(shard_root / "hst") in str(err.value) and "['decals', 'sdss', 'ukidss']" in str(err.value)
    with pytest.raises(ValueError, match="--radius must be > 0"):
        match.match_surveys(shard_root, ["sdss", "decals"], -1.0)
    with pytest.raises(ValueError, match="at least two different surveys"):
        match.match_surveys(shard_root, ["sdss", "sdss"], 1.0)
    assert match.main(["--shards", str(shard_root), "--surveys", "sdss,hst", "--out", str(tmp_path / "p.parquet")]) == 2
    assert "no survey folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        match.main(["--help"])
    assert done.value.code == 0 and "examples:" in capsys.readouterr().out
