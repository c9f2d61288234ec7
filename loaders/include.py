"""`data.include_keys`: train on a chosen subset (e.g. `python -m eval select` picks) of each survey's samples.

The rule: a survey of the mix with at least one key listed keeps only its listed samples; a survey with no key
listed is untouched (so a round of picks for one survey combines with the full mix of the others). A listed key
that no mixed survey's train split holds is an error (a typo, a key from another split or from a survey left out
of the mix), and so is a survey left with no samples. The kept set depends only on the keys, never on the world
size: the sampler then mixes the kept samples exactly, as it does for `data.label_fraction`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from loaders.shards import SurveyShards, keep_samples


def read_key_file(path: str | Path) -> list[str]:
    """Keys listed in a Parquet or CSV file with a `key` column, or a text file with one key per line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data.include_keys: {path} does not exist (a picks.parquet from `python -m eval select`, "
                         "a CSV with a key column, or a text file with one key per line)")
    if path.suffix in (".parquet", ".csv"):
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype=str)
        if "key" not in table.columns:
            raise ValueError(f"data.include_keys: {path} has no `key` column (columns: {list(table.columns)[:8]}); "
                             "write the sample keys (<survey>_<object id>) in a column named key")
        keys = table["key"]
        if keys.isna().any():
            row = int(keys.isna().to_numpy().argmax())
            raise ValueError(f"data.include_keys: {path} row {row} has an empty key; drop it or fill it in")
        return [str(k) for k in keys]
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def read_key_files(paths: Iterable[str | Path]) -> set[str]:
    keys: set[str] = set()
    for path in paths:
        keys.update(read_key_file(path))
    return keys


def restrict_to_keys(surveys: list[SurveyShards], keys: set[str], split: str = "train") -> list[SurveyShards]:
    """Each survey with a listed key restricted to its listed samples; the others as they are (module docstring)."""
    if not keys:
        return surveys
    out, found = [], set()
    for info in surveys:
        keep = [[e.key in keys for e in entries] for entries in info.index]
        listed = {e.key for entries in info.index for e in entries if e.key in keys}
        found |= listed
        if listed:
            out.append(keep_samples(info, keep))
            continue
        out.append(info)
    missing = sorted(keys - found)
    if missing:
        names = [s.name for s in surveys]
        raise ValueError(f"data.include_keys: {len(missing)} of {len(keys)} keys are in no {split} sample of the mixed "
                         f"surveys {names} (e.g. {missing[:3]}); select from the {split} split of surveys in the mix "
                         "(`python -m eval select --split train`) or remove those keys")
    return out
