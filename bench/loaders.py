"""Benchmark: loader img/s at 224 px: our DALI and torch backends vs plain webdataset + PIL and DALI's own reader;
with --views, multi-crop views (bench/multicrop.py) against peers making the same crops."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import write_report  # noqa: E402
from loaders.augment import AugmentConfig  # noqa: E402
from loaders.loader import LoaderConfig, build_loader  # noqa: E402
from loaders.sampler import MixConfig  # noqa: E402
from loaders.shards import load_shard_root  # noqa: E402

SURVEYS = ("sdss", "decals", "hst")
MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def make_shards(root: Path, num_galaxies: int, workers: int = 2) -> None:
    from sharding import build
    from sharding.mock import main as mock_main
    from sharding.registry import load_survey
    for survey in SURVEYS:
        raw = root / "raw" / survey
        mock_main(["--survey", survey, "--num-galaxies", str(num_galaxies), "--out", str(raw), "--no-progress",
                   "--workers", str(workers)])
        build.main(["--survey", survey, "--catalog", str(raw / Path(load_survey(survey).catalog).name),
                    "--images", str(raw / "images"), "--out", str(root / "shards"), "--image-size", "256",
                    "--samples-per-shard", "200", "--workers", str(workers), "--no-progress"])


def ours(shards: Path, backend: str, workers: int, augment: bool, batch: int, device: str,
         threads: int = 2) -> tuple[int, float]:
    counts = {s.name: s.num_samples for s in load_shard_root(shards, list(SURVEYS))}
    mix = MixConfig(ratios="sdss=0.33,decals=0.33,hst=0.34", global_batch_size=batch,
                    epoch_samples=min(counts.values()) * 3 // batch * batch, on_exhausted="repeat")
    cfg = LoaderConfig(shard_root=str(shards), backend=backend, image_size=224, num_workers=workers,
                       num_threads=threads, device=device, augment=AugmentConfig(enabled=augment))
    loader = build_loader(cfg, mix)
    try:
        start, n = time.perf_counter(), 0
        for b in loader:
            n += len(b)
        return n, time.perf_counter() - start
    finally:
        loader.close()


def plain_webdataset(shards: Path, batch: int) -> tuple[int, float]:
    """The pipeline people write first: webdataset + PIL decode + resize + normalise, batched."""
    import webdataset as wds
    from PIL import Image
    urls = sorted(str(p) for s in SURVEYS for p in (shards / s).glob(f"{s}-train-*.tar"))

    def prepare(sample):
        img = sample["jpg"].convert("RGB").resize((224, 224), Image.BILINEAR)
        return torch.from_numpy(((np.asarray(img, np.float32) - MEAN) / STD).transpose(2, 0, 1))
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").map(prepare).batched(batch, collation_fn=torch.stack)
    start, n = time.perf_counter(), 0
    for images in dataset:
        n += len(images)
    return n, time.perf_counter() - start


def webdataset_dataloader(shards: Path, batch: int, workers: int) -> tuple[int, float]:
    """The same webdataset + PIL pipeline in a torch DataLoader with `workers` processes (shards split by worker):
    the fair peer of our torch backend with the same number of workers."""
    import webdataset as wds
    from PIL import Image
    from torch.utils.data import DataLoader
    urls = sorted(str(p) for s in SURVEYS for p in (shards / s).glob(f"{s}-train-*.tar"))

    def prepare(sample):
        img = sample["jpg"].convert("RGB").resize((224, 224), Image.BILINEAR)
        return torch.from_numpy(((np.asarray(img, np.float32) - MEAN) / STD).transpose(2, 0, 1))
    dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").map(prepare)
               .batched(batch, collation_fn=torch.stack))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)
    start, n = time.perf_counter(), 0
    for images in loader:
        n += len(images)
    return n, time.perf_counter() - start


def dali_reader(shards: Path, batch: int, device: str, threads: int = 2) -> tuple[int, float]:
    """DALI's own fn.readers.webdataset with our index files: no mixing, no random access, same decode/resize."""
    from nvidia.dali import fn, pipeline_def, types
    paths = sorted(str(p) for s in SURVEYS for p in (shards / s).glob(f"{s}-train-*.tar"))
    total = sum(int(Path(p).with_suffix(".idx").read_text().split()[1]) for p in paths)

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=0 if device == "gpu" else None)
    def pipe():
        jpg = fn.readers.webdataset(paths=paths, index_paths=[p[:-4] + ".idx" for p in paths], ext=["jpg"],
                                    random_shuffle=False, name="reader")
        images = fn.decoders.image(jpg, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
        images = fn.resize(images, resize_x=224, resize_y=224)
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=MEAN.tolist(),
                                        std=STD.tolist())
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    p = pipe()
    p.build()
    # Into torch tensors, as a training loop takes them and as our loader delivers them.
    loader = DALIGenericIterator([p], ["images"], reader_name="reader", last_batch_policy=LastBatchPolicy.PARTIAL)
    start, n = time.perf_counter(), 0
    for (out,) in loader:
        n += len(out["images"])
    return n, time.perf_counter() - start


def best_of_rounds(cases: list[tuple], repeats: int) -> dict[str, tuple[int, float]]:
    """Each case's fastest run over `repeats` rounds of all cases: round-robin, so that a slow spell of a shared
    machine falls on every case alike rather than on whichever ran then."""
    runs: dict[str, list[tuple[int, float]]] = {}
    for _ in range(repeats):
        for name, fn, _peer in cases:
            runs.setdefault(name, []).append(fn())
    return {name: min(results, key=lambda r: r[1] / r[0]) for name, results in runs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=Path, help="shard root with sdss/decals/hst at 256 px (default: build one)")
    parser.add_argument("--num-galaxies", type=int, default=700, help="per survey, when building shards")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", help="comma-separated words: run the cases whose name has one of them, and their "
                                        "peers (e.g. torch, DALI)")
    parser.add_argument("--views", action="store_true",
                        help="multi-crop views (2 x 224 + 8 x 96 px) of each backend against a peer making the same "
                             "crops with as many workers (bench/multicrop.py)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the torch cases (--views)")
    parser.add_argument("--json", type=Path, help="default: bench/results/loaders.json (loaders_views.json with "
                                                  "--views)")
    args = parser.parse_args(argv)
    args.json = args.json or REPO / "bench" / "results" / ("loaders_views.json" if args.views else "loaders.json")
    work = None
    shards = args.shards
    if shards is None:
        work = Path(tempfile.mkdtemp(prefix="bench_loaders_"))
        make_shards(work, args.num_galaxies)
        shards = work / "shards"
    device = "gpu" if torch.cuda.is_available() else "cpu"
    # (case, function, its fair peer: the same work with the same processes and threads, without our mixing)
    cases = [("plain webdataset + PIL", lambda: plain_webdataset(shards, args.batch), None),
             ("DALI fn.readers.webdataset", lambda: dali_reader(shards, args.batch, "cpu"), None),
             ("ours: DALI backend, aug off", lambda: ours(shards, "dali", 0, False, args.batch, "cpu"),
              "DALI fn.readers.webdataset"),
             ("ours: DALI backend, aug on", lambda: ours(shards, "dali", 0, True, args.batch, "cpu"),
              "DALI fn.readers.webdataset"),
             ("webdataset + PIL DataLoader, 2 workers", lambda: webdataset_dataloader(shards, args.batch, 2), None),
             ("ours: torch backend, aug off, 2 workers", lambda: ours(shards, "torch", 2, False, args.batch, "cpu"),
              "webdataset + PIL DataLoader, 2 workers"),
             ("ours: torch backend, aug on, 2 workers", lambda: ours(shards, "torch", 2, True, args.batch, "cpu"),
              "webdataset + PIL DataLoader, 2 workers")]
    if args.views:
        from bench import multicrop
        cases = multicrop.cases(shards, args.batch, args.workers)
    elif device == "gpu":
        cases += [("DALI reader, mixed decode", lambda: dali_reader(shards, args.batch, "gpu"), None),
                  ("ours: DALI backend mixed, aug on", lambda: ours(shards, "dali", 4, True, args.batch, "gpu"),
                   "DALI reader, mixed decode")]
    if args.only:
        words = args.only.split(",")
        keep = {c[0] for c in cases if any(word in c[0] for word in words)}
        keep |= {c[2] for c in cases if c[0] in keep and c[2]}
        cases = [c for c in cases if c[0] in keep or c is cases[0]]  # the plain row is every table's baseline
    rows = []
    try:
        fastest = best_of_rounds(cases, args.repeats)
        for name, _fn, peer in cases:
            n, seconds = fastest[name]
            rows.append({"case": name, "images": n, "seconds": seconds, "img_per_s": n / seconds, "peer": peer})
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    by_case = {r["case"]: r for r in rows}
    what = "2 x 224 + 8 x 96 px views (steady state)" if args.views else "224 px"
    print(f"\nloader throughput, 256 px JPEG -> {what}, batch {args.batch}, {os.cpu_count()} CPUs, "
          f"{platform.machine()}, best of {args.repeats}")
    print(f"{'case':<50}{'images':>8}{'img/s':>9}{'vs first' if args.views else 'vs plain':>10}{'vs fair peer':>14}")
    for r in rows:
        r["vs_plain"] = r["img_per_s"] / rows[0]["img_per_s"]
        r["vs_peer"] = r["img_per_s"] / by_case[r["peer"]]["img_per_s"] if r["peer"] else None
        peer = f"{r['vs_peer']:>13.2f}x" if r["vs_peer"] else f"{'':>14}"
        print(f"{r['case']:<50}{r['images']:>8}{r['img_per_s']:>9.1f}{r['vs_plain']:>9.2f}x{peer}")
    write_report(args.json, "loaders_views" if args.views else "loaders", rows, batch=args.batch, device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
