"""Locating and reading survey images: patterns, file_loc, FITS cubes/bands/gz/fz, PNG/JPEG, corrupt files."""

import gzip
import io
import pickle

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image

from sharding import images, render
from sharding.images import ImageError

from image_cases import (ASTROPY_DATA, galaxy_cube, write_fits, write_png, decode, reason_of)


def test_locate_by_pattern(tmp_path):
    target = write_fits(tmp_path / "sdss_42.fits", galaxy_cube())
    assert images.locate_images(tmp_path, "sdss_{id}.fits", "42", ["g", "r", "i"]) == [target]


def test_locate_by_band_pattern_keeps_band_order(tmp_path):
    for band in ("F814W", "F606W"):
        write_fits(tmp_path / f"7_{band}.fits", galaxy_cube()[0])
    paths = images.locate_images(tmp_path, "{id}_{band}.fits", "7", ["F606W", "F814W"])
    assert [p.name for p in paths] == ["7_F606W.fits", "7_F814W.fits"]


def test_file_loc_wins_over_pattern(tmp_path):
    write_fits(tmp_path / "9.fits", galaxy_cube())
    (tmp_path / "sub").mkdir()
    target = write_png(tmp_path / "sub" / "nine.png", np.zeros((8, 8, 3), np.uint8))
    assert images.locate_images(tmp_path, "{id}.fits", "9", ["g"], file_loc="sub/nine.png") == [target]
    # an absent file_loc (None, empty, NaN from a pandas column) falls back to the pattern
    for absent in (None, "", float("nan")):
        assert images.locate_images(tmp_path, "{id}.fits", "9", ["g"], file_loc=absent) == [tmp_path / "9.fits"]


@pytest.mark.parametrize("present", ["5.fits.gz", "5.fits.fz", "5.jpg", "5.png"])
def test_locate_falls_back_to_other_suffixes(tmp_path, present):
    (tmp_path / present).write_bytes(b"x")
    assert images.locate_images(tmp_path, "{id}.fits", "5", ["r"]) == [tmp_path / present]


def test_locate_prefers_the_pattern_suffix(tmp_path):
    for name in ("5.png", "5.fits.gz"):
        (tmp_path / name).write_bytes(b"x")
    assert images.locate_images(tmp_path, "{id}.fits.gz", "5", ["r"]) == [tmp_path / "5.fits.gz"]
    assert images.locate_images(tmp_path, "{id}.png", "5", ["r"]) == [tmp_path / "5.png"]


def test_missing_file_error_names_every_path_tried(tmp_path):
    with pytest.raises(ImageError) as excinfo:
        images.locate_images(tmp_path, "{id}.fits", "77", ["g"])
    assert reason_of(excinfo) == "missing-file"
    for suffix in images.IMAGE_SUFFIXES:
        assert str(tmp_path / f"77{suffix}") in str(excinfo.value)


def test_missing_band_file_is_missing_file(tmp_path):
    write_fits(tmp_path / "3_g.fits", galaxy_cube()[0])
    with pytest.raises(ImageError) as excinfo:
        images.locate_images(tmp_path, "{id}_{band}.fits", "3", ["g", "r"])
    assert reason_of(excinfo) == "missing-file"
    assert str(tmp_path / "3_r.fits") in str(excinfo.value)
    assert str(tmp_path / "3_g.fits") not in str(excinfo.value)


# --- read_image ------------------------------------------------------------------------------------------------

def test_read_fits_2d_and_cube(tmp_path):
    cube = galaxy_cube(size=20)
    flat = images.read_image([write_fits(tmp_path / "flat.fits", cube[1])])
    assert flat.shape == (1, 20, 20) and flat.dtype == np.float32
    np.testing.assert_array_equal(flat[0], cube[1])
    np.testing.assert_array_equal(images.read_image([write_fits(tmp_path / "cube.fits", cube)]), cube)
    # a degenerate leading axis (1, bands, H, W) is a cube too
    np.testing.assert_array_equal(images.read_image([write_fits(tmp_path / "4d.fits", cube[None])]), cube)


def test_plain_float_fits_fast_path_equals_astropy_and_leaves_the_rest_to_it(tmp_path):
    cube = galaxy_cube(size=20)
    cases = {"f32": cube, "f64": cube.astype(np.float64), "2d": cube[0], "4d": cube[None]}
    for name, data in cases.items():
        path = write_fits(tmp_path / f"{name}.fits", data)
        fast = images._read_plain_float_fits(path)
        assert fast is not None and fast.dtype == np.float32
        np.testing.assert_array_equal(fast, fits.getdata(path).astype(np.float32))
    scaled = fits.PrimaryHDU(np.arange(400, dtype=np.float32).reshape(20, 20))
    scaled.scale("int16", bscale=0.5, bzero=10.0)  # stored as (value - 10) / 0.5
    scaled.writeto(tmp_path / "scaled.fits")
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(cube)]).writeto(tmp_path / "ext.fits")
    whole = write_fits(tmp_path / "whole.fits", cube).read_bytes()
    (tmp_path / "cut.fits").write_bytes(whole[:len(whole) - 3000])
    for name in ("scaled", "ext", "cut"):
        assert images._read_plain_float_fits(tmp_path / f"{name}.fits") is None, name
    # the general reader takes over: scaling applied, the extension found, the truncation reported
    np.testing.assert_array_equal(images.read_image([tmp_path / "scaled.fits"])[0], np.arange(400).reshape(20, 20))
    np.testing.assert_array_equal(images.read_image([tmp_path / "ext.fits"]), cube)
    with pytest.raises(ImageError) as excinfo:
        images.read_image([tmp_path / "cut.fits"])
    assert reason_of(excinfo) == "unreadable" and "cut.fits" in str(excinfo.value)


def test_read_per_band_files_stacks_in_order(tmp_path):
    cube = galaxy_cube(size=16)
    paths = [write_fits(tmp_path / f"b{i}.fits", band) for i, band in enumerate(cube)]
    np.testing.assert_array_equal(images.read_image(paths), cube)
    np.testing.assert_array_equal(images.read_image(paths[::-1]), cube[::-1])


def test_per_band_shapes_must_agree(tmp_path):
    paths = [write_fits(tmp_path / "a.fits", np.ones((16, 16), np.float32)),
             write_fits(tmp_path / "b.fits", np.ones((16, 18), np.float32))]
    with pytest.raises(ImageError) as excinfo:
        images.read_image(paths)
    assert reason_of(excinfo) == "band-mismatch" and "b.fits" in str(excinfo.value)


def test_read_gzipped_fits(tmp_path):
    cube = galaxy_cube(size=16)
    plain = write_fits(tmp_path / "x.fits", cube)
    packed = tmp_path / "x.fits.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    np.testing.assert_array_equal(images.read_image([packed]), cube)


def test_read_tile_compressed_fits(tmp_path):
    data = np.arange(3 * 20 * 24, dtype=np.int16).reshape(3, 20, 24)
    path = tmp_path / "x.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, compression_type="RICE_1")]).writeto(path)
    np.testing.assert_array_equal(images.read_image([path]), data.astype(np.float32))


def test_astropy_real_files_rice_equals_plain():
    plain = images.read_image([ASTROPY_DATA / "m13.fits"])
    assert plain.shape == (1, 300, 300)
    np.testing.assert_array_equal(images.read_image([ASTROPY_DATA / "m13_rice.fits"]), plain)
    with_nan = images.read_image([ASTROPY_DATA / "compressed_with_nan.fits"])
    assert np.isnan(with_nan).any()
    assert np.isfinite(images.clean_pixels(with_nan)[0]).all()


def test_read_16bit_png(tmp_path):
    values = (np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) * 85).astype(np.uint16)
    values[0, 0] = 65535
    data = images.read_image([write_png(tmp_path / "deep.png", values)])
    assert data.shape == (1, 24, 32) and data.dtype == np.float32
    np.testing.assert_array_equal(data[0], values.astype(np.float32))
    rgb = decode(render.prepare_sample([tmp_path / "deep.png"], image_size=16, image_format="png")["png"])
    assert rgb.shape == (16, 16, 3) and np.array_equal(rgb[..., 0], rgb[..., 2]) and rgb.max() > rgb.min()


def test_read_jpeg_and_grey_png(tmp_path):
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[..., 0] = 200
    path = tmp_path / "x.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    data = images.read_image([path])
    assert data.shape == (3, 16, 24) and data.dtype == np.float32
    assert abs(data[0].mean() - 200) < 3 and data[2].mean() < 5  # R, G, B order
    grey = images.read_image([write_png(tmp_path / "grey.png", np.full((8, 8), 77, np.uint8))])
    np.testing.assert_array_equal(grey, np.full((3, 8, 8), 77, np.float32))


@pytest.mark.parametrize("keep", [0, 100, 2880, 5000, -3000])
def test_truncated_fits_is_unreadable(tmp_path, keep):
    raw = write_fits(tmp_path / "full.fits", galaxy_cube(size=40)).read_bytes()
    broken = tmp_path / "cut.fits"
    broken.write_bytes(raw[:keep])
    with pytest.raises(ImageError) as excinfo:
        images.read_image([broken])
    assert reason_of(excinfo) == "unreadable" and str(broken) in str(excinfo.value)


@pytest.mark.parametrize("name, content", [
    ("cut.fits.gz", lambda raw: gzip.compress(raw)[:500]),
    ("cut.fits.fz", None),
    ("cut.jpg", "jpeg"),
    ("noise.fits", lambda raw: b"not a fits file at all" * 200),
])
def test_corrupt_files_are_unreadable(tmp_path, name, content):
    cube = galaxy_cube(size=40)
    raw = write_fits(tmp_path / "full.fits", cube).read_bytes()
    path = tmp_path / name
    if content is None:
        fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(cube)]).writeto(tmp_path / "full.fits.fz")
        path.write_bytes((tmp_path / "full.fits.fz").read_bytes()[:6000])
    elif content == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(buffer, format="JPEG")
        path.write_bytes(buffer.getvalue()[:300])
    else:
        path.write_bytes(content(raw))
    with pytest.raises(ImageError) as excinfo:
        images.read_image([path])
    assert reason_of(excinfo) == "unreadable" and str(path) in str(excinfo.value)


def test_fits_without_image_and_bad_shapes(tmp_path):
    table = tmp_path / "table.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column("a", "E", array=[1.0])])]
                 ).writeto(table)
    with pytest.raises(ImageError) as excinfo:
        images.read_image([table])
    assert reason_of(excinfo) == "unreadable"
    for name, data in [("line.fits", np.ones(50, np.float32)), ("thin.fits", np.ones((50, 2), np.float32)),
                       ("4d.fits", np.ones((2, 3, 8, 8), np.float32))]:
        with pytest.raises(ImageError) as excinfo:
            images.read_image([write_fits(tmp_path / name, data)])
        assert reason_of(excinfo) == "bad-shape", name


def test_image_error_survives_pickle():
    err = pickle.loads(pickle.dumps(ImageError("unreadable", "x.fits: broken")))
    assert isinstance(err, ValueError) and err.reason == "unreadable" and str(err) == "x.fits: broken"


# --- clean_pixels ----------------------------------------------------------------------------------------------
