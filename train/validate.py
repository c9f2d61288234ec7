"""Validation during training: loss, MAE and Pearson r per feature by name on each survey's val split."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist

from loaders.evaluation import eval_refs, iter_eval_batches
from loaders.shards import load_survey_shards
from models.metrics import feature_metrics, summary
from train import stages
from train.config import TrainConfig
from train.world import World


def _gather(array: np.ndarray, world_size: int) -> np.ndarray:
    """Every rank's rows, in rank order (ranks hold disjoint, possibly empty, slices)."""
    parts: list[np.ndarray | None] = [None] * world_size
    dist.all_gather_object(parts, array)
    return np.concatenate(parts, axis=0)


class Predictor(Protocol):
    """What validation needs of the training engine."""
    module: torch.nn.Module

    def forward(self, images: torch.Tensor) -> torch.Tensor: ...  # raw logits (named + other answers)
    def train(self, mode: bool = True) -> None: ...


class Validator:
    """Every rank predicts its share of each survey's val split; rank 0 computes, logs and prints the table
    (in the manner of torchtitan's Validator).

    Ranks run equally many forward passes: the val rows are padded to a multiple of the world size and the
    padding is masked out, since a ZeRO-3 forward gathers partitioned parameters, a collective.
    """

    def __init__(self, cfg: TrainConfig, engine: Predictor, surveys: list[str], feature_names: list[str],
                 world: World, on_results: Callable[[int, dict], None] | None = None):
        self.cfg, self.engine, self.world = cfg, engine, world
        self.surveys = cfg.data.val_surveys or surveys
        self.feature_names = feature_names
        self.on_results = on_results

    @torch.no_grad()
    def predict_survey(self, survey: str) -> dict[str, Any]:
        """This rank's share of a survey's val split -> gathered fractions, targets, masks and the loss sum."""
        data, rank, world_size = self.cfg.data, self.world.rank, self.world.world_size
        info = load_survey_shards(Path(data.loader.shard_root) / survey, "val")
        num_real = len(eval_refs(info, rank, world_size, data.val_max_samples))
        preds, targets, masks, losses, counts = [], [], [], [], []
        seen, model = 0, self.engine.module
        self.engine.train(False)
        for batch in iter_eval_batches(data.loader, survey, "val", rank, world_size, data.val_batch_size,
                                       data.val_max_samples, pad=True):
            logits = self.engine.forward(batch.images).float()
            real = max(0, min(len(batch), num_real - seen))  # padding rows come last
            seen += len(batch)
            if not real:
                continue
            part = stages.slice_batch(batch, slice(0, real)).to(logits.device)
            logits = logits[:real]
            losses.append(stages.loss_sum(self.cfg.loss, logits, part, model).item())
            counts.append(int(stages.label_count(self.cfg.loss, part, model)))
            preds.append(stages.fractions(logits, model).cpu().numpy())
            targets.append(part.features.cpu().numpy())
            masks.append(part.feature_mask.cpu().numpy())
        width = len(self.feature_names)
        stack = lambda xs, dtype: np.concatenate(xs) if xs else np.zeros((0, width), dtype)  # noqa: E731
        return {"pred": _gather(stack(preds, np.float32), world_size),
                "target": _gather(stack(targets, np.float32), world_size),
                "mask": _gather(stack(masks, bool), world_size),
                "loss_sum": float(sum(_gather(np.array(losses, np.float64), world_size))),
                "loss_count": int(sum(_gather(np.array(counts, np.int64), world_size)))}

    def run(self, step: int) -> dict:
        """Collective: per-survey results (n, loss, summary metrics, per-feature metrics) on every rank."""
        results = {}
        for survey in self.surveys:
            out = self.predict_survey(survey)
            n = len(out["pred"])
            metrics = feature_metrics(out["pred"], out["target"], out["mask"], self.feature_names)
            # The loss as training defines it: summed over the split's labels, divided by their number.
            loss = out["loss_sum"] / max(out["loss_count"], 1)
            results[survey] = {"n": n, "loss": loss, **summary(metrics), "features": metrics}
        if self.world.is_main and self.on_results is not None:
            self.on_results(step, results)
        return results


def format_table(results: dict, step: int) -> str:
    """A per-feature r table with one column per survey, and the summary rows."""
    surveys = list(results)
    lines = [f"validation at step {step}", f"{'feature':<34}" + "".join(f"{s:>10}" for s in surveys)]
    for name in next(iter(results.values()))["features"] if results else []:
        cells = [results[s]["features"][name]["r"] for s in surveys]
        lines.append(f"{name:<34}" + "".join(f"{c:>10.3f}" if math.isfinite(c) else f"{'-':>10}" for c in cells))
    for row in ("r", "mae", "loss", "n"):
        cells = [results[s][row] for s in surveys]
        label = {"r": "mean r", "mae": "mean MAE", "loss": "loss", "n": "galaxies"}[row]
        lines.append(f"{label:<34}" + "".join(f"{c:>10.3f}" if isinstance(c, float) else f"{c:>10}" for c in cells))
    return "\n".join(lines)
