"""`python -m eval neighbors`: the galaxies most similar to one galaxy by cosine similarity of embeddings."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from eval.store import open_embeddings

EXAMPLES = """examples:
  python -m eval predict --model runs/mixed --shards data/shards --surveys sdss,decals --split all \\
      --out all.parquet --embeddings emb.zarr
  python -m eval neighbors --embeddings emb.zarr --key sdss_587722981742084144 -k 8 --grid similar.png"""
SCAN_ROWS = 65536  # embeddings compared per block: bounded memory for stores of millions of galaxies


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval neighbors", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Find the k galaxies whose pooled backbone features are most similar (cosine) to one galaxy's, "
                    "in an embedding store written by `python -m eval predict --embeddings`, and optionally show "
                    "them as a labelled contact sheet.")
    parser.add_argument("--embeddings", required=True, help="zarr store from `python -m eval predict --embeddings`")
    parser.add_argument("--key", required=True, help="the galaxy's sample key, e.g. sdss_587722981742084144")
    parser.add_argument("-k", type=int, default=8, help="number of neighbours")
    parser.add_argument("--grid", help="write a contact sheet (PNG) of the galaxy and its neighbours")
    parser.add_argument("--shards", help="shard root with the images for --grid (default: the one the store names)")
    parser.add_argument("--center", action="store_true",
                        help="subtract the store's mean embedding first (features shared by every galaxy, as in an "
                             "undertrained model, otherwise make every cosine close to 1)")
    parser.add_argument("--json", help="write the neighbours as JSON ('-': JSON only)")
    return parser.parse_args(argv)


def mean_embedding(array) -> np.ndarray:
    total = np.zeros(array.shape[1])
    for start in range(0, array.shape[0], SCAN_ROWS):
        total += np.asarray(array[start:start + SCAN_ROWS], np.float64).sum(axis=0)
    return total / max(array.shape[0], 1)


def nearest(array, keys: list[str], key: str, k: int, center: bool = False) -> list[tuple[str, float]]:
    """(key, cosine similarity) of the k nearest other galaxies, most similar first; reads the store in blocks."""
    if k < 1:
        raise ValueError(f"-k must be >= 1, got {k}")
    try:
        row = keys.index(key)
    except ValueError:
        close = [x for x in keys if key.split("_")[0] in x][:3]
        raise ValueError(f"key {key!r} is not in the store ({len(keys)} galaxies; e.g. {close or keys[:3]})") from None
    offset = mean_embedding(array) if center else 0.0
    query = np.asarray(array[row], np.float64) - offset
    query /= max(np.linalg.norm(query), 1e-12)
    best_keys: list[int] = []
    best_sims = np.zeros(0)
    for start in range(0, len(keys), SCAN_ROWS):
        block = np.asarray(array[start:start + SCAN_ROWS], np.float64) - offset
        sims = block @ query / np.maximum(np.linalg.norm(block, axis=1), 1e-12)
        if start <= row < start + len(block):
            sims[row - start] = -np.inf
        candidates = np.argsort(-sims, kind="stable")[:k]
        best_keys += [start + int(i) for i in candidates]
        best_sims = np.concatenate([best_sims, sims[candidates]])
        keep = np.argsort(-best_sims, kind="stable")[:k]
        best_keys, best_sims = [best_keys[i] for i in keep], best_sims[keep]
    return [(keys[i], float(s)) for i, s in zip(best_keys, best_sims)]


def write_grid(path: str, shards: str, key: str, found: list[tuple[str, float]]) -> None:
    from eval import plots
    from eval.thumbnails import read_thumbnails

    wanted = [key] + [k for k, _ in found]
    unreadable: dict[str, str] = {}
    thumbs = read_thumbnails(shards, wanted, unreadable=unreadable)
    missing = [k for k in wanted if k not in thumbs and k not in unreadable]
    if missing:
        raise ValueError(f"{len(missing)} galaxies (e.g. {missing[:2]}) are not in the shards under {shards}; pass "
                         "--shards with the shard root they were predicted from")
    for k, reason in unreadable.items():  # a grey tile says so; the grid still shows the rest
        print(f"warning: image of {k} is unreadable ({reason}); check the shards with python -m sharding.verify",
              file=sys.stderr)
        thumbs[k] = np.full((96, 96, 3), 128, np.uint8)
    titles = [f"query\n{key}"] + [f"#{i + 1} cos {s:.3f}\n{k}" for i, (k, s) in enumerate(found)]
    titles = [t + ("\n(unreadable)" if k in unreadable else "") for t, k in zip(titles, wanted)]
    Path(path).write_bytes(plots.contact_sheet([thumbs[k] for k in wanted], titles, columns=min(6, len(wanted))))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        array, keys, attrs = open_embeddings(args.embeddings)
        found = nearest(array, keys, args.key, args.k, args.center)
        if args.grid:
            runs = attrs.get("runs", [])
            shards = args.shards or next((r["inputs"].get("shards") for r in runs if r.get("inputs", {}).get("shards")),
                                         None)
            if not shards:
                raise ValueError("--grid needs the images: pass --shards ROOT")
            write_grid(args.grid, shards, args.key, found)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = {"key": args.key, "neighbors": [{"key": k, "cosine": s} for k, s in found]}
    if args.json == "-":
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.k} nearest galaxies to {args.key} ({len(keys)} in {args.embeddings}):")
    for i, (k, s) in enumerate(found, start=1):
        print(f"  {i:>3}  {s:7.4f}  {k}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.grid:
        print(f"contact sheet: {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
