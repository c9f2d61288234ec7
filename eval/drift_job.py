"""`python -m eval drift`: are new embeddings drawn from the training surveys' distribution? And `python -m eval
drift reference`: the reference sample (embeddings + image statistics) that this test and the service compare to.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eval import drift
from eval.store import open_embeddings
from eval.thumbnails import survey_of
from sharding.writer import sha256_of

EXAMPLES = """examples:
  python -m eval predict --model runs/mixed --shards data/shards --surveys sdss,decals --split train \\
      --out train.parquet --embeddings train.zarr
  python -m eval predict --model runs/mixed --shards data/shards --surveys ukidss --split test \\
      --out new.parquet --embeddings new.zarr
  python -m eval drift --reference train.zarr --embeddings new.zarr --out drift.json
  python -m eval drift --reference ref.npz --embeddings new.zarr --surveys ukidss,hst    # one test per survey
  python -m eval drift reference --model runs/mixed --shards data/shards --surveys sdss,decals --split train \\
      --out ref.npz --max 2000        # embeddings + image statistics, for the test above and the service
Verdict: drift when the MMD permutation p-value or the kNN-distance Mann-Whitney p-value is below --alpha / 2.
Large stores are subsampled with --seed (--max-reference, --max-embeddings): bounded memory and time."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval drift", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Two-sample drift tests of new pooled backbone embeddings against a reference sample: the MMD "
                    "(RBF kernel, median-heuristic bandwidth) with a permutation p-value, and the k-nearest-"
                    "neighbour distance of the new embeddings against the reference's held-out ones (ratio, "
                    "Mann-Whitney and KS tests). `python -m eval drift reference --help` makes a reference.")
    parser.add_argument("--reference", required=True,
                        help="reference: a zarr store of `eval predict --embeddings` or a .npz of `drift reference`")
    parser.add_argument("--embeddings", required=True, help="the new embeddings: a zarr store of `eval predict`")
    parser.add_argument("--out", help="write the results as JSON")
    parser.add_argument("--surveys", help="comma-separated surveys of --embeddings to test, each on its own "
                                          "(keys <survey>_<id>); default: the whole store as one sample")
    parser.add_argument("--reference-surveys", help="comma-separated surveys of --reference to compare to "
                                                    "(default: all of it)")
    parser.add_argument("--permutations", type=int, default=500, help="MMD permutations")
    parser.add_argument("--alpha", type=float, default=0.01, help="test level of the verdict")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsamples, split and permutations")
    parser.add_argument("--max-reference", type=int, default=drift.MAX_REFERENCE,
                        help="reference embeddings used at most (a seeded subset)")
    parser.add_argument("--max-embeddings", type=int, default=drift.MAX_REFERENCE,
                        help="new embeddings used at most, per tested survey (a seeded subset)")
    parser.add_argument("--mmd-samples", type=int, default=1000, help="embeddings per side in the MMD test (its "
                                                                      "cost grows as the square)")
    parser.add_argument("-k", type=int, default=drift.K_NEIGHBOURS, help="nearest neighbours per distance")
    parser.add_argument("--fail-on-drift", action="store_true", help="exit with status 1 when drift is found")
    return parser.parse_args(argv)


def parse_reference_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval drift reference", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a drift reference (.npz): the pooled embeddings and the image statistics (sky, noise, "
                    "S/N, size of what the model sees) of a seeded sample of each survey's split, read through "
                    "eval predict's path. The service's drift monitor and `python -m eval drift` read it.")
    parser.add_argument("--model", required=True, help="a training run folder or its export/ folder")
    parser.add_argument("--shards", required=True, help="shard root (<root>/<survey>/manifest.json)")
    parser.add_argument("--surveys", required=True, help="comma-separated surveys (the model's training surveys)")
    parser.add_argument("--split", default="train", help="train, val or test")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--max", type=int, default=2000, help="galaxies per survey at most (a seeded subset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def split_list(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def build_reference(model: str | Path, shards: str | Path, surveys: list[str], split: str = "train",
                    max_per_survey: int = 2000, seed: int = 0, batch_size: int = 64, device: str = "auto",
                    progress: bool = False) -> tuple[drift.Reference, list[str]]:
    """(reference, keys): embeddings and image_stats of a seeded sample of each survey's split, read like eval
    predict (unreadable samples skipped up to its error rate). For the registry and `drift reference`."""
    from eval import reading, source as sources  # torch: only this path needs the model
    from eval.infer import infer, resolve_device
    from loaders.loader import LoaderConfig
    from loaders.shards import load_survey_shards

    if max_per_survey < 2:
        raise ValueError(f"--max must be >= 2, got {max_per_survey}")
    source = sources.open_source(model)
    spec = source.input_spec()
    root = Path(shards)
    for survey in surveys:
        sources.check_shards(source, root / survey, spec)
    net = sources.load_model(source, resolve_device(device))
    cfg = LoaderConfig(backend="torch", image_size=spec.image_size, mean=spec.mean, std=spec.std)
    vectors, values, names, keys = [], {name: [] for name in drift.STAT_NAMES}, [], []
    for number, survey in enumerate(surveys):
        info = load_survey_shards(root / survey, split)
        refs = reading.split_refs(info)
        rows = drift.subsample(len(refs), max_per_survey, seed + number)
        rejects = reading.Rejects(info, split)
        bar = tqdm(total=len(rows), unit="gal", desc=f"reference {survey}", disable=not progress, mininterval=0.5)
        for batch in reading.iter_batches(cfg, info, refs[rows], rows, batch_size=batch_size, rejects=rejects):
            vectors.append(infer(net, batch.images).embedding)
            stats = drift.image_stats(drift.unnormalise(batch.images.numpy(), spec.mean, spec.std))
            for name in drift.STAT_NAMES:
                values[name].append(stats[name])
            names += [survey] * len(batch.keys)
            keys += batch.keys
            bar.update(len(batch.keys))
        bar.close()
    if not keys:
        raise ValueError(f"no readable galaxies in the {split} split of {surveys} under {root}")
    meta = {"model": source.record(), "shards": str(root), "split": split, "surveys": surveys, "seed": seed,
            "max_per_survey": max_per_survey, "input": vars(spec),
            "manifests": {s: sha256_of(root / s / "manifest.json") for s in surveys}}
    stats = {name: np.concatenate(parts) for name, parts in values.items()}
    return drift.Reference(np.concatenate(vectors), stats, np.array(names, dtype=str), meta), keys


def reference_summary(reference: drift.Reference) -> dict:
    """Rows per survey and the quartiles of each image statistic: what a reference holds, printable."""
    surveys = reference.surveys if reference.surveys is not None else np.full(len(reference.embeddings), "")
    out = {}
    for survey in sorted(set(surveys.tolist())):
        rows = surveys == survey
        quartiles = {name: np.nanpercentile(values[rows], [25, 50, 75]).round(3).tolist()
                     for name, values in reference.stats.items() if np.isfinite(values[rows]).any()}
        out[survey or "all"] = {"rows": int(rows.sum()), "quartiles": quartiles}
    return out


def run_reference(argv: list[str]) -> int:
    args = parse_reference_args(argv)
    reference, keys = build_reference(args.model, args.shards, split_list(args.surveys), args.split, args.max,
                                      args.seed, args.batch_size, args.device, not args.no_progress)
    path = drift.save_reference(args.out, reference, keys)
    for survey, entry in reference_summary(reference).items():
        quartiles = ", ".join(f"{name} {q[1]:.3g} [{q[0]:.3g}, {q[2]:.3g}]" for name, q in entry["quartiles"].items())
        print(f"  {survey}: {entry['rows']} galaxies; median [quartiles]: {quartiles}")
    print(f"wrote a drift reference of {len(keys)} galaxies ({reference.embeddings.shape[1]}-d) to {path}")
    return 0


def new_samples(path: str, surveys: list[str], limit: int, seed: int) -> dict[str, np.ndarray]:
    """{survey or 'all': (n, D) embeddings} of a store, at most `limit` rows each (seeded), for the tests."""
    array, keys, attrs = open_embeddings(path)
    if not surveys:
        rows = drift.subsample(len(keys), limit, seed)
        return {"all": np.asarray(array.oindex[rows], np.float64)}
    known = sorted(set(drift.store_surveys(attrs)) | set(surveys))
    owner = np.array([survey_of(key, known) or "" for key in keys], dtype=str)
    out = {}
    for survey in surveys:
        where = np.flatnonzero(owner == survey)
        if not len(where):
            raise ValueError(f"{path} holds no embeddings of survey {survey!r} (keys start with the survey name; "
                             f"it holds {sorted(set(owner.tolist()) - {''}) or 'unnamed keys'})")
        out[survey] = np.asarray(array.oindex[where[drift.subsample(len(where), limit, seed)]], np.float64)
    return out


def reference_sample(args: argparse.Namespace) -> np.ndarray:
    reference = drift.load_reference(args.reference, args.max_reference, args.seed,
                                     split_list(args.reference_surveys) or None)
    return np.asarray(reference.embeddings, np.float64)


def run(args: argparse.Namespace) -> dict:
    if args.max_reference < 5 or args.max_embeddings < 2 or args.mmd_samples < 2:
        raise ValueError("need --max-reference >= 5, --max-embeddings >= 2 and --mmd-samples >= 2")
    reference = reference_sample(args)
    results = []
    for survey, new in new_samples(args.embeddings, split_list(args.surveys), args.max_embeddings,
                                   args.seed).items():
        result = drift.compare_embeddings(reference, new, k=args.k, permutations=args.permutations,
                                          seed=args.seed, alpha=args.alpha, mmd_samples=args.mmd_samples)
        results.append({"survey": survey, **result})
    return {"reference": str(args.reference), "embeddings": str(args.embeddings), "seed": args.seed,
            "reference_surveys": split_list(args.reference_surveys) or "all", "results": results,
            "drift": any(r["drift"] for r in results)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["reference"]:
            return run_reference(argv[1:])
        args = parse_args(argv)
        report = run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for r in report["results"]:
        print(f"{r['survey']}: {r['verdict'].upper()} (alpha {r['alpha']}): MMD^2 {r['mmd2']:.4g} (p {r['mmd_p']:.3g}, "
              f"{r['permutations']} permutations, {r['mmd_num_reference']} vs {r['mmd_num_new']}); kNN distance "
              f"ratio {r['knn_ratio']:.3f} (Mann-Whitney p {r['mann_whitney_p']:.3g}, KS {r['ks_statistic']:.3f} "
              f"p {r['ks_p']:.3g}); {r['num_new']} new vs {r['num_reference']} reference embeddings")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.out}")
    return 1 if report["drift"] and args.fail_on_drift else 0


if __name__ == "__main__":
    sys.exit(main())
