"""The SSL benchmark's data (bench/ssl_bench.py, bench/active.py): the mock surveys of one sky, made again on every
run, an unlabeled UKIDSS build, more unlabeled galaxies from another sky, and the random backbone."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.kept import newest_manifest_time, shard_fingerprint
from bench.ssl_targets import LABELLED

HELD_OUT = "ukidss"

STALE_HINT = (" (where the build says its folder holds a build made with different arguments, the mock changed "
              "since that build: runs on the old shards do not compare with new ones; use another --out)")


def fresh_shards(args: argparse.Namespace) -> Path:
    """launch.demo's mock surveys under args.out/shards, made again every time (about a minute): the build finds
    nothing to do when they are what this code makes, and stops when they are not."""
    from launch.demo import make_shards
    try:
        return make_shards(args.out, args.num_galaxies,
                           argparse.Namespace(seed=args.seed, workers=2, corrupt_fraction=0.0))
    except RuntimeError as err:
        raise RuntimeError(f"{err}{STALE_HINT}") from None


def fingerprint_shards(args: argparse.Namespace, *roots: Path) -> None:
    """What train() checks kept runs against (bench.kept)."""
    args.shards_fingerprint = shard_fingerprint(*roots)
    args.shards_built_at = newest_manifest_time(*roots)


def make_data(args: argparse.Namespace) -> tuple[Path, Path]:
    """(labelled shard root, SSL shard root): the demo's mock surveys, and UKIDSS once more, unlabeled."""
    from sharding import build
    from sharding.registry import load_survey
    labelled = fresh_shards(args)
    unlabeled = args.out / "shards_unlabeled"
    raw = args.out / "raw" / HELD_OUT
    if build.main(["--survey", HELD_OUT, "--catalog", str(raw / Path(load_survey(HELD_OUT).catalog).name),
                   "--images", str(raw / "images"), "--out", str(unlabeled), "--unlabeled", "--no-progress"]):
        raise RuntimeError(f"the unlabeled UKIDSS build failed{STALE_HINT}")
    fingerprint_shards(args, labelled, unlabeled)
    ssl_root = args.out / "shards_ssl"
    ssl_root.mkdir(exist_ok=True)
    for survey, target in [*((s, labelled / s) for s in LABELLED), (HELD_OUT, unlabeled / HELD_OUT)]:
        link = ssl_root / survey
        if not link.exists():
            link.symlink_to(target.resolve(), target_is_directory=True)
    return labelled, ssl_root


def random_backbone(args: argparse.Namespace) -> Path:
    """The cpu model (with --backbone's settings) at its initial weights (seed args.seed), saved once under
    args.out."""
    random_dir = args.out / "runs" / "random_backbone"
    if not (random_dir / "config.json").is_file():
        from transformers import Dinov2Model

        from models.backbone import dinov2_config
        from models.config import load_model_config
        torch.manual_seed(args.seed)
        Dinov2Model(dinov2_config(load_model_config("cpu", args.backbone).backbone)).save_pretrained(random_dir)
    return random_dir


def more_images(args: argparse.Namespace) -> Path:
    """--more-unlabeled N: N more galaxies of each of the four surveys from another mock sky (seed + 1: no galaxy of
    the labelled shards), built --unlabeled: the unlabeled cutouts a survey has beyond its Galaxy Zoo votes."""
    from sharding import build
    from sharding.mock import cli as mock
    from sharding.registry import load_survey
    root = args.out / "more"
    for survey in (*LABELLED, HELD_OUT):
        raw = root / "raw" / survey  # made again every time, as fresh_shards' (the build then finds nothing to do)
        if mock.main(["--survey", survey, "--num-galaxies", str(args.more_unlabeled), "--out", str(raw), "--seed",
                      str(args.seed + 1), "--workers", "2", "--overwrite", "--no-progress"]) or build.main([
                "--survey", survey, "--catalog", str(raw / Path(load_survey(survey).catalog).name), "--images",
                str(raw / "images"), "--out", str(root / "shards"), "--unlabeled", "--workers", "2", "--no-progress"]):
            raise RuntimeError(f"the extra unlabeled {survey} images failed{STALE_HINT}")
    return root / "shards"
