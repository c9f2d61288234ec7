"""Galaxy cutouts on disk: find a galaxy's image files, read FITS/JPEG/PNG as float bands, repair bad pixels."""

from __future__ import annotations

import gzip
import io
import math
import re
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from PIL import Image

IMAGE_SUFFIXES = (".fits", ".fits.gz", ".fits.fz", ".fit", ".jpg", ".jpeg", ".png")
MIN_SIDE_PX = 4
FILL_PASSES = 3  # NaN holes are filled from finite neighbours this many pixels deep, then with the band median
PLAIN_FLOAT_BITPIX = {-32: ">f4", -64: ">f8"}  # FITS stores big-endian IEEE floats
FITS_BLOCK = 2880  # FITS headers and data start on 2880-byte record boundaries
# astropy and PIL report corrupt or truncated files in all of these ways.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_UNREADABLE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, TypeError, IndexError, KeyError, MemoryError,
                      Image.DecompressionBombError)


def without_addresses(text: str) -> str:
    """A library message without in-memory object addresses ('<_io.BytesIO object at 0x7f...>'): the address
    would make two runs over the same inputs write different rejects tables and logs."""
    return _ADDRESS.sub("", text)


class ImageError(ValueError):
    """An input image that cannot be used; .reason is a short machine-friendly tag, str() a message naming the file."""

    def __init__(self, reason: str, message: str):
        super().__init__(without_addresses(message))
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
    if not Path(template).is_absolute() and ".." in Path(template).parts:
        # Absolute file_loc values (Zoobot-style catalogs) are the catalog's choice; a relative one stays inside.
        raise ImageError("bad-path", f"image path {template!r} for object {object_id!r} leaves the images folder "
                                     f"{images_dir} ('..'); give a path inside it, or an absolute one")
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
    return read_stack(paths)[0]


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


def _suffix_candidates(path: Path) -> list[Path]:
    """`path` first, then the same stem with every other known image suffix."""
    own = max((s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), key=len, default="")
    stem = path.name[:len(path.name) - len(own)]
    return [path] + [path.with_name(stem + suffix) for suffix in IMAGE_SUFFIXES if suffix != own]


def read_stack(paths: list[Path], draft_size: int | None = None) -> tuple[np.ndarray, bool]:
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
        notes = _warning_notes(caught)
        raise ImageError("unreadable", f"{path}: cannot read FITS ({type(exc).__name__}: {exc}{notes})") from exc
    if data is None:
        notes = _warning_notes(caught)
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


def _warning_notes(caught: list) -> str:
    """'; message' per distinct warning (astropy repeats its truncation warning once per access)."""
    return "".join(f"; {message}" for message in dict.fromkeys(str(w.message) for w in caught))


def _as_template(name: str, object_id: str, bands: list[str]) -> str:
    template = name.replace(object_id, "{id}")
    for band in sorted(bands, key=len, reverse=True):
        template = re.sub(rf"(?<![A-Za-z0-9]){re.escape(band)}(?![A-Za-z0-9])", "{band}", template, count=1)
    return template


def diagnose_missing(images_dir: Path, pattern: str, object_ids: list[str], bands: list[str],
                     max_files: int = 20000) -> str:
    """Why these objects' images are not found, with the --image-pattern that would find them where one does."""
    images_dir = Path(images_dir)
    files = []
    for path in sorted(images_dir.rglob("*")) if images_dir.is_dir() else []:
        if path.is_file():
            files.append(path.relative_to(images_dir).as_posix())
            if len(files) >= max_files:
                break
    tried = pattern.replace("{id}", object_ids[0]).replace("{band}", bands[0]) if object_ids else pattern
    lines = [f"none of the first {len(object_ids)} galaxies has an image under {images_dir} with the pattern "
             f"{pattern!r} (e.g. {images_dir / tried} does not exist)."]
    if not files:
        return " ".join(lines + [f"The folder {'is empty' if images_dir.is_dir() else 'does not exist'}."])
    candidates: dict[str, int] = {}
    for oid in object_ids:
        found = {_as_template(f, oid, bands) for f in files if oid and oid in Path(f).name}
        for template in found:
            candidates[template] = candidates.get(template, 0) + 1
    lines.append(f"It holds {len(files)}{'+' if len(files) >= max_files else ''} files such as "
                 f"{', '.join(files[:3])}.")
    for template, _ in sorted(candidates.items(), key=lambda kv: (-kv[1], kv[0])):
        hits = sum(image_found(images_dir, template, oid, bands) for oid in object_ids)
        if hits:
            lines.append(f"--image-pattern {template!r} finds {hits} of these {len(object_ids)}: pass it (or set "
                         f"image_pattern in the survey YAML, or give the catalog a file_loc column).")
            break
    else:
        lines.append("No file name contains these object ids: check --images, the id column, or add a file_loc "
                     "column to the catalog.")
    return " ".join(lines)


def image_found(images_dir: Path, pattern: str, object_id: str, bands: list[str], file_loc: str | None = None) -> bool:
    try:
        locate_images(images_dir, pattern, object_id, bands, file_loc)
        return True
    except ImageError:
        return False
