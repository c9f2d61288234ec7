"""The pools `python -m eval select` picks from, behind one interface, so the selection never asks which kind:

- `ShardPool`: one survey split of built shards (`--pool SHARD_ROOT --surveys decals --split train`), read as
  eval predict reads shards (an unreadable sample is a reject; past training's error rate the job stops);
- `CatalogPool`: a catalog + image folder (`--pool CATALOG --images DIR --survey decals`), every row a candidate,
  rendered by eval.catalog_input exactly as sharding.build renders (so the pixels equal built shards'); a row
  that cannot be rendered (missing or corrupt file, duplicate key, empty id) is a reject with its catalog row.

Both have: `len(pool)` rows; `keys(rows)`; `batches(rows, batch_size, cfg, decode)` yielding (images or None,
keys, rows) for the readable rows, recording the others in `reject_rows`; `catalog` (key -> object_id, ra, dec);
`image_bytes(keys)` (the encoded images, for the upload folder and the contact sheet); `state()`/`restore()` for
the selection's checkpoint. Only the rows of one chunk are rendered or read at a time.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from eval import catalog_input, reading, source as sources
from loaders.evaluation import plain_image
from loaders.loader import LoaderConfig
from loaders.shards import SampleReader, load_survey_shards
from sharding.catalog import read_catalog
from sharding.registry import load_survey
from sharding.writer import sha256_of

Batch = tuple[torch.Tensor | None, list[str], np.ndarray]  # (images, keys, rows); images None when not decoded
CATALOG_OPTIONS = ("survey", "image_pattern", "render_size")  # catalog-pool arguments that shards must not get


class ShardPool:
    """One survey split of built shards; rows are the split's rows in shard order."""
    reject_columns = reading.REJECT_COLUMNS

    def __init__(self, root: Path, survey: str, split: str):
        self.survey, self.directory = survey, root / survey
        self.info = load_survey_shards(self.directory, split)
        self.refs = reading.split_refs(self.info)
        self.image_ext = self.info.image_ext
        self.catalog = pd.read_parquet(self.directory / "labels.parquet",
                                       columns=["key", "object_id", "ra", "dec"]).set_index("key")
        self.rejects = reading.Rejects(self.info, split)

    def __len__(self) -> int:
        return len(self.refs)

    def keys(self, rows: np.ndarray) -> list[str]:
        return [self.info.key(int(self.refs[r][1]), int(self.refs[r][2])) for r in rows]

    def batches(self, rows: np.ndarray, batch_size: int, cfg: LoaderConfig, decode: bool = True) -> Iterator[Batch]:
        if not decode:  # random picks need no pixels; the build checked every image it wrote
            for start in range(0, len(rows), batch_size):
                yield None, self.keys(rows[start:start + batch_size]), rows[start:start + batch_size]
            return
        for batch in reading.iter_batches(cfg, self.info, self.refs[rows], rows, batch_size=batch_size,
                                          rejects=self.rejects):
            yield batch.images, batch.keys, batch.rows

    def image_bytes(self, keys: list[str]) -> dict[str, bytes]:
        where = {e.key: (s, i) for s, entries in enumerate(self.info.index) for i, e in enumerate(entries)}
        reader = SampleReader([self.info])
        try:
            return {key: reader.read(0, *where[key]) for key in keys}
        finally:
            reader.close()

    @property
    def reject_rows(self) -> list[dict]:
        return self.rejects.rows

    def state(self) -> dict:
        return {"read": self.rejects.num_read, "bad": self.rejects.num_bad, "rows": self.rejects.rows}

    def restore(self, state: dict) -> None:
        self.rejects.num_read, self.rejects.num_bad = state["read"], state["bad"]
        self.rejects.rows, self.rejects.examples = list(state["rows"]), list(state["rows"][:2])


class CatalogPool:
    """Every row of a catalog, rendered from its image folder; rows are the catalog's 0-based data rows."""
    reject_columns = catalog_input.REJECT_COLUMNS

    def __init__(self, catalog: Path, survey: str, images: str, image_pattern: str | None, render_size: int | None,
                 workers: int):
        config, self.rows, self.settings = catalog_input.open_catalog(survey, str(catalog), images, image_pattern,
                                                                      render_size)
        self.survey, self.workers, self.image_ext = config.name, workers, self.settings.image_format
        self.catalog = _positions(catalog, config, self.rows)
        self.rejects: list[dict] = []

    def __len__(self) -> int:
        return len(self.rows)

    def keys(self, rows: np.ndarray) -> list[str]:
        return [self.rows[r].key for r in rows]

    def _rendered(self, rows: list[catalog_input.CatalogRow]) -> list[tuple[catalog_input.CatalogRow, bytes]]:
        good = []
        for row, data, reject in catalog_input.iter_rendered(rows, self.settings, self.workers):
            if reject is not None:
                self.rejects.append(reject)
            else:
                good.append((row, data))
        return good

    def batches(self, rows: np.ndarray, batch_size: int, cfg: LoaderConfig, decode: bool = True) -> Iterator[Batch]:
        # Rendered even when not decoded: a random pick must be a row whose image can be uploaded.
        good = self._rendered([self.rows[r] for r in rows])
        for start in range(0, len(good), batch_size):
            part = good[start:start + batch_size]
            images = torch.stack([plain_image(data, cfg) for _, data in part]) if decode else None
            yield images, [row.key for row, _ in part], np.array([row.position for row, _ in part], np.int64)

    def image_bytes(self, keys: list[str]) -> dict[str, bytes]:
        """The picks rendered again (only rows that rendered while scoring are picked)."""
        position = {row.key: row.position for row in self.rows if row.duplicate_of is None}
        wanted = [self.rows[position[key]] for key in keys]
        out = {}
        for row, data, reject in catalog_input.iter_rendered(wanted, self.settings, self.workers):
            if reject is not None:
                raise ValueError(f"{reject['file'] or self.settings.images}: row {row.position} ({row.key}) rendered "
                                 f"while it was scored but not now ({reject['detail']}); did the image folder change? "
                                 "Restore it, or select again with --overwrite")
            out[row.key] = data
        return out

    @property
    def reject_rows(self) -> list[dict]:
        return self.rejects

    def state(self) -> dict:
        return {"rows": self.rejects}

    def restore(self, state: dict) -> None:
        self.rejects = list(state["rows"])


def _positions(path: Path, survey, rows: list[catalog_input.CatalogRow]) -> pd.DataFrame:
    """key -> object_id, ra, dec from the survey's ra/dec columns (NaN where the catalog has none)."""
    df = read_catalog(path)
    coords = {name: pd.to_numeric(df[column], errors="coerce").to_numpy(np.float64) if column in df.columns
              else np.full(len(df), np.nan) for name, column in (("ra", survey.ra_column), ("dec", survey.dec_column))}
    frame = pd.DataFrame({"key": [r.key for r in rows], "object_id": [r.object_id for r in rows], **coords})
    return frame[~frame["key"].duplicated()].set_index("key")


def is_catalog(args: argparse.Namespace) -> bool:
    """Which pool the arguments name; ValueError naming the fix when they mix the two forms."""
    given = [f"--{name.replace('_', '-')}" for name in CATALOG_OPTIONS if getattr(args, name) is not None]
    if args.images is None:
        if given:
            raise ValueError(f"{', '.join(given)} belong to a catalog pool (--pool CATALOG --images DIR --survey "
                             "NAME); a shard pool takes --surveys a,b")
        if not args.surveys:
            raise ValueError("give --surveys a,b for a shard pool (or --images DIR and --survey NAME for a catalog)")
        if Path(args.pool).is_file():
            raise ValueError(f"--pool {args.pool} is a file: a catalog pool needs --images DIR and --survey NAME")
        return False
    if args.surveys:
        raise ValueError("--surveys is for a shard pool; a catalog pool (--images) takes one --survey NAME")
    if not args.survey:
        raise ValueError("a catalog pool (--images) needs --survey NAME (its YAML gives the id column, file pattern "
                         "and bands)")
    if not Path(args.pool).is_file():
        raise ValueError(f"--pool {args.pool} is not a catalog file; with --images, --pool is the catalog "
                         "(CSV, Parquet or FITS) whose rows are rendered from --images")
    return True


def pool_surveys(args: argparse.Namespace) -> list[str]:
    if is_catalog(args):
        return [load_survey(args.survey).name]
    return [s.strip() for s in args.surveys.split(",") if s.strip()]


def fingerprint(args: argparse.Namespace) -> dict:
    """What identifies the pool's content for the signature: shard manifests, or catalog hash + rendering."""
    if is_catalog(args):
        survey = load_survey(args.survey)
        settings = catalog_input.render_settings(survey, args.images, args.image_pattern, args.render_size)
        return {"catalog_sha256": sha256_of(args.pool), "survey": survey.name, "render": vars(settings)}
    return {"manifests": {s: sha256_of(Path(args.pool) / s / "manifest.json") for s in pool_surveys(args)}}


def open_pools(args: argparse.Namespace, source: sources.ModelSource) -> list[ShardPool] | list[CatalogPool]:
    if is_catalog(args):
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        return [CatalogPool(Path(args.pool), args.survey, args.images, args.image_pattern, args.render_size,
                            args.workers)]
    for survey in pool_surveys(args):
        sources.check_shards(source, Path(args.pool) / survey, source.input_spec())
    return [ShardPool(Path(args.pool), survey, args.split) for survey in pool_surveys(args)]


def thumbnails(images: dict[str, bytes], size: int = 96) -> dict[str, np.ndarray]:
    """{key: (size, size, 3) uint8} of the images PIL can decode (a damaged one is left out of the sheet)."""
    from PIL import Image

    out = {}
    for key, data in images.items():
        try:
            with Image.open(io.BytesIO(data)) as image:
                out[key] = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        except (OSError, ValueError):
            continue
    return out
