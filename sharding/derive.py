"""`python -m sharding.derive`: one survey's FITS cutouts as another survey would see them, in flux.

Each galaxy's bands are convolved from the source PSF to the target PSF, resampled onto the target's pixel
scale (flux kept, angular size kept), converted to the target's flux unit and given Gaussian noise up to the
target's sky noise. The output is a survey of its own: FITS files, a copy of the source catalog (same labels,
campaign and column mapping) and `<out>/<name>.yaml`, which `python -m sharding.build` shards like any other.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import re
import shutil
import sys
import warnings
import zlib
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from astropy.io import fits
from astropy.wcs import WCS
from tqdm import tqdm

from sharding import flux, images, pool
from sharding.catalog import Reject, normalise_ids, read_catalog
from sharding.config import to_dict
from sharding.progress import rejects_frame, write_json_atomic, write_parquet
from sharding.registry import SurveyConfig, list_surveys, load_survey, validate_survey
from sharding.schema import load_schema
from sharding.writer import TMP_SUFFIX, sha256_of

EXAMPLES = """example:
  python -m sharding.mock   --survey hst --num-galaxies 200 --out data/raw/hst
  python -m sharding.derive --from hst --like sdss --catalog data/raw/hst/gz_hubble_main.fits \\
      --images data/raw/hst/images --out data/raw/hst_as_sdss --workers 4
  python -m sharding.build  --survey data/raw/hst_as_sdss/hst_as_sdss.yaml --out data/shards
  (or add --build-to data/shards to the derive command)"""
IMAGES_DIR = "images"
STATE_FILE = "derive.json"
REJECTS_FILE = "rejects.parquet"
# Dropped from the source headers: structure (astropy writes its own) and photometric calibration (the unit is
# now the target's, BUNIT and FLUXSCL say how it was converted).
DROPPED_KEYS = re.compile(r"^(SIMPLE|BITPIX|NAXIS\d*|EXTEND|BSCALE|BZERO|BLANK|PCOUNT|GCOUNT|XTENSION|CHECKSUM|"
                          r"DATASUM|PHOT[A-Z0-9]*|MAGZP[A-Z0-9]*|ZEROP[A-Z0-9]*|NMGY[A-Z0-9]*)$")
WCS_KEYS = re.compile(r"^(WCSAXES|CTYPE\d|CRPIX\d|CRVAL\d|CDELT\d|CUNIT\d|CD\d_\d|PC\d_\d|CROTA\d|LONPOLE|LATPOLE|"
                      r"RADESYS|EQUINOX|MJDREF|DATEREF)$")
_WORKER: dict = {}


@dataclass(frozen=True)
class DerivePlan:
    """Everything that decides a derived pixel: the two surveys, the flux scale, the noise rule and the seed."""
    source: SurveyConfig
    target: SurveyConfig
    flux_scale: float  # target bunit per source bunit
    seed: int = 0
    source_noise: str = "measured"  # measured per band on each cutout, or "yaml": the source's mock.sky_noise

    @property
    def kernel(self) -> np.ndarray:
        return flux.psf_matching_kernel(flux.PSF.of_survey(self.source), flux.PSF.of_survey(self.target),
                                        self.source.pixel_scale_arcsec)

    def noise_gain(self, shape: tuple[int, int]) -> float:
        """flux.noise_gain of this plan for cutouts of `shape`: the same for every galaxy of that size."""
        return _noise_gain(flux.PSF.of_survey(self.source), flux.PSF.of_survey(self.target),
                           self.source.pixel_scale_arcsec, self.target.pixel_scale_arcsec, tuple(shape))


@lru_cache(maxsize=8)
def _noise_gain(source: flux.PSF, target: flux.PSF, from_scale: float, to_scale: float,
                shape: tuple[int, int]) -> float:
    return flux.noise_gain(flux.psf_matching_kernel(source, target, from_scale), shape, from_scale, to_scale)


def make_plan(source: SurveyConfig, target: SurveyConfig, flux_scale: float | None = None, seed: int = 0,
              source_noise: str = "measured") -> DerivePlan:
    """A checked plan: refuses a target PSF sharper than the source's; the flux scale defaults to AB zero points."""
    flux.check_psf_order(flux.PSF.of_survey(source), flux.PSF.of_survey(target), source.name, target.name)
    if source_noise not in ("measured", "yaml"):
        raise ValueError(f"source_noise must be 'measured' or 'yaml', got {source_noise!r}")
    scale = flux.flux_scale(source.bunit, target.bunit) if flux_scale is None else float(flux_scale)
    if not scale > 0:
        raise ValueError(f"--flux-scale must be positive, got {flux_scale}")
    return DerivePlan(source, target, scale, seed, source_noise)


def derive_cutout(data: np.ndarray, plan: DerivePlan, rng: np.random.Generator | None) -> tuple[np.ndarray, dict]:
    """(bands, H, W) source fluxes -> (bands, H', W') float32 target fluxes, and per-band noise facts.

    rng None: no noise is added (the noiseless derived image). The source's own noise, propagated through the
    kernel and the resampling and converted to target units, is subtracted in quadrature from the target's.
    """
    source, target = plan.source, plan.target
    kernel = plan.kernel
    data = np.asarray(data, dtype=np.float64)
    smoothed = flux.convolve_kernel(data, kernel)
    out = flux.resample_to_scale(smoothed, source.pixel_scale_arcsec, target.pixel_scale_arcsec) * plan.flux_scale
    if plan.source_noise == "yaml":
        noise_in = np.full(data.shape[0], source.mock.sky_noise)
    else:
        noise_in = np.array([flux.measure_sky_noise(band) for band in data])
    gain = plan.noise_gain(data.shape[-2:])
    present = noise_in * gain * plan.flux_scale
    added = np.zeros_like(present)
    if rng is not None:
        out, added = flux.add_noise_to_depth(out, target.mock.sky_noise, present, rng)
    return out.astype(np.float32), {"source_noise": present.tolist(), "added_noise": added.tolist()}


def galaxy_rng(seed: int, object_id: str) -> np.random.Generator:
    """One generator per galaxy: the noise does not depend on workers, order or resumption."""
    return np.random.default_rng([seed, zlib.crc32(str(object_id).encode())])


def derived_survey(plan: DerivePlan, name: str, catalog: Path, images_dir: Path, num_px: int) -> SurveyConfig:
    """The derived survey's facts: the source's labels, bands, ids and layout; the target's pixels, PSF and depth."""
    source, target = plan.source, plan.target
    mock = replace(source.mock, cutout_px=num_px, sky_noise=target.mock.sky_noise, gain=target.mock.gain,
                   saturation=target.mock.saturation, psf_profile=target.mock.psf_profile,
                   moffat_beta=target.mock.moffat_beta,
                   flux_range=tuple(v * plan.flux_scale for v in source.mock.flux_range))
    reference = f"{source.catalog_reference or source.name}; images as {target.name} sees them (sharding.derive)"
    survey = replace(source, name=name, pixel_scale_arcsec=target.pixel_scale_arcsec,
                     psf_fwhm_arcsec=target.psf_fwhm_arcsec, bunit=target.bunit, catalog=str(catalog),
                     images=str(images_dir), catalog_reference=reference, mock=mock)
    validate_survey(survey, load_schema(), f"derived survey {name!r}")
    return survey


def derived_relpaths(paths: list[Path], images_dir: Path, survey: SurveyConfig, object_id: str) -> list[str]:
    """Where a galaxy's derived files go under the output's images folder: the source's own relative paths, or
    (for files outside the source images folder, e.g. absolute file_loc values) the survey's image_pattern."""
    out = []
    for i, path in enumerate(paths):
        try:
            out.append(Path(path).resolve().relative_to(Path(images_dir).resolve()).as_posix())
        except ValueError:
            name = survey.image_pattern.replace("{id}", str(object_id))
            out.append(name.replace("{band}", survey.bands[i]) if len(paths) > 1 else name.replace("{band}", "all"))
    return out


def _image_header(path: Path) -> fits.Header:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, memmap=False) as hdul:
            hdu = next((h for h in hdul if h.is_image and h.data is not None), hdul[0])
            return hdu.header.copy()


def derived_header(source_header: fits.Header, plan: DerivePlan, name: str, shape_in: tuple[int, int],
                   shape_out: tuple[int, int]) -> fits.Header:
    """The source file's header with the target's units, PSF and pixel scale, its WCS rescaled about the centre."""
    header = fits.Header()
    for card in source_header.cards:
        if card.keyword and not DROPPED_KEYS.match(card.keyword) and not WCS_KEYS.match(card.keyword) \
                and card.keyword not in ("HISTORY", "COMMENT", ""):
            header.append(card)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            wcs = WCS(source_header, naxis=2)
        except Exception:  # astropy raises many kinds for odd headers; such a file simply keeps no WCS
            wcs = None
    if wcs is not None and wcs.has_celestial:
        factor = plan.target.pixel_scale_arcsec / plan.source.pixel_scale_arcsec
        if wcs.wcs.has_cd():
            wcs.wcs.cd = wcs.wcs.cd * factor
        else:
            wcs.wcs.cdelt = wcs.wcs.cdelt * factor
        # Pixel edges: input x_in = n_in/2 + (x_out - n_out/2) * factor; FITS pixel i is centred at edge i - 0.5.
        wcs.wcs.crpix = [(c - 0.5 - n_in / 2.0) / factor + n_out / 2.0 + 0.5
                         for c, n_in, n_out in zip(wcs.wcs.crpix, shape_in[::-1], shape_out[::-1])]
        header.extend(wcs.to_header(), update=True)
    header["SURVEY"] = (name, "survey name")
    header["BUNIT"] = (plan.target.bunit, "pixel unit")
    header["PSFFWHM"] = (plan.target.psf_fwhm_arcsec, "[arcsec] PSF full width at half maximum")
    header["PIXSCALE"] = (plan.target.pixel_scale_arcsec, "[arcsec/pixel] pixel scale")
    header["DERIVED"] = (f"{plan.source.name} as {plan.target.name}", "sharding.derive: source seen as target")
    header["FLUXSCL"] = (plan.flux_scale, f"{plan.target.bunit} per {plan.source.bunit}")
    return header


def fits_payload(data: np.ndarray, header: fits.Header, name: str) -> bytes:
    buffer = io.BytesIO()
    fits.PrimaryHDU(data=data.astype(np.float32), header=header).writeto(buffer)
    payload = buffer.getvalue()
    return gzip.compress(payload, compresslevel=6, mtime=0) if name.endswith(".gz") else payload


def write_atomic(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def derive_galaxy(task: tuple) -> tuple[str, dict | None, Reject | None]:
    """One galaxy in a worker: (object id, noise facts or {"skipped": True} if already written, or a Reject)."""
    row, object_id, file_loc = task
    w = _WORKER
    plan, source = w["plan"], w["plan"].source
    paths: list[Path] = []
    try:
        paths = images.locate_images(w["images"], w["pattern"], object_id, source.bands, file_loc)
        targets = [w["out_images"] / rel for rel in derived_relpaths(paths, w["images"], source, object_id)]
        if all(t.is_file() for t in targets):
            return object_id, {"skipped": True, "shape": list(fits.getdata(targets[0]).shape[-2:])}, None
        data, is_8bit = images.read_stack(paths)
        if is_8bit:
            raise images.ImageError("not-flux", f"{paths[0]}: an 8-bit picture (JPEG/PNG), not flux: only FITS "
                                                "can be seen as another survey")
        data, _ = images.clean_pixels(data)
        out, facts = derive_cutout(data, plan, galaxy_rng(plan.seed, object_id))
        # One cube (2-D when it holds one band) or one 2-D file per band, as the source has them.
        planes = [out if out.shape[0] > 1 else out[0]] if len(paths) == 1 else list(out)
        for path, target, plane in zip(paths, targets, planes):
            header = derived_header(_image_header(path), plan, w["name"], data.shape[-2:], out.shape[-2:])
            write_atomic(target, fits_payload(plane, header, target.name))
        return object_id, {**facts, "shape": list(out.shape[-2:])}, None
    except images.ImageError as err:
        return object_id, None, Reject("image", err.reason, str(err), row, object_id, ";".join(map(str, paths)))


def _init_worker(params: dict) -> None:
    _WORKER.update(params)


def _runner(params: dict, workers: int):
    return pool.ordered_map(derive_galaxy, _init_worker, params, workers)


def catalog_tasks(df: pd.DataFrame, survey: SurveyConfig) -> list[tuple[int, str, str | None]]:
    """(row, id, file_loc) of each distinct non-empty id; empty and repeated ids are the build's rejects."""
    ids = normalise_ids(df[survey.id_column]).reset_index(drop=True)
    locs = df["file_loc"].reset_index(drop=True) if "file_loc" in df.columns else [None] * len(ids)
    seen: set[str] = set()
    tasks = []
    for row, (oid, loc) in enumerate(zip(ids, locs)):
        if oid and oid not in seen:
            seen.add(oid)
            tasks.append((row, oid, loc if isinstance(loc, str) else None))
    return tasks


def copy_catalog(catalog: Path, df: pd.DataFrame, survey: SurveyConfig, out: Path) -> Path:
    """The source catalog under out/: byte for byte, unless absolute file_loc values must point at the new files."""
    target = out / catalog.name
    absolute = "file_loc" in df.columns and bool(
        df["file_loc"].map(lambda v: isinstance(v, str) and Path(v).is_absolute()).any())
    if not absolute:
        tmp = target.with_name(target.name + TMP_SUFFIX)
        shutil.copyfile(catalog, tmp)
        os.replace(tmp, target)
        return target
    frame = df.copy()
    ids = normalise_ids(frame[survey.id_column])
    frame["file_loc"] = [survey.image_pattern.replace("{id}", oid) if isinstance(loc, str) and Path(loc).is_absolute()
                         else loc for oid, loc in zip(ids, frame["file_loc"])]
    target = target.with_suffix(".parquet") if not target.name.endswith(".parquet") else target
    write_parquet(frame, target)
    return target


def write_survey_yaml(survey: SurveyConfig, path: Path, plan: DerivePlan, command: str) -> None:
    source, target = plan.source, plan.target
    lines = [
        f"# {survey.name}: {source.name} galaxies as {target.name} would see them, derived in flux by sharding.derive:",
        f"#   PSF {flux.PSF.of_survey(source).describe()} -> {flux.PSF.of_survey(target).describe()} (matching "
        "kernel), "
        f"pixels {source.pixel_scale_arcsec}\" -> {target.pixel_scale_arcsec}\" (flux-conserving),",
        f"#   flux x {plan.flux_scale:.6g} {target.bunit} per {source.bunit}, sky noise {target.mock.sky_noise} "
        f"{target.bunit} per pixel ({plan.source_noise} source noise subtracted in quadrature), seed {plan.seed}.",
        f"# Labels, campaign and columns are {source.name}'s. Made by: {command}",
    ]
    body = yaml.safe_dump(to_dict(survey), sort_keys=False, width=120, default_flow_style=None)
    text = "\n".join(lines) + "\n" + body
    write_atomic(path, text.encode())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sharding.derive", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Render one survey's FITS cutouts as another survey would see them, in flux before any "
                    "stretch: convolve to the target PSF (the kernel that turns the source PSF into the target's), "
                    "resample to the target pixel scale (flux-conserving, the cutout's angular size kept), convert "
                    "the flux unit, and add Gaussian noise up to the target's sky noise (mock.sky_noise of its "
                    "YAML; the source's own noise, propagated, subtracted in quadrature). Writes <out>/images/ "
                    "(the source's file layout and bands), a copy of the catalog (same labels), <out>/<name>.yaml "
                    "for sharding.build, <out>/rejects.parquet (unreadable inputs) and <out>/derive.json. "
                    "Re-running resumes; every file is written atomically.")
    parser.add_argument("--from", dest="source", required=True, help=f"source survey ({', '.join(list_surveys())}) "
                                                                     "or a YAML path")
    parser.add_argument("--like", dest="target", required=True, help="target survey whose PSF, pixels and depth "
                                                                     "to take (a name or a YAML path)")
    parser.add_argument("--catalog", help="source catalog; default: the source YAML's")
    parser.add_argument("--images", help="source image folder; default: the source YAML's")
    parser.add_argument("--out", required=True, help="output folder of the derived survey")
    parser.add_argument("--name", help="derived survey name (default <from>_as_<like>)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (with the galaxy id)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--flux-scale", type=float,
                        help="target flux units per source unit; default from AB zero points of the two bunits "
                             f"({', '.join(f'{k} {v}' for k, v in flux.AB_ZEROPOINTS.items())}), 1 for equal units")
    parser.add_argument("--source-noise", choices=("measured", "yaml"), default="measured",
                        help="the source noise subtracted from the target's: measured per band on each cutout "
                             "(sigma-clipped MAD), or the source YAML's mock.sky_noise")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier derivation in --out")
    parser.add_argument("--build-to", metavar="SHARD_ROOT", help="run sharding.build on the result into this root")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _prepare_out(out: Path, params: dict, overwrite: bool, yaml_path: Path) -> None:
    state = out / STATE_FILE
    if overwrite:
        shutil.rmtree(out / IMAGES_DIR, ignore_errors=True)
        for path in (state, out / REJECTS_FILE, yaml_path):
            path.unlink(missing_ok=True)
    if state.is_file():
        old = json.loads(state.read_text()).get("params")
        if old != params:
            changed = sorted(k for k in set(old or {}) | set(params) if (old or {}).get(k) != params.get(k))
            raise ValueError(f"{out} holds a derivation made with different arguments (differs in: {changed}); "
                             "re-run with the same arguments to resume, or use --overwrite")
    elif (out / IMAGES_DIR).is_dir() and any((out / IMAGES_DIR).iterdir()):
        raise ValueError(f"{out / IMAGES_DIR} holds files but no {STATE_FILE}; use --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state, {"params": params, "complete": False})


def run(args: argparse.Namespace, command: str = "") -> int:
    source, target = load_survey(args.source), load_survey(args.target)
    name = args.name or f"{source.name}_as_{target.name}"
    if name in list_surveys():
        raise ValueError(f"--name {name!r} is a registered survey (configs/surveys/{name}.yaml); a derived survey "
                         "needs a name of its own")
    plan = make_plan(source, target, args.flux_scale, args.seed, args.source_noise)
    catalog, images_dir = Path(args.catalog or source.catalog), Path(args.images or source.images)
    if not images_dir.is_dir():
        raise ValueError(f"image directory not found: {images_dir}. Pass --images DIR.")
    df = read_catalog(catalog)
    if source.id_column not in df.columns:
        raise ValueError(f"catalog {catalog} has no id column {source.id_column!r} (from the {source.name} YAML)")
    out = Path(args.out)
    num_px = flux.resampled_shape((source.mock.cutout_px,) * 2, source.pixel_scale_arcsec,
                                  target.pixel_scale_arcsec)[-1]  # replaced below by what the cutouts gave
    survey = derived_survey(plan, name, (out / catalog.name).resolve(), (out / IMAGES_DIR).resolve(), num_px)
    yaml_path = out / f"{name}.yaml"
    params = json.loads(json.dumps({
        "from": to_dict(source), "like": to_dict(target), "name": name, "seed": args.seed,
        "flux_scale": plan.flux_scale, "source_noise": args.source_noise, "catalog": str(catalog),
        "catalog_sha256": sha256_of(catalog), "images": str(images_dir)}))
    _prepare_out(out, params, args.overwrite, yaml_path)
    tasks = catalog_tasks(df, source)
    worker = {"plan": plan, "images": images_dir, "pattern": source.image_pattern, "out_images": out / IMAGES_DIR,
              "name": name}
    plan.kernel  # noqa: B018 - computed (and cached) once here, inherited by forked workers
    rejects, facts = [], []
    with _runner(worker, args.workers) as derive_all, \
            tqdm(total=len(tasks), unit="gal", desc=f"{name} derive", disable=args.no_progress) as bar:
        for _, info, reject in derive_all(tasks):
            bar.update(1)
            if reject is not None:
                rejects.append(reject)
            else:
                facts.append(info)
    if facts:  # the derived cutouts' width: eval's default native width of this survey's shards
        survey = replace(survey, mock=replace(survey.mock, cutout_px=int(facts[0]["shape"][-1])))
    catalog_copy = copy_catalog(catalog, df, source, out)
    survey = replace(survey, catalog=str(catalog_copy.resolve()))
    write_survey_yaml(survey, yaml_path, plan, command or f"python -m sharding.derive --from {args.source} "
                                                          f"--like {args.target} --out {args.out}")
    load_survey(yaml_path)  # what the build will read must load and validate
    write_parquet(rejects_frame(rejects, name), out / REJECTS_FILE)
    summary = summarize(facts, rejects, len(tasks))
    write_json_atomic(out / STATE_FILE, {"params": params, "complete": True, "survey_yaml": str(yaml_path),
                                         "kernel_px": list(plan.kernel.shape), "cutout_px": survey.mock.cutout_px,
                                         **summary})
    print_summary(plan, name, survey.mock.cutout_px, summary, yaml_path, out)
    if not args.build_to:
        print(f"  shard it:    python -m sharding.build --survey {yaml_path} --out data/shards")
        return 0
    from sharding import build
    build_args = ["--survey", str(yaml_path), "--out", args.build_to, "--workers", str(args.workers)]
    return build.main(build_args + (["--no-progress"] if args.no_progress else []))


def summarize(facts: list[dict], rejects: list[Reject], num_tasks: int) -> dict:
    done = [f for f in facts if not f.get("skipped")]
    source_noise = [v for f in done for v in f["source_noise"]]
    added = [v for f in done for v in f["added_noise"]]
    return {"num_galaxies": num_tasks, "num_derived": len(done), "num_resumed": len(facts) - len(done),
            "num_rejects": len(rejects),
            "num_shallow": sum(any(a == 0 for a in f["added_noise"]) for f in done),
            "median_source_noise": float(np.median(source_noise)) if source_noise else None,
            "median_added_noise": float(np.median(added)) if added else None}


def print_summary(plan: DerivePlan, name: str, num_px: int, summary: dict, yaml_path: Path, out: Path) -> None:
    source, target = plan.source, plan.target
    print(f"\n{name}: {summary['num_derived']} galaxies derived, {summary['num_resumed']} already there, "
          f"{summary['num_rejects']} rejected (see {out / REJECTS_FILE})")
    print(f"  PSF {flux.PSF.of_survey(source).describe()} -> {flux.PSF.of_survey(target).describe()}; pixels "
          f"{source.pixel_scale_arcsec}\" -> {target.pixel_scale_arcsec}\" (cutouts {num_px} px wide)")
    if summary["median_source_noise"] is not None:
        print(f"  flux x {plan.flux_scale:.4g} ({target.bunit} per {source.bunit}); sky noise {target.mock.sky_noise}: "
              f"source noise after matching {summary['median_source_noise']:.3g}, added "
              f"{summary['median_added_noise']:.3g} (medians)")
    if summary["num_shallow"]:
        print(f"warning: {summary['num_shallow']} galaxies have a band whose own noise already exceeds "
              f"{target.name}'s sky noise after matching: they stay shallower than {target.name}", file=sys.stderr)
    print(f"  survey YAML: {yaml_path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m sharding.derive " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        return run(args, command)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
