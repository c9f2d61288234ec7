"""The batch layout both backends produce: images (and multi-crop views), labels by schema order, masks, vote
counts, survey, keys."""

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
    views: list[torch.Tensor] | None = None
    """Multi-crop views (loader views enabled), normalised like images: the global crops (N, 3, G, G) first, then
    the local crops (N, 3, L, L); `images` is views[0]. None without views."""
    num_global_views: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking), self.keys)

    def slice(self, part: slice) -> "Batch":
        """Samples `part` of the batch (a micro-batch), views included."""
        return self._map(lambda t: t[part], self.keys[part])

    def _map(self, fn, keys: list[str]) -> "Batch":
        views = None if self.views is None else [fn(v) for v in self.views]
        # images is views[0]: map it once, so the two stay one tensor.
        images = views[0] if views is not None and self.views[0] is self.images else fn(self.images)
        return Batch(images, fn(self.features), fn(self.feature_mask), fn(self.votes), fn(self.total_votes),
                     fn(self.survey), keys, views, self.num_global_views)


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


def make_batch(images: torch.Tensor, labels: dict[str, np.ndarray], refs: np.ndarray, keys: list[str],
               views: list[torch.Tensor] | None = None, num_global_views: int = 0) -> Batch:
    """A Batch from decoded images (or, with views, views[0]) and label arrays; absent answers masked, zeroed."""
    features = labels["features"]
    mask = np.isfinite(features)
    return Batch(
        images=images,
        features=torch.from_numpy(np.where(mask, features, 0).astype(np.float32)),
        feature_mask=torch.from_numpy(mask),
        votes=torch.from_numpy(np.nan_to_num(labels["votes"], nan=0.0)),
        total_votes=torch.from_numpy(np.nan_to_num(labels["total_votes"], nan=0.0)),
        survey=torch.from_numpy(np.asarray(refs)[:, 0].astype(np.int64)),
        keys=list(keys), views=views, num_global_views=num_global_views if views is not None else 0)
