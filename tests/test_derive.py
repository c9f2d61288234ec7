"""sharding.flux and sharding.derive: one survey seen as another, in flux; checked by independent measurements."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.modeling import fitting, models
from astropy.nddata import block_reduce
from astropy.stats import mad_std

from loaders.shards import load_shard_root
from sharding import build, derive, flux, verify
from sharding.mock import main as mock_main
from sharding.mock.render import point_source
from sharding.registry import load_survey

HST, SDSS, DECALS = (load_survey(name) for name in ("hst", "sdss", "decals"))


def _fitted_fwhm_px(image: np.ndarray, profile: str) -> float:
    """FWHM in pixels of a least-squares Moffat2D (free alpha) or Gaussian2D fit to a centred source."""
    y, x = np.mgrid[: image.shape[0], : image.shape[1]]
    centre = ((image.shape[1] - 1) / 2, (image.shape[0] - 1) / 2)
    if profile == "moffat":
        start = models.Moffat2D(amplitude=image.max(), x_0=centre[0], y_0=centre[1], gamma=2.0, alpha=3.0)
    else:
        start = models.Gaussian2D(amplitude=image.max(), x_mean=centre[0], y_mean=centre[1], x_stddev=1.5,
                                  y_stddev=1.5)
    fit = fitting.LevMarLSQFitter()(start, x, y, image, maxiter=400)
    if profile == "moffat":
        return float(fit.fwhm)
    return float(np.sqrt(fit.x_stddev.value * fit.y_stddev.value) * flux.FWHM_PER_SIGMA)


@pytest.mark.parametrize("target", [SDSS, DECALS, replace(SDSS, name="sdss_gauss", mock=replace(
    SDSS.mock, psf_profile="gaussian"))], ids=["sdss", "decals", "gaussian"])
def test_derived_point_source_has_the_target_psf(target):
    """An HST star (the mock's own HST PSF, in HST pixels), derived without noise, has the target's FWHM, measured
    by a profile fit that shares no code with the matching kernel; and the same FWHM as the target's mock star."""
    star = point_source(HST, flux=100.0)[None]
    derived, _ = derive.derive_cutout(star, derive.make_plan(HST, target, flux_scale=1.0), rng=None)
    image = derived[0].astype(np.float64)
    measured = _fitted_fwhm_px(image, target.mock.psf_profile)
    assert measured / target.psf_fwhm_px == pytest.approx(1.0, abs=0.05)
    # The target's own mock star, measured the same way: the derived PSF looks like the real thing.
    assert measured / _fitted_fwhm_px(point_source(target), target.mock.psf_profile) == pytest.approx(1.0, abs=0.02)
    assert image.sum() == pytest.approx(100.0, rel=0.02)  # PSF wings past 2.5 FWHM and the edge are all that is lost


@pytest.mark.parametrize("target", [SDSS, DECALS], ids=["sdss", "decals"])
def test_derived_empty_field_has_the_target_sky_noise(target):
    """Empty HST sky, derived: the robust std equals the target's sky noise, also from a source so noisy that its
    own noise, propagated through kernel and resampling, is most of the target's (it is subtracted in quadrature)."""
    plan = derive.make_plan(HST, target)
    gain = flux.noise_gain(plan.kernel, (320, 320), HST.pixel_scale_arcsec, target.pixel_scale_arcsec)
    for multiple in (1.0, 0.8 * target.mock.sky_noise / (HST.mock.sky_noise * plan.flux_scale * gain)):
        field = multiple * HST.mock.sky_noise * np.random.default_rng(7).standard_normal((6, 320, 320))
        noisy, facts = derive.derive_cutout(field, plan, np.random.default_rng(1))
        ratios = [mad_std(band) / target.mock.sky_noise for band in noisy]
        assert np.mean(ratios) == pytest.approx(1.0, abs=0.10) and max(abs(r - 1) for r in ratios) < 0.15
        np.testing.assert_allclose(np.hypot(facts["added_noise"], facts["source_noise"]), target.mock.sky_noise)
    # The propagated source noise that the quadrature subtracts is what the operations leave of the source's noise
    # (std away from the edges, where the kernel still sees the whole source field; few independent patches each).
    assert np.mean(facts["source_noise"]) > 0.5 * target.mock.sky_noise
    propagated, _ = derive.derive_cutout(field, plan, rng=None)
    inner = propagated[:, 4:-4, 4:-4]
    measured = [float(np.std(band)) / noise for band, noise in zip(inner, facts["source_noise"])]
    assert np.mean(measured) == pytest.approx(1.0, abs=0.12)


def test_noise_to_depth_subtracts_present_noise_in_quadrature():
    rng = np.random.default_rng(3)
    image = 0.4 * rng.standard_normal((1, 200, 200))
    noisy, added = flux.add_noise_to_depth(image, 1.0, 0.4, rng)
    assert added[0] == pytest.approx(np.sqrt(1.0 - 0.16))
    assert float(noisy.std()) == pytest.approx(1.0, rel=0.03)
    _, none = flux.add_noise_to_depth(image, 0.3, 0.4, rng)  # already noisier than the target: nothing added
    assert none[0] == 0.0


def test_resampling_conserves_flux():
    rng = np.random.default_rng(0)
    image = np.zeros((2, 60, 60))
    image[:, 10:50, 10:50] = rng.random((2, 40, 40))  # all flux well inside the output grid
    for to_scale in (0.37, 0.11, 0.031):  # non-integer coarser, and finer
        out = flux.resample_to_scale(image, 0.05, to_scale)
        assert out.shape[1:] == flux.resampled_shape(image.shape, 0.05, to_scale)[1:]
        assert out.shape[-1] * to_scale <= 60 * 0.05 + 1e-9  # angular size kept, never past the cutout
        np.testing.assert_allclose(out.sum(axis=(1, 2)), image.sum(axis=(1, 2)), rtol=1e-10)
    # An integer ratio is a plain block sum (astropy's block_reduce).
    np.testing.assert_allclose(flux.resample_to_scale(image, 0.1, 0.4), block_reduce(image, (1, 4, 4)), rtol=1e-12)


def test_matching_kernel_of_gaussians_is_the_analytic_gaussian():
    source, target = flux.PSF(0.3), flux.PSF(1.0)
    kernel = flux.psf_matching_kernel(source, target, 0.1)
    size = kernel.shape[0]
    analytic = flux.psf_image(flux.PSF(np.sqrt(1.0 - 0.09)), 0.1, size)
    assert np.abs(kernel - analytic).max() < 0.01 * analytic.max()


def test_a_sharper_target_is_refused(capsys):
    with pytest.raises(ValueError, match=r"hst PSF .*sharper than the sdss PSF"):
        derive.make_plan(SDSS, HST)
    assert derive.main(["--from", "sdss", "--like", "hst", "--out", "unused"]) == 2
    assert "error: the hst PSF" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--flux-scale"):
        derive.make_plan(load_survey("ukidss"), SDSS)  # adu has no AB zero point


def _labels(root: Path, survey: str) -> pd.DataFrame:
    frame = pd.read_parquet(root / survey / "labels.parquet")
    return frame.drop(columns=["key", "survey", "shard"]).sort_values("object_id").reset_index(drop=True)


def test_cli_derives_a_survey_that_builds_like_any_other(tmp_path, capsys):
    raw, out, root = tmp_path / "hst", tmp_path / "hst_as_sdss", tmp_path / "shards"
    assert mock_main(["--survey", "hst", "--num-galaxies", "6", "--out", str(raw), "--no-progress"]) == 0
    catalog = raw / Path(HST.catalog).name
    victim = sorted((raw / "images").glob("*_F606W.fits"))[2]
    victim.write_bytes(victim.read_bytes()[:3000])  # a truncated download: rejected and listed, never skipped
    args = ["--from", "hst", "--like", "sdss", "--catalog", str(catalog), "--images", str(raw / "images"),
            "--out", str(out), "--no-progress", "--seed", "5"]
    assert derive.main(args + ["--build-to", str(root)]) == 0
    rejects = pd.read_parquet(out / "rejects.parquet")
    assert rejects["reason"].tolist() == ["unreadable"] and victim.stem.split("_")[0] in rejects["object_id"].iat[0]
    assert not list(out.rglob("*.tmp"))

    survey = load_survey(out / "hst_as_sdss.yaml")
    assert (survey.name, survey.campaign, survey.bands) == ("hst_as_sdss", "hubble", HST.bands)
    assert (survey.pixel_scale_arcsec, survey.psf_fwhm_arcsec, survey.bunit) == (0.396, 1.4, "nanomaggy")
    assert survey.mock.cutout_px == 16  # 128 px x 0.05" fits 16 px of 0.396"
    state = json.loads((out / "derive.json").read_text())
    assert state["complete"] and state["num_derived"] == 5 and state["num_rejects"] == 1

    # The source through the same build: the derived survey has its accepted rows and identical labels.
    assert build.main(["--survey", "hst", "--catalog", str(catalog), "--images", str(raw / "images"),
                       "--out", str(root), "--no-progress"]) == 0
    manifests = {name: json.loads((root / name / "manifest.json").read_text()) for name in ("hst", "hst_as_sdss")}
    assert manifests["hst_as_sdss"]["num_samples"] == manifests["hst"]["num_samples"] == 5
    assert manifests["hst_as_sdss"]["survey_meta"]["pixel_scale_arcsec"] == 0.396
    pd.testing.assert_frame_equal(_labels(root, "hst_as_sdss"), _labels(root, "hst"))
    # Loaders take it like any other survey, and twins (the same galaxies) share splits across the two.
    assert [s.name for s in load_shard_root(root, ["hst", "hst_as_sdss"], "train")] == ["hst", "hst_as_sdss"]
    assert verify.main(["--across", str(root)]) == 0
    # Found by name beside its shards, as eval looks surveys up.
    assert load_survey("hst_as_sdss", shard_root=root) == load_survey(root / "hst_as_sdss" / "survey.yaml")
    with pytest.raises(ValueError, match="unknown survey 'hst_as_sdss'"):
        load_survey("hst_as_sdss")

    # A re-run resumes (nothing redone, same files); other arguments are refused without --overwrite.
    before = {p: p.read_bytes() for p in (out / "images").iterdir()}
    capsys.readouterr()
    assert derive.main(args) == 0
    assert "0 galaxies derived, 5 already there" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in (out / "images").iterdir()} == before
    assert derive.main([*args[:-1], "6"]) == 2
    assert "different arguments" in capsys.readouterr().err
