"""Held-out galaxies with and without a training twin: the same galaxy in a survey a run trained on.

A held-out score can flatter a model that saw the same galaxy through another survey's eyes. Splitting the held-out
galaxies by whether a positional twin sits in a training survey's train split shows how much of the score is new.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from eval import metrics as m
from eval.match import read_positions
from sharding.sky import match_positions

SUBSETS = ("new", "twin")  # new: no twin in any training survey's train split; twin: at least one
MIN_SUBSET = 10  # fewer galaxies than this give no interval worth printing


def _positions(shards: Path, survey: str, split: str | None = None) -> pd.DataFrame:
    frame = read_positions(shards, survey, ("key", "ra", "dec", "split"))
    return frame if split is None else frame[frame["split"] == split]


def twin_keys(shards: Path, held_out: str, training_surveys: list[str], radius_arcsec: float = 1.0,
              split: str = "train") -> set[str]:
    """Keys of held-out galaxies with a one-to-one positional twin in a training survey's `split`."""
    held = _positions(shards, held_out)
    found: set[str] = set()
    for survey in training_surveys:
        other = _positions(shards, survey, split)
        rows, _, _ = match_positions(held["ra"], held["dec"], other["ra"], other["dec"], radius_arcsec)
        found.update(held["key"].iloc[rows])
    return found


def subset_rows(keys: list[str], twins: set[str]) -> dict[str, np.ndarray]:
    has_twin = np.array([k in twins for k in keys], dtype=bool)
    return {"new": np.flatnonzero(~has_twin), "twin": np.flatnonzero(has_twin)}


def subset_scores(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, features: list[str],
                  rows: dict[str, np.ndarray], bootstrap: int, seed: int) -> dict:
    """{subset: {"n", "r", "r_ci"}} of one run; r is None where the subset is too small."""
    out = {}
    for name, idx in rows.items():
        entry: dict = {"n": int(len(idx)), "r": None, "r_ci": None}
        if len(idx) >= MIN_SUBSET:
            table = m.feature_table(pred[idx], target[idx], mask[idx], features, num_resamples=bootstrap,
                                    seed=seed, metrics=("r",))
            entry.update(r=table["mean"]["r"], r_ci=table["mean"]["r_ci"])
        out[name] = entry
    return out


def subset_differences(pred_a: np.ndarray, pred_b: np.ndarray, target: np.ndarray, mask: np.ndarray,
                       rows: dict[str, np.ndarray], bootstrap: int, seed: int) -> dict:
    """{subset: {"n", "diff", "ci", "p_gt0"}}: r of a minus r of b on the same galaxies, paired resamples."""
    out = {}
    for name, idx in rows.items():
        entry: dict = {"n": int(len(idx)), "diff": None, "ci": None, "p_gt0": None}
        if len(idx) >= MIN_SUBSET:
            d = m.paired_differences([pred_b[idx], pred_a[idx]], target[idx], mask[idx], num_resamples=bootstrap,
                                     seed=seed, metrics=("r",))[(0, 1)]["r"]
            entry.update(diff=-d["diff"], ci=[-d["ci"][1], -d["ci"][0]], p_gt0=1 - d["p_gt0"])
        out[name] = entry
    return out
