"""Joining predictions to labels.parquet by key and by feature NAME: aligned arrays, and what was dropped and why."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from eval.metrics import MIN_VOTES
from eval.store import read_metadata
from sharding.schema import total_votes_column, votes_column

ID_COLUMNS = ("key", "survey", "object_id", "split")


@dataclass
class Predictions:
    path: Path
    frame: pd.DataFrame
    metadata: dict

    @property
    def names(self) -> list[str]:
        """Predicted features: the metadata's list, else every float column without a '__' suffix."""
        if self.metadata.get("names"):
            return list(self.metadata["names"])
        return [c for c in self.frame.columns if c not in ID_COLUMNS and "__" not in c
                and pd.api.types.is_float_dtype(self.frame[c])]

    @property
    def surveys(self) -> list[str]:
        return list(dict.fromkeys(self.frame["survey"]))

    def shards(self, override: str | Path | None) -> Path:
        root = override or self.metadata.get("inputs", {}).get("shards")
        if not root:
            raise ValueError(f"{self.path}: the predictions do not say which shards hold their labels; pass --shards")
        return Path(root)


def read_predictions(path: str | Path) -> Predictions:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prediction file {path} does not exist; make one with `python -m eval predict`")
    frame = pd.read_parquet(path)
    missing = [c for c in ("key", "survey") if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}: not a prediction file of `python -m eval predict`")
    return Predictions(path, frame, read_metadata(path))


@dataclass
class SurveyLabels:
    survey: str
    frame: pd.DataFrame  # indexed by key
    questions: dict[str, list[str]]  # question -> its features, from the shards' manifest

    def has(self, feature: str) -> bool:
        return feature in self.frame.columns


def read_labels(shards: Path, survey: str) -> SurveyLabels:
    directory = Path(shards) / survey
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{directory}: no manifest.json, so no labels for survey {survey!r}; pass the shard root "
                         "that holds it with --shards")
    manifest = json.loads(manifest_path.read_text())
    columns = [c for c in pq.read_schema(directory / manifest["labels"]).names if not c.startswith("native:")]
    frame = pd.read_parquet(directory / manifest["labels"], columns=columns).set_index("key")
    return SurveyLabels(survey, frame, dict(manifest["feature_schema"]["questions"]))


@dataclass
class Aligned:
    """Predictions and labels of the same galaxies, feature columns in `names` order."""
    survey: str
    keys: list[str]
    names: list[str]
    pred: np.ndarray  # (n, F)
    target: np.ndarray  # (n, F), NaN where the survey has no label
    mask: np.ndarray  # (n, F) bool
    labels: pd.DataFrame  # the joined label rows (votes, totals), indexed by key
    num_unmatched: int = 0  # prediction keys absent from labels.parquet
    dropped: dict[str, str] = field(default_factory=dict)  # feature -> reason


def align(frame: pd.DataFrame, names: list[str], labels: SurveyLabels, source: str = "predictions") -> Aligned:
    """Rows of one survey's predictions joined to its labels by key, features kept by name where labels exist."""
    keys = frame["key"].astype(str)
    present = keys.isin(labels.frame.index)
    unmatched = int((~present).sum())
    if not present.any():
        raise ValueError(f"{source}: none of the {len(frame)} {labels.survey} prediction keys (e.g. "
                         f"{keys.iloc[:2].tolist()}) are in {labels.survey}'s labels.parquet; are these the shards "
                         "the predictions were made from?")
    frame = frame[present.to_numpy()]
    kept, dropped = [], {}
    for name in names:
        if not labels.has(name):
            dropped[name] = f"not a label column of {labels.survey}"
        else:
            kept.append(name)
    rows = labels.frame.loc[frame["key"].astype(str)]
    pred = frame[kept].to_numpy(np.float64) if kept else np.zeros((len(frame), 0))
    target = rows[kept].to_numpy(np.float64) if kept else np.zeros((len(frame), 0))
    mask = label_mask(rows, kept, labels.questions) & np.isfinite(pred)
    return Aligned(labels.survey, frame["key"].astype(str).tolist(), kept, pred, target, mask, rows, unmatched,
                   dropped)


def label_mask(rows: pd.DataFrame, names: list[str], questions: dict[str, list[str]]) -> np.ndarray:
    """(n, F) bool: the galaxies each feature is scored on, the same for r, its noise ceiling and every job.

    A label counts where its fraction is finite and its question got at least MIN_VOTES votes: a fraction from
    fewer votes is 0 or 1 and carries no estimate of its own noise. Where a survey records no vote total for the
    question, every finite fraction counts (and the noise ceiling is undefined).
    """
    question_of = {f: q for q, fs in questions.items() for f in fs}
    mask = np.zeros((len(rows), len(names)), bool)
    for j, name in enumerate(names):
        label = rows[name].to_numpy(np.float64) if name in rows.columns else np.full(len(rows), np.nan)
        column = total_votes_column(question_of[name]) if name in question_of else None
        totals = rows[column].to_numpy(np.float64) if column in rows.columns else np.full(len(rows), np.nan)
        mask[:, j] = np.isfinite(label) & ~(np.isfinite(totals) & (totals < MIN_VOTES))
    return mask


def votes(aligned: Aligned, features: list[str]) -> np.ndarray:
    """(n, k) vote counts of features (NaN where the survey lacks the answer)."""
    cols = [votes_column(f) for f in features]
    present = [c for c in cols if c in aligned.labels.columns]
    out = np.full((len(aligned.keys), len(cols)), np.nan)
    for j, c in enumerate(cols):
        if c in present:
            out[:, j] = aligned.labels[c].to_numpy(np.float64)
    return out


def total_votes(aligned: Aligned, question: str) -> np.ndarray:
    col = total_votes_column(question)
    if col not in aligned.labels.columns:
        return np.full(len(aligned.keys), np.nan)
    return aligned.labels[col].to_numpy(np.float64)
