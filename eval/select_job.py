"""`python -m eval select`: choose the galaxies volunteers should label next, from a model's predictions on a pool.

The pool (a survey split of built shards, or a catalog + image folder rendered as sharding.build renders it: see
eval.select_pool) streams through the model `--chunk-rows` galaxies at a time; each chunk is scored (eval.select)
and only the best `--candidates` per survey are kept, so memory does not grow with the pool. Strategies:
  random       a stable hash of (seed, key): the same picks whatever the chunking
  uncertainty  the top BALD scores (Dirichlet models) or MC variances (MSE models) from --mc-samples passes
  diversity    k-center greedy on the embeddings of a seeded random reservoir of --candidates galaxies, starting
               from the pool's already-labelled (--exclude) galaxies: picks fill what the labels do not cover
  hybrid       the --candidates most uncertain (default 4 x budget), then k-center greedy on their embeddings
Outputs: <out> (key, survey, object_id, ra, dec, score, rank, strategy); <out>.manifest.csv and <out>_images/
for the Zooniverse subject uploader; <out>.png, a contact sheet of the first picks; <out>.rejects.parquet, the
galaxies that could not be read or rendered (skipped, never silently).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from eval import catalog_input, reading, select, select_pool, source as sources
from eval.infer import check_mc, infer, key_seeds, resolve_device
from eval.predict import rejects_path
from eval.select_pool import CatalogPool, ShardPool
from eval.select_state import Checkpoint
from eval.store import METADATA_KEY, read_metadata
from loaders.include import read_key_files
from loaders.loader import LoaderConfig
from models.backbone import pooled_size
from models.head import concentrations, fractions
from sharding.writer import sha256_of

EXAMPLES = """examples:
  python -m eval select --model runs/decals --pool data/shards --surveys decals --split train --budget 500 \\
      --strategy hybrid --mc-samples 10 --exclude labelled.txt --out round1.parquet
  python -m eval select --model runs/mixed --pool data/shards --surveys decals,sdss --budget 1000 \\
      --strategy uncertainty --quota decals=0.5,sdss=0.5 --out round1.parquet
  python -m eval select --model runs/decals --pool new_cutouts.csv --images cutouts/ --survey decals \
      --budget 500 --strategy hybrid --workers 8 --out round1.parquet   (no shards: rows rendered as the build does)
  then: panoptes subject-set upload-subjects SUBJECT_SET_ID round1.manifest.csv  (from round1_images/)
and, once the votes are sharded, train on the picks: python -m train ... data.include_keys=[round1.parquet]
Re-running with the same arguments finds the finished output and stops (nothing is recomputed); --overwrite
selects anew. A killed run continues from the last chunk it finished (<out>.progress.npz)."""
STRATEGIES = ("random", "uncertainty", "diversity", "hybrid")
STREAM_ID = 2**40  # candidate id = pool * STREAM_ID + row in the pool: keys are looked up only for the kept few
Pool = ShardPool | CatalogPool


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval select", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pick --budget galaxies of a pool for volunteers to label next, by uncertainty (BALD from MC "
                    "dropout), diversity (k-center greedy on embeddings), both, or at random.")
    parser.add_argument("--model", required=True, help="a training run folder or its export/ folder")
    parser.add_argument("--pool", required=True, help="the unlabelled pool: a shard root (<root>/<survey>/, with "
                                                      "--surveys) or a catalog file (with --images and --survey)")
    parser.add_argument("--surveys", help="shard pool: comma-separated surveys under --pool")
    parser.add_argument("--split", default="train", help="shard pool: the split to pick from (train, val, test); "
                                                         "ignored for a catalog pool, whose every row is a candidate")
    catalog_input.add_catalog_args(parser, "a --pool catalog")
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
    parser.add_argument("--labelled-cap", type=int, default=20_000,
                        help="diversity, hybrid: k-center starts from the embeddings of up to this many excluded "
                             "galaxies found in the pool (a seeded sample), so picks cover what is not labelled "
                             "yet; 0: start from a random galaxy")
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
            raise ValueError(f"--quota {text!r}: {part!r} must be survey=share for a survey of the pool {surveys}")
        quotas[survey.strip()] = float(share)
    return quotas


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

    def score(self, images: torch.Tensor, keys: list[str], survey: str) -> tuple[np.ndarray, np.ndarray]:
        """(scores, embeddings) of one batch; random scores for random and diversity (a uniform reservoir). Each
        galaxy's MC passes are seeded by its key: its score does not depend on the galaxies batched with it."""
        if self.model is None:
            return select.random_scores(keys, self.args.seed), np.zeros((len(keys), 0), np.float32)
        out = infer(self.model, images, self.mc, keep_samples=bool(self.mc),
                    row_seeds=key_seeds(self.args.seed, keys) if self.mc else None)
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


def stream_pool(scorer: Scorer, pools: list[Pool], tops: dict[str, select.TopCandidates], excluded: set[str],
                args: argparse.Namespace, labelled: select.TopCandidates | None, checkpoint: Checkpoint) -> int:
    """Scores every readable galaxy into its survey's candidates (or the shared one); returns how many were seen.
    Unreadable ones stay in their pool's reject_rows. With `labelled`, the excluded galaxies of the pool are
    embedded into it (k-center then starts from them, so picks fill the gaps the labelled set leaves). Continues
    from the checkpoint, and saves one after each chunk."""
    spec = scorer.source.input_spec()
    cfg = LoaderConfig(backend="torch", image_size=spec.image_size, mean=spec.mean, std=spec.std)
    at = checkpoint.load(tops, labelled) or {"pool": 0, "start": 0, "seen": 0, "states": []}
    for pool, state in zip(pools, at["states"]):
        pool.restore(state)
    seen = at["seen"]
    bar = tqdm(total=sum(len(p) for p in pools), unit="gal", desc="select", disable=args.no_progress,
               dynamic_ncols=True, mininterval=0.5, initial=sum(len(p) for p in pools[:at["pool"]]) + at["start"])
    for number, pool in enumerate(pools):
        if number < at["pool"]:
            continue
        top = tops.get(pool.survey) or tops["*"]
        for start in range(at["start"] if number == at["pool"] else 0, len(pool), args.chunk_rows):
            if start:
                checkpoint.save(tops, labelled, {"pool": number, "start": start, "seen": seen,
                                                 "states": [p.state() for p in pools]})
            rows = np.arange(start, min(start + args.chunk_rows, len(pool)))
            keep = np.array([k not in excluded for k in pool.keys(rows)], bool)
            bar.update(len(rows))
            if labelled is not None and not keep.all():
                for images, keys, _ in pool.batches(rows[~keep], args.batch_size, cfg):
                    embedding = infer(scorer.model, images).embedding
                    labelled.add(select.random_scores(keys, args.seed), np.zeros(len(keys), np.int64), embedding)
            for images, keys, batch_rows in pool.batches(rows[keep], args.batch_size, cfg,
                                                         decode=scorer.model is not None):
                scores, embedding = scorer.score(images, keys, pool.survey)
                top.add(scores, number * STREAM_ID + batch_rows, embedding if top.payload.shape[1] else None)
                seen += len(keys)
    bar.close()
    return seen


def pick(top: select.TopCandidates, count: int, strategy: str, seed: int,
         already: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of the picks in rank order; diversity's scores are NaN (its order is the k-center order).
    `already`: embeddings of labelled galaxies that k-center counts as chosen."""
    scores, ids, payload = top.result()
    if strategy in ("random", "uncertainty") or count >= len(ids):
        order = np.arange(min(count, len(ids)))
    else:
        order = select.k_center_greedy(payload, count, already=already, seed=seed)
    picked = scores[order] if strategy != "diversity" else np.full(len(order), np.nan)
    return ids[order], picked


def picks_frame(pools: list[Pool], picks: dict[str, tuple[np.ndarray, np.ndarray]], strategy: str) -> pd.DataFrame:
    """One row per pick; with quotas the surveys' rankings interleave in proportion (pick i of n at i / n)."""
    rows = []
    for ids, scores in picks.values():
        for i, (ident, score) in enumerate(zip(ids, scores)):
            pool = pools[int(ident) // STREAM_ID]
            key = pool.keys(np.array([int(ident) % STREAM_ID]))[0]
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


def write_upload(frame: pd.DataFrame, pools: list[Pool], out: Path, sheet_size: int) -> tuple[Path, Path, Path | None]:
    """The picks' images (the shards' own bytes, or the catalog rows rendered again), a Zooniverse subject manifest
    naming them, and a contact sheet of the first `sheet_size` picks."""
    from eval import plots

    folder = out.with_name(out.name.removesuffix(".parquet") + "_images")
    folder.mkdir(parents=True, exist_ok=True)
    by_survey = {p.survey: p for p in pools}
    names, first, shown_keys = {}, {}, set(frame["key"].head(sheet_size))
    for survey, group in frame.groupby("survey", sort=False):
        pool = by_survey[survey]
        for key, data in pool.image_bytes(group["key"].tolist()).items():
            names[key] = f"{key}.{pool.image_ext}"
            (folder / names[key]).write_bytes(data)
            if key in shown_keys:
                first[key] = data
    # The uploader makes every column subject metadata; names starting with '#' are hidden from volunteers, so the
    # model's score and rank cannot sway their answers.
    manifest = pd.DataFrame({"id": frame["key"], "image_1": [names[k] for k in frame["key"]],
                             "ra": frame["ra"], "dec": frame["dec"], "#survey": frame["survey"],
                             "#object_id": frame["object_id"], "#score": frame["score"], "#rank": frame["rank"]})
    manifest_path = out.with_name(out.name.removesuffix(".parquet") + ".manifest.csv")
    manifest.to_csv(manifest_path, index=False)
    thumbs = select_pool.thumbnails(first)
    shown = [row for row in frame.head(sheet_size).itertuples() if row.key in thumbs]
    sheet = out.with_suffix(".png") if shown else None
    if shown:
        titles = [f"#{row.rank} {row.score:.3f}\n{row.key}" for row in shown]
        sheet.write_bytes(plots.contact_sheet([thumbs[row.key] for row in shown], titles, columns=min(6, len(shown))))
    return folder, manifest_path, sheet


def signature(args: argparse.Namespace, source: sources.ModelSource) -> dict:
    """What makes two selections the same: arguments, weights and the pool's content (shard manifests, or the
    catalog's sha256 and render settings); not progress, device or rendering processes."""
    ignored = ("no_progress", "overwrite", "device", "out", "workers") + \
        (("split",) if select_pool.is_catalog(args) else ())
    options = {k: v for k, v in vars(args).items() if k not in ignored}
    return {**options, "model": source.record()["weights_sha256"], "pool_content": select_pool.fingerprint(args),
            "exclude_sha256": [sha256_of(p) for p in args.exclude]}


def run(args: argparse.Namespace) -> dict:
    if args.budget < 1:
        raise ValueError(f"--budget must be >= 1, got {args.budget}")
    out = Path(args.out)
    surveys = select_pool.pool_surveys(args)
    source = sources.open_source(args.model)
    sig = signature(args, source)
    if out.is_file() and not args.overwrite and read_metadata(out).get("signature") == sig:
        return {"out": str(out), "resumed": True, "rows": pq.read_metadata(out).num_rows}
    quotas = parse_quota(args.quota, surveys)
    counts = select.quota_counts(args.budget, quotas) if quotas else {"*": args.budget}
    pools = select_pool.open_pools(args, source)
    scorer = Scorer(args, source)
    dims = 0 if scorer.model is None or args.strategy == "uncertainty" else pooled_size(scorer.model.config)
    tops = {name: select.TopCandidates(candidate_capacity(args.strategy, n, args.candidates), dims)
            for name, n in counts.items()}
    excluded = read_key_files(args.exclude)
    labelled = select.TopCandidates(args.labelled_cap, dims) if dims and args.labelled_cap else None
    checkpoint = Checkpoint(out, sig)
    if args.overwrite:
        checkpoint.remove()
    seen = stream_pool(scorer, pools, tops, excluded, args, labelled, checkpoint)
    rejects = [row for pool in pools for row in pool.reject_rows]
    already = labelled.result()[2] if labelled is not None and len(labelled.ids) else None
    picks = {name: pick(top, counts[name], args.strategy, args.seed, already) for name, top in tops.items()}
    frame = picks_frame(pools, picks, args.strategy)
    assert not set(frame["key"]) & excluded
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = {"signature": sig, "model": source.record(), "seen": seen, "unreadable": len(rejects), "counts": counts,
            "labelled_embedded": 0 if already is None else len(already)}
    out.parent.mkdir(parents=True, exist_ok=True)
    folder, manifest, sheet = write_upload(frame, pools, out, args.sheet_size)
    pd.DataFrame(rejects, columns=pools[0].reject_columns).to_parquet(rejects_path(out), index=False)
    partial = out.with_name(out.name + ".partial")  # the finished file appears whole, after its companions
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                  METADATA_KEY: json.dumps(meta, sort_keys=True).encode()}), partial)
    partial.replace(out)
    checkpoint.remove()
    short = [n for n, c in counts.items() if int((frame["survey"] == n).sum() if n != "*" else len(frame)) < c]
    return {"out": str(out), "resumed": False, "rows": len(frame), "seen": seen, "unreadable": len(rejects),
            "rejects": str(rejects_path(out)), "catalog": isinstance(pools[0], CatalogPool), "images": str(folder),
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
        fix = "fix or drop those catalog rows" if summary["catalog"] else \
            "check the shards with `python -m sharding.verify`"
        print(f"warning: {summary['unreadable']} unreadable galaxies were skipped, listed in {summary['rejects']}; "
              f"{fix}", file=sys.stderr)
    if summary["short"]:
        print(f"warning: the pool of {summary['short']} held fewer galaxies than its share of the budget",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
