"""`python -m sharding.build`: a survey's catalog and cutouts become webdataset shards, labels and a manifest."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import yaml
from tqdm import tqdm

from sharding import images, parts, pool, progress, render
from sharding.catalog import Reject, check_columns, has_answers, load_labels, parse_splits, read_catalog
from sharding.config import to_dict
from sharding.registry import SHARD_SURVEY_FILE, SurveyConfig, list_surveys, load_survey
from sharding.schema import FeatureSchema, load_schema
from sharding.sky import DEFAULT_NSIDE, SPLIT_RULES, nside_for, split_rule
from sharding.writer import ShardPacker, sha256_of

MANIFEST_VERSION = 1
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
_WORKER: dict = {}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sharding.build",
        description="Turn one survey's Galaxy Zoo catalog and image cutouts into webdataset tar shards with DALI "
                    "index files, labels.parquet (the 26 standard features by name, vote counts, native columns), "
                    "rejects.parquet (every input that was not sharded, with the reason) and manifest.json. "
                    "Defaults come from configs/surveys/<survey>.yaml. Re-running after an interruption resumes "
                    "and gives byte-identical output.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--survey", required=True, help=f"survey name ({', '.join(list_surveys())}) or a YAML path")
    parser.add_argument("--catalog", help="catalog table (.csv, .parquet, .fits); default: the survey YAML's")
    parser.add_argument("--images", help="image directory; default: the survey YAML's")
    parser.add_argument("--out", default="data/shards", help="shard root; the survey's files go to <out>/<survey>/")
    parser.add_argument("--samples-per-shard", type=int, help="samples per tar (default: survey YAML, 1000)")
    parser.add_argument("--workers", type=int, default=1, help="image-processing worker processes")
    parser.add_argument("--image-size", type=int, help="output square size in pixels (default: survey YAML)")
    parser.add_argument("--image-format", choices=("jpg", "png"), default="jpg", help="8-bit RGB encoding")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality (1-100)")
    parser.add_argument("--jpeg-chroma", choices=("420", "444"), default="420",
                        help="JPEG chroma sampling: 420 (survey cutout services' default: smaller, faster) or 444 "
                             "(full-resolution colour)")
    parser.add_argument("--keep-float", action="store_true", help="also store the float16 multi-band cutout (.npy)")
    parser.add_argument("--image-pattern", help="file name pattern for {id} (and {band}); default: survey YAML")
    parser.add_argument("--splits", default="train=0.8,val=0.1,test=0.1",
                        help="split fractions, assigned by a stable hash of the galaxy's sky cell (or of its id)")
    parser.add_argument("--split-by", choices=SPLIT_RULES, default="sky",
                        help="sky: hash of the HEALPix cell of the position, so a galaxy's copies in every survey "
                             "share a split whatever order the surveys are built in (check with sharding.verify "
                             "--across); id: hash of the object id (twins in two surveys may land in different "
                             "splits)")
    parser.add_argument("--sky-cell-deg", type=float, default=None,
                        help=f"side of the sky cells in degrees, rounded to a HEALPix nside (default nside "
                             f"{DEFAULT_NSIDE}, 0.23 deg); every survey of a shard root should use the same")
    parser.add_argument("--overwrite", action="store_true", help="delete this survey's previous output first")
    parser.add_argument("--strict", action="store_true", help="exit non-zero if any input was rejected")
    parser.add_argument("--unlabeled", action="store_true",
                        help="shard images with ids and positions only, for self-supervised training: every standard "
                             "feature NaN, zero votes, the manifest says labelled: false. Automatic when the catalog "
                             "has none of the survey's answer columns")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--part", metavar="I/N",
                       help="render only the I-th of N slices of every split into <out>/<survey>/_parts/ (e.g. one "
                            "array task per node); the last part to finish merges, or run --merge")
    group.add_argument("--merge", action="store_true",
                       help="pack the finished parts into the survey's shards, labels, rejects and manifest: "
                            "byte-identical to a one-process build")
    return parser.parse_args(argv)


def build_params(args: argparse.Namespace, survey: SurveyConfig, catalog: Path, images_dir: Path,
                 unlabeled: bool = False) -> dict:
    """Everything that decides the bytes of the output; a resume must match it exactly.

    "unlabeled" is present only when true, so labelled builds made before it existed still count as built.
    """
    if not 1 <= args.jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be in 1..100, got {args.jpeg_quality}")
    pattern = args.image_pattern or survey.image_pattern
    if ".." in Path(pattern).parts:
        raise ValueError(f"--image-pattern {pattern!r} leaves the images folder ('..'); name files inside --images")
    size = args.image_size or survey.image_size
    per_shard = args.samples_per_shard or survey.samples_per_shard
    if size < 16 or per_shard < 1:
        raise ValueError("--image-size must be >= 16 and --samples-per-shard >= 1")
    return {
        "catalog": str(catalog), "catalog_sha256": sha256_of(catalog), "images": str(images_dir),
        "image_pattern": pattern, "image_size": size,
        "image_format": args.image_format, "jpeg_quality": args.jpeg_quality, "jpeg_chroma": args.jpeg_chroma,
        "keep_float": args.keep_float,
        "samples_per_shard": per_shard, "splits": parse_splits(args.splits), "survey": to_dict(survey),
        "split_rule": split_rule(args.split_by, nside_for(args.sky_cell_deg) if args.sky_cell_deg else DEFAULT_NSIDE),
        **({"unlabeled": True} if unlabeled else {}),
    }


def _init_worker(params: dict) -> None:
    _WORKER.update(params)
    _keep_freed_memory()


def _keep_freed_memory() -> None:
    """Have glibc reuse freed megabyte-sized arrays instead of handing them back to the kernel.

    Every galaxy allocates a few cube-sized temporaries; by default glibc maps each one fresh and unmaps it on
    free, and faulting those pages back in costs ~30% of the render on a VM. Process-wide, which suits the
    build's short-lived processes; a no-op where libc has no mallopt (macOS, musl).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's ceiling: blocks below 32 MiB come from the reusable heap
    mallopt(M_TRIM_THRESHOLD, 256 << 20)  # and the heap keeps up to 256 MiB of free space instead of trimming it


def _process(task: tuple) -> tuple:
    """Render one galaxy in a worker: (position, key, members or None, Reject or None)."""
    position, key, object_id, row, file_loc = task
    p = _WORKER
    paths: list[Path] = []
    try:
        paths = images.locate_images(Path(p["images"]), p["image_pattern"], object_id,
                                     p["survey"]["bands"], file_loc)
        members = render.prepare_sample(paths, image_size=p["image_size"], image_format=p["image_format"],
                                        keep_float=p["keep_float"], jpeg_quality=p["jpeg_quality"],
                                        jpeg_chroma=p["jpeg_chroma"])
        return position, key, members, None
    except images.ImageError as err:
        files = ";".join(str(x) for x in paths) or (file_loc or "")
        return position, key, None, Reject("image", err.reason, str(err), row, object_id, files)


def _tasks(labels: pd.DataFrame, split: str, start: int) -> list[tuple]:
    rows = labels[labels["split"] == split]
    file_locs = rows["file_loc"] if "file_loc" in rows.columns else [None] * len(rows)
    tasks = list(zip(range(len(rows)), rows["key"], rows["object_id"], map(int, rows["row"]), file_locs))
    return tasks[start:]


def _renderer(params: dict, workers: int):
    """Yields tasks -> iterator of _process results, in order: in this process, or one worker pool for every split."""
    return pool.ordered_map(_process, _init_worker, params, workers)


PROBE_ROWS, PROBE_MIN = 50, 10


def _diagnosis(params: dict, survey: SurveyConfig, object_ids: list[str]) -> str:
    return images.diagnose_missing(Path(params["images"]), params["image_pattern"], object_ids, survey.bands)


def check_images_found(labels: pd.DataFrame, params: dict, survey: SurveyConfig) -> None:
    """Fail before rendering anything when none of the first galaxies has an image (a wrong pattern or folder)."""
    probe = labels.head(PROBE_ROWS)
    locs = probe["file_loc"] if "file_loc" in probe.columns else [None] * len(probe)
    found = sum(images.image_found(Path(params["images"]), params["image_pattern"], oid, survey.bands, loc)
                for oid, loc in zip(probe["object_id"], locs))
    if len(probe) >= PROBE_MIN and not found:  # a few missing files are rejects; all of the first 50 is a mistake
        raise ValueError(_diagnosis(params, survey, probe["object_id"].tolist()))


@contextlib.contextmanager
def _part_reader(survey_dir: Path):
    """A merge's rendering step: read back from the finished parts (checked only when there is work to do)."""
    yield parts.PartReader(parts.all_parts(survey_dir))


def write_split(out_dir: Path, survey: str, split: str, labels: pd.DataFrame, params: dict,
                state: progress.SplitState, log: progress.ProgressLog, render_all, bar) -> None:
    """Render and pack one split from where an earlier run stopped, logging every completed shard."""
    tasks = _tasks(labels, split, state.next_position)
    packer = ShardPacker(out_dir, survey, split, params["samples_per_shard"], first_shard=len(state.records))
    pending: list[Reject] = []
    try:
        for position, key, members, reject in render_all(tasks):
            bar.update(1)
            if reject is not None:
                pending.append(reject)
                continue
            record = packer.add(key, members)
            if record is not None:
                log.shard_done(split, record, position + 1, pending)
                pending = []
        log.split_done(split, packer.flush(), len(tasks) + state.next_position, pending)
    except BaseException:
        packer.abandon()
        raise


def finalize(out_dir: Path, survey: SurveyConfig, schema: FeatureSchema, params: dict, labels: pd.DataFrame,
             catalog_rejects: list[Reject], states: dict[str, progress.SplitState]) -> dict:
    """labels.parquet, rejects.parquet and manifest.json from the completed shards."""
    records = [r for s in states.values() for r in s.records]
    shard_of = {key: r.name for r in records for key in r.keys}
    written = labels[labels["key"].isin(shard_of)].copy()
    written.insert(written.columns.get_loc("split") + 1, "shard", written["key"].map(shard_of))
    order = {key: i for i, key in enumerate(k for r in records for k in r.keys)}
    written = written.sort_values("key", key=lambda s: s.map(order)).reset_index(drop=True)
    progress.write_parquet(written, out_dir / "labels.parquet")
    image_rejects = [r for s in states.values() for r in s.rejects]
    rejects = sorted(catalog_rejects + image_rejects, key=lambda r: (r.row, r.stage))
    progress.write_parquet(progress.rejects_frame(rejects, survey.name), out_dir / "rejects.parquet")
    # The resolved survey beside its shards: eval finds a survey that has no configs/surveys/ YAML (a derived one)
    # by name under the shard root (sharding.registry.load_survey(name, shard_root=...)).
    progress.write_text_atomic(out_dir / SHARD_SURVEY_FILE, yaml.safe_dump(params["survey"], sort_keys=False,
                                                                           default_flow_style=None, width=120))
    manifest = {
        "schema_version": MANIFEST_VERSION, "survey": survey.name,
        "survey_meta": {k: params["survey"][k] for k in ("campaign", "pixel_scale_arcsec", "psf_fwhm_arcsec",
                                                         "bands", "bunit", "catalog_reference")},
        "feature_schema": {"name": schema.name, "version": schema.version, "features": schema.names,
                           "questions": {q.name: [f.name for f in q.features] for q in schema.questions}},
        "build": params,
        "split_rule": params["split_rule"],
        "labelled": not params.get("unlabeled", False),
        "members": [params["image_format"]] + (["npy"] if params["keep_float"] else []),
        "num_samples": len(written), "num_rejects": len(rejects),
        "splits": {split: {"num_samples": sum(r.num_samples for r in s.records), "num_shards": len(s.records)}
                   for split, s in states.items()},
        "shards": [r.manifest_entry() for r in records],
        "labels": "labels.parquet", "rejects": "rejects.parquet",
    }
    progress.write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def print_summary(manifest: dict, rejects: pd.DataFrame, seconds: float, out_dir: Path) -> None:
    unlabeled = "" if manifest.get("labelled", True) else " (unlabeled)"
    print(f"\n{manifest['survey']}{unlabeled}: {manifest['num_samples']} samples in "
          f"{len(manifest['shards'])} shards -> {out_dir}  ({seconds:.1f} s)")
    rule = manifest["split_rule"]
    by = (f"the HEALPix cell (nside {rule['healpix_nside']}, {rule['cell_deg']} deg) of each position"
          if rule["split_by"] == "sky" else "the object id")
    print(f"  splits by a hash of {by}:")
    for split, info in manifest["splits"].items():
        print(f"  {split:>6}: {info['num_samples']:>7} samples, {info['num_shards']:>4} shards")
    empty = [s for s, info in manifest["splits"].items() if not info["num_samples"]]
    if empty and manifest["num_samples"]:
        print(f"warning: split(s) {empty} of {manifest['survey']} are empty: whole sky cells go to one split, so a "
              "small or compact survey's splits vary; use a smaller --sky-cell-deg, more galaxies, or --split-by id",
              file=sys.stderr)
    if len(rejects):
        print(f"  rejected {len(rejects)} input(s) (see {out_dir / 'rejects.parquet'}):")
        for (stage, reason), n in sorted(Counter(zip(rejects["stage"], rejects["reason"])).items()):
            print(f"    {stage:>7} {reason:<16} {n}")
    else:
        print("  no rejects")


def is_unlabeled(args: argparse.Namespace, columns, survey: SurveyConfig, catalog: Path) -> bool:
    """--unlabeled, or a catalog without any of the survey's answer columns (said out loud: a catalog whose vote
    columns are misnamed in the survey YAML would look the same, and a supervised stage then refuses it)."""
    if args.unlabeled:
        return True
    if has_answers(columns, survey):
        return False
    print(f"{survey.name}: catalog {catalog} has none of the survey's answer columns: building it unlabeled "
          "(images, ids and positions; pass --unlabeled to say so, or fix the column names in the survey YAML "
          "if it has votes)", file=sys.stderr)
    return True


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    survey = load_survey(args.survey)
    schema = load_schema()
    catalog = Path(args.catalog or survey.catalog)
    images_dir = Path(args.images or survey.images)
    if not images_dir.is_dir():
        raise ValueError(f"image directory not found: {images_dir}. Pass --images DIR.")
    df = read_catalog(catalog)
    unlabeled = is_unlabeled(args, df.columns, survey, catalog)
    check_columns(df.columns, survey, catalog, labelled=not unlabeled)
    params = build_params(args, survey, catalog, images_dir, unlabeled)
    survey_dir = Path(args.out) / survey.name
    labels, catalog_rejects = load_labels(df, survey, schema, params["splits"], labelled=not unlabeled,
                                          rule=params["split_rule"])
    if not args.merge:
        check_images_found(labels, params, survey)  # on the whole catalog: a part may hold a handful of rows
    if args.part:
        index, count = parts.parse_part(args.part)
        out_dir = parts.part_dir(survey_dir, index, count)
        labels = parts.part_rows(labels, list(params["splits"]), index, count)
        params, catalog_rejects = {**params, "part": [index, count]}, []  # the merge reports catalog rejects
    else:
        out_dir = survey_dir
    render = _part_reader(survey_dir) if args.merge else _renderer(params, args.workers)
    built = build_dir(out_dir, survey, schema, params, labels, catalog_rejects, args, render)
    if built is None:
        print(f"{survey.name}: already built in {out_dir} with these arguments; nothing to do "
              "(use --overwrite to rebuild).")
        return _exit_code(args, out_dir)
    manifest, seconds = built, time.perf_counter() - started
    rejects = pd.read_parquet(out_dir / "rejects.parquet")
    print_summary(manifest, rejects, seconds, out_dir)
    missing = rejects.loc[rejects["reason"] == "missing-file", "object_id"].tolist()
    if missing and len(missing) > manifest["num_samples"]:
        print(f"warning: most images were not found. {_diagnosis(params, survey, missing[:50])}", file=sys.stderr)
    if manifest["num_samples"] == 0 and not args.part:  # a part may hold no galaxies of a small catalog
        print(f"error: nothing was sharded for {survey.name}: every input was rejected (see {out_dir / 'rejects.parquet'})",
              file=sys.stderr)
        return 1
    if args.merge:
        shutil.rmtree(survey_dir / parts.PARTS_DIR, ignore_errors=True)
    elif args.part and len(parts.finished_parts(survey_dir)) == count and parts.try_lock(survey_dir):
        print(f"\nall {count} parts of {survey.name} are done: merging", flush=True)
        return run(argparse.Namespace(**{**vars(args), "part": None, "merge": True, "overwrite": False}))
    return _exit_code(args, out_dir)


def build_dir(out_dir: Path, survey: SurveyConfig, schema: FeatureSchema, params: dict, labels: pd.DataFrame,
              catalog_rejects: list[Reject], args: argparse.Namespace, render) -> dict | None:
    """Render (or read back from parts) and pack every split into out_dir, resuming; None if already built."""
    states = progress.prepare(out_dir, params, args.overwrite)
    if states is None:
        return None
    remaining = sum(max(0, int((labels["split"] == s).sum()) - states[s].next_position) for s in states)
    with progress.ProgressLog(out_dir) as log, tqdm(total=remaining, unit="gal", desc=f"{survey.name} shards",
                                                    disable=args.no_progress, mininterval=0.5) as bar, \
            render as render_all:
        for split, state in states.items():
            if not state.done:
                write_split(out_dir, survey.name, split, labels, params, state, log, render_all, bar)
    states = progress.load_states(out_dir, params)
    manifest = finalize(out_dir, survey, schema, params, labels, catalog_rejects, states)
    progress.cleanup(out_dir)
    return manifest


def _exit_code(args: argparse.Namespace, out_dir: Path) -> int:
    num_rejects = pq.read_metadata(out_dir / "rejects.parquet").num_rows
    if args.strict and num_rejects:
        print(f"--strict: {num_rejects} input(s) rejected (see {out_dir / 'rejects.parquet'})", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
