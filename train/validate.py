"""Validation during training: loss, MAE and Pearson r per feature by name on each survey's val split."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from loaders.evaluation import iter_eval_batches
from models.metrics import feature_metrics, summary
from train import stages

if TYPE_CHECKING:
    from train.loop import Run


def _gather(array: np.ndarray, world_size: int) -> np.ndarray:
    """Every rank's rows, in rank order (ranks hold disjoint, possibly empty, slices)."""
    parts: list[np.ndarray | None] = [None] * world_size
    dist.all_gather_object(parts, array)
    return np.concatenate(parts, axis=0)


@torch.no_grad()
def predict_survey(run: Run, survey: str) -> dict[str, np.ndarray]:
    """This rank's share of a survey's val split -> gathered fractions, targets, masks and loss sums."""
    data = run.cfg.data
    preds, targets, masks, losses = [], [], [], []
    run.engine.train(False)
    for batch in iter_eval_batches(data.loader, survey, "val", run.world.rank, run.world.world_size,
                                   data.val_batch_size, data.val_max_samples):
        logits = run.engine.forward(batch.images).float()
        batch = batch.to(logits.device)
        model = run.engine.module
        losses.append(stages.loss(run.cfg.loss, logits, batch, model).item() * len(batch))
        preds.append(stages.fractions(logits, model).cpu().numpy())
        targets.append(batch.features.cpu().numpy())
        masks.append(batch.feature_mask.cpu().numpy())
    num_features = len(run.schema.names)
    stack = lambda xs, dtype: np.concatenate(xs) if xs else np.zeros((0, num_features), dtype)  # noqa: E731
    world = run.world.world_size
    return {"pred": _gather(stack(preds, np.float32), world), "target": _gather(stack(targets, np.float32), world),
            "mask": _gather(stack(masks, bool), world),
            "loss_sum": float(sum(_gather(np.array(losses, np.float64), world)))}


def run_validation(run: Run) -> dict:
    """Every rank predicts; rank 0 computes, prints and logs the per-survey, per-feature table."""
    surveys = run.cfg.data.val_surveys or run.loader.surveys
    results = {}
    for survey in surveys:
        out = predict_survey(run, survey)
        n = len(out["pred"])
        metrics = feature_metrics(out["pred"], out["target"], out["mask"], run.schema.names)
        results[survey] = {"n": n, "loss": out["loss_sum"] / max(n, 1), **summary(metrics), "features": metrics}
    if run.world.is_main:
        run.log.event({"event": "validation", "step": run.step, "surveys": results})
        run.log.write(format_table(results, run.step))
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
