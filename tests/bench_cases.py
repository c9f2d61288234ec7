"""Shared helpers of the benchmark tests: a mock sky's test labels and arms whose noise sets their mean r."""

import numpy as np
import pandas as pd

from sharding.schema import load_schema


def noisy_sky(root, seed: int, noise: dict[str, float], num: int = 300) -> dict[str, dict[str, tuple]]:
    """Random test-split labels of sdss, decals and hst under root/shards, and {survey: {arm: (keys, predictions)}}:
    each arm the labels plus Gaussian noise of its sigma (more noise, lower mean r)."""
    rng = np.random.default_rng(seed)
    names = load_schema().names
    arms = {}
    for survey in ("sdss", "decals", "hst"):
        truth = rng.random((num, len(names))).astype(np.float32)
        keys = [f"{survey}-{seed}-{i}" for i in range(num)]
        (root / "shards" / survey).mkdir(parents=True)
        pd.DataFrame({"key": keys, "split": "test", **dict(zip(names, truth.T))}).to_parquet(
            root / "shards" / survey / "labels.parquet")
        arms[survey] = {arm: (keys, truth + sigma * rng.standard_normal(truth.shape).astype(np.float32))
                        for arm, sigma in noise.items()}
    return arms
