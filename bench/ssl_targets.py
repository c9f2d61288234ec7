"""The SSL benchmark's two targets (issue 17) and the runs under a bench/ssl_bench.py --out that each arm reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.probes import model_predictions, ridge_predictions

LABELLED = ("sdss", "decals", "hst")

# The two targets, with the arms fixed before a confirmatory run (--targets): frozen features, >= 0.30 on each
# survey, by the ridge probe of the recipe's teacher and by an MLP head stage on it (each against the same on a random
# backbone), and head-first fine-tuning from it against scratch with 10% of the labels (>= +0.05, interval above 0).
# Head first was the best way to fine-tune averaged over the exploratory skies (0 and 1), so it is the one looked at.
TARGET_PAIRS = [("ridge ssl", "ridge random"), ("mlp ssl", "mlp random"), ("ssl lpft 10pct", "scratch 10pct")]
# Each target arm and what it reads under --out/runs: a backbone folder (a ridge arm) or a training run.
TARGET_RUNS = {"ridge ssl": "ssl/export/backbone", "ridge random": "random_backbone",
               "mlp ssl": "mlp_head_ssl", "mlp random": "mlp_head_random",
               "ssl lpft 10pct": "ft_ssl_10pct_lpft", "scratch 10pct": "ft_scratch_10pct"}


def target_runs(recipe: str = "ssl") -> dict[str, str]:
    """TARGET_RUNS with another SSL arm in the recipe's place: "long" reads ssl_long, its MLP head stage
    mlp_head_long and its head-first fine-tuning ft_long_10pct_lpft (the runs --long-ssl-steps and --variant make),
    against the same random backbone and scratch run."""
    if recipe == "ssl":
        return dict(TARGET_RUNS)
    return {**TARGET_RUNS, "ridge ssl": f"ssl_{recipe}/export/backbone", "mlp ssl": f"mlp_head_{recipe}",
            "ssl lpft 10pct": f"ft_{recipe}_10pct_lpft"}


def target_arms(out: Path, survey: str, runs: dict[str, str] = TARGET_RUNS) -> dict[str, tuple[list[str], np.ndarray]]:
    """The target arms' test predictions from the runs kept under a benchmark's --out."""
    root, shards = out / "runs", out / "shards"
    return {arm: ridge_predictions(root / run, shards, survey)[:2] if arm.startswith("ridge ")
            else model_predictions(root / run, shards, survey, "test") for arm, run in runs.items()}
