"""`loaders.inspect --grid`: a contact sheet of the loader's batch, labelled and colour-coded by survey."""

from __future__ import annotations

import argparse
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from loaders.sampler import MixConfig

MAX_GRID_TILES = 64
"""Largest contact sheet; a bigger global batch shows rank 0's slice, cut to this many tiles."""

SURVEY_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
                  (240, 50, 230), (210, 245, 60)]
"""Tile border and label colour per survey index (cycled)."""


def contact_sheet(images: np.ndarray, keys: Sequence[str], survey_index: Sequence[int], names: Sequence[str],
                  title: str) -> Any:
    """A PIL image of uint8 (N, H, W, 3) tiles, each framed in its survey's colour and labelled by key."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    num, height, width = images.shape[:3]
    border, label_height, title_height = 3, 14, 34
    columns = math.ceil(math.sqrt(num))
    tile_w, tile_h = width + 2 * border, height + 2 * border + label_height
    legend = "".join(f"    {n}   " for n in names)
    text_w = int(max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font) for t in (title, legend)))
    sheet = Image.new("RGB", (max(columns * tile_w, text_w + 8), title_height + math.ceil(num / columns) * tile_h),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), title, fill=(0, 0, 0), font=font)
    x = 4
    for s, name in enumerate(names):  # legend: a colour swatch, then the survey name
        colour = SURVEY_COLOURS[s % len(SURVEY_COLOURS)]
        draw.rectangle([x, 19, x + 10, 29], fill=colour)
        draw.text((x + 14, 17), name, fill=colour, font=font)
        x += 14 + int(draw.textlength(name + "   ", font=font))
    for i, (image, key, s) in enumerate(zip(images, keys, survey_index)):
        left, top = (i % columns) * tile_w, title_height + (i // columns) * tile_h
        colour = SURVEY_COLOURS[int(s) % len(SURVEY_COLOURS)]
        draw.rectangle([left, top, left + tile_w - 1, top + height + 2 * border - 1], fill=colour)
        sheet.paste(Image.fromarray(image), (left + border, top + border))
        draw.text((left + 1, top + height + 2 * border), _fit(draw, key, font, tile_w - 2), fill=colour, font=font)
    return sheet


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    """`text` cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "\u2026", font=font) > width:
        text = text[:-1]
    return text + "\u2026"


def grid_batch(args: argparse.Namespace, mix: MixConfig, state: dict | None,
               report: dict[str, Any]) -> tuple[Any, Any, int]:
    """The loader's batch of the first inspected step, restored from `state`, the sampler state a resumed run
    would load (rank 0's slice if the global batch exceeds MAX_GRID_TILES): (Batch, LoaderConfig, world size)."""
    from loaders.augment import AugmentConfig
    from loaders.loader import LoaderConfig, build_loader

    world_size = 1 if mix.global_batch_size <= MAX_GRID_TILES else report["world_size"]
    cfg = LoaderConfig(shard_root=str(args.shards), backend=args.backend, split=args.split,
                       image_size=args.image_size, num_workers=args.workers,
                       augment=AugmentConfig(enabled=args.augment))
    loader = build_loader(cfg, mix, rank=0, world_size=world_size, sampler_state=state)
    try:
        batches = iter(loader)
        batch = next(batches)
        batches.close()
    finally:
        loader.close()
    return batch, cfg, world_size


def write_grid(args: argparse.Namespace, mix: MixConfig, state: dict | None,
               report: dict[str, Any]) -> dict[str, Any]:
    """Save the contact sheet of grid_batch() to args.grid; returns what the report records about it."""
    batch, cfg, world_size = grid_batch(args, mix, state, report)
    num = min(len(batch), MAX_GRID_TILES)
    images = batch.images[:num].float().numpy()  # (N, 3, S, S) normalised on 0..1 pixels
    pixels = images * np.array(cfg.std)[:, None, None] + np.array(cfg.mean)[:, None, None]
    pixels = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    survey_index = batch.survey[:num].tolist()
    names, step = report["surveys"], report["steps"][0]
    counts = Counter(names[s] for s in batch.survey.tolist())
    what = "global batch" if world_size == 1 else f"rank 0 of {world_size}"
    title = (f"step {step['step']} ({what}, {len(batch)} samples{', first ' + str(num) if num < len(batch) else ''})"
             f"  {'  '.join(f'{n} {counts[n]}' for n in names)}"
             f"  [{args.backend}, {'augmented' if args.augment else 'not augmented'}]")
    args.grid.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(pixels, batch.keys[:num], survey_index, names, title).save(args.grid)
    expected = [k for keys in step["keys_by_rank"] for k in keys] if world_size == 1 else step["keys_by_rank"][0]
    # The loader replaces an unreadable sample by its survey's next one, so keys may differ on damaged shards.
    return {"path": str(args.grid), "step": step["step"], "num_tiles": num, "world_size": world_size,
            "counts": {n: counts[n] for n in names}, "keys_match_sampler": batch.keys == expected}
