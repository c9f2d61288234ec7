"""`python -m eval predict`: batch inference on built shards or on a catalog + image folder, resumable.

Output: one Parquet row per galaxy with key, survey, object_id, split and one float column per feature NAME
(`<feature>__std` with MC dropout; the raw head outputs `<feature>__logit` and `<question>__other_logit`, which
`eval metrics` scores with the training loss), the model's provenance in the file's metadata; unreadable inputs in
`<out>.rejects.parquet`; optionally the pooled backbone features in a zarr store.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from eval import catalog_input, reading, source as sources
from eval.infer import Outputs, check_mc, infer, resolve_device
from eval.nll import logit_column, other_logit_column
from eval.store import EmbeddingStore, PartStore, frame_from_columns, read_metadata
from loaders.evaluation import choose_backend, plain_image
from loaders.loader import LoaderConfig
from loaders.shards import load_survey_shards
from models.backbone import pooled_size
from sharding.writer import sha256_of

EXAMPLES = """examples:
  python -m eval predict --model runs/mixed --shards data/shards --surveys ukidss --split all --out ukidss.parquet
  python -m eval predict --model runs/mixed/export --shards data/shards --surveys sdss,decals --split test \\
      --out id.parquet --embeddings id.zarr --mc-samples 20
  python -m eval predict --model runs/mixed --catalog new.csv --images cutouts/ --survey decals --out new.parquet
A killed prediction resumes when re-run with the same arguments and gives the same file. An unreadable sample is
recorded in <out>.rejects.parquet (key, shard, reason) and skipped; past --max-error-rate the job stops."""


@dataclass(frozen=True)
class Stream:
    index: int
    survey: str
    split: str
    num_inputs: int


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64, help="galaxies per forward pass")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: a CUDA GPU when one is visible")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "dali"),
                        help="image decoding: auto = DALI on a GPU, the torch (PIL) path on the CPU")
    parser.add_argument("--num-workers", type=int, default=0, help="DALI external-source worker processes")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval predict", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Predict every feature of a trained model for the galaxies of built shards (through the "
                    "training loaders with augmentation off) or of a catalog + image folder (through the same "
                    "rendering as sharding.build). One Parquet row per galaxy, columns named by feature.")
    parser.add_argument("--model", required=True, help="a training run folder or its export/ folder")
    parser.add_argument("--out", required=True, help="output Parquet file")
    parser.add_argument("--shards", help="shard root (<root>/<survey>/manifest.json)")
    parser.add_argument("--surveys", help="comma-separated surveys under --shards")
    parser.add_argument("--split", default="test", help="test, val, train or all")
    parser.add_argument("--catalog", help="a catalog to score without shards (needs --images and --survey)")
    catalog_input.add_catalog_args(parser, "--catalog")
    parser.add_argument("--embeddings", help="zarr store for the pooled backbone features (appended to)")
    parser.add_argument("--embeddings-dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--mc-samples", type=int, default=0, help="MC dropout passes (adds <feature>__std)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the MC dropout masks")
    parser.add_argument("--image-size", type=int, help="must equal the model's input size when given")
    parser.add_argument("--rows-per-part", type=int, default=4096,
                        help="galaxies per durable part (rounded to whole batches): what a resume may redo")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out (and its unfinished parts) and start a new --embeddings store")
    parser.add_argument("--max-error-rate", type=float, default=reading.MAX_ERROR_RATE,
                        help="share of unreadable samples (per survey split) past which the job stops, as training's "
                             "loader.max_error_rate")
    parser.add_argument("--error-min-reads", type=int, default=reading.MIN_READS,
                        help="samples read before --max-error-rate applies (one early bad sample is no trend)")
    parser.add_argument("--no-progress", action="store_true")
    add_model_args(parser)
    return parser.parse_args(argv)


def shard_streams(root: Path, surveys: list[str], split: str) -> list[Stream]:
    streams = []
    for survey in surveys:
        manifest_path = root / survey / "manifest.json"
        if not manifest_path.is_file():
            found = sorted(p.parent.name for p in root.glob("*/manifest.json"))
            raise ValueError(f"{root}: no built shards for survey {survey!r} (found {found}); run "
                             f"`python -m sharding.build --survey {survey} --out {root}`")
        splits = json.loads(manifest_path.read_text())["splits"]
        chosen = list(splits) if split == "all" else [split]
        if split != "all" and split not in splits:
            raise ValueError(f"{root / survey}: no {split!r} split (splits: {sorted(splits)}); use --split all")
        for name in chosen:
            if splits[name]["num_samples"]:
                streams.append(Stream(len(streams), survey, name, int(splits[name]["num_samples"])))
    return streams


def block_rows(batch_size: int, rows_per_part: int) -> int:
    """Inputs per durable part: whole batches, about rows_per_part galaxies (bounded memory, cheap resume)."""
    return batch_size * max(1, rows_per_part // batch_size)


def _mc_seed(seed: int, stream: int, row: int) -> int:
    return (seed * 1_000_003 + stream * 1_000_000_007 + row) % 2**63


def output_frame(outs: list[Outputs], keys: list[str], survey: str, object_ids: list[str], splits: list[str],
                 names: list[str], other_questions: list[str]) -> pd.DataFrame:
    columns: dict = {"key": keys, "survey": [survey] * len(keys), "object_id": object_ids, "split": splits}
    raw_names = [logit_column(n) for n in names] + [other_logit_column(q) for q in other_questions]
    frac = np.concatenate([o.fractions for o in outs]) if outs else np.zeros((0, len(names)), np.float32)
    std = np.concatenate([o.std for o in outs]) if outs and outs[0].std is not None else None
    logits = np.concatenate([o.logits for o in outs]) if outs else np.zeros((0, len(raw_names)), np.float32)
    columns.update({name: frac[:, j].astype(np.float32) for j, name in enumerate(names)})
    if std is not None:
        columns.update({f"{name}__std": std[:, j].astype(np.float32) for j, name in enumerate(names)})
    columns.update({name: logits[:, j].astype(np.float32) for j, name in enumerate(raw_names)})
    return frame_from_columns(columns)


class Predictor:
    """The state of one prediction job: model, durable parts, optional embedding store, progress bar."""

    def __init__(self, args: argparse.Namespace, source: sources.ModelSource, signature: dict, total: int) -> None:
        self.args, self.source = args, source
        self.device = resolve_device(args.device)
        self.model = sources.load_model(source, self.device)
        check_mc(self.model, args.mc_samples)
        self.names, self.questions = source.names, self.model.schema.question_names
        self.other_questions = list(self.model.layout.other_questions)
        self.store = PartStore(Path(args.out), signature, args.overwrite)
        self.dims = pooled_size(self.model.config)
        self.embeddings, self.next_row = None, 0
        if args.embeddings:
            self.embeddings = EmbeddingStore(Path(args.embeddings), self.dims, args.embeddings_dtype,
                                             new=args.overwrite)
            start = self.store.remember("embeddings_start", len(self.embeddings))
            self.next_row = start + self.store.rows_done()
            self.embeddings.truncate(self.next_row)
            self._earlier_keys = self.embeddings.keys_before(start)
        self.bar = tqdm(total=total, initial=0, unit="gal", desc="predict", disable=args.no_progress,
                        dynamic_ncols=True, mininterval=0.5)

    def infer(self, images: torch.Tensor, stream: int, rows) -> Outputs:
        """A batch of a stream's rows; each galaxy's MC passes are seeded by its own row (resumes and batch sizes
        draw the same)."""
        seeds = [_mc_seed(self.args.seed, stream, int(row)) for row in rows]
        return infer(self.model, images, self.args.mc_samples, row_seeds=seeds)

    def write_block(self, stream: Stream, block: int, frame: pd.DataFrame, vectors: np.ndarray,
                    rejects: list[dict]) -> None:
        if self.embeddings is not None:
            keys = frame["key"].tolist()
            clash = [k for k in keys if k in self._earlier_keys]
            if clash:
                raise ValueError(f"{self.embeddings.path} already holds {len(clash)} of these galaxies (e.g. "
                                 f"{clash[:3]}) from an earlier prediction; write to a new --embeddings store, or "
                                 "pass --overwrite to start this one anew")
            # Embeddings first: a part that exists always has its rows in the store.
            self.embeddings.write(self.next_row, keys, vectors)
            self.next_row += len(frame)
        self.store.write(stream.index, block, frame, rejects)

    def finish(self, metadata: dict, rejects_out: Path, reject_columns: list[str]) -> int:
        self.bar.close()
        if self.embeddings is not None:
            self.embeddings.add_run({"predictions": str(self.args.out), **metadata})
        return self.store.finish(metadata, rejects_out, reject_columns)


def _batched(iterable, size: int):
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def predict_shards(job: Predictor, streams: list[Stream], root: Path, spec: sources.InputSpec,
                   backend: str) -> None:
    """Every readable sample of each stream, one durable part per block of the split's rows; rejects with the part."""
    args = job.args
    cfg = LoaderConfig(shard_root=str(root), backend="torch", image_size=spec.image_size, mean=spec.mean,
                       std=spec.std, device="gpu" if job.device.type == "cuda" else "cpu",
                       num_workers=args.num_workers)
    per_block = block_rows(args.batch_size, args.rows_per_part)
    for stream in streams:
        labels = pd.read_parquet(root / stream.survey / "labels.parquet", columns=["key", "object_id"])
        object_id = dict(zip(labels["key"], labels["object_id"].astype(str)))
        info = load_survey_shards(root / stream.survey, stream.split)
        refs = reading.split_refs(info)
        first = job.store.done_blocks(stream.index)
        done = min(first * per_block, len(refs))
        rejects = reading.Rejects(info, stream.split, args.max_error_rate, args.error_min_reads, num_read=done,
                                  num_bad=job.store.num_rejects(stream.index))
        job.bar.update(done)
        for block in range(first, -(-len(refs) // per_block)):
            rows = np.arange(block * per_block, min((block + 1) * per_block, len(refs)))
            outs, keys = [], []
            for batch in reading.iter_batches(cfg, info, refs[rows], rows, batch_size=args.batch_size,
                                              rejects=rejects, backend=backend):
                outs.append(job.infer(batch.images, stream.index, batch.rows))
                keys += batch.keys
            job.bar.update(len(rows))
            frame = output_frame(outs, keys, stream.survey, [object_id[k] for k in keys], [stream.split] * len(keys),
                                 job.names, job.other_questions)
            vectors = np.concatenate([o.embedding for o in outs]) if outs else np.zeros((0, job.dims), np.float32)
            job.write_block(stream, block, frame, vectors, rejects.take())


def predict_catalog(job: Predictor, rows: list, settings: catalog_input.RenderSettings, survey: str,
                    spec: sources.InputSpec) -> None:
    args = job.args
    cfg = LoaderConfig(backend="torch", image_size=spec.image_size, mean=spec.mean, std=spec.std)
    stream = Stream(0, survey, "catalog", len(rows))
    per_block = block_rows(args.batch_size, args.rows_per_part)
    first = job.store.done_blocks(0)
    job.bar.update(min(first * per_block, len(rows)))
    rendered = catalog_input.iter_rendered(rows[first * per_block:], settings, args.workers)
    for block, group in enumerate(_batched(rendered, per_block), start=first):
        good = [(row, data) for row, data, _ in group if data is not None]
        rejects = [reject for _, _, reject in group if reject is not None]
        outs = []
        for offset in range(0, len(good), args.batch_size):
            part = good[offset:offset + args.batch_size]
            images = torch.stack([plain_image(data, cfg) for _, data in part])
            outs.append(job.infer(images, 0, [row.position for row, _ in part]))
        job.bar.update(len(group))
        picked = [row for row, _ in good]
        frame = output_frame(outs, [r.key for r in picked], survey, [r.object_id for r in picked],
                             [r.split for r in picked], job.names, job.other_questions)
        vectors = np.concatenate([o.embedding for o in outs]) if outs else np.zeros((0, job.dims), np.float32)
        job.write_block(stream, block, frame, vectors, rejects)


def run(args: argparse.Namespace) -> dict:
    """Predict as the arguments say; returns a summary (rows, rejects, output)."""
    source = sources.open_source(args.model)
    spec = sources.check_input_override(source.input_spec(), args.image_size)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    backend, why = choose_backend(args.backend, device.type)
    if not args.no_progress:
        print(f"decoding with the {backend} backend on {device.type} ({why})", file=sys.stderr, flush=True)
    common = {"model": source.record()["weights_sha256"], "batch_size": args.batch_size,
              "rows_per_part": block_rows(args.batch_size, args.rows_per_part), "mc_samples": args.mc_samples,
              "seed": args.seed, "backend": backend, "device": device.type, "embeddings": args.embeddings,
              "embeddings_dtype": args.embeddings_dtype, "input": vars(spec)}
    if args.catalog:
        if not (args.images and args.survey) or args.shards:
            raise ValueError("--catalog needs --images and --survey (and no --shards)")
        survey, rows, settings = catalog_input.open_catalog(args.survey, args.catalog, args.images,
                                                            args.image_pattern, args.render_size)
        inputs = {"catalog": str(args.catalog), "catalog_sha256": sha256_of(args.catalog), "survey": survey.name,
                  "render": vars(settings)}
        job = Predictor(args, source, {**common, **inputs}, len(rows))
        predict_catalog(job, rows, settings, survey.name, spec)
        reject_columns = catalog_input.REJECT_COLUMNS
    else:
        if not (args.shards and args.surveys):
            raise ValueError("give --shards ROOT --surveys a,b (or --catalog, --images and --survey)")
        root, surveys = Path(args.shards), [s.strip() for s in args.surveys.split(",") if s.strip()]
        streams = shard_streams(root, surveys, args.split)
        manifests = {s: sources.check_shards(source, root / s, spec) for s in surveys}
        inputs = {"shards": str(root), "split": args.split,
                  "manifests": {s: sha256_of(root / s / "manifest.json") for s in manifests}}
        job = Predictor(args, source, {**common, **inputs}, sum(s.num_inputs for s in streams))
        predict_shards(job, streams, root, spec, backend)
        reject_columns = reading.REJECT_COLUMNS
    metadata = {"model": source.record(), "inputs": inputs, "mc_samples": args.mc_samples, "seed": args.seed,
                "backend": backend, "device": device.type, "names": job.names, "questions": job.questions,
                "other_questions": job.other_questions}
    rejects_out = rejects_path(args.out)
    rows_written = job.finish(metadata, rejects_out, reject_columns)
    return {"rows": rows_written, "out": str(args.out), "rejects": str(rejects_out),
            "num_rejects": pq.read_metadata(rejects_out).num_rows}  # (pandas 3.1 reads columns=[] as 0 rows)


def rejects_path(out: str | Path) -> Path:
    """Where a prediction's unreadable inputs are listed: <out without .parquet>.rejects.parquet."""
    return Path(str(out).removesuffix(".parquet") + ".rejects.parquet")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(sources.describe(sources.open_source(args.model)), flush=True)
        summary = run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    extra = f"; {summary['num_rejects']} unreadable inputs listed in {summary['rejects']}" \
        if summary["num_rejects"] else ""
    print(f"wrote {summary['rows']} predictions to {summary['out']}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def cached_prediction(model: str | Path, shards: str | Path, survey: str, split: str, folder: str | Path, *,
                      batch_size: int = 64, device: str = "auto", quiet: bool = True) -> Path:
    """A model's predictions on one survey split, under `folder` in a file named by split and weights hash.

    A finished file is reused only when its provenance names the same weights (sha256), survey, split and shard
    manifest; anything else (a retrained model, another split, rebuilt shards) is predicted anew."""
    weights = sources.open_source(model).record()["weights_sha256"]
    out = Path(folder) / f"{survey}-{split}-{weights[:16]}.parquet"
    manifest = sha256_of(Path(shards) / survey / "manifest.json")
    if out.is_file():
        meta = read_metadata(out)
        inputs = meta.get("inputs", {})
        if (meta.get("model", {}).get("weights_sha256"), inputs.get("split"), inputs.get("manifests")) == \
                (weights, split, {survey: manifest}):
            return out
    argv = ["--model", str(model), "--shards", str(shards), "--surveys", survey, "--split", split, "--out", str(out),
            "--batch-size", str(batch_size), "--device", device, "--overwrite"]
    run(parse_args(argv + (["--no-progress"] if quiet else [])))
    return out
