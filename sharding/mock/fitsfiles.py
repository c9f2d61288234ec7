"""FITS cutout files: celestial WCS and survey headers, per-band or cube layout, gzip, byte-level damage."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from sharding.mock.sky import per_band_files
from sharding.registry import SurveyConfig


def image_header(survey: SurveyConfig, gal_id: int | str, ra: float, dec: float, bands: list[str]) -> fits.Header:
    """TAN WCS centred on the galaxy (north up, east left) plus the survey facts a reader needs."""
    size = survey.mock.cutout_px
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [(size + 1) / 2.0, (size + 1) / 2.0]
    scale_deg = survey.pixel_scale_arcsec / 3600.0
    wcs.wcs.cdelt = [-scale_deg, scale_deg]
    header = fits.Header()
    header["OBJECT"] = (str(gal_id), "object id in the survey catalog")
    header["SURVEY"] = (survey.name, "survey name")
    header["BUNIT"] = (survey.bunit, "pixel unit")
    if len(bands) == 1:
        header["BAND"] = (bands[0], "filter")
    else:
        for i, band in enumerate(bands, start=1):
            header[f"BAND{i}"] = (band, f"filter of plane {i} (NAXIS3 index {i})")
    header["PSFFWHM"] = (survey.psf_fwhm_arcsec, "[arcsec] PSF full width at half maximum")
    header["PIXSCALE"] = (survey.pixel_scale_arcsec, "[arcsec/pixel] pixel scale")
    header["MOCK"] = (True, "synthetic image from sharding.mock")
    header.extend(wcs.to_header(), update=True)
    return header


def fits_bytes(data: np.ndarray, header: fits.Header) -> bytes:
    """The FITS file astropy writes for a primary HDU (reference; the mock writes via `galaxy_fits`)."""
    buffer = io.BytesIO()
    fits.PrimaryHDU(data=data, header=header).writeto(buffer)
    return buffer.getvalue()


_TEMPLATES: dict[tuple, fits.Header] = {}


def _template(survey: SurveyConfig, shape: tuple[int, ...], bands: tuple[str, ...]) -> fits.Header:
    """A complete primary header for this survey and data shape, built once by astropy: building and verifying
    a header per file costs more than rendering the galaxy."""
    key = (survey.name, survey.bunit, survey.psf_fwhm_arcsec, survey.pixel_scale_arcsec, shape, bands)
    if key not in _TEMPLATES:
        header = image_header(survey, "", 0.0, 0.0, list(bands))
        # LONPOLE/LATPOLE are the TAN defaults wcslib derives from CRVAL; leaving them out keeps the
        # per-file update to OBJECT/CRVAL1/CRVAL2.
        for key_name in ("LONPOLE", "LATPOLE"):
            header.remove(key_name, ignore_missing=True)
        _TEMPLATES[key] = fits.PrimaryHDU(data=np.zeros(shape, dtype=np.float32), header=header).header
    return _TEMPLATES[key]


def galaxy_fits(survey: SurveyConfig, gal_id: int | str, ra: float, dec: float, data: np.ndarray,
                bands: list[str]) -> bytes:
    """One float32 FITS file, byte-identical to astropy's writer for the same header and data."""
    header = _template(survey, data.shape, tuple(bands)).copy()
    header["OBJECT"] = str(gal_id)
    header["CRVAL1"] = ra
    header["CRVAL2"] = dec
    payload = data.astype(">f4").tobytes()
    return header.tostring().encode("ascii") + payload + b"\0" * (-len(payload) % 2880)


def encode(name: str, payload: bytes) -> bytes:
    """gzip for *.gz names; mtime=0 and no stored file name keep the bytes identical across runs."""
    return gzip.compress(payload, compresslevel=6, mtime=0) if name.endswith(".gz") else payload


def galaxy_files(survey: SurveyConfig, gal_id: int | str, ra: float, dec: float, image: np.ndarray,
                 paths: list[str]) -> dict[str, bytes]:
    """The file contents of one galaxy: 2-D files in band order, or one (bands, H, W) cube."""
    if per_band_files(survey):
        return {path: encode(path, galaxy_fits(survey, gal_id, ra, dec, image[i], [band]))
                for i, (path, band) in enumerate(zip(paths, survey.bands))}
    return {paths[0]: encode(paths[0], galaxy_fits(survey, gal_id, ra, dec, image, list(survey.bands)))}


def truncated(name: str, payload: bytes) -> bytes:
    """Cut a file in the middle of its data: past the FITS header (plain) or mid-stream (gzip, like an
    interrupted download)."""
    if name.endswith(".gz"):
        return payload[: len(payload) // 2]
    header_bytes = _header_length(payload)
    return payload[: header_bytes + (len(payload) - header_bytes) // 2]


def _header_length(payload: bytes) -> int:
    """Bytes of the primary header: up to the END card, padded to the 2880-byte FITS block."""
    for offset in range(0, len(payload), 80):
        if payload[offset: offset + 8] == b"END     ":
            return (offset // 2880 + 1) * 2880
    raise ValueError("no END card: not a FITS file")


def write_files(images_dir: Path, files: dict[str, bytes]) -> None:
    for rel, payload in files.items():
        path = images_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
