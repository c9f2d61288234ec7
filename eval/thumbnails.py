"""Galaxy images by key from built shards (labels.parquet names the shard, its DALI index the offset)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from eval.reading import reject_reason
from loaders.shards import read_index


def survey_of(key: str, surveys: list[str]) -> str | None:
    """The survey a key `<survey>_<id>` belongs to (the longest matching survey name)."""
    matches = [s for s in surveys if key.startswith(s + "_")]
    return max(matches, key=len) if matches else None


def read_thumbnails(shards: str | Path, keys: list[str], size: int = 96,
                    unreadable: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """{key: (size, size, 3) uint8} for the keys found in the shards; keys not found are left out, and so are
    images that cannot be read (a cut shard, damaged bytes), whose reasons go to `unreadable` by key."""
    root = Path(shards)
    surveys = sorted(p.parent.name for p in root.glob("*/manifest.json"))
    out: dict[str, np.ndarray] = {}
    by_survey: dict[str, list[str]] = {}
    for key in keys:
        survey = survey_of(key, surveys)
        if survey is not None:
            by_survey.setdefault(survey, []).append(key)
    for survey, wanted in by_survey.items():
        directory = root / survey
        manifest = json.loads((directory / "manifest.json").read_text())
        ext = manifest["members"][0]
        labels = pd.read_parquet(directory / manifest["labels"], columns=["key", "shard"]).set_index("key")
        shard_of = labels["shard"].reindex(wanted).dropna()
        for shard, group in shard_of.groupby(shard_of):
            entries = {e.key: e for e in read_index(directory / (Path(shard).stem + ".idx"))}
            with open(directory / shard, "rb") as tar:
                for key in group.index:
                    offset, length = entries[key].members[ext]
                    tar.seek(offset)
                    try:
                        with Image.open(io.BytesIO(tar.read(length))) as image:
                            out[key] = np.asarray(image.convert("RGB").resize((size, size),
                                                                              Image.Resampling.BILINEAR))
                    except (OSError, ValueError) as err:  # PIL's errors for cut or damaged image bytes
                        if unreadable is not None:
                            unreadable[key] = f"{shard}: {reject_reason(err)}"
    return out
