"""Rendering survey images: pixel cleaning, Lupton colour stretch, resizing, encoding, float cutouts."""

import io
import multiprocessing

import numpy as np
import pytest
from astropy.visualization import LuptonAsinhStretch, make_lupton_rgb
from PIL import Image, JpegImagePlugin

from sharding import images, render
from sharding.images import ImageError

from image_cases import (galaxy_cube, write_fits, write_png, decode, load_npy, reason_of)


def test_all_nan_and_constant_images_are_rejected():
    with pytest.raises(ImageError) as excinfo:
        images.clean_pixels(np.full((3, 8, 8), np.nan, np.float32))
    assert reason_of(excinfo) == "all-nan"
    with pytest.raises(ImageError) as excinfo:
        images.clean_pixels(np.zeros((3, 8, 8), np.float32))
    assert reason_of(excinfo) == "constant"
    partly = np.full((2, 8, 8), 4.0, np.float32)
    partly[0, :3] = np.nan
    partly[1] = np.inf  # no finite pixel in this band: the finite ones are all 4.0
    with pytest.raises(ImageError) as excinfo:
        images.clean_pixels(partly)
    assert reason_of(excinfo) == "constant"


def test_clean_replaces_nan_and_inf_sensibly():
    ramp = np.tile(np.arange(10, dtype=np.float32), (10, 1))[None].repeat(2, axis=0)  # value = column index
    dirty = ramp.copy()
    dirty[0, 5, 5] = np.nan  # isolated masked pixel: its neighbours' mean is the true value
    dirty[0, 0, 9] = np.inf  # saturated: the brightest finite value
    dirty[1, 3, 0] = -np.inf
    dirty[1, :, 2:4] = np.nan  # a masked column pair
    cleaned, stats = images.clean_pixels(dirty)
    assert np.isfinite(cleaned).all() and np.isnan(dirty[0, 5, 5])  # input untouched
    assert cleaned[0, 5, 5] == pytest.approx(5.0)
    assert cleaned[0, 0, 9] == 9.0 and cleaned[1, 3, 0] == 0.0
    np.testing.assert_allclose(cleaned[1, 1:-1, 2:4], ramp[1, 1:-1, 2:4], atol=1.0)
    assert stats["num_nan"] == 21 and stats["num_posinf"] == 1 and stats["num_neginf"] == 1
    assert stats["bad_fraction"] == pytest.approx(23 / 200)


def test_clean_empty_band_and_large_hole():
    data = galaxy_cube(size=32)
    data[0] = np.nan
    data[1, :, :20] = np.nan
    cleaned, stats = images.clean_pixels(data)
    assert stats["num_empty_bands"] == 1 and np.all(cleaned[0] == 0)
    assert np.isfinite(cleaned).all()
    assert abs(np.median(cleaned[1, :, :10])) < 0.05  # deep inside the hole: the band median, ~sky


def test_clean_is_a_no_op_on_good_data():
    data = galaxy_cube(size=16)
    cleaned, stats = images.clean_pixels(data)
    np.testing.assert_array_equal(cleaned, data)
    assert stats["bad_fraction"] == 0


# --- to_rgb8 ---------------------------------------------------------------------------------------------------

def centre_mean(rgb: np.ndarray) -> np.ndarray:
    height, width = rgb.shape[:2]
    return rgb[height // 2 - 4:height // 2 + 4, width // 2 - 4:width // 2 + 4].reshape(-1, 3).mean(axis=0)


def test_reddest_band_is_red():
    red_galaxy = render.to_rgb8(galaxy_cube(colours=(0.3, 1.0, 3.0)), False)
    assert red_galaxy.shape == (48, 48, 3) and red_galaxy.dtype == np.uint8
    r, g, b = centre_mean(red_galaxy)
    assert r > g > b and r > 1.5 * b
    r, g, b = centre_mean(render.to_rgb8(galaxy_cube(colours=(3.0, 1.0, 0.3)), False))
    assert b > g > r and b > 1.5 * r


def test_more_than_three_bands_uses_the_reddest_three():
    cube = galaxy_cube()
    ugriz = np.concatenate([galaxy_cube(colours=(50.0, 20.0), seed=1), cube])
    np.testing.assert_array_equal(render.to_rgb8(ugriz, False), render.to_rgb8(cube, False))


def test_two_bands_map_to_blue_and_red():
    r, g, b = centre_mean(render.to_rgb8(galaxy_cube(colours=(0.3, 3.0)), False))
    assert r > g > b
    r, g, b = centre_mean(render.to_rgb8(galaxy_cube(colours=(3.0, 0.3)), False))
    assert b > g > r


def test_one_band_is_grey():
    rgb = render.to_rgb8(galaxy_cube(colours=(1.0,)), False)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    assert rgb.max() > 200 and np.median(rgb) < 60


def test_stretch_ignores_units_and_sky_level():
    """Noise-normalised: a survey with 1000x the flux units and a sky pedestal renders the same."""
    cube = galaxy_cube(size=64)
    rescaled = cube.astype(np.float64) * 1000 + 250
    diff = render.to_rgb8(cube, False).astype(int) - render.to_rgb8(rescaled.astype(np.float32), False)
    assert np.abs(diff).max() <= 1


def test_bright_core_is_not_burnt_out_and_sky_is_dark():
    cube = galaxy_cube(size=64, flux=2500.0, noise=0.01, scale_px=3.0)  # core at ~20000 sigma
    rgb = render.to_rgb8(cube, False)
    assert (rgb.max(axis=2) == 255).mean() < 0.002
    core = rgb[32 - 3:32 + 3, 32 - 3:32 + 3].max(axis=2)
    assert core.min() > 150 and len(np.unique(core)) > 3  # bright with structure, not a flat blob
    sky = rgb[:8, :8].max(axis=2)
    assert sky.mean() < 40 and np.percentile(sky, 90) > 5  # dark, but the noise still shows


def test_matches_astropy_make_lupton_rgb():
    planes = render._colour_planes(galaxy_cube(size=32))
    stretch = LuptonAsinhStretch(stretch=8.0 * 2.0, Q=8.0)
    reference = make_lupton_rgb(*planes, stretch_object=stretch)
    intensity = planes.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.arcsinh(intensity / 2.0) / intensity * (0.1 / np.arcsinh(0.8))  # the same stretch, as to_rgb8 forms it
    gain[~(intensity > 0)] = 0.0
    ours = render._lupton_planes8(planes.copy(), gain.astype(np.float32)).transpose(1, 2, 0)
    assert np.abs(ours.astype(int) - reference).max() <= 1
    peak = planes.max(axis=0) * gain.astype(np.float32)  # render_planes hands the peak over precomputed
    np.testing.assert_array_equal(render._lupton_planes8(planes.copy(), gain.astype(np.float32), peak),
                                  ours.transpose(2, 0, 1))


def test_background_and_noise_estimates_with_a_galaxy_present():
    cube = galaxy_cube(size=128, flux=2000.0, noise=0.5)
    cube[0] += 3.0
    background, noise = render._background_and_noise(cube[0])
    assert background == pytest.approx(3.0, abs=0.1) and noise == pytest.approx(0.5, rel=0.1)


def test_noise_estimate_ignores_zero_padding():
    cube = galaxy_cube(size=96, flux=500.0, noise=0.2)
    cube[0, :, :50] = 0.0  # off the survey footprint
    background, noise = render._background_and_noise(cube[0])
    assert noise == pytest.approx(0.2, rel=0.15) and abs(background) < 0.05


def test_nan_inf_negative_and_saturated_pixels_render(tmp_path):
    cube = galaxy_cube(size=48, flux=500.0)
    cube[:, 20:28, 20:28] = 1e30  # saturated core
    cube[1, 0:5, :] = -1e4  # badly over-subtracted rows
    cube[0, 10, 10], cube[2, 11, 11], cube[1, 30, 3] = np.nan, np.inf, -np.inf
    cleaned, _ = images.clean_pixels(cube)
    rgb = render.to_rgb8(cleaned, False)
    assert rgb.shape == (48, 48, 3)
    assert (rgb[22:26, 22:26] > 200).all()  # saturated core is white-ish, not a hole
    assert rgb[40:, 40:].mean() < 60  # the sky stays dark


def test_8bit_rgb_passes_through():
    data = np.random.default_rng(0).integers(0, 256, (3, 10, 12)).astype(np.float32)
    rgb = render.to_rgb8(data, True)
    np.testing.assert_array_equal(rgb, data.transpose(1, 2, 0).astype(np.uint8))


# --- square_resize ---------------------------------------------------------------------------------------------

def test_square_resize_crops_the_centre():
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :10, 2] = 255  # blue side strips fall outside the central 40 x 40 square
    rgb[:, -10:, 2] = 255
    rgb[:, 10:50, 0] = 255
    out = render.square_resize(rgb, 24)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    assert out[..., 2].max() == 0 and out[..., 0].min() == 255


def test_square_resize_float_bands():
    planes = np.full((2, 30, 50), 3.5, np.float32)
    out = render.square_resize(planes, 16)
    assert out.shape == (2, 16, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out, 3.5, rtol=1e-5)
    assert render.square_resize(planes[0], 64).shape == (64, 64)


# --- prepare_sample --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, fmt", [(224, "jpg"), (256, "png"), (32, "jpg")])
def test_prepare_sample_size_format_and_determinism(tmp_path, size, fmt):
    path = write_fits(tmp_path / "g.fits", galaxy_cube(size=96))
    first = render.prepare_sample([path], image_size=size, image_format=fmt)
    assert set(first) == {fmt}
    assert decode(first[fmt]).shape == (size, size, 3)
    assert render.prepare_sample([path], image_size=size, image_format=fmt) == first


def test_prepare_sample_bytes_match_in_a_worker_process(tmp_path):
    path = write_fits(tmp_path / "g.fits", galaxy_cube(size=64))
    kwargs = {"image_size": 48, "keep_float": True}
    with multiprocessing.get_context("fork").Pool(1) as pool:
        remote = pool.apply(_prepare_kwargs, ([path], kwargs))
    assert remote == render.prepare_sample([path], **kwargs)


def _prepare_kwargs(paths, kwargs):
    return render.prepare_sample(paths, **kwargs)


def test_jpeg_settings(tmp_path):
    path = write_fits(tmp_path / "g.fits", galaxy_cube(size=64))
    high = render.prepare_sample([path], image_size=64, jpeg_quality=95)["jpg"]
    low = render.prepare_sample([path], image_size=64, jpeg_quality=40)["jpg"]
    full_colour = render.prepare_sample([path], image_size=64, jpeg_quality=95, jpeg_chroma="444")["jpg"]
    assert len(low) < len(high) < len(full_colour)
    assert JpegImagePlugin.get_sampling(Image.open(io.BytesIO(high))) == 2  # 4:2:0 by default
    assert JpegImagePlugin.get_sampling(Image.open(io.BytesIO(full_colour))) == 0  # 4:4:4 on request
    with pytest.raises(ValueError, match="jpeg_chroma"):
        render.prepare_sample([path], image_size=64, jpeg_chroma="422")


def test_keep_float_npy_round_trips(tmp_path):
    cube = galaxy_cube(size=64, flux=200.0)
    cube[0, 5, 5] = np.nan
    cube[2, 0, :] = 1e6  # beyond float16: clipped, not inf
    members = render.prepare_sample([write_fits(tmp_path / "g.fits", cube)], image_size=32, keep_float=True)
    assert set(members) == {"jpg", "npy"}
    stored = load_npy(members["npy"])
    assert stored.shape == (3, 32, 32) and stored.dtype == np.float16
    assert np.isfinite(stored).all() and stored.max() == np.float16(65504)
    expected = render.square_resize(images.clean_pixels(cube)[0], 32)
    np.testing.assert_allclose(stored[:2].astype(np.float32), expected[:2], rtol=2e-3, atol=2e-4)


def test_keep_float_same_size_is_exact_and_jpeg_sources_are_bluest_first(tmp_path):
    cube = galaxy_cube(size=32)
    stored = load_npy(render.prepare_sample([write_fits(tmp_path / "g.fits", cube)], image_size=32,
                                            keep_float=True)["npy"])
    np.testing.assert_array_equal(stored, cube.astype(np.float16))
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 10
    members = render.prepare_sample([write_png(tmp_path / "x.png", rgb)], image_size=32, keep_float=True)
    np.testing.assert_allclose(decode(members["jpg"]).mean(axis=(0, 1)), [200, 100, 10], atol=2)
    np.testing.assert_array_equal(load_npy(members["npy"])[:, 0, 0], [10, 100, 200])


def test_prepare_sample_from_per_band_files_and_jpeg(tmp_path):
    cube = galaxy_cube(size=60, colours=(0.3, 3.0))
    paths = [write_fits(tmp_path / f"7_{band}.fits", data) for band, data in zip(("F606W", "F814W"), cube)]
    members = render.prepare_sample(paths, image_size=40, keep_float=True)
    r, g, b = centre_mean(decode(members["jpg"]))
    assert r > g > b
    assert load_npy(members["npy"]).shape == (2, 40, 40)
    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (500, 700, 3), dtype=np.uint8)).save(big)
    assert decode(render.prepare_sample([big], image_size=64)["jpg"]).shape == (64, 64, 3)


def test_large_cutout_is_binned_and_rendered(tmp_path):
    path = write_fits(tmp_path / "big.fits", galaxy_cube(size=300, flux=3000.0))
    rgb = decode(render.prepare_sample([path], image_size=64, image_format="png")["png"])
    assert rgb.shape == (64, 64, 3)
    r, g, b = centre_mean(rgb)
    assert r > 150 and r > b and rgb[:6, :6].mean() < 60


def test_prepare_sample_errors_name_the_file(tmp_path):
    nan_path = write_fits(tmp_path / "nan.fits", np.full((3, 16, 16), np.nan, np.float32))
    with pytest.raises(ImageError) as excinfo:
        render.prepare_sample([nan_path], image_size=16)
    assert reason_of(excinfo) == "all-nan" and str(nan_path) in str(excinfo.value)
    zero_path = write_fits(tmp_path / "zero.fits", np.zeros((16, 16), np.float32))
    with pytest.raises(ImageError) as excinfo:
        render.prepare_sample([zero_path], image_size=16)
    assert reason_of(excinfo) == "constant" and str(zero_path) in str(excinfo.value)
    with pytest.raises(ImageError) as excinfo:
        render.prepare_sample([tmp_path / "absent.fits"], image_size=16)
    assert reason_of(excinfo) == "missing-file"


def test_bad_arguments_are_plain_value_errors(tmp_path):
    path = write_fits(tmp_path / "g.fits", galaxy_cube(size=16))
    for kwargs in ({"image_format": "webp"}, {"jpeg_quality": 0}, {"image_size": 0}):
        with pytest.raises(ValueError) as excinfo:
            render.prepare_sample([path], **{"image_size": 16, **kwargs})
        assert not isinstance(excinfo.value, ImageError)
