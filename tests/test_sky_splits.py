"""Sky-cell splits: twins share a split whatever the build order; verify --across finds id-split leaks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy import units as u
from astropy_healpix import nside_to_pixel_resolution

from sharding import build, verify
from sharding.mock import main as mock_main
from sharding.registry import load_survey
from sharding.sky import assign_splits, nside_for, sky_cells, split_of

SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, Path]:
    """SDSS and UKIDSS drawn on one sky (seed 2): UKIDSS lies inside SDSS, so they share galaxies."""
    root = tmp_path_factory.mktemp("sky")
    out = {}
    for name in ("sdss", "ukidss"):
        out[name] = root / "raw" / name
        assert mock_main(["--survey", name, "--num-galaxies", "60", "--out", str(out[name]), "--seed", "2",
                          "--no-progress", "--set", "mock.cutout_px=32"]) == 0
    return out


def build_root(raw: dict[str, Path], root: Path, order: list[str], *extra: str) -> Path:
    for name in order:
        catalog = raw[name] / Path(load_survey(name).catalog).name
        assert build.main(["--survey", name, "--catalog", str(catalog), "--images", str(raw[name] / "images"),
                           "--out", str(root), "--image-size", "32", "--no-progress", *extra]) == 0
    return root


def twin_splits(raw: dict[str, Path], root: Path) -> pd.DataFrame:
    """Each twin's split in both surveys, twins found by the mock's truth (sky_id), not by a positional match."""
    frames = []
    for name in ("sdss", "ukidss"):
        truth = pd.read_parquet(raw[name] / "truth.parquet")[["sky_id", "catalog_id"]]
        labels = pd.read_parquet(root / name / "labels.parquet", columns=["object_id", "split"])
        truth["object_id"] = truth["catalog_id"].astype(str).str.strip()
        frames.append(truth.merge(labels, on="object_id")[["sky_id", "split"]].rename(columns={"split": name}))
    return frames[0].merge(frames[1], on="sky_id")


def test_twins_share_a_split_in_any_build_order(raw, tmp_path, capsys):
    forward = build_root(raw, tmp_path / "a", ["sdss", "ukidss"])
    backward = build_root(raw, tmp_path / "b", ["ukidss", "sdss"])
    twins = twin_splits(raw, forward)
    assert len(twins) >= 8
    assert (twins["sdss"] == twins["ukidss"]).all()
    for name in ("sdss", "ukidss"):
        a, b = (pd.read_parquet(r / name / "labels.parquet", columns=["key", "split"]) for r in (forward, backward))
        pd.testing.assert_frame_equal(a, b)
        rule = json.loads((forward / name / "manifest.json").read_text())["split_rule"]
        assert rule["split_by"] == "sky" and rule["healpix_nside"] == 256
    capsys.readouterr()
    assert verify.main(["--across", str(forward)]) == 0
    report = capsys.readouterr().out
    assert f"sdss - ukidss: {len(twins)} twins within 1 arcsec, 0 in different splits" in report


def test_id_splits_separate_twins_and_verify_reports_them(raw, tmp_path, capsys):
    root = build_root(raw, tmp_path / "id", ["sdss", "ukidss"], "--split-by", "id")
    twins = twin_splits(raw, root)
    differ = int((twins["sdss"] != twins["ukidss"]).sum())
    assert differ > 0  # the leak sky splits exist to prevent
    capsys.readouterr()
    assert verify.main(["--across", str(root)]) == 0  # reported, not failed: the build asked for id splits
    assert f"{differ} in different splits" in capsys.readouterr().out
    # One survey rebuilt with sky splits next to an id-split one: the leak now fails verification.
    (root / "ukidss").rename(tmp_path / "old_ukidss")
    build_root(raw, root, ["ukidss"])
    capsys.readouterr()
    assert verify.main(["--across", str(root)]) == 1
    out = capsys.readouterr().out
    assert "FAIL sdss - ukidss" in out and "different rules" in out


def test_split_is_a_function_of_the_cell_alone():
    rng = np.random.default_rng(0)
    ra, dec = rng.uniform(0, 360, 3000), np.degrees(np.arcsin(rng.uniform(-1, 1, 3000)))
    ids = pd.Series([f"g{i}" for i in range(3000)])
    rule = {"split_by": "sky", "healpix_nside": 64}
    splits = assign_splits(ids, ra, dec, SPLITS, rule)
    cells = sky_cells(ra, dec, 64)
    assert all(split_of(f"healpix64:{c}", SPLITS) == s for c, s in zip(cells, splits))
    # adding galaxies never moves old ones; fractions hold over many cells
    more = assign_splits(pd.concat([ids, pd.Series(["new"])], ignore_index=True), np.append(ra, 10.0),
                         np.append(dec, 5.0), SPLITS, rule)
    assert more.iloc[:3000].tolist() == splits.tolist()
    assert abs((splits == "train").mean() - 0.8) < 0.05
    # the cell of a position: astropy-healpix's own resolution tells the size
    assert nside_for(1.0) == 64 and nside_for(0.23) == 256
    assert abs(nside_to_pixel_resolution(nside_for(1.0)).to_value(u.deg) - 1.0) < 0.1
    no_position = assign_splits(pd.Series(["x"]), np.array([np.nan]), np.array([0.0]), SPLITS, rule)
    assert no_position.tolist() == [""]
