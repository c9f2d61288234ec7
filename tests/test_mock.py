"""sharding.mock through its real main(): native columns, FITS layout, PSF, labels, corruptions, determinism."""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.convolution import convolve_fft
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy import stats

from sharding.mock import main
from sharding.mock.fitsfiles import fits_bytes, galaxy_fits, image_header
from sharding.mock.render import convolve_psf, point_source, psf_kernel
from sharding.mock import sky
from sharding.mock.sky import iau_name
from sharding.registry import SkyRegion, list_surveys, load_survey

SURVEYS = ("sdss", "decals", "hst", "ukidss")
SCHEMAS = Path(__file__).resolve().parent.parent / "sharding" / "gz_schemas"
NUM_GALAXIES = 60


def run_mock(out: Path, survey: str, num: int = NUM_GALAXIES, *extra: str) -> Path:
    code = main(["--survey", survey, "--num-galaxies", str(num), "--out", str(out), "--no-progress", *extra])
    assert code == 0
    return out


def read_table(path: Path) -> pd.DataFrame:
    if path.suffix == ".csv":
        return pd.read_csv(path)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return Table.read(path).to_pandas()


def catalog_of(out: Path, survey: str) -> pd.DataFrame:
    return read_table(out / Path(load_survey(survey).catalog).name)


def fractions_of(frame: pd.DataFrame, survey: str, feature: str) -> np.ndarray:
    return frame[load_survey(survey).fraction_columns(feature)].sum(axis=1, min_count=1).to_numpy()


@pytest.fixture(scope="module")
def surveys(tmp_path_factory) -> dict[str, Path]:
    """The same 60-galaxy population (seed 0) generated for each survey, with no corruptions."""
    root = tmp_path_factory.mktemp("mock")
    return {name: run_mock(root / name, name) for name in SURVEYS}


def test_every_registered_survey_is_covered():
    assert set(list_surveys()) == set(SURVEYS)


def _native_columns(survey: str) -> list[str]:
    """The real catalog's column names, read straight from the gz_schemas tables (not from sharding.mock)."""
    ortho = pd.read_csv(SCHEMAS / "gz_ortho_schemas_long.csv", dtype=str, keep_default_na=False)
    if survey == "sdss":
        table = pd.read_csv(SCHEMAS / "gz2_hart16_to_ortho.csv", dtype=str, keep_default_na=False)
        mapped = table[table["galaxy_datasets_ortho_col"] != ""]
        return list(mapped["count_col"]) + list(mapped["fraction_col"]) + ["total_votes", "total_classifications"]
    if survey == "hst":
        table = pd.read_csv(SCHEMAS / "gz_hubble_willett17_to_ortho.csv", dtype=str, keep_default_na=False)
        mapped = table[table["galaxy_datasets_ortho_col"] != ""]
        return [p + "_count" for p in mapped["gzh_answer_prefix"]] + list(mapped["fraction_col"])
    rows = ortho[ortho["schema"] == load_survey(survey).campaign]
    cols = list(rows["count_col"]) + list(rows["fraction_col"]) + list(rows["total_votes_col"])
    return [c.replace("-dr5", "") for c in cols] if survey == "decals" else cols


@pytest.mark.parametrize("name", SURVEYS)
def test_catalog_has_native_names_and_every_yaml_column(surveys, name):
    survey = load_survey(name)
    catalog_path = surveys[name] / Path(survey.catalog).name
    assert catalog_path.is_file()
    frame = read_table(catalog_path)
    referenced = [survey.id_column, survey.ra_column, survey.dec_column]
    for feature in survey.features:
        referenced += survey.count_columns(feature) + survey.fraction_columns(feature)
    referenced += [c for cols in survey.question_totals.values() for c in cols]
    assert [c for c in referenced if c not in frame.columns] == []
    assert [c for c in _native_columns(name) if c not in frame.columns] == []
    assert len(frame) == NUM_GALAXIES and frame[survey.id_column].is_unique


def test_catalog_formats_follow_the_catalog_extension(surveys):
    assert (surveys["sdss"] / "gz2_hart16.csv").read_bytes().startswith(b"dr7objid,ra,dec,")
    assert (surveys["decals"] / "gz_decals_volunteers_5.parquet").read_bytes()[:4] == b"PAR1"
    assert (surveys["hst"] / "gz_hubble_main.fits").read_bytes().startswith(b"SIMPLE  =")
    assert isinstance(fits.getdata(surveys["hst"] / "gz_hubble_main.fits", 1), fits.FITS_rec)


def test_ids_look_like_each_survey(surveys):
    sdss = catalog_of(surveys["sdss"], "sdss")["dr7objid"]
    assert sdss.dtype == np.int64 and sdss.map(lambda v: len(str(v)) == 18).all()
    hst = catalog_of(surveys["hst"], "hst")["survey_id"]
    assert hst.min() >= 20000001 and hst.is_monotonic_increasing
    decals = catalog_of(surveys["decals"], "decals")
    assert decals["iauname"].str.fullmatch(r"J\d{6}\.\d{2}[+-]\d{6}\.\d").all()
    assert (decals["file_loc"] == decals["iauname"].str[:4] + "/" + decals["iauname"] + ".fits").all()
    ukidss = catalog_of(surveys["ukidss"], "ukidss")["id_str"]
    assert ukidss.map(lambda v: isinstance(v, str) and not v.isdigit()).all()


def test_iau_name_truncates_like_the_convention():
    assert iau_name(172.4745, -0.0743) == "J112953.88-000427.4"
    assert iau_name(0.0, 0.0) == "J000000.00+000000.0"


def _image_files(out: Path, name: str, gal_id, file_loc: str | None = None) -> list[Path]:
    survey = load_survey(name)
    images = out / "images"
    if file_loc:
        return [images / file_loc]
    if "{band}" in survey.image_pattern:
        return [images / survey.image_pattern.format(id=gal_id, band=b) for b in survey.bands]
    return [images / survey.image_pattern.format(id=gal_id)]


@pytest.mark.parametrize("name", SURVEYS)
def test_fits_layout_headers_and_wcs(surveys, name):
    survey = load_survey(name)
    frame = catalog_of(surveys[name], name)
    row = frame.iloc[3]  # a mixed-dtype row turns integers into floats: take the id from its column
    gal_id = frame[survey.id_column].iloc[3]
    paths = _image_files(surveys[name], name, gal_id, row.get("file_loc"))
    assert all(p.is_file() for p in paths)
    size = survey.mock.cutout_px
    for band_index, path in enumerate(paths):
        with fits.open(path) as hdul:
            header, data = hdul[0].header, hdul[0].data
        assert header["BUNIT"] == survey.bunit and header["SURVEY"] == name
        assert header["PSFFWHM"] == survey.psf_fwhm_arcsec and header["PIXSCALE"] == survey.pixel_scale_arcsec
        if len(paths) > 1:  # one 2-D file per band
            assert data.shape == (size, size) and header["BAND"] == survey.bands[band_index]
        else:  # one cube per galaxy
            assert data.shape == (len(survey.bands), size, size)
            assert [header[f"BAND{i + 1}"] for i in range(len(survey.bands))] == survey.bands
        wcs = WCS(header).celestial
        assert list(wcs.wcs.ctype) == ["RA---TAN", "DEC--TAN"]
        assert np.allclose(np.abs(wcs.wcs.cdelt), survey.pixel_scale_arcsec / 3600.0)
        centre = wcs.pixel_to_world((size - 1) / 2.0, (size - 1) / 2.0)
        assert centre.ra.deg == pytest.approx(row[survey.ra_column], abs=1e-9)
        assert centre.dec.deg == pytest.approx(row[survey.dec_column], abs=1e-9)
        assert np.isfinite(data).all() and data.dtype.kind == "f"
    if name == "ukidss":
        assert paths[0].name.endswith(".fits.gz") and paths[0].read_bytes()[:2] == b"\x1f\x8b"
    if name == "decals":
        assert re.fullmatch(r"J\d{3}", paths[0].parent.name)


def test_fits_writer_matches_astropy():
    survey = load_survey("sdss")
    data = np.random.default_rng(0).normal(size=(3, 64, 64)).astype(np.float32)
    header = image_header(survey, 12345, 180.5, -1.25, survey.bands)
    header.remove("LONPOLE")
    header.remove("LATPOLE")
    assert galaxy_fits(survey, 12345, 180.5, -1.25, data, survey.bands) == fits_bytes(data, header)


def _fwhm_px(image: np.ndarray) -> float:
    """FWHM of the profile through the peak, half-maximum crossings interpolated between pixels."""
    row, col = np.unravel_index(np.argmax(image), image.shape)
    profile = image[row] / image[row, col]
    right = col + np.argmax(profile[col:] < 0.5)
    left = col - np.argmax(profile[col::-1] < 0.5)

    def crossing(inside: int, outside: int) -> float:
        return inside + (profile[inside] - 0.5) / (profile[inside] - profile[outside]) * (outside - inside)

    return crossing(right - 1, right) - crossing(left + 1, left)


def test_psf_size_in_pixels_follows_each_survey():
    measured = {}
    for name in SURVEYS:
        survey = load_survey(name)
        fwhm = _fwhm_px(point_source(survey))
        assert fwhm == pytest.approx(survey.psf_fwhm_px, rel=0.2)
        assert fwhm * survey.pixel_scale_arcsec == pytest.approx(survey.psf_fwhm_arcsec, rel=0.2)
        measured[name] = fwhm
    # SDSS/DECaLS seeing spans ~3.5-3.8 px; HST's diffraction-limited PSF and UKIDSS's ~2 px.
    assert measured["sdss"] > 1.4 * measured["hst"] and measured["decals"] > 1.4 * measured["ukidss"]
    assert len({load_survey(n).pixel_scale_arcsec for n in SURVEYS}) == 4


def test_psf_convolution_equals_astropy_convolve_fft():
    survey = load_survey("decals")
    image = np.random.default_rng(1).random((40, 40))
    expected = convolve_fft(image, psf_kernel(survey), boundary="fill", fill_value=0.0, normalize_kernel=False)
    assert np.allclose(convolve_psf(image, survey), expected, atol=1e-12)


def test_galaxies_are_resolved_differently(surveys):
    resolution = {n: pd.read_parquet(surveys[n] / "truth.parquet")["resolution"].median() for n in SURVEYS}
    assert resolution["hst"] > 1.5 * resolution["sdss"]


def test_labels_depend_on_true_morphology(surveys):
    frame = catalog_of(surveys["decals"], "decals")
    truth = pd.read_parquet(surveys["decals"] / "truth.parquet")
    smooth = fractions_of(frame, "decals", "smooth-or-featured_smooth")
    kind = truth["kind"].to_numpy()
    assert np.nanmean(smooth[kind == "smooth"]) > np.nanmean(smooth[kind == "featured"]) + 0.25
    spiral = fractions_of(frame, "decals", "has-spiral-arms_yes")
    face_on_disk = (kind == "featured") & ~truth["edge_on"].to_numpy()
    arms = truth["has_spiral"].to_numpy()
    assert np.nanmean(spiral[face_on_disk & arms]) > np.nanmean(spiral[face_on_disk & ~arms]) + 0.2
    asked = face_on_disk & np.isfinite(spiral)
    assert np.corrcoef(spiral[asked], truth["arm_strength"].to_numpy()[asked])[0, 1] > 0.4
    artifact = fractions_of(frame, "decals", "smooth-or-featured_artifact")
    assert np.nanmean(artifact[kind == "artifact"]) > 0.5 > np.nanmean(artifact[kind != "artifact"])


def test_same_population_votes_differently_per_survey(surveys):
    hst, ukidss = (pd.read_parquet(surveys[n] / "truth.parquet") for n in ("hst", "ukidss"))
    mean_yes = {}
    for name, truth in (("hst", hst), ("ukidss", ukidss)):
        spirals = truth["has_spiral"].to_numpy()
        mean_yes[name] = np.nanmean(fractions_of(catalog_of(surveys[name], name), name, "has-spiral-arms_yes")[spirals])
    # HST resolves the arms; shallow UKIDSS near-infrared imaging washes them out.
    assert mean_yes["hst"] > mean_yes["ukidss"] + 0.1
    assert hst["visibility"].mean() > ukidss["visibility"].mean() + 0.2


def test_one_sky_twins_are_one_galaxy(surveys):
    """UKIDSS lies inside SDSS and goes deeper: every SDSS galaxy in the UKIDSS footprint is a UKIDSS galaxy with
    the same position and morphology, and the UKIDSS galaxies shallower than SDSS's limit inside SDSS are twins."""
    sdss, ukidss = (pd.read_parquet(surveys[n] / "truth.parquet") for n in ("sdss", "ukidss"))
    in_ukidss = sky.in_footprint(sdss["ra"].to_numpy(), sdss["dec"].to_numpy(), load_survey("ukidss").mock.footprint)
    expected = set(sdss.loc[in_ukidss, "sky_id"])
    shallow = ukidss["depth"] < sdss["depth"].max()
    in_sdss = sky.in_footprint(ukidss["ra"].to_numpy(), ukidss["dec"].to_numpy(), load_survey("sdss").mock.footprint)
    assert expected == set(ukidss.loc[shallow & in_sdss, "sky_id"]) and len(expected) >= 3
    twins = sdss.merge(ukidss, on="sky_id", suffixes=("_s", "_u"))
    assert set(twins["sky_id"]) == expected
    for column in ("ra", "dec", "kind", "arm_count", "bar_strength", "inclination_deg", "edge_on"):
        assert (twins[f"{column}_s"] == twins[f"{column}_u"]).all(), column
    assert not (twins["num_classifications_s"] == twins["num_classifications_u"]).all()  # own volunteers


def test_sky_is_uniform_nested_and_wraps_through_ra_zero():
    box = [SkyRegion(ra=(300.0, 20.0), dec=(-30.0, 60.0))]
    galaxies = sky.select_galaxies(box, 4000, seed=5)
    ra, dec = galaxies["ra"], galaxies["dec"]
    assert sky.in_footprint(ra, dec, box).all() and (ra < 20).any() and (ra >= 300).any()
    # Uniform on the sphere: sin(dec) uniform between the box's limits, RA uniform over the 80 deg span.
    lo, hi = np.sin(np.radians([-30.0, 60.0]))
    assert stats.kstest(np.sin(np.radians(dec)), stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
    assert stats.kstest((ra - 300.0) % 360.0, stats.uniform(0, 80).cdf).pvalue > 1e-3
    fewer = sky.select_galaxies(box, 1000, seed=5)
    assert np.array_equal(fewer["sky_id"], galaxies["sky_id"][:1000])  # more galaxies never move the old ones
    other = sky.select_galaxies(box, 1000, seed=6)
    assert len(np.intersect1d(other["ra"], fewer["ra"])) == 0  # another seed, another sky


def test_volunteers_walk_the_decision_tree(surveys):
    frame = catalog_of(surveys["decals"], "decals")
    total = frame["smooth-or-featured_total-votes"]
    root = frame[["smooth-or-featured_smooth", "smooth-or-featured_featured-or-disk",
                  "smooth-or-featured_artifact"]].sum(axis=1)
    assert (root == total).all() and total.mean() == pytest.approx(35, rel=0.2)
    assert (frame["disk-edge-on_total-votes"] == frame["smooth-or-featured_featured-or-disk"]).all()
    assert (frame["has-spiral-arms_total-votes"] == frame["disk-edge-on_no"]).all()
    assert (frame["spiral-winding_total-votes"] == frame["has-spiral-arms_yes"]).all()
    unasked = frame["spiral-winding_total-votes"] == 0
    assert unasked.any() and frame.loc[unasked, "spiral-winding_tight_fraction"].isna().all()
    asked = ~unasked
    ratio = frame.loc[asked, "spiral-winding_tight"] / frame.loc[asked, "spiral-winding_total-votes"]
    assert np.allclose(ratio, frame.loc[asked, "spiral-winding_tight_fraction"])
    # GZ Hubble asks disk-edge-on only after clumpy-appearance = no.
    hst = catalog_of(surveys["hst"], "hst")
    edge_on_votes = hst["t02_edgeon_a01_yes_count"] + hst["t02_edgeon_a02_no_count"]
    assert (edge_on_votes == hst["t12_clumpy_a02_no_count"]).all()


def test_default_out_is_the_yaml_catalog_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--survey", "ukidss", "--num-galaxies", "5", "--no-progress"]) == 0
    survey = load_survey("ukidss")
    assert Path(survey.catalog).is_file()
    first = catalog_of(Path(survey.catalog).parent, "ukidss")["id_str"].iloc[0]
    assert (Path(survey.images) / survey.image_pattern.format(id=first)).is_file()
    assert (Path(survey.catalog).parent / "truth.parquet").is_file()


@pytest.mark.filterwarnings("ignore:File may have been truncated")
@pytest.mark.parametrize("name", ["hst", "ukidss"])
def test_corrupt_fraction_injects_every_kind(tmp_path, name):
    survey = load_survey(name)
    out = run_mock(tmp_path / name, name, 70, "--corrupt-fraction", "0.12")
    records = pd.read_csv(out / "corruptions.csv")
    assert set(records["kind"]) == {"truncated_fits", "all_nan", "all_zero", "missing_file", "nan_votes",
                                    "negative_votes", "duplicate_id"}
    frame = catalog_of(out, name)
    ids = frame[survey.id_column].astype(str)
    count_cols = [c for f in survey.features for c in survey.count_columns(f)]
    for record in records.itertuples():
        row = frame.iloc[record.row]
        gal_id = frame[survey.id_column].iloc[record.row]
        assert str(gal_id) == str(record.id)
        first_file = _image_files(out, name, gal_id)[0]
        if record.kind == "missing_file":
            assert not first_file.exists()
        elif record.kind == "truncated_fits":
            with pytest.raises((OSError, EOFError, ValueError, TypeError)):
                with fits.open(first_file) as hdul:
                    np.asarray(hdul[0].data).sum()
        elif record.kind in ("all_nan", "all_zero"):
            data = fits.getdata(first_file)
            assert np.isnan(data).all() if record.kind == "all_nan" else (data == 0).all()
        elif record.kind == "nan_votes":
            assert row[count_cols].isna().all()
        elif record.kind == "negative_votes":
            assert (row[count_cols] < 0).any()
        elif record.kind == "duplicate_id":
            assert (ids == str(record.id)).sum() == 2
    clean = frame.drop(index=records["row"]).reset_index(drop=True)
    assert clean[survey.id_column].is_unique and (clean[count_cols] >= 0).all().all()
    truth = pd.read_parquet(out / "truth.parquet")
    defects = truth[truth["pixel_defects"] != ""]
    assert len(defects) >= 1 and (defects["corruption"] == "").all()
    sample = np.stack([fits.getdata(p) for p in _image_files(out, name, defects["id"].iloc[0])])
    bad = ~np.isfinite(sample) | (sample >= survey.mock.saturation)
    assert 0 < bad.sum() < sample.size / 10


def _digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    args = ("--corrupt-fraction", "0.1")
    first = _digests(run_mock(tmp_path / "a", "decals", 40, *args))
    again = _digests(run_mock(tmp_path / "b", "decals", 40, *args, "--workers", "2"))
    assert first == again and len(first) > 40
    other = _digests(run_mock(tmp_path / "c", "decals", 40, *args, "--seed", "1"))
    assert other["gz_decals_volunteers_5.parquet"] != first["gz_decals_volunteers_5.parquet"]


def test_gzip_images_are_reproducible(tmp_path):
    first = _digests(run_mock(tmp_path / "a", "ukidss", 8))
    second = _digests(run_mock(tmp_path / "b", "ukidss", 8))
    assert first == second
    gz = next(p for p in (tmp_path / "a" / "images").iterdir())
    assert gzip.decompress(gz.read_bytes()).startswith(b"SIMPLE  =")


def test_user_errors_are_reported(tmp_path, capsys):
    run_mock(tmp_path / "x", "sdss", 3)
    assert main(["--survey", "sdss", "--num-galaxies", "3", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["--survey", "sdss", "--num-galaxies", "3", "--out", str(tmp_path / "x"), "--no-progress",
                 "--overwrite"]) == 0
    assert main(["--survey", "nosuch", "--out", str(tmp_path / "y")]) == 2
    assert main(["--survey", "sdss", "--corrupt-fraction", "1.5", "--out", str(tmp_path / "z")]) == 2
    assert main(["--survey", "sdss", "--num-galaxies", "0", "--out", str(tmp_path / "w")]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--corrupt-fraction" in capsys.readouterr().out
