"""`python -m sharding.mock`: the command line of the mock-survey generator and its printed summary."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from sharding.mock.generate import Options, Summary, generate
from sharding.mock.sky import per_band_files, region_area_deg2
from sharding.registry import SurveyConfig, list_surveys, load_survey


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sharding.mock",
        description="Generate a mock survey: FITS cutouts rendered from true galaxy morphologies (Sersic bulge, "
                    "exponential disk, bar, logarithmic spiral arms, clumps, mergers, artifacts) through the "
                    "survey's pixel scale, PSF and noise, and a Galaxy Zoo vote catalog with the survey's real "
                    "native column names, whose votes come from volunteers walking the campaign's decision tree "
                    "and seeing what the survey lets them see. Writes <out>/<catalog name from the survey YAML>, "
                    "<out>/images/, <out>/truth.parquet (true parameters) and <out>/corruptions.csv. The same "
                    "--seed gives byte-identical files, whatever --workers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--survey", required=True, help=f"survey name ({', '.join(list_surveys())}) or a YAML path")
    parser.add_argument("--num-galaxies", type=int, default=200, help="number of galaxies (catalog rows)")
    parser.add_argument("--out", help="output directory; default: the directory of the survey YAML's catalog "
                                      "path (e.g. data/raw/hst), so the YAML's catalog/images paths find the output")
    parser.add_argument("--seed", type=int, default=0, help="seed of the one mock sky: with the same seed, a galaxy inside two surveys' "
                             "footprints is the same galaxy (position, morphology) in both")
    parser.add_argument("--corrupt-fraction", type=float, default=0.0,
                        help="fraction of galaxies given a bad input (truncated/missing/all-NaN/all-zero image, NaN "
                             "or negative votes, duplicated id), each kind at least once; listed in corruptions.csv")
    parser.add_argument("--bad-pixel-fraction", type=float, default=None,
                        help="fraction of clean galaxies whose images get a few NaN/inf/saturated pixels "
                             "(valid inputs); default: the --corrupt-fraction")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes (output does not depend on it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier mock survey in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the survey YAML, e.g. --set mock.cutout_px=64 (repeatable)")
    return parser.parse_args(argv)


def _options(args: argparse.Namespace, survey: SurveyConfig) -> Options:
    out = Path(args.out) if args.out else Path(survey.catalog).parent
    bad_pixels = args.corrupt_fraction if args.bad_pixel_fraction is None else args.bad_pixel_fraction
    return Options(num_galaxies=args.num_galaxies, out_dir=out, seed=args.seed,
                   corrupt_fraction=args.corrupt_fraction, bad_pixel_fraction=bad_pixels, workers=args.workers,
                   progress=not args.no_progress, overwrite=args.overwrite)


def footprint_area(survey: SurveyConfig) -> float:
    return sum(region_area_deg2(r) for r in survey.mock.footprint)


def summarize(survey: SurveyConfig, summary: Summary, seconds: float) -> str:
    truth = summary.truth
    kinds = truth["kind"].value_counts()
    layout = "one 2-D FITS per band" if per_band_files(survey) else f"one ({len(survey.bands)}, H, W) cube"
    lines = [
        f"mock {survey.name} ({survey.campaign}): {len(truth)} galaxies in {seconds:.1f} s",
        "  classes: " + ", ".join(f"{k} {kinds.get(k, 0)}" for k in ("smooth", "featured", "artifact")),
        f"  pixels: {survey.pixel_scale_arcsec} arcsec/px, PSF {survey.psf_fwhm_arcsec} arcsec = "
        f"{survey.psf_fwhm_px:.2f} px, {survey.mock.cutout_px}^2 px cutouts, {layout}",
        f"  seen: median r_eff/PSF {np.median(truth['resolution']):.2f}, median S/N {np.median(truth['snr']):.0f}, "
        f"mean visibility {truth['visibility'].mean():.2f}",
        f"  votes: {truth['num_classifications'].mean():.1f} classifications per galaxy",
        f"  sky: {len(survey.mock.footprint)} footprint region(s), {footprint_area(survey):.1f} deg^2, the "
        f"{len(truth)} shallowest galaxies (down to {truth['depth'].max():.3g} per deg^2)",
        f"  corruptions: {len(summary.corruptions)}; images with bad pixels: {(truth['pixel_defects'] != '').sum()}",
        f"  catalog: {summary.catalog}",
        f"  images:  {summary.images_dir}",
        f"  truth:   {summary.catalog.parent / 'truth.parquet'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        survey = load_survey(args.survey, overrides=args.overrides)
        started = time.perf_counter()
        summary = generate(survey, _options(args, survey))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summarize(survey, summary, time.perf_counter() - started))
    return 0
