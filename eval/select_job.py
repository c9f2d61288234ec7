"""`python -m eval select`: choose the galaxies volunteers should label next, from a model's predictions on a pool.

The pool (a survey split of built shards) streams through the model `--chunk-rows` galaxies at a time; each chunk
is scored (eval.select) and only the best `--candidates` per survey are kept, so memory does not grow with the
pool. Strategies:
  random       a stable hash of (seed, key): the same picks whatever the chunking
  uncertainty  the top BALD scores (Dirichlet models) or MC variances (MSE models) from --mc-samples passes
  diversity    k-center greedy on the embeddings of a seeded random reservoir of --candidates galaxies
  hybrid       the --candidates most uncertain (default 4 x budget), then k-center greedy on their embeddings
Outputs: <out> (key, survey, object_id, ra, dec, score, rank, strategy); <out>.manifest.csv and <out>_images/
for the Zooniverse subject uploader; <out>.png, a contact sheet of the first picks.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from eval import reading, select, source as sources
from eval.infer import check_mc, infer, resolve_device
from eval.store import METADATA_KEY, read_metadata
from loaders.include import read_key_files
from loaders.loader import LoaderConfig
from loaders.shards import SampleReader, SurveyShards, load_survey_shards
from models.backbone import pooled_size
from models.head import concentrations, fractions
from sharding.writer import sha256_of

EXAMPLES = """examples:
  python -m eval select --model runs/decals --pool data/shards --surveys decals --split train --budget 500 \\
      --strategy hybrid --mc-samples 10 --exclude labelled.txt --out round1.parquet
  python -m eval select --model runs/mixed --pool data/shards --surveys decals,sdss --budget 1000 \\
      --strategy uncertainty --quota decals=0.5,sdss=0.5 --out round1.parquet
  then: panoptes subject-set upload-subjects SUBJECT_SET_ID round1.manifest.csv  (from round1_images/)
and, once the votes are sharded, train on the picks: python -m train ... data.include_keys=[round1.parquet]
Re-running with the same arguments finds the finished output and stops (nothing is recomputed); --overwrite
selects anew. A killed run starts over (predictions are not cached)."""
STRATEGIES = ("random", "uncertainty", "diversity", "hybrid")
STREAM_ID = 2**40  # candidate id = stream * STREAM_ID + row in the split: keys are looked up only for the kept few


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval select", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pick --budget galaxies of a pool for volunteers to label next, by uncertainty (BALD from MC "
                    "dropout), diversity (k-center greedy on embeddings), both, or at random.")
    parser.add_argument("--model", required=True, help="a training run folder or its export/ folder")
    parser.add_argument("--pool", required=True, help="shard root of the unlabelled pool (<root>/<survey>/)")
    parser.add_argument("--surveys", required=True, help="comma-separated surveys under --pool")
    parser.add_argument("--split", default="train", help="the split to pick from (train, val, test)")
    parser.add_argument("--budget", type=int, required=True, help="galaxies to pick")
    parser.add_argument("--strategy", required=True, choices=STRATEGIES)
    parser.add_argument("--out", required=True, help="picks Parquet file")
    parser.add_argument("--mc-samples", type=int, default=10, help="MC dropout passes (uncertainty, hybrid)")
    parser.add_argument("--exclude", action="append", default=[],
                        help="keys never to pick (already labelled): Parquet/CSV with a key column or one key per "
                             "line; repeatable")
    parser.add_argument("--quota", help="per-survey shares of the budget, e.g. decals=0.5,sdss=0.5 (largest "
                                        "remainder); default: one ranking over all surveys")
    parser.add_argument("--candidates", type=int, help="galaxies kept for k-center (hybrid: 4 x budget; diversity: "
                                                       "max(20 x budget, 10000))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-rows", type=int, default=reading.CHECK_ROWS, help="galaxies scored at a time")
    parser.add_argument("--sheet-size", type=int, default=24, help="picks shown in the contact sheet")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--overwrite", action="store_true", help="select anew even if --out is finished")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def parse_quota(text: str | None, surveys: list[str]) -> dict[str, float] | None:
    if not text:
        return None
    quotas = {}
    for part in text.split(","):
        survey, _, share = part.partition("=")
        if survey.strip() not in surveys or not share:
            raise ValueError(f"--quota {text!r}: {part!r} must be survey=share for a survey of --surveys {surveys}")
        quotas[survey.strip()] = float(share)
    return quotas


@dataclass
class Pool:
    """One survey split of the pool: shard index and the catalogue columns of its keys."""
    survey: str
    info: SurveyShards
    refs: np.ndarray
    catalog: pd.DataFrame  # indexed by key: object_id, ra, dec


def open_pool(root: Path, survey: str, split: str) -> Pool:
    info = load_survey_shards(root / survey, split)
    catalog = pd.read_parquet(root / survey / "labels.parquet", columns=["key", "object_id", "ra", "dec"])
    return Pool(survey, info, reading.split_refs(info), catalog.set_index("key"))


class Scorer:
    """Model, MC passes and the strategy's score of each galaxy in a batch (eval.select's pure functions)."""

    def __init__(self, args: argparse.Namespace, source: sources.ModelSource):
        self.args, self.source = args, source
        self.needs_model = args.strategy != "random"
        self.mc = args.mc_samples if args.strategy in ("uncertainty", "hybrid") else 0
        if self.mc == 1:
            raise ValueError("--mc-samples 1 has no spread; use 2 or more (10 is usual)")
        if args.strategy in ("uncertainty", "hybrid") and not self.mc:
            raise ValueError(f"--strategy {args.strategy} needs --mc-samples >= 2")
        self.model = sources.load_model(source, resolve_device(args.device)) if self.needs_model else None
        if self.model is not None:
            check_mc(self.model, self.mc)
            self.schema, self.layout = self.model.schema, self.model.layout
            self.columns = select.question_columns(self.schema, self.layout.other_questions)
        self.dirichlet = source.provenance.get("loss", "dirichlet") == "dirichlet"
        self.parents: dict[str, dict] = {}  # survey -> its campaign's question tree, read once

    def score(self, images: torch.Tensor, keys: list[str], survey: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, embeddings) of one batch; random scores for random and diversity (a uniform reservoir)."""
        if self.model is None:
            return select.random_scores(keys, self.args.seed), np.zeros((len(keys), 0), np.float32)
        out = infer(self.model, images, self.mc, seed, keep_samples=bool(self.mc))
        if not self.mc:
            return select.random_scores(keys, self.args.seed), out.embedding
        if survey not in self.parents:
            self.parents[survey] = select.question_parents(self.schema, survey)
        parents = self.parents[survey]
        raw = torch.from_numpy(out.samples)
        if self.dirichlet:
            alpha = concentrations(raw, self.layout).numpy()
            return select.bald_scores(alpha, self.columns, self.schema, parents), out.embedding
        frac = fractions(raw, self.layout).numpy()
        return select.mc_variance_scores(frac, self.schema, parents), out.embedding


def _stream_keys(pool: Pool, rows: np.ndarray) -> list[str]:
    return [pool.info.key(int(pool.refs[r][1]), int(pool.refs[r][2])) for r in rows]


def stream_pool(scorer: Scorer, pools: list[Pool], tops: dict[str, select.TopCandidates], excluded: set[str],
                args: argparse.Namespace) -> tuple[int, int]:
    """Scores every readable galaxy into its survey's candidates (or the shared one); returns how many were seen
    and how many were unreadable (skipped, as eval predict skips them, up to its error rate)."""
    spec = scorer.source.input_spec()
    cfg = LoaderConfig(backend="torch", image_size=spec.image_size, mean=spec.mean, std=spec.std)
    seen = unreadable = 0
    bar = tqdm(total=sum(len(p.refs) for p in pools), unit="gal", desc="select", disable=args.no_progress,
               dynamic_ncols=True, mininterval=0.5)
    for number, pool in enumerate(pools):
        top = tops.get(pool.survey) or tops["*"]
        rejects = reading.Rejects(pool.info, args.split)
        for start in range(0, len(pool.refs), args.chunk_rows):
            rows = np.arange(start, min(start + args.chunk_rows, len(pool.refs)))
            keep = np.array([k not in excluded for k in _stream_keys(pool, rows)], bool)
            bar.update(len(rows))
            rows = rows[keep]
            if scorer.model is None:  # random needs no images
                top.add(scorer.score(None, _stream_keys(pool, rows), pool.survey, 0)[0], number * STREAM_ID + rows)
                seen += len(rows)
                continue
            for batch in reading.iter_batches(cfg, pool.info, pool.refs[rows], rows, batch_size=args.batch_size,
                                              rejects=rejects):
                seed = (args.seed * 1_000_003 + number * 1_000_000_007 + int(batch.rows[0])) % 2**63
                scores, embedding = scorer.score(batch.images, batch.keys, pool.survey, seed)
                top.add(scores, number * STREAM_ID + batch.rows, embedding if top.payload.shape[1] else None)
                seen += len(batch.keys)
        unreadable += rejects.num_bad
    bar.close()
    return seen, unreadable


def pick(top: select.TopCandidates, count: int, strategy: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of the picks in rank order; diversity's scores are NaN (its order is the k-center order)."""
    scores, ids, payload = top.result()
    if strategy in ("random", "uncertainty") or count >= len(ids):
        order = np.arange(min(count, len(ids)))
    else:
        order = select.k_center_greedy(payload, count, seed=seed)
    picked = scores[order] if strategy != "diversity" else np.full(len(order), np.nan)
    return ids[order], picked


def picks_frame(pools: list[Pool], picks: dict[str, tuple[np.ndarray, np.ndarray]], strategy: str) -> pd.DataFrame:
    """One row per pick; with quotas the surveys' rankings interleave in proportion (pick i of n at i / n)."""
    rows = []
    for ids, scores in picks.values():
        for i, (ident, score) in enumerate(zip(ids, scores)):
            pool = pools[int(ident) // STREAM_ID]
            key = _stream_keys(pool, np.array([int(ident) % STREAM_ID]))[0]
            entry = pool.catalog.loc[key]
            rows.append({"key": key, "survey": pool.survey, "object_id": str(entry["object_id"]),
                         "ra": float(entry["ra"]), "dec": float(entry["dec"]), "score": float(score),
                         "order": i / len(ids)})
    frame = pd.DataFrame(rows, columns=["key", "survey", "object_id", "ra", "dec", "score", "order"])
    frame = frame.sort_values(["order"], kind="stable").drop(columns="order").reset_index(drop=True)
    frame["rank"] = np.arange(1, len(frame) + 1)
    frame["strategy"] = strategy
    assert frame["key"].is_unique, "a galaxy was picked twice"
    return frame


def write_upload(frame: pd.DataFrame, pools: list[Pool], out: Path) -> tuple[Path, Path]:
    """The picks' images (the shards' own JPEG/PNG bytes) and a Zooniverse subject manifest naming them."""
    folder = out.with_name(out.name.removesuffix(".parquet") + "_images")
    folder.mkdir(parents=True, exist_ok=True)
    by_survey = {p.survey: p for p in pools}
    names = []
    for survey, group in frame.groupby("survey", sort=False):
        info = by_survey[survey].info
        where = {e.key: (s, i) for s, entries in enumerate(info.index) for i, e in enumerate(entries)}
        reader = SampleReader([info])
        try:
            for key in group["key"]:
                name = f"{key}.{info.image_ext}"
                (folder / name).write_bytes(reader.read(0, *where[key]))
                names.append((key, name))
        finally:
            reader.close()
    image_of = dict(names)
    # The uploader makes every column subject metadata; names starting with '#' are hidden from volunteers, so the
    # model's score and rank cannot sway their answers.
    manifest = pd.DataFrame({"id": frame["key"], "image_1": [image_of[k] for k in frame["key"]],
                             "ra": frame["ra"], "dec": frame["dec"], "#survey": frame["survey"],
                             "#object_id": frame["object_id"], "#score": frame["score"], "#rank": frame["rank"]})
    manifest_path = out.with_name(out.name.removesuffix(".parquet") + ".manifest.csv")
    manifest.to_csv(manifest_path, index=False)
    return folder, manifest_path


def write_sheet(frame: pd.DataFrame, root: Path, out: Path, size: int) -> Path | None:
    from eval import plots
    from eval.thumbnails import read_thumbnails

    first = frame.head(size)
    thumbs = read_thumbnails(root, first["key"].tolist())
    shown = [row for row in first.itertuples() if row.key in thumbs]
    if not shown:
        return None
    path = out.with_suffix(".png")
    titles = [f"#{row.rank} {row.score:.3f}\n{row.key}" for row in shown]
    path.write_bytes(plots.contact_sheet([thumbs[row.key] for row in shown], titles, columns=min(6, len(shown))))
    return path


def signature(args: argparse.Namespace, source: sources.ModelSource, surveys: list[str]) -> dict:
    """What makes two selections the same: arguments, weights and shard manifests (not progress or device)."""
    options = {k: v for k, v in vars(args).items() if k not in ("no_progress", "overwrite", "device", "out")}
    return {**options, "model": source.record()["weights_sha256"],
            "manifests": {s: sha256_of(Path(args.pool) / s / "manifest.json") for s in surveys},
            "exclude_sha256": [sha256_of(p) for p in args.exclude]}


def run(args: argparse.Namespace) -> dict:
    if args.budget < 1:
        raise ValueError(f"--budget must be >= 1, got {args.budget}")
    root, out = Path(args.pool), Path(args.out)
    surveys = [s.strip() for s in args.surveys.split(",") if s.strip()]
    source = sources.open_source(args.model)
    sig = signature(args, source, surveys)
    if out.is_file() and not args.overwrite and read_metadata(out).get("signature") == sig:
        return {"out": str(out), "resumed": True, "rows": pq.read_metadata(out).num_rows}
    quotas = parse_quota(args.quota, surveys)
    counts = select.quota_counts(args.budget, quotas) if quotas else {"*": args.budget}
    pools = [open_pool(root, s, args.split) for s in surveys]
    for s in surveys:
        sources.check_shards(source, root / s, source.input_spec())
    scorer = Scorer(args, source)
    dims = 0 if scorer.model is None or args.strategy == "uncertainty" else pooled_size(scorer.model.config)
    tops = {name: select.TopCandidates(candidate_capacity(args.strategy, n, args.candidates), dims)
            for name, n in counts.items()}
    excluded = read_key_files(args.exclude)
    seen, unreadable = stream_pool(scorer, pools, tops, excluded, args)
    picks = {name: pick(top, counts[name], args.strategy, args.seed) for name, top in tops.items()}
    frame = picks_frame(pools, picks, args.strategy)
    assert not set(frame["key"]) & excluded
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = {"signature": sig, "model": source.record(), "seen": seen, "unreadable": unreadable, "counts": counts}
    out.parent.mkdir(parents=True, exist_ok=True)
    folder, manifest = write_upload(frame, pools, out)
    sheet = write_sheet(frame, root, out, args.sheet_size)
    partial = out.with_name(out.name + ".partial")  # the finished file appears whole, after its companions
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                  METADATA_KEY: json.dumps(meta, sort_keys=True).encode()}), partial)
    partial.replace(out)
    short = [n for n, c in counts.items() if int((frame["survey"] == n).sum() if n != "*" else len(frame)) < c]
    return {"out": str(out), "resumed": False, "rows": len(frame), "seen": seen, "unreadable": unreadable,
            "images": str(folder),
            "manifest": str(manifest), "sheet": str(sheet) if sheet else None, "short": short}


def candidate_capacity(strategy: str, count: int, candidates: int | None) -> int:
    """Galaxies kept while streaming: the picks themselves, or the pool k-center greedy chooses from."""
    if strategy in ("random", "uncertainty"):
        return count
    if candidates is not None:
        if candidates < count:
            raise ValueError(f"--candidates {candidates} is below the budget {count}; k-center needs at least that")
        return candidates
    return 4 * count if strategy == "hybrid" else max(20 * count, 10_000)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary["resumed"]:
        print(f"{summary['out']} is already finished with these arguments ({summary['rows']} picks); nothing to do "
              "(--overwrite selects anew)")
        return 0
    print(f"picked {summary['rows']} of {summary['seen']} galaxies: {summary['out']}; upload manifest "
          f"{summary['manifest']} (images in {summary['images']}); contact sheet {summary['sheet']}")
    if summary["unreadable"]:
        print(f"warning: {summary['unreadable']} unreadable galaxies were skipped; check the shards with "
              "`python -m sharding.verify`", file=sys.stderr)
    if summary["short"]:
        print(f"warning: the pool of {summary['short']} held fewer galaxies than its share of the budget",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
