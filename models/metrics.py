"""Per-feature regression metrics by feature NAME (MAE, Pearson r, R^2), ignoring absent labels."""

from __future__ import annotations

import numpy as np


def feature_metrics(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, names: list[str],
                    min_count: int = 3) -> dict[str, dict[str, float]]:
    """{feature: {n, mae, mse, r, r2}} over samples whose label exists; r/r2 NaN where undefined."""
    if pred.shape != target.shape or pred.shape != mask.shape or pred.shape[1] != len(names):
        raise ValueError(f"shapes differ: pred {pred.shape}, target {target.shape}, mask {mask.shape}, "
                         f"{len(names)} names")
    out = {}
    for j, name in enumerate(names):
        m = mask[:, j].astype(bool)
        p, t = pred[m, j].astype(np.float64), target[m, j].astype(np.float64)
        n = int(m.sum())
        row = {"n": n, "mae": float("nan"), "mse": float("nan"), "r": float("nan"), "r2": float("nan")}
        if n:
            err = p - t
            row["mae"], row["mse"] = float(np.abs(err).mean()), float((err ** 2).mean())
        if n >= min_count and p.std() > 0 and t.std() > 0:
            row["r"] = float(np.corrcoef(p, t)[0, 1])
            row["r2"] = float(1 - (err ** 2).sum() / ((t - t.mean()) ** 2).sum())
        out[name] = row
    return out


def summary(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean MAE and mean r over the features that have them (NaNs skipped), and how many features count."""
    maes = [m["mae"] for m in metrics.values() if np.isfinite(m["mae"])]
    rs = [m["r"] for m in metrics.values() if np.isfinite(m["r"])]
    return {"mae": float(np.mean(maes)) if maes else float("nan"),
            "r": float(np.mean(rs)) if rs else float("nan"), "num_features": len(rs)}
