"""Multi-crop cases of bench/loaders.py (--views): each backend's views against an equal-worker peer that makes the
same crops (DINOv2's 2 x 224 px from 32-100% of the image and 8 x 96 px from 5-32%, flips, right-angle turns).

Peers: a webdataset + PIL DataLoader cropping with torch (F.interpolate of the window, antialiased, as
torchvision's RandomResizedCrop on tensors) for the torch backend; DALI's own reader with fn.random_resized_crop,
fn.flip and fn.rotate for the DALI backend. The clock starts when the first batch arrives, for every case, so that
pipeline builds and worker start-ups (seconds on two cores, against a few hundred images) are left out.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loaders.loader import LoaderConfig, build_loader
from loaders.sampler import MixConfig
from loaders.shards import load_shard_root
from loaders.views import CropSet, LocalCrops, ViewsConfig

SURVEYS = ("sdss", "decals", "hst")
MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
GLOBAL, LOCAL = CropSet(), LocalCrops()
# What the peers do too: random resized crops, flips, right-angle turns; no degradation.
SAME_AS_PEERS = ViewsConfig(enabled=True, global_crops=CropSet(rotation_step_deg=90.0, degrade_prob=(0.0,)),
                            local_crops=LocalCrops(rotation_step_deg=90.0, degrade_prob=(0.0,)))
# The astronomy defaults (free rotations, survey degradation with DINOv2's per-view probabilities): more work.
DEFAULTS = ViewsConfig(enabled=True)
CROPS = [(GLOBAL.size, GLOBAL.scale)] * GLOBAL.count + [(LOCAL.size, LOCAL.scale)] * LOCAL.count


def _steady(batches) -> tuple[int, float]:
    """(images after the first batch, seconds from the first batch's arrival to the last's)."""
    n, start = 0, None
    for size in batches:
        if start is None:
            start = time.perf_counter()
        else:
            n += size
    return n, time.perf_counter() - start


def ours(shards: Path, backend: str, workers: int, batch: int, views: ViewsConfig,
         threads: int = 2) -> tuple[int, float]:
    counts = {s.name: s.num_samples for s in load_shard_root(shards, list(SURVEYS))}
    mix = MixConfig(ratios="sdss=0.33,decals=0.33,hst=0.34", global_batch_size=batch,
                    epoch_samples=min(counts.values()) * 3 // batch * batch, on_exhausted="repeat")
    cfg = LoaderConfig(shard_root=str(shards), backend=backend, num_workers=workers, num_threads=threads,
                       views=views)
    loader = build_loader(cfg, mix)
    try:
        return _steady(len(b) for b in loader)
    finally:
        loader.close()


def _torch_crop(image: torch.Tensor, size: int, scale: tuple[float, float], rng: random.Random) -> torch.Tensor:
    _, h, w = image.shape
    side = min(round(math.sqrt(rng.uniform(*scale) * h * w)), h, w)
    top, left = rng.randint(0, h - side), rng.randint(0, w - side)
    out = F.interpolate(image[None, :, top:top + side, left:left + side], size=(size, size), mode="bilinear",
                        antialias=True, align_corners=False)[0]
    flips = [dim for dim in (2, 1) if rng.random() < 0.5]
    out = out.flip(flips) if flips else out
    return torch.rot90(out, rng.randrange(4), (1, 2))


def webdataset_views(shards: Path, batch: int, workers: int) -> tuple[int, float]:
    """The multi-crop pipeline people write first, in a DataLoader with `workers` processes (shards split by
    worker): webdataset + PIL decode, then every crop with torch from the decoded image, normalised, batched."""
    import webdataset as wds
    from torch.utils.data import DataLoader
    urls = sorted(str(p) for s in SURVEYS for p in (shards / s).glob(f"{s}-train-*.tar"))
    mean, std = torch.from_numpy(MEAN).view(3, 1, 1), torch.from_numpy(STD).view(3, 1, 1)

    def prepare(sample):
        rng = random.Random(sample["__key__"])
        image = torch.from_numpy(np.asarray(sample["jpg"].convert("RGB"), np.float32)).permute(2, 0, 1)
        return [(_torch_crop(image, size, scale, rng) - mean) / std for size, scale in CROPS]

    def collate(samples):
        return [torch.stack(view) for view in zip(*samples)]
    dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").map(prepare)
               .batched(batch, collation_fn=collate))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)
    return _steady(len(views[0]) for views in loader)


def dali_views(shards: Path, batch: int, threads: int = 2) -> tuple[int, float]:
    """DALI's own reader (no mixing, no random access) making the same crops with its fused operators."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    paths = sorted(str(p) for s in SURVEYS for p in (shards / s).glob(f"{s}-train-*.tar"))

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None)
    def pipe():
        jpg = fn.readers.webdataset(paths=paths, index_paths=[p[:-4] + ".idx" for p in paths], ext=["jpg"],
                                    random_shuffle=False, name="reader")
        images = fn.decoders.image(jpg, device="cpu", output_type=types.RGB)
        views = []
        for size, scale in CROPS:
            view = fn.random_resized_crop(images, size=[size, size], random_area=list(scale),
                                          random_aspect_ratio=[1.0, 1.0])
            view = fn.flip(view, horizontal=fn.random.coin_flip(), vertical=fn.random.coin_flip())
            angle = fn.cast(fn.random.uniform(values=[0.0, 90.0, 180.0, 270.0]), dtype=types.FLOAT)
            view = fn.rotate(view, angle=angle, keep_size=True)
            views.append(fn.crop_mirror_normalize(view, dtype=types.FLOAT, output_layout="CHW", mean=MEAN.tolist(),
                                                  std=STD.tolist()))
        return tuple(views)
    p = pipe()
    p.build()
    names = [f"view_{v}" for v in range(len(CROPS))]
    loader = DALIGenericIterator([p], names, reader_name="reader", last_batch_policy=LastBatchPolicy.PARTIAL)
    return _steady(len(out["view_0"]) for (out,) in loader)


def cases(shards: Path, batch: int, workers: int) -> list[tuple]:
    """(case, function, its fair peer or None) rows for bench/loaders.py."""
    torch_peer = f"webdataset + PIL + torch crops, {workers} workers"
    return [
        ("DALI reader + random_resized_crop", lambda: dali_views(shards, batch), None),
        ("ours: DALI backend, same crops", lambda: ours(shards, "dali", 0, batch, SAME_AS_PEERS),
         "DALI reader + random_resized_crop"),
        ("ours: DALI backend, astronomy defaults", lambda: ours(shards, "dali", 0, batch, DEFAULTS), None),
        (torch_peer, lambda: webdataset_views(shards, batch, workers), None),
        (f"ours: torch backend, same crops, {workers} workers",
         lambda: ours(shards, "torch", workers, batch, SAME_AS_PEERS), torch_peer),
        (f"ours: torch backend, astronomy defaults, {workers} workers",
         lambda: ours(shards, "torch", workers, batch, DEFAULTS), None)]
