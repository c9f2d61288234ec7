"""Galaxy cutouts: find a galaxy's image files, read FITS/JPEG/PNG, clean bad pixels, stretch to 8-bit RGB, encode."""

from __future__ import annotations

import gzip
import io
import math
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from PIL import Image

IMAGE_SUFFIXES = (".fits", ".fits.gz", ".fits.fz", ".fit", ".jpg", ".jpeg", ".png")
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

MIN_SIDE_PX = 4
STATS_MAX_PIXELS = 4096  # background/noise come from a strided subsample of at most this many pixels
SOFTENING_SIGMA = 1.0  # asinh turns from linear to logarithmic at this many noise sigmas of the mean intensity
PEAK_FRACTION = 5e-4  # the brightest 0.05% of pixels may saturate (hot pixels, star cores), nothing more
MIN_PEAK_SIGMA = 30.0  # white is never fainter than this many sigmas, so a blank (pure noise) field stays dim
TINY = float(np.finfo(np.float32).tiny)
MAX_SIGMA = 1e12  # caps normalised pixels so float32 arithmetic in the stretch never overflows
FLOAT16_MAX = float(np.finfo(np.float16).max)
FILL_PASSES = 3  # NaN holes are filled from finite neighbours this many pixels deep, then with the band median
# astropy and PIL report corrupt or truncated files in all of these ways.
PLAIN_FLOAT_BITPIX = {-32: ">f4", -64: ">f8"}  # FITS stores big-endian IEEE floats
FITS_BLOCK = 2880  # FITS headers and data start on 2880-byte record boundaries
_UNREADABLE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, TypeError, IndexError, KeyError, MemoryError,
                      Image.DecompressionBombError)


class ImageError(ValueError):
    """An input image that cannot be used; .reason is a short machine-friendly tag, str() a message naming the file."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # worker processes send these back through pickle
        return type(self), (self.reason, str(self))


def locate_images(images_dir: Path, pattern: str, object_id: str, bands: list[str],
                  file_loc: str | None = None) -> list[Path]:
    """Paths of one galaxy's image: [cube_or_rgb_file] or one per band when `pattern` contains '{band}' (in band order).

    file_loc (relative to images_dir, from a catalog column) wins over the pattern when it is a non-empty string.
    A file that is not there is also looked for with the other IMAGE_SUFFIXES on the same stem.
    Raises ImageError('missing-file') naming every path tried.
    """
    template = file_loc.strip() if isinstance(file_loc, str) and file_loc.strip() else pattern
    template = template.replace("{id}", str(object_id))
    names = [template.replace("{band}", band) for band in bands] if "{band}" in template else [template]
    found: list[Path] = []
    missing: list[str] = []
    for name in names:
        candidates = _suffix_candidates(Path(images_dir) / name)
        hit = next((path for path in candidates if path.is_file()), None)
        if hit is None:
            missing.append(", ".join(str(path) for path in candidates))
        else:
            found.append(hit)
    if missing:
        raise ImageError("missing-file", f"no image file for object {object_id!r}; tried: " + "; ".join(missing))
    return found


def read_image(paths: list[Path]) -> np.ndarray:
    """float32 array (bands, H, W) of one galaxy; JPEG/PNG give (3, H, W) in R, G, B order (grey repeated).

    FITS: the first HDU with image data (also .fits.gz and tile-compressed CompImageHDU); 2-D -> 1 band,
    3-D cube (bands, H, W); one file per band are stacked (shapes must agree). 8-bit images hold 0..255,
    16-bit greyscale PNG 0..65535 as one band (PIL decodes 16-bit RGB PNG as 8-bit RGB).
    Raises ImageError: 'unreadable', 'bad-shape', 'band-mismatch'.
    """
    return _read_stack(paths)[0]


def clean_pixels(data: np.ndarray) -> tuple[np.ndarray, dict]:
    """Replace NaN/inf so the stretch works; returns (cleaned float32 copy or `data` itself, stats).

    +inf (saturated) becomes the band's brightest finite value, -inf its faintest, NaN (masked) the mean of
    its finite neighbours (holes deeper than FILL_PASSES: the band median); a band with no finite pixel is 0.
    Raises ImageError('all-nan') when no pixel is finite, ('constant') when all finite pixels are equal.
    """
    data = np.asarray(data, dtype=np.float32)
    finite = np.isfinite(data)
    num_finite = int(np.count_nonzero(finite))
    if num_finite == 0:
        raise ImageError("all-nan", f"no finite pixel in a {data.shape} image (all NaN/inf)")
    stats = {"bad_fraction": 1.0 - num_finite / data.size, "num_nan": 0, "num_posinf": 0, "num_neginf": 0,
             "num_empty_bands": 0}
    if num_finite == data.size:  # the usual case: no counting passes, and a constant image is rare
        first = data.flat[0]
        if (data.flat[:: max(1, data.size // 4096)] == first).all() and (data == first).all():
            raise ImageError("constant", f"all {data.size} pixels equal {float(first)!r}")
        return data, stats
    stats["num_nan"] = int(np.count_nonzero(np.isnan(data)))
    stats["num_posinf"] = int(np.count_nonzero(data == np.inf))
    stats["num_neginf"] = data.size - num_finite - stats["num_nan"] - stats["num_posinf"]
    out = data.copy()
    extremes = []
    for band, good in zip(out, finite):
        if not good.any():
            band[...] = 0.0
            stats["num_empty_bands"] += 1
            continue
        values = band[good]
        low, high = float(values.min()), float(values.max())
        extremes += [low, high]
        band[band == np.inf] = high
        band[band == -np.inf] = low
        _fill_nan(band, float(np.median(values)))
    if min(extremes) == max(extremes):
        raise ImageError("constant", f"all {num_finite} finite pixels equal {extremes[0]!r}")
    return out, stats


def to_rgb8(data: np.ndarray, is_8bit_rgb: bool) -> np.ndarray:
    """(H, W, 3) uint8 rendering of (bands, H, W) data whose band order is bluest first.

    8-bit RGB (JPEG/PNG, channels R, G, B) passes through. Float data: each band has its background
    subtracted and is divided by its noise (robust order statistics on a subsample, so sky noise looks
    alike across images and surveys), then the Lupton et al. (2004) colour-preserving asinh stretch
    (astropy's make_lupton_rgb / LuptonAsinhStretch arithmetic, in fewer passes; a test checks equality) with the
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
    """Centre-crop to a square, then resize to size x size with PIL (bicubic, box pre-reduction when shrinking a lot).

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
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if image_size < 1 or not 1 <= jpeg_quality <= 100 or jpeg_chroma not in JPEG_CHROMA:
        raise ValueError(f"need image_size >= 1, jpeg_quality in 1..100 and jpeg_chroma in {list(JPEG_CHROMA)}, "
                         f"got {image_size}, {jpeg_quality}, {jpeg_chroma!r}")
    data, is_8bit_rgb = _read_stack(paths, draft_size=image_size)
    try:
        data, _ = clean_pixels(data)
        square = _centre_square(data)
        factor = square.shape[-1] // image_size
        # Binning a much larger cutout before the stretch saves work; noise is measured after binning anyway.
        binned = _bin_down(square, factor) if factor >= 2 and not is_8bit_rgb else square
        rgb = _resized(Image.merge("RGB", [Image.fromarray(plane) for plane in render_planes(binned, is_8bit_rgb)]),
                       image_size)
    except ImageError as err:
        raise ImageError(err.reason, f"{', '.join(map(str, paths))}: {err}") from None
    members = {image_format: _encode(rgb, image_format, jpeg_quality, jpeg_chroma)}
    if keep_float:
        planes = _resize_float_bands(square[::-1] if is_8bit_rgb else square, image_size)
        buffer = io.BytesIO()
        np.save(buffer, np.clip(planes, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16), allow_pickle=False)
        members["npy"] = buffer.getvalue()
    return members


def _suffix_candidates(path: Path) -> list[Path]:
    """`path` first, then the same stem with every other known image suffix."""
    own = max((s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), key=len, default="")
    stem = path.name[:len(path.name) - len(own)]
    return [path] + [path.with_name(stem + suffix) for suffix in IMAGE_SUFFIXES if suffix != own]


def _read_stack(paths: list[Path], draft_size: int | None = None) -> tuple[np.ndarray, bool]:
    """(bands, H, W) float32 and whether it is an 8-bit RGB picture (JPEG/PNG) rather than science data."""
    if not paths:
        raise ImageError("missing-file", "no image paths given")
    parts = [_read_one(Path(path), draft_size) for path in paths]
    if len(parts) == 1:
        data, is_8bit = parts[0]
        if is_8bit and data.shape[0] == 1:
            data = np.repeat(data, 3, axis=0)
        return data, is_8bit
    for path, (data, _) in zip(paths, parts):
        if data.shape[0] != 1:
            raise ImageError("bad-shape", f"{path}: a per-band file must hold one band, it holds {data.shape[0]}")
    shapes = {tuple(data.shape[1:]) for data, _ in parts}
    if len(shapes) > 1:
        listing = ", ".join(f"{path} {data.shape[1:]}" for path, (data, _) in zip(paths, parts))
        raise ImageError("band-mismatch", f"per-band images differ in shape: {listing}")
    return np.concatenate([data for data, _ in parts]), False


def _read_one(path: Path, draft_size: int | None) -> tuple[np.ndarray, bool]:
    """One file, whatever its suffix says: the content's magic bytes pick the reader."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
            # Plain FITS is opened by path below: reading it into bytes first would copy it twice.
            raw = magic if magic == b"SIMPLE" else magic + f.read()
    except OSError as exc:
        raise ImageError("missing-file" if not path.exists() else "unreadable", f"{path}: {exc}") from exc
    if not raw:
        raise ImageError("unreadable", f"{path}: empty file")
    if raw[:2] == b"\x1f\x8b":
        # gzip.decompress in memory is ~2x faster than astropy streaming the gzip file.
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, ValueError) as exc:
            raise ImageError("unreadable", f"{path}: corrupt gzip ({type(exc).__name__}: {exc})") from exc
    if raw[:6] == b"SIMPLE":
        data, is_8bit = _read_fits(path if len(raw) == 6 else io.BytesIO(raw), path), False
    else:
        data, is_8bit = _read_pil(raw, path, draft_size)
    if min(data.shape[1:]) < MIN_SIDE_PX:
        raise ImageError("bad-shape", f"{path}: image of shape {data.shape} is smaller than {MIN_SIDE_PX} px")
    return data, is_8bit


def _read_fits(source: Path | io.BytesIO, path: Path) -> np.ndarray:
    """The first HDU with image data as (bands, H, W) float32; leading length-1 axes are dropped."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = _read_plain_float_fits(source) if isinstance(source, Path) else None
        if data is None:
            data = _read_fits_astropy(source, path, caught)
    while data.ndim > 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ImageError("bad-shape", f"{path}: FITS image has shape {data.shape}; expected (H, W) or (bands, H, W)")
    return data


def _read_plain_float_fits(path: Path) -> np.ndarray | None:
    """A float primary image straight from the bytes after astropy's header parser; None for anything else.

    Survey cutouts are mostly this one case, and astropy's HDUList machinery costs ~1 ms per file, as much
    as rendering the galaxy. Integer, scaled, compressed, extension-only and truncated files return None and
    go through astropy's general reader (which also words their errors).
    """
    try:
        with open(path, "rb") as f:
            header = fits.Header.fromfile(f)
            offset = f.tell()
            naxis = header.get("NAXIS", 0)
            if (header.get("SIMPLE") is not True or header.get("BITPIX") not in PLAIN_FLOAT_BITPIX
                    or not isinstance(naxis, int) or not 2 <= naxis <= 4
                    or header.get("BSCALE", 1) != 1 or header.get("BZERO", 0) != 0 or offset % FITS_BLOCK):
                return None
            shape = tuple(int(header[f"NAXIS{axis}"]) for axis in range(naxis, 0, -1))
            count = math.prod(shape)
            if min(shape) < 1:
                return None
            data = np.fromfile(f, dtype=PLAIN_FLOAT_BITPIX[header["BITPIX"]], count=count)
    except (*_UNREADABLE_ERRORS, fits.VerifyError):
        return None
    return data.reshape(shape).astype(np.float32) if data.size == count else None


def _read_fits_astropy(source: Path | io.BytesIO, path: Path, caught: list) -> np.ndarray:
    try:
        with fits.open(source, memmap=False) as hdul:
            hdu = next((h for h in hdul if h.is_image and h.data is not None), None)
            data = None if hdu is None else np.array(hdu.data, dtype=np.float32)
    except _UNREADABLE_ERRORS as exc:
        notes = "".join(f"; {w.message}" for w in caught)
        raise ImageError("unreadable", f"{path}: cannot read FITS ({type(exc).__name__}: {exc}{notes})") from exc
    if data is None:
        notes = "".join(f"; {w.message}" for w in caught)
        raise ImageError("unreadable", f"{path}: no HDU with image data{notes}")
    return data


def _read_pil(raw: bytes, path: Path, draft_size: int | None) -> tuple[np.ndarray, bool]:
    """(channels, H, W) float32 and is-8-bit; JPEGs much larger than draft_size decode at 1/2, 1/4 or 1/8 scale."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if draft_size and img.format == "JPEG":
                img.draft(img.mode, (draft_size, draft_size))
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                return np.asarray(img, dtype=np.float32)[None], False
            if img.mode not in ("L", "RGB"):
                img = img.convert("RGB")
            pixels = np.asarray(img, dtype=np.float32)
    except _UNREADABLE_ERRORS as exc:
        raise ImageError("unreadable", f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    return (pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)), True


def _fill_nan(band: np.ndarray, fallback: float) -> None:
    """In place: each NaN becomes the mean of its finite 3x3 neighbours, a few passes deep, then `fallback`."""
    for _ in range(FILL_PASSES):
        bad = np.isnan(band)
        if not bad.any():
            return
        good = ~bad
        values = np.pad(np.where(good, band, 0.0), 1)
        counts = np.pad(good.astype(np.float32), 1)
        height, width = band.shape
        total = sum(values[i:i + height, j:j + width] for i in range(3) for j in range(3))
        num = sum(counts[i:i + height, j:j + width] for i in range(3) for j in range(3))
        fillable = bad & (num > 0)
        band[fillable] = total[fillable] / num[fillable]
    band[np.isnan(band)] = fallback


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
    as a whole so that its hue survives; both scalings are folded into one per-pixel factor. Consumes `planes`.
    """
    factor = planes.max(axis=0) * gain if peak is None else peak.copy()
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
