"""The service's uploads: validated, read from memory and turned into the model's input tensors.

One path from bytes to features, shared with `eval predict`: a JPEG/PNG (an 8-bit rendering as the shards hold it)
goes through loaders.evaluation.plain_image; a FITS cutout in flux (bands bluest first, as the build reads them) is
rendered with sharding.render.render_sample, the build's own cleaning, Lupton stretch, resize and JPEG encoding, at
the size the model's training shards of that survey were built at, and then takes the JPEG's path.

Size policy: an image whose shorter side is below the model's input size is refused (the model would see a
blurrier galaxy than it was trained on, which `eval predict` also refuses for shards); an 8-bit image must be
square (the shards hold square renderings: crop it, or send the FITS and let the service render it); a FITS
cutout may be rectangular (the build centre-crops it) and larger than the render size (the build bins and
resizes it). Nothing here touches the filesystem: a filename is a label echoed in messages and answers.
"""

from __future__ import annotations

import io
import math
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from astropy.io import fits
from PIL import Image

from eval.source import InputSpec, ModelSource
from loaders.evaluation import plain_image
from loaders.source import CorruptSample, LoaderConfig, check_image
from sharding.images import MIN_SIDE_PX, ImageError
from sharding.registry import SurveyConfig
from sharding.render import render_sample

MAX_SIDE_PX = 4096  # an upload's pixels are bounded as its bytes are: a small PNG can declare a huge canvas
MAX_BANDS = 16
MAX_FITS_BYTES = 256 * 2**20  # decompressed .fits.gz; 8 MB of gzip can hold gigabytes of zeros
JPEG_QUALITY, JPEG_CHROMA = 95, "420"  # sharding.build's defaults, which the catalog input of eval predict uses
_OTHER_FORMATS = {b"GIF8": "GIF", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"RIFF": "WebP/RIFF",
                  b"%PDF": "PDF", b"PK\x03\x04": "ZIP", b"\x00\x00\x00\x0cjP": "JPEG 2000"}
_FITS_ERRORS = (OSError, ValueError, EOFError, TypeError, IndexError, KeyError, MemoryError, fits.VerifyError)


class InputError(ValueError):
    """A request the service refuses: HTTP status, a short machine-friendly reason and a message saying the fix."""

    def __init__(self, status: int, reason: str, message: str, filename: str | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.filename = status, reason, filename


@dataclass(frozen=True)
class Upload:
    filename: str  # echoed in answers and messages, never opened
    data: bytes


@dataclass(frozen=True)
class Decoded:
    filename: str
    image: torch.Tensor  # (3, S, S) float32, normalised as the model was trained
    kind: str  # jpeg, png or fits


@dataclass(frozen=True)
class DecodeSettings:
    """How uploads become inputs for one model: its input spec and, per survey, the FITS rendering size and format."""
    input: InputSpec
    render_sizes: dict[str, int]
    render_formats: dict[str, str]

    @property
    def min_side_px(self) -> int:
        return max(MIN_SIDE_PX, self.input.image_size)

    def loader_config(self) -> LoaderConfig:
        return LoaderConfig(backend="torch", image_size=self.input.image_size, mean=self.input.mean,
                            std=self.input.std)


def decode_settings(source: ModelSource, surveys: dict[str, SurveyConfig],
                    render_size: int | None = None) -> DecodeSettings:
    """A survey the model trained on renders at its shards' size (its provenance), any other at its YAML's size,
    as `sharding.build` would; `render_size` overrides both."""
    trained = source.provenance.get("surveys", {})
    sizes, formats = {}, {}
    for name, survey in surveys.items():
        built = trained.get(name, {})
        sizes[name] = int(render_size or built.get("image_size") or survey.image_size)
        formats[name] = built.get("image_format") or "jpg"
    return DecodeSettings(source.input_spec(), sizes, formats)


def pick_survey(name: str | None, surveys: dict[str, SurveyConfig]) -> SurveyConfig:
    known = ", ".join(sorted(surveys))
    if not name or not name.strip():
        raise InputError(400, "missing-survey", f"the form field 'survey' is missing: give the survey the cutouts come "
                                                f"from (one of {known}); FITS are rendered with its bands")
    if name.strip() not in surveys:
        raise InputError(400, "unknown-survey", f"unknown survey {name.strip()!r}; known surveys: {known} "
                                                "(configs/surveys/*.yaml)")
    return surveys[name.strip()]


def sniff(data: bytes, filename: str) -> str:
    """jpeg, png, fits or gzip from the content's first bytes (never from the filename or the declared type)."""
    if not data:
        raise InputError(422, "empty-file", f"{filename}: empty file (0 bytes)", filename)
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] == b"SIMPLE":
        return "fits"
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    named = next((kind for magic, kind in _OTHER_FORMATS.items() if data.startswith(magic)), None)
    if named:
        raise InputError(415, "unsupported-format", f"{filename}: {named} is not supported; send the cutout as JPEG "
                                                    "or PNG (8-bit, as the shards hold them) or FITS in flux", filename)
    looks = "text" if _is_text(data[:512]) else f"bytes starting {data[:8]!r}"
    raise InputError(415, "not-an-image", f"{filename}: not an image ({looks}); send JPEG, PNG or FITS", filename)


def decode_upload(upload: Upload, survey: SurveyConfig, settings: DecodeSettings) -> Decoded:
    """The model input for one upload; InputError (4xx) naming what is wrong with it."""
    kind = sniff(upload.data, upload.filename)
    if kind in ("jpeg", "png"):
        return Decoded(upload.filename, _decode_8bit(upload.data, kind, upload.filename, settings), kind)
    raw = _gunzip(upload.data, upload.filename) if kind == "gzip" else upload.data
    if raw[:6] != b"SIMPLE":
        raise InputError(415, "unsupported-format", f"{upload.filename}: a gzip file that does not hold FITS",
                         upload.filename)
    cube = read_fits_cube(raw, upload.filename)
    _check_bands(cube, survey, upload.filename)
    _check_side(cube.shape[1:], settings.min_side_px, upload.filename, "FITS cutout")
    fmt = settings.render_formats[survey.name]
    try:
        encoded = render_sample(cube, False, image_size=settings.render_sizes[survey.name], image_format=fmt,
                                jpeg_quality=JPEG_QUALITY, jpeg_chroma=JPEG_CHROMA, source=upload.filename)[fmt]
    except ImageError as err:
        raise InputError(422, err.reason, f"{err}: nothing to render", upload.filename) from None
    return Decoded(upload.filename, plain_image(encoded, settings.loader_config()), "fits")


def read_fits_cube(raw: bytes, filename: str) -> np.ndarray:
    """(bands, H, W) float32 of the first HDU with image data, read as sharding.images reads a FITS file; the
    declared size is checked before any pixel is read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy's header fix-ups; a real problem raises below
        try:
            with fits.open(io.BytesIO(raw), memmap=False) as hdul:
                seen = []
                for hdu in hdul:
                    seen.append(type(hdu).__name__)
                    shape = tuple(hdu.shape) if hdu.is_image else ()
                    if not hdu.is_image or not shape or 0 in shape:
                        continue
                    _check_declared(shape, filename)
                    data = np.array(hdu.data, dtype=np.float32)
                    break
                else:
                    raise InputError(415, "no-image-hdu", f"{filename}: FITS file with no image data (HDUs: "
                                                          f"{', '.join(seen) or 'none'}); a table is not a cutout",
                                     filename)
        except InputError:
            raise
        except _FITS_ERRORS as err:
            raise InputError(422, "unreadable", f"{filename}: cannot read FITS ({type(err).__name__}: {err})",
                             filename) from None
    while data.ndim > 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise InputError(422, "bad-shape", f"{filename}: FITS image of shape {data.shape}; expected (H, W) or "
                                           "(bands, H, W)", filename)
    return data


def _decode_8bit(data: bytes, kind: str, filename: str, settings: DecodeSettings) -> torch.Tensor:
    ext = "jpg" if kind == "jpeg" else "png"
    try:
        height, width = check_image(data, ext)
    except CorruptSample as err:
        raise InputError(422, "corrupt-image", f"{filename}: corrupt or unusable {kind.upper()} ({err})",
                         filename) from None
    _check_side((height, width), settings.min_side_px, filename, kind.upper())
    if height != width:
        raise InputError(422, "not-square", f"{filename}: {width}x{height} {kind.upper()}; the shards hold square "
                                            "renderings: crop it to a square, or send the FITS to be rendered",
                         filename)
    try:
        return plain_image(data, settings.loader_config())
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise InputError(422, "corrupt-image", f"{filename}: cannot decode {kind.upper()} ({type(err).__name__}: "
                                               f"{err})", filename) from None


def _gunzip(data: bytes, filename: str) -> bytes:
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        raw = inflater.decompress(data, MAX_FITS_BYTES)
    except zlib.error as err:
        raise InputError(422, "corrupt-gzip", f"{filename}: corrupt gzip ({err})", filename) from None
    if inflater.unconsumed_tail:
        raise InputError(413, "too-large", f"{filename}: decompresses to more than {MAX_FITS_BYTES // 2**20} MiB",
                         filename)
    if not inflater.eof:
        raise InputError(422, "corrupt-gzip", f"{filename}: truncated gzip", filename)
    return raw


def _check_declared(shape: tuple[int, ...], filename: str) -> None:
    side = shape[-2:]
    bands = math.prod(shape[:-2])
    if max(side) > MAX_SIDE_PX or bands > MAX_BANDS:
        raise InputError(422, "too-large", f"{filename}: FITS image of shape {shape}; at most {MAX_BANDS} bands of "
                                           f"{MAX_SIDE_PX} px a side", filename)


def _check_bands(cube: np.ndarray, survey: SurveyConfig, filename: str) -> None:
    if cube.shape[0] != len(survey.bands):
        raise InputError(422, "wrong-band-count",
                         f"{filename}: {cube.shape[0]} band(s) of shape {tuple(cube.shape[1:])}, but survey "
                         f"{survey.name} has {len(survey.bands)} ({', '.join(survey.bands)}, bluest first): send one "
                         "FITS cube with the survey's bands in that order", filename)


def _check_side(hw: tuple[int, int], min_side: int, filename: str, what: str) -> None:
    if min(hw) < min_side:
        raise InputError(422, "too-small", f"{filename}: {what} of {hw[1]}x{hw[0]} px is smaller than the model's "
                                           f"{min_side} px input; the service does not upsample cutouts", filename)
    if max(hw) > MAX_SIDE_PX:
        raise InputError(422, "too-large", f"{filename}: {what} of {hw[1]}x{hw[0]} px is larger than "
                                           f"{MAX_SIDE_PX} px a side", filename)


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
