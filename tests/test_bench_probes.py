"""bench/probes.py: the frozen-feature probes against a simulation whose answer is known."""

import numpy as np
import pandas as pd

from bench.learning import weighted_mean_r
from bench.probes import mlp_probe, ridge_probe
from sharding.schema import load_schema


def _survey(root, num=900, seed=0):
    """Labels that are products of pairs of four inputs (a ridge fit on the inputs cannot read a product of two
    independent zero-mean inputs: its correlation with each input is 0), some missing; a useless second input."""
    rng = np.random.default_rng(seed)
    names = load_schema().names
    x = rng.standard_normal((num, 4)).astype(np.float32)
    pairs = [(i, j) for i in range(4) for j in range(4) if i < j]
    truth = np.stack([x[:, a] * x[:, b] for a, b in (pairs[k % len(pairs)] for k in range(len(names)))], 1)
    truth = 1 / (1 + np.exp(-truth))
    y = (truth + 0.05 * rng.standard_normal(truth.shape)).astype(np.float32)
    y[rng.random(y.shape) < 0.2] = np.nan
    keys = [f"g{i}" for i in range(num)]
    split = np.array(["train"] * (num * 2 // 3) + ["val"] * (num // 6) + ["test"] * (num - num * 2 // 3 - num // 6))
    (root / "sdss").mkdir(parents=True)
    pd.DataFrame({"key": keys, "split": split, **dict(zip(names, y.T))}).to_parquet(root / "sdss" / "labels.parquet")
    noise = rng.standard_normal((num, 4)).astype(np.float32)

    def split_features(part):
        rows = np.flatnonzero(split == part)
        return [keys[i] for i in rows], {"noise": noise[rows], "signal": x[rows]}
    return split_features, y[split == "test"], truth[split == "test"]


def test_the_mlp_probe_reads_what_a_linear_one_cannot_and_chooses_on_val(tmp_path):
    split_features, test_y, test_truth = _survey(tmp_path)
    ones = np.ones((1, len(test_y)))
    _, ridge_pred, ridge_choice = ridge_probe(split_features, tmp_path, "sdss")
    keys, mlp_pred, choice = mlp_probe(split_features, tmp_path, "sdss", max_epochs=60)
    assert keys == split_features("test")[0]
    ridge_r = weighted_mean_r(ridge_pred, np.nan_to_num(test_y), np.isfinite(test_y), ones)[0]
    mlp_r = weighted_mean_r(mlp_pred, np.nan_to_num(test_y), np.isfinite(test_y), ones)[0]
    # The ceiling: the noiseless labels themselves, scored the same way.
    ceiling = weighted_mean_r(test_truth, np.nan_to_num(test_y), np.isfinite(test_y), ones)[0]
    assert abs(ridge_r) < 0.15 and 0.9 * ceiling < mlp_r <= ceiling + 0.01, (ridge_r, mlp_r, ceiling)
    assert choice["input"] == "signal" and choice["epoch"] % 5 == 0 and 0 < choice["epoch"] <= 60
    assert choice["val_r"] > 0.5 and ridge_choice["val_r"] < 0.2
