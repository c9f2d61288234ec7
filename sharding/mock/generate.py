"""One mock survey end to end: plan ids and corruptions, render and vote per galaxy (in parallel), write tables."""

from __future__ import annotations

import hashlib
import multiprocessing
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from sharding.mock import corrupt, fitsfiles, sky, tables
from sharding.mock.morphology import draw_morphology, truth_record
from sharding.mock.perception import perceive
from sharding.mock.render import render_galaxy
from sharding.mock.tree import load_tree, native_names
from sharding.mock.volunteers import cast_votes
from sharding.registry import SurveyConfig

# Independent random streams per galaxy: SeedSequence([seed, sky_id, stream(, survey)]). The morphology stream does
# not involve the survey, so a galaxy seen by two surveys is one galaxy; its pixels, noise and volunteers are each
# survey's own.
MORPHOLOGY, SKY, RENDER, VOTES, DEFECTS = range(5)
PLAN = 2**32 - 1  # stream key of the run-level plan (corruptions, defects); never a galaxy index
_CONTEXT: dict = {}


def galaxy_rng(seed: int, index: int, stream: int, survey: str = "") -> np.random.Generator:
    keys = [seed, index, stream] + ([survey_key(survey)] if survey else [])
    return np.random.default_rng(np.random.SeedSequence(keys))


def survey_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


@dataclass(frozen=True)
class Job:
    index: int  # row in the catalog
    sky_id: int  # the galaxy on the one mock sky: the same in every survey that sees it
    depth: float  # galaxies per deg^2 of the sky down to this one (the survey takes the shallowest)
    object_id: int | str
    ra: float
    dec: float
    paths: tuple[str, ...]  # image files relative to the images directory
    corruption: str = ""
    defects: bool = False
    write_images: bool = True


@dataclass
class Result:
    job: Job
    num_classifications: int
    votes: dict[str, int]
    truth: dict
    detail: str = ""
    defects: str = ""


@dataclass(frozen=True)
class Options:
    num_galaxies: int
    out_dir: Path
    seed: int = 0
    corrupt_fraction: float = 0.0
    bad_pixel_fraction: float = 0.0
    workers: int = 1
    progress: bool = True
    overwrite: bool = False


def plan_jobs(survey: SurveyConfig, opts: Options) -> tuple[list[Job], dict[int, int]]:
    """Ids, positions, files and corruptions of every galaxy, decided up front so workers never collide."""
    plan_rng = galaxy_rng(opts.seed, PLAN, 0, survey.name)
    plan = corrupt.plan_corruptions(opts.num_galaxies, opts.corrupt_fraction, plan_rng)
    sources = corrupt.duplicate_sources(plan, plan_rng)
    defects = corrupt.plan_defects(opts.num_galaxies, opts.bad_pixel_fraction, plan, plan_rng)
    galaxies = sky.select_galaxies(sky.check_footprint(survey), opts.num_galaxies, opts.seed)
    jobs, seen = [], set()
    for index, sky_id in enumerate(galaxies["sky_id"].tolist()):
        depth = float(galaxies["depth"][index])
        rng = galaxy_rng(opts.seed, sky_id, SKY, survey.name)
        ra, dec = float(galaxies["ra"][index]), float(galaxies["dec"][index])
        gal_id = sky.object_id(index, rng, survey, ra, dec)
        while gal_id in seen:  # two IAU names in the same 0.1 arcsec: nudge north until unique
            dec = min(dec + 0.2 / 3600.0, 90.0)
            gal_id = sky.object_id(index, rng, survey, ra, dec)
        seen.add(gal_id)
        kind = plan.get(index, "")
        jobs.append(Job(index, sky_id, depth, gal_id, ra, dec, tuple(sky.relative_paths(survey, gal_id)), kind,
                        index in defects, write_images=kind != "duplicate_id"))
    return jobs, sources


def _init_worker(context: dict) -> None:
    _CONTEXT.clear()
    _CONTEXT.update(context)
    _CONTEXT["tree"] = load_tree(context["survey"])


def make_galaxy(job: Job) -> Result:
    """Morphology, perceived votes and (unless its row duplicates another) the image files of one galaxy."""
    survey: SurveyConfig = _CONTEXT["survey"]
    seed, images_dir = _CONTEXT["seed"], Path(_CONTEXT["images_dir"])
    m = draw_morphology(galaxy_rng(seed, job.sky_id, MORPHOLOGY), survey.mock)
    seen = perceive(m, survey)
    num, votes = cast_votes(_CONTEXT["tree"], m, seen, galaxy_rng(seed, job.sky_id, VOTES, survey.name),
                            survey.mock.volunteers_mean)
    truth = dict(id=job.object_id, index=job.index, sky_id=job.sky_id, depth=job.depth, ra=job.ra, dec=job.dec,
                 num_classifications=num,
                 **truth_record(m),
                 resolution=seen.resolution, snr=seen.snr, visibility=seen.visibility,
                 axis_ratio_seen=seen.axis_ratio_seen)
    result = Result(job, num, votes, truth)
    if job.write_images:
        _write_images(job, m, survey, seed, images_dir, result)
    return result


def _write_images(job: Job, m, survey: SurveyConfig, seed: int, images_dir: Path, result: Result) -> None:
    image = render_galaxy(m, survey, galaxy_rng(seed, job.sky_id, RENDER, survey.name))
    if job.defects:
        result.defects = corrupt.sprinkle_defects(image, survey.mock.saturation,
                                                  galaxy_rng(seed, job.sky_id, DEFECTS, survey.name))
    image = corrupt.corrupt_pixels(image, job.corruption)
    files = fitsfiles.galaxy_files(survey, job.object_id, job.ra, job.dec, image, list(job.paths))
    first = job.paths[0]
    if job.corruption == "truncated_fits":
        full = len(files[first])
        files[first] = fitsfiles.truncated(first, files[first])
        where = "mid gzip stream" if first.endswith(".gz") else "in the middle of the data"
        result.detail = f"{first} cut from {full} to {len(files[first])} bytes, {where}"
    elif job.corruption == "missing_file":
        del files[first]
        result.detail = f"{first} not written"
    elif job.corruption in ("all_nan", "all_zero"):
        result.detail = f"every pixel of {', '.join(job.paths)} is {job.corruption[4:].upper()}"
    fitsfiles.write_files(images_dir, files)


def _results(jobs: list[Job], context: dict, workers: int):
    if workers <= 1:
        _init_worker(context)
        yield from map(make_galaxy, jobs)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    chunk = max(1, min(32, len(jobs) // (workers * 8) or 1))
    with ctx.Pool(workers, _init_worker, (context,)) as pool:
        yield from pool.imap(make_galaxy, jobs, chunksize=chunk)


def prepare_out_dir(survey: SurveyConfig, opts: Options) -> tuple[Path, Path]:
    """(catalog path, images dir); refuses to mix with an earlier run unless overwrite is set."""
    catalog = opts.out_dir / Path(survey.catalog).name
    images_dir = opts.out_dir / "images"
    if catalog.exists() or (images_dir.exists() and any(images_dir.iterdir())):
        if not opts.overwrite:
            raise ValueError(f"{opts.out_dir} already holds a mock {survey.name} survey ({catalog.name} or "
                             f"images/); pass --overwrite to replace it, or choose another --out")
        shutil.rmtree(images_dir, ignore_errors=True)
        for stale in (catalog, opts.out_dir / "truth.parquet", opts.out_dir / "corruptions.csv"):
            stale.unlink(missing_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    return catalog, images_dir


def catalog_rows(survey: SurveyConfig, results: list[Result], sources: dict[int, int]) -> list[dict]:
    tree = load_tree(survey)
    names = native_names(survey, tree)
    rows = []
    for r in results:
        job = r.job
        origin = results[sources[job.index]].job if job.index in sources else job
        row = {survey.id_column: origin.object_id, survey.ra_column: origin.ra, survey.dec_column: origin.dec}
        if survey.mock.write_file_loc:
            row[tables.FILE_LOC] = origin.paths[0]
        row.update(tables.vote_columns(survey, tree, names, r.num_classifications, r.votes))
        rows.append(row)
    return rows


def _corrupt_catalog(survey: SurveyConfig, frame: pd.DataFrame, results: list[Result],
                     sources: dict[int, int]) -> tuple[pd.DataFrame, list[dict]]:
    """Apply the catalog-level corruptions; one corruptions.csv record per corrupted galaxy."""
    tree = load_tree(survey)
    names = native_names(survey, tree)
    keep = {survey.id_column, survey.ra_column, survey.dec_column, tables.FILE_LOC}
    vote_cols = [c for c in frame.columns if c not in keep]
    records = []
    for r in results:
        kind, row = r.job.corruption, r.job.index
        if not kind:
            continue
        detail = r.detail
        if kind == "nan_votes":
            frame = tables.nan_row(frame, row, vote_cols)
            detail = f"all {len(vote_cols)} vote columns of catalog row {row} are NaN"
        elif kind == "negative_votes":
            count_col, fraction_col = names.answers[tree[0].column(tree[0].answers[0])]
            negative = -int(frame.loc[row, count_col]) - 1
            frame.loc[row, count_col] = negative
            frame.loc[row, fraction_col] = -abs(frame.loc[row, fraction_col])
            detail = f"{count_col} of catalog row {row} is {negative}"
        elif kind == "duplicate_id":
            source = results[sources[r.job.index]].job
            detail = f"catalog row {row} (own id {r.job.object_id}) reuses the id of row {source.index}"
        records.append({"id": frame.loc[row, survey.id_column], "kind": kind, "row": row, "detail": detail})
    return frame, records


@dataclass
class Summary:
    survey: str
    catalog: Path
    images_dir: Path
    truth: pd.DataFrame
    catalog_frame: pd.DataFrame
    corruptions: list[dict]


def generate(survey: SurveyConfig, opts: Options) -> Summary:
    """Write the catalog, images, truth.parquet and corruptions.csv of one mock survey under opts.out_dir."""
    if opts.num_galaxies < 1:
        raise ValueError(f"--num-galaxies must be >= 1, got {opts.num_galaxies}")
    if opts.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {opts.workers}")
    sky.check_pattern(survey)
    fmt = tables.table_format(survey.catalog, survey.mock.catalog_format)
    load_tree(survey)  # fail on an unknown campaign before any rendering
    catalog_path, images_dir = prepare_out_dir(survey, opts)
    jobs, sources = plan_jobs(survey, opts)
    context = {"survey": survey, "seed": opts.seed, "images_dir": str(images_dir)}
    bar = tqdm(total=len(jobs), desc=f"mock {survey.name}", unit="galaxy", disable=not opts.progress)
    results = []
    for result in _results(jobs, context, opts.workers):
        results.append(result)
        bar.update(1)
    bar.close()
    frame = pd.DataFrame.from_records(catalog_rows(survey, results, sources))
    tables.check_required(survey, frame.columns)
    frame, records = _corrupt_catalog(survey, frame, results, sources)
    tables.write_table(frame, catalog_path, fmt)
    truth = pd.DataFrame.from_records([dict(r.truth, corruption=r.job.corruption, pixel_defects=r.defects,
                                            catalog_id=frame.loc[r.job.index, survey.id_column])
                                       for r in results])
    truth.to_parquet(opts.out_dir / "truth.parquet", index=False)
    corruptions = pd.DataFrame(records, columns=["id", "kind", "row", "detail"])
    corruptions.to_csv(opts.out_dir / "corruptions.csv", index=False)
    return Summary(survey.name, catalog_path, images_dir, truth, frame, records)
