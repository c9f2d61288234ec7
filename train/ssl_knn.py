"""The kNN probe of stage `ssl`: how much morphology the teacher's embeddings hold, without training a head.

Each labelled survey's val split (the queries) and the start of its train split (the bank, at most
data.val_max_samples x 4 galaxies) go through the teacher backbone, every rank a share, gathered; each val galaxy's
26 vote fractions are predicted by its k = 20 nearest bank galaxies (cosine similarity, weights
exp(similarity / 0.07) as DINO's kNN classifier), and scored as validation scores the supervised model: Pearson r
per feature by name, mean r over the features. Surveys built unlabeled are left out by the caller.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from loaders.evaluation import eval_refs, iter_eval_batches
from loaders.shards import load_survey_shards
from models.metrics import feature_metrics, summary
from train.config import TrainConfig
from train.world import World

KNN_TEMPERATURE = 0.07


def knn_predict(bank: torch.Tensor, bank_targets: torch.Tensor, bank_mask: torch.Tensor, queries: torch.Tensor,
                k: int, temperature: float = KNN_TEMPERATURE) -> torch.Tensor:
    """(q, F) predictions: the similarity-weighted mean of the labels of each query's k nearest bank rows, per
    feature over the neighbours that have it (NaN where none does). A bank apart from the queries: leave-one-out
    within a small split biases r towards -1 (a row's prediction is the split's mean without itself)."""
    if not len(bank):
        return torch.full((len(queries), bank_targets.shape[1]), math.nan, dtype=torch.float64)
    bank_z = torch.nn.functional.normalize(bank.double(), dim=1)
    query_z = torch.nn.functional.normalize(queries.double(), dim=1)
    top, index = (query_z @ bank_z.T).topk(min(k, len(bank)), dim=1)
    weights = torch.exp((top - 1.0) / temperature)[:, :, None]  # shifted by the largest similarity (1): no overflow
    has = bank_mask[index].double() * weights  # (q, k, F)
    total = has.sum(dim=1)
    pred = (has * bank_targets[index].double()).sum(dim=1) / total.clamp(min=1e-300)
    return torch.where(total > 0, pred, torch.full_like(pred, math.nan))


def _gather(array: np.ndarray, world_size: int) -> np.ndarray:
    if world_size == 1:
        return array
    parts: list[np.ndarray | None] = [None] * world_size
    dist.all_gather_object(parts, array)
    return np.concatenate(parts, axis=0)


class KnnProbe:
    """Stage ssl's validator: `run(step)` probes the teacher's CLS embeddings on every labelled val split."""

    def __init__(self, cfg: TrainConfig, teacher_backbone: Callable[[torch.Tensor], torch.Tensor],
                 surveys: list[str], feature_names: list[str], world: World, device: torch.device,
                 on_results: Callable[[int, dict], None] | None = None):
        self.cfg, self.embed, self.world, self.device = cfg, teacher_backbone, world, device
        self.surveys = surveys  # the labelled val surveys
        self.feature_names, self.on_results = feature_names, on_results

    @torch.no_grad()
    def _embed(self, survey: str, split: str, max_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(embeddings, targets, masks) of the first `max_samples` of a split, gathered in rank order."""
        data, rank, world_size = self.cfg.data, self.world.rank, self.world.world_size
        info = load_survey_shards(Path(data.loader.shard_root) / survey, split)
        num_real = len(eval_refs(info, rank, world_size, max_samples))
        embeddings, targets, masks, seen = [], [], [], 0
        for batch in iter_eval_batches(data.loader, survey, split, rank, world_size, data.val_batch_size,
                                       max_samples, pad=True):
            cls = self.embed(batch.images.to(self.device).float())
            real = max(0, min(len(batch), num_real - seen))  # padding rows come last
            seen += len(batch)
            embeddings.append(cls[:real].double().cpu().numpy())
            targets.append(batch.features[:real].double().numpy())
            masks.append(batch.feature_mask[:real].numpy())
        stack = lambda xs: np.concatenate(xs) if xs else np.zeros((0, 0))  # noqa: E731
        return tuple(_gather(stack(x), world_size) for x in (embeddings, targets, masks))

    def run(self, step: int) -> dict:
        """Collective: {survey: {n, loss (NaN: no loss here), mae, r, num_features, features}} on every rank."""
        results, k = {}, self.cfg.ssl.knn_k
        max_val = self.cfg.data.val_max_samples
        for survey in self.surveys:
            bank = [torch.from_numpy(a) for a in self._embed(survey, "train", 4 * max_val)]
            queries, targets, masks = self._embed(survey, "val", max_val)
            masks = masks.astype(bool)
            if not len(queries) or not masks.any():
                continue
            pred = knn_predict(bank[0], bank[1], bank[2].bool(), torch.from_numpy(queries), k).numpy()
            scored = masks & np.isfinite(pred)
            metrics = feature_metrics(np.nan_to_num(pred), targets, scored, self.feature_names)
            results[survey] = {"n": len(queries), "loss": math.nan, **summary(metrics), "features": metrics,
                               "probe": f"knn{k}", "bank": len(bank[0])}
        if self.world.is_main and self.on_results is not None and results:
            self.on_results(step, results)
        return results
