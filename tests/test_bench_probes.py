"""bench/probes.py: the frozen-feature probes against a simulation whose answer is known."""

import numpy as np
import pandas as pd

from bench.learning import weighted_mean_r
from bench.probes import joint_mlp_probe, mlp_probe, ridge_probe
from sharding.schema import load_schema


def _survey(root, num=900, seed=0, survey="sdss", distractors=0):
    """Labels that are products of pairs of four inputs (a ridge fit on the inputs cannot read a product of two
    independent zero-mean inputs: its correlation with each input is 0), some missing; a useless second input.
    `distractors` noise columns join the four (more to learn from the same labels)."""
    rng = np.random.default_rng(seed)
    names = load_schema().names
    x = rng.standard_normal((num, 4)).astype(np.float32)
    pairs = [(i, j) for i in range(4) for j in range(4) if i < j]
    truth = np.stack([x[:, a] * x[:, b] for a, b in (pairs[k % len(pairs)] for k in range(len(names)))], 1)
    truth = 1 / (1 + np.exp(-truth))
    y = (truth + 0.05 * rng.standard_normal(truth.shape)).astype(np.float32)
    y[rng.random(y.shape) < 0.2] = np.nan
    keys = [f"{survey}-{i}" for i in range(num)]
    split = np.array(["train"] * (num * 2 // 3) + ["val"] * (num // 6) + ["test"] * (num - num * 2 // 3 - num // 6))
    (root / survey).mkdir(parents=True)
    pd.DataFrame({"key": keys, "split": split, **dict(zip(names, y.T))}).to_parquet(root / survey / "labels.parquet")
    noise = rng.standard_normal((num, 4)).astype(np.float32)
    signal = np.hstack([x, rng.standard_normal((num, distractors)).astype(np.float32)])

    def split_features(part):
        rows = np.flatnonzero(split == part)
        return [keys[i] for i in rows], {"noise": noise[rows], "signal": signal[rows]}
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


def test_the_joint_mlp_probe_reads_a_small_survey_with_a_large_ones_labels(tmp_path):
    """Two surveys with the same mapping from 24 inputs (4 of them useful) to labels: alone, 60 training galaxies do
    not read it; fitted with the other survey's 600, they do. Each survey's predictions come back under its own keys,
    in its order."""
    big, _, _ = _survey(tmp_path, num=900, seed=0, survey="sdss", distractors=20)
    small, small_y, small_truth = _survey(tmp_path, num=90, seed=1, survey="hst", distractors=20)
    ones = np.ones((1, len(small_y)))

    def r(pred):
        return weighted_mean_r(pred, np.nan_to_num(small_y), np.isfinite(small_y), ones)[0]
    _, alone, _ = mlp_probe(small, tmp_path, "hst", max_epochs=60)
    keys, joint, choice = joint_mlp_probe({"sdss": big, "hst": small}, tmp_path, max_epochs=60)
    assert keys == {"sdss": big("test")[0], "hst": small("test")[0]} and len(joint["hst"]) == len(small_y)
    ceiling = r(small_truth)
    assert r(alone) < 0.5 * ceiling and r(joint["hst"]) > 0.8 * ceiling, (r(alone), r(joint["hst"]), ceiling)
    assert choice["input"] == "signal"
