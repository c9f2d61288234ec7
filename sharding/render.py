"""Rendering a galaxy for the shards: noise-normalised Lupton asinh stretch to 8-bit RGB, resize, encode."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from sharding.images import ImageError, clean_pixels, read_stack

IMAGE_FORMATS = ("jpg", "png")

# PIL's subsampling codes: 4:4:4 keeps full-resolution colour (colour gradients a few pixels wide stay
# sharp); 4:2:0, libjpeg's and the survey cutout services' default, encodes and decodes faster and makes
# smaller shards, with colour at half resolution and brightness, which morphology mostly rests on, untouched.
JPEG_CHROMA = {"444": 0, "420": 2}
# zlib level 1: PNG members are ~10% larger than at level 6 but encode ~3x faster; a fixed level keeps bytes stable.
PNG_COMPRESS_LEVEL = 1
# Bilinear (PIL widens its support when shrinking, so it anti-aliases): half bicubic's cost, and the
# loaders resample bilinearly anyway.
RESAMPLE = Image.Resampling.BILINEAR
# PIL first box-reduces by an integer factor while the image stays >= 3x the target: fast and alias-free.
REDUCING_GAP = 3.0

STATS_MAX_PIXELS = 4096  # background/noise come from a strided subsample of at most this many pixels
SOFTENING_SIGMA = 1.0  # asinh turns from linear to logarithmic at this many noise sigmas of the mean intensity
PEAK_FRACTION = 5e-4  # the brightest 0.05% of pixels may saturate (hot pixels, star cores), nothing more
MIN_PEAK_SIGMA = 30.0  # white is never fainter than this many sigmas, so a blank (pure noise) field stays dim
TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32: the intensity floor that avoids 0 / 0
MAX_SIGMA = 1e12  # caps normalised pixels so float32 arithmetic in the stretch never overflows
FLOAT16_MAX = float(np.finfo(np.float16).max)


def to_rgb8(data: np.ndarray, is_8bit_rgb: bool) -> np.ndarray:
    """(H, W, 3) uint8 rendering of (bands, H, W) data whose band order is bluest first.

    8-bit RGB (JPEG/PNG, channels R, G, B) passes through. Float data: each band has its background
    subtracted and is divided by its noise (robust order statistics on a subsample, so sky noise looks
    alike across images and surveys), then the Lupton et al. (2004) colour-preserving asinh stretch
    (astropy's make_lupton_rgb / LuptonAsinhStretch arithmetic in fewer passes; a test holds it to 1 level) with the
    softening at SOFTENING_SIGMA and Q chosen so that only the brightest PEAK_FRACTION of pixels saturate: cores
    are not burnt out. 1 band -> grey; 2 bands -> (R, G, B) = (b2, mean, b1); >= 3 bands -> the reddest three,
    reddest = R.
    """
    return np.ascontiguousarray(render_planes(data, is_8bit_rgb).transpose(1, 2, 0))


def render_planes(data: np.ndarray, is_8bit_rgb: bool) -> np.ndarray:
    """to_rgb8 as (3, H, W) R, G, B planes: PIL merges planes into RGB faster than numpy interleaves them."""
    if data.ndim != 3 or min(data.shape[1:]) < 1:
        raise ImageError("bad-shape", f"expected (bands, H, W) data, got shape {data.shape}")
    if is_8bit_rgb:
        if data.shape[0] != 3:
            raise ImageError("bad-shape", f"8-bit RGB data must have 3 channels, got shape {data.shape}")
        return np.clip(data, 0, 255).astype(np.uint8)
    planes = _colour_planes(data)
    intensity = planes[0] + planes[1]
    intensity += planes[2]
    intensity *= np.float32(1.0 / 3.0)
    # LuptonAsinhStretch(stretch=Q * softening, Q) maps I to asinh(I / softening) * 0.1 / asinh(0.1 Q):
    # asinh(I / softening) / I is computed once and serves both the choice of Q and the stretch itself.
    # I <= 0 renders black; multiplying by the mask is several times faster than a masked assignment.
    safe = np.maximum(intensity, np.float32(TINY))  # asinh(x) / x -> 1 for x -> 0, so tiny I is exact too
    ratio = np.arcsinh(safe * np.float32(1.0 / SOFTENING_SIGMA))
    ratio /= safe
    ratio *= intensity > 0
    peak = planes.max(axis=0)
    peak *= ratio  # each pixel's brightest channel after the stretch, up to the slope
    slope = np.float32(0.1 / math.asinh(0.1 * _lupton_q(peak)))  # LuptonAsinhStretch's slope
    ratio *= slope
    peak *= slope
    return _lupton_planes8(planes, ratio, peak)


def square_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square, then resize to size x size with PIL (bilinear, box pre-reduction when shrinking a lot).

    (H, W, 3) uint8 RGB -> (size, size, 3) uint8; (bands, H, W) or (H, W) float -> float32 of the same layout.
    """
    if img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
        return np.asarray(_resized_rgb_image(img, size))
    planes = np.asarray(img, dtype=np.float32)
    if planes.ndim == 2:
        return _resize_float_bands(planes[None], size)[0]
    if planes.ndim != 3:
        raise ValueError(f"square_resize takes (H, W, 3) uint8 or (bands, H, W) float, got {img.dtype} {img.shape}")
    return _resize_float_bands(planes, size)


def prepare_sample(paths: list[Path], *, image_size: int, image_format: str = "jpg", keep_float: bool = False,
                   jpeg_quality: int = 95, jpeg_chroma: str = "420") -> dict[str, bytes]:
    """One galaxy's webdataset members: {'jpg' or 'png': 8-bit RGB bytes} plus, with keep_float, {'npy': bytes}.

    The npy member is np.save of the cleaned (bands, image_size, image_size) float16 cutout (bluest band
    first; for 8-bit RGB sources the channels B, G, R in 0..255), clipped to the float16 range.
    Deterministic: identical input gives identical bytes. Raises ImageError on unusable input, ValueError
    on bad arguments.
    """
    _check_render_args(image_size, image_format, jpeg_quality, jpeg_chroma)
    data, is_8bit_rgb = read_stack(paths, draft_size=image_size)
    return render_sample(data, is_8bit_rgb, image_size=image_size, image_format=image_format, keep_float=keep_float,
                         jpeg_quality=jpeg_quality, jpeg_chroma=jpeg_chroma, source=", ".join(map(str, paths)))


def render_sample(data: np.ndarray, is_8bit_rgb: bool, *, image_size: int, image_format: str = "jpg",
                  keep_float: bool = False, jpeg_quality: int = 95, jpeg_chroma: str = "420",
                  source: str = "image") -> dict[str, bytes]:
    """prepare_sample's members from (bands, H, W) data already read (read_stack's output, or an upload held in
    memory that the service read itself): the same bytes prepare_sample writes for the same pixels. `source`
    names the input in ImageError messages."""
    _check_render_args(image_size, image_format, jpeg_quality, jpeg_chroma)
    try:
        data, _ = clean_pixels(data)
        square = _centre_square(data)
        rgb = _rendered_square(square, is_8bit_rgb, image_size)
    except ImageError as err:
        raise ImageError(err.reason, f"{source}: {err}") from None
    members = {image_format: _encode(rgb, image_format, jpeg_quality, jpeg_chroma)}
    if keep_float:
        planes = _resize_float_bands(square[::-1] if is_8bit_rgb else square, image_size)
        buffer = io.BytesIO()
        np.save(buffer, np.clip(planes, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16), allow_pickle=False)
        members["npy"] = buffer.getvalue()
    return members


def _check_render_args(image_size: int, image_format: str, jpeg_quality: int, jpeg_chroma: str) -> None:
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if image_size < 1 or not 1 <= jpeg_quality <= 100 or jpeg_chroma not in JPEG_CHROMA:
        raise ValueError(f"need image_size >= 1, jpeg_quality in 1..100 and jpeg_chroma in {list(JPEG_CHROMA)}, "
                         f"got {image_size}, {jpeg_quality}, {jpeg_chroma!r}")


def render_float(data: np.ndarray, image_size: int) -> np.ndarray:
    """(3, image_size, image_size) uint8 R, G, B planes of (bands, H, W) float fluxes, rendered as the build renders
    a FITS cutout (cleaned, centre square, binned, stretched, resized): for images altered in flux (eval robustness)."""
    cleaned, _ = clean_pixels(data)
    rgb = _rendered_square(_centre_square(cleaned), False, image_size)
    return np.ascontiguousarray(np.asarray(rgb).transpose(2, 0, 1))


def _rendered_square(square: np.ndarray, is_8bit_rgb: bool, image_size: int) -> Image.Image:
    factor = square.shape[-1] // image_size
    # Binning a much larger cutout before the stretch saves work; noise is measured after binning anyway.
    binned = _bin_down(square, factor) if factor >= 2 and not is_8bit_rgb else square
    return _resized(Image.merge("RGB", [Image.fromarray(plane) for plane in render_planes(binned, is_8bit_rgb)]),
                    image_size)


def _colour_planes(data: np.ndarray) -> np.ndarray:
    """Noise-normalised (red, green, blue) planes, (3, H, W) float32, from bands ordered bluest first."""
    chosen = data[-3:][::-1] if data.shape[0] >= 3 else data[::-1]  # reddest first from here on
    planes = np.empty(chosen.shape, dtype=np.float32)
    for out, band in zip(planes, chosen):
        background, noise = _background_and_noise(band)
        np.subtract(band, np.float32(background), out=out)
        out *= np.float32(min(1.0 / noise, MAX_SIGMA))
    np.clip(planes, -MAX_SIGMA, MAX_SIGMA, out=planes)
    if planes.shape[0] == 1:
        return np.repeat(planes, 3, axis=0)
    if planes.shape[0] == 2:
        red, blue = planes
        return np.stack((red, (red + blue) * 0.5, blue))
    return planes


def _lupton_q(reach: np.ndarray) -> float:
    """The Lupton Q that, with stretch = Q * SOFTENING_SIGMA, maps the bright end of the brightest channel to 1.

    Lupton maps a pixel's brightest channel M to M asinh(I / softening) / I * 0.1 / asinh(0.1 Q), so
    asinh(0.1 Q) = 0.1 * (bright end of `reach` = M asinh(I / softening) / I). Measuring M rather than I keeps
    strongly coloured cores (a red bulge) from saturating in their dominant channel. The bright end comes
    from every other row and column: a quarter of the pixels, the same percentile.
    """
    top = max(_bright_end(reach[::2, ::2]), math.asinh(MIN_PEAK_SIGMA / SOFTENING_SIGMA))
    return 10.0 * math.sinh(top / 10.0)


def _lupton_planes8(planes: np.ndarray, gain: np.ndarray, peak: np.ndarray | None = None) -> np.ndarray:
    """Lupton et al. (2004) colour-preserving mapping, as astropy's make_lupton_rgb, in (3, H, W) uint8 planes.

    Every channel is scaled by f(I) / I of the mean intensity I (`gain`, >= 0), clipped at 0, and a pixel whose
    brightest channel (`peak`: max over channels times gain, when the caller has it) passes 1 is scaled down
    as a whole so that its hue survives; both scalings are folded into one per-pixel factor. Consumes `planes`
    and `peak`.
    """
    factor = planes.max(axis=0) * gain if peak is None else peak
    np.maximum(factor, 1.0, out=factor)
    np.divide(gain, factor, out=factor)
    factor *= np.float32(255.0)
    planes *= factor
    np.maximum(planes, 0.0, out=planes)
    return planes.astype(np.uint8)  # truncates like make_lupton_rgb


def _background_and_noise(band: np.ndarray) -> tuple[float, float]:
    """Sky level and noise sigma from the lower half of the pixel distribution, which galaxy light barely touches.

    One 3-sigma clip of the bright side, then median and (median - 15.87th percentile): as robust as
    sigma_clipped_stats for a centred galaxy, on a strided subsample sorted once (the clipped set is a prefix).
    """
    step = max(1, math.ceil(math.sqrt(band.size / STATS_MAX_PIXELS)))
    sample = band[::step, ::step].ravel()
    nonzero = sample[sample != 0]
    if nonzero.size < 0.9 * sample.size and nonzero.size >= 64:
        sample = nonzero  # exact zeros are padding (off-footprint, chip gaps), not sky
    ordered = np.sort(sample)  # numpy's vectorised sort beats partition at this size
    low, median = _order_statistics(ordered)
    if median > low:
        low, median = _order_statistics(ordered[:np.searchsorted(ordered, median + 3.0 * (median - low))])
    noise = float(median - low)
    if not noise > 0:
        noise = float(sample.std()) or 1.0
    return float(median), noise


def _order_statistics(ordered: np.ndarray) -> tuple[float, float]:
    """The 15.87th percentile and the median of sorted values, without interpolation."""
    last = ordered.size - 1
    return float(ordered[int(0.1587 * last)]), float(ordered[int(0.5 * last)])


def _bright_end(values: np.ndarray) -> float:
    """The value that only the brightest PEAK_FRACTION of pixels exceed."""
    flat = values.ravel()
    rank = flat.size - 1 - int(flat.size * PEAK_FRACTION)
    return float(np.partition(flat, rank)[rank])


def _square_slices(height: int, width: int) -> tuple[slice, slice]:
    """Rows and columns of the central square."""
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return slice(top, top + side), slice(left, left + side)


def _centre_square(data: np.ndarray) -> np.ndarray:
    return data[(..., *_square_slices(*data.shape[-2:]))]


def _bin_down(data: np.ndarray, factor: int) -> np.ndarray:
    """Mean of factor x factor blocks of (bands, S, S) data (edge rows/columns that do not fill a block dropped)."""
    bands, side = data.shape[0], data.shape[-1] // factor * factor
    blocks = data[:, :side, :side].reshape(bands, side // factor, factor, side // factor, factor)
    return blocks.mean(axis=(2, 4), dtype=np.float32)


def _resized_rgb_image(rgb: np.ndarray, size: int) -> Image.Image:
    return _resized(Image.fromarray(np.ascontiguousarray(rgb[_square_slices(*rgb.shape[:2])])), size)


def _resized(img: Image.Image, size: int) -> Image.Image:
    return img if img.size == (size, size) else img.resize((size, size), RESAMPLE, reducing_gap=REDUCING_GAP)


def _resize_float_bands(data: np.ndarray, size: int) -> np.ndarray:
    """(bands, H, W) -> (bands, size, size) float32, centre-cropped, each band resized as a PIL 'F' image."""
    square = _centre_square(data)
    if square.shape[-1] == size:
        return np.ascontiguousarray(square, dtype=np.float32)
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(band, dtype=np.float32))
                                .resize((size, size), RESAMPLE, reducing_gap=REDUCING_GAP)) for band in square])


def _encode(img: Image.Image, image_format: str, jpeg_quality: int, jpeg_chroma: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpg":
        img.save(buffer, format="JPEG", quality=jpeg_quality, subsampling=JPEG_CHROMA[jpeg_chroma],
                 optimize=False)
    else:
        img.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()
