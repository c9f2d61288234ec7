"""The batch layout both backends produce: images, labels by schema order, masks, vote counts, survey, keys."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from loaders.shards import SurveyShards


@dataclass
class Batch:
    images: torch.Tensor  # (N, C, H, W), normalised float32 or bfloat16
    features: torch.Tensor  # (N, F) vote fractions in schema order; 0 where absent (see feature_mask)
    feature_mask: torch.Tensor  # (N, F) bool: True where the survey has this answer for this galaxy
    votes: torch.Tensor  # (N, F) vote counts; 0 where absent
    total_votes: torch.Tensor  # (N, Q) total votes per question; 0 where absent
    survey: torch.Tensor  # (N,) int64 index into the loader's survey list
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.images), move(self.features), move(self.feature_mask), move(self.votes),
                     move(self.total_votes), move(self.survey), self.keys)


def label_arrays(surveys: list[SurveyShards], refs: np.ndarray) -> dict[str, np.ndarray]:
    """Labels for sample references (rows of survey, shard, index), gathered from each survey's tables."""
    num = len(refs)
    first = surveys[0]
    out = {
        "features": np.empty((num, first.features.shape[1]), np.float32),
        "votes": np.empty((num, first.votes.shape[1]), np.float32),
        "total_votes": np.empty((num, first.total_votes.shape[1]), np.float32),
    }
    refs = np.asarray(refs)
    for s, info in enumerate(surveys):
        mine = refs[:, 0] == s
        if mine.any():
            rows = info.shard_starts[refs[mine, 1]] + refs[mine, 2]
            out["features"][mine] = info.features[rows]
            out["votes"][mine] = info.votes[rows]
            out["total_votes"][mine] = info.total_votes[rows]
    return out


def make_batch(images: torch.Tensor, labels: dict[str, np.ndarray], refs: np.ndarray, keys: list[str]) -> Batch:
    features = labels["features"]
    mask = np.isfinite(features)
    return Batch(
        images=images,
        features=torch.from_numpy(np.where(mask, features, 0).astype(np.float32)),
        feature_mask=torch.from_numpy(mask),
        votes=torch.from_numpy(np.nan_to_num(labels["votes"], nan=0.0)),
        total_votes=torch.from_numpy(np.nan_to_num(labels["total_votes"], nan=0.0)),
        survey=torch.from_numpy(np.asarray(refs)[:, 0].astype(np.int64)),
        keys=list(keys))
