"""Predicting straight from a catalog and an image folder: the rendering of sharding.build, without shards.

Only the id column (and a file_loc column where the catalog has one) is needed: a new catalog has no votes yet.
Images that cannot be rendered are returned as rejects with the catalog row, never dropped silently.
"""

from __future__ import annotations

import argparse
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sharding import images as sharding_images, render
from sharding.catalog import make_key, normalise_ids, parse_splits, read_catalog
from sharding.registry import SurveyConfig, load_survey
from sharding.sky import DEFAULT_NSIDE, assign_splits, split_rule

DEFAULT_SPLITS = "train=0.8,val=0.1,test=0.1"  # sharding.build's default, so split labels agree with shards
DEFAULT_RULE = split_rule("sky", DEFAULT_NSIDE)  # and its default rule: sky cells
REJECT_COLUMNS = ["row", "object_id", "reason", "detail", "file"]


@dataclass(frozen=True)
class CatalogRow:
    position: int  # 0-based data row in the catalog
    object_id: str
    key: str
    split: str
    file_loc: str | None
    duplicate_of: int | None = None  # the earlier row with the same key (this one is rejected, as the build does)


@dataclass(frozen=True)
class RenderSettings:
    """sharding.build's rendering arguments; the defaults are the build's, so pixels match built shards."""
    images: str
    image_pattern: str
    bands: tuple[str, ...]
    image_size: int
    image_format: str = "jpg"
    jpeg_quality: int = 95
    jpeg_chroma: str = "420"


def add_catalog_args(parser: argparse.ArgumentParser, what: str) -> None:
    """The options that say how a catalog's images are found and rendered (eval predict --catalog, eval select's
    catalog pool); `what` names the catalog option in the help."""
    parser.add_argument("--images", help=f"image folder of {what}")
    parser.add_argument("--survey", help=f"survey of {what} (its YAML gives id column, pattern, bands)")
    parser.add_argument("--image-pattern", help=f"file name pattern for {what} ({{id}}, {{band}}); default: YAML's")
    parser.add_argument("--render-size", type=int, help=f"rendering size for {what} (default: the YAML's, as "
                                                        "sharding.build)")
    parser.add_argument("--workers", type=int, default=1, help=f"rendering processes for {what}")


def catalog_rows(catalog: str | Path, survey: SurveyConfig, splits: str = DEFAULT_SPLITS) -> list[CatalogRow]:
    df = read_catalog(catalog)
    if survey.id_column not in df.columns:
        raise ValueError(f"catalog {catalog} has no id column {survey.id_column!r} (the {survey.name} survey's "
                         f"id_column); its columns are {list(df.columns)[:12]}")
    ids = normalise_ids(df[survey.id_column]).reset_index(drop=True)
    locs = df["file_loc"].astype(str).tolist() if "file_loc" in df.columns else [None] * len(df)
    positions = [pd.to_numeric(df[c], errors="coerce").to_numpy() if c in df.columns else np.full(len(df), np.nan)
                 for c in (survey.ra_column, survey.dec_column)]
    assigned = assign_splits(ids, *positions, parse_splits(splits), DEFAULT_RULE)  # "" without a position
    first: dict[str, int] = {}
    rows = []
    for i, (oid, loc, split) in enumerate(zip(ids, locs, assigned)):
        key = make_key(survey.name, oid)
        rows.append(CatalogRow(i, oid, key, split, loc, first.get(key)))
        first.setdefault(key, i)
    return rows


def render_settings(survey: SurveyConfig, images: str | Path, image_pattern: str | None,
                    image_size: int | None) -> RenderSettings:
    if not Path(images).is_dir():
        raise ValueError(f"image directory not found: {images}; pass --images DIR")
    return RenderSettings(str(images), image_pattern or survey.image_pattern, tuple(survey.bands),
                          image_size or survey.image_size)


def render_row(task: tuple[CatalogRow, RenderSettings]) -> tuple[CatalogRow, bytes | None, dict | None]:
    """(row, encoded 8-bit image, None) or (row, None, reject record)."""
    row, settings = task
    paths: list[Path] = []
    if not row.object_id:
        return row, None, {"row": row.position, "object_id": "", "reason": "missing-id",
                           "detail": "empty object id", "file": ""}
    if row.duplicate_of is not None:
        return row, None, {"row": row.position, "object_id": row.object_id, "reason": "duplicate-key",
                           "detail": f"key {row.key} already given by row {row.duplicate_of}", "file": ""}
    try:
        paths = sharding_images.locate_images(Path(settings.images), settings.image_pattern, row.object_id,
                                              list(settings.bands), row.file_loc)
        members = render.prepare_sample(paths, image_size=settings.image_size, image_format=settings.image_format,
                                        jpeg_quality=settings.jpeg_quality, jpeg_chroma=settings.jpeg_chroma)
        return row, members[settings.image_format], None
    except sharding_images.ImageError as err:
        return row, None, {"row": row.position, "object_id": row.object_id, "reason": err.reason,
                           "detail": str(err), "file": ";".join(map(str, paths)) or (row.file_loc or "")}


def iter_rendered(rows: list[CatalogRow], settings: RenderSettings,
                  workers: int) -> Iterator[tuple[CatalogRow, bytes | None, dict | None]]:
    """render_row over the rows, in order, in `workers` processes."""
    tasks = [(row, settings) for row in rows]
    if workers <= 1:
        yield from map(render_row, tasks)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(render_row, tasks, chunksize=max(1, min(16, len(tasks) // (workers * 4))))


def open_catalog(survey_name: str, catalog: str, images: str, image_pattern: str | None,
                 image_size: int | None) -> tuple[SurveyConfig, list[CatalogRow], RenderSettings]:
    survey = load_survey(survey_name)
    return survey, catalog_rows(catalog, survey), render_settings(survey, images, image_pattern, image_size)
