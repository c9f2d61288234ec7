"""bench/ssl_skies.py: the SSL targets per mock sky and pooled over skies (a stratified bootstrap)."""

import numpy as np
import pandas as pd
import pytest

from bench import ssl_skies
from bench_cases import noisy_sky
from sharding.schema import load_schema


def _sky(root, seed):
    """Arms whose noise sets their mean r: SSL's well above random and scratch."""
    return noisy_sky(root, seed, {"ridge ssl": 0.25, "ridge random": 0.9, "mlp ssl": 0.25, "mlp random": 0.9,
                                  "ssl lpft 10pct": 0.25, "scratch 10pct": 0.5})


def test_pooled_interval_narrows_and_targets_are_judged(tmp_path, monkeypatch):
    skies = {tmp_path / f"s{seed}": seed for seed in (0, 1)}
    arms = {out: _sky(out, seed) for out, seed in skies.items()}
    monkeypatch.setattr(ssl_skies, "sky_seed", lambda out, *_: skies[out])
    monkeypatch.setattr(ssl_skies, "target_arms", lambda out, survey, runs: arms[out][survey])
    rows = ssl_skies.pool(list(skies), num_resamples=400)
    assert [row["sky"] for row in rows] == [0, 1, "pooled"] * 3
    for survey_rows in (rows[i:i + 3] for i in range(0, 9, 3)):
        *each, pooled = survey_rows
        for arm in ("ridge ssl", "scratch 10pct"):
            assert pooled["arms"][arm]["r"] == pytest.approx(np.mean([row["arms"][arm]["r"] for row in each]))
            # Two independent skies of one size: the mean's interval is about 1/sqrt(2) of one sky's.
            width = [row["arms"][arm]["hi"] - row["arms"][arm]["lo"] for row in survey_rows]
            assert 0.5 < width[2] / np.mean(width[:2]) < 0.9
        assert all(row["met"] == {"frozen": True, "frozen mlp": True, "10pct": True} for row in survey_rows)
    assert pooled["n"] == 600


def test_a_gain_inside_the_noise_is_not_met(tmp_path, monkeypatch):
    out = tmp_path / "s0"
    arms = _sky(out, 0)
    for survey in arms:  # scratch as good as SSL: no gain; an MLP head on random features as good as on SSL ones
        arms[survey]["scratch 10pct"] = arms[survey]["ssl lpft 10pct"]
        arms[survey]["mlp random"] = arms[survey]["mlp ssl"]
    monkeypatch.setattr(ssl_skies, "sky_seed", lambda *_: 0)
    monkeypatch.setattr(ssl_skies, "target_arms", lambda _, survey, runs: arms[survey])
    rows = ssl_skies.pool([out], num_resamples=200)
    assert [row["sky"] for row in rows] == [0, 0, 0]  # one sky: nothing to pool
    assert all(row["arms"]["mlp ssl"]["r"] > 0.5 for row in rows)  # above 0.30, yet the SSL features add nothing
    assert all(row["met"] == {"frozen": True, "frozen mlp": False, "10pct": False} for row in rows)


def test_frozen_features_below_the_line_are_not_met(tmp_path, monkeypatch):
    out = tmp_path / "s0"
    arms = _sky(out, 0)
    rng = np.random.default_rng(1)
    for survey, survey_arms in arms.items():  # SSL features at mean r ~0.24, random ones at ~0.1
        table = pd.read_parquet(out / "shards" / survey / "labels.parquet")
        truth = table[load_schema().names].to_numpy(np.float32)
        keys = table["key"].tolist()
        for arm, sigma in (("ridge ssl", 1.2), ("mlp ssl", 1.2), ("mlp random", 3.0)):
            survey_arms[arm] = (keys, truth + sigma * rng.standard_normal(truth.shape).astype(np.float32))
    monkeypatch.setattr(ssl_skies, "sky_seed", lambda *_: 0)
    monkeypatch.setattr(ssl_skies, "target_arms", lambda _, survey, runs: arms[survey])
    for row in ssl_skies.pool([out], num_resamples=200):
        assert row["arms"]["mlp ssl"]["r"] < 0.30 and next(p for p in row["pairs"] if p["a"] == "mlp ssl")["lo"] > 0
        assert row["met"] == {"frozen": False, "frozen mlp": False, "10pct": True}


def test_a_folder_without_the_target_runs_says_how_to_make_them(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"ssl/export/backbone.*--targets"):
        ssl_skies.sky_seed(tmp_path)
    monkeypatch.setattr(ssl_skies, "sky_seed", lambda *_: 3)
    with pytest.raises(ValueError, match="different skies"):
        ssl_skies.pool([tmp_path / "a", tmp_path / "b"], 10)


def test_other_runs_are_pooled_paired_with_their_target_arm(tmp_path, monkeypatch):
    """--also: an SSL run's ridge probe against the recipe's, a fine-tuning run against head first, on each sky's
    same resamples; a sky without the run says so."""
    runs, pairs = ssl_skies.runs_and_pairs("ssl", ["ssl_long", "ft_long_10pct_lpft"])
    assert runs["ridge long"] == "ssl_long/export/backbone" and runs["ft_long_10pct_lpft"] == "ft_long_10pct_lpft"
    assert pairs[-2:] == [("ridge long", "ridge ssl"), ("ft_long_10pct_lpft", "ssl lpft 10pct")]
    # The recipe's own runs beside another judged arm keep their own names: nothing is read twice or lost.
    runs_long, pairs_long = ssl_skies.runs_and_pairs("long", ["ssl", "ft_ssl_10pct_lpft"])
    assert runs_long["ridge ssl"] == "ssl_long/export/backbone"
    assert runs_long["ridge ssl (--also ssl)"] == "ssl/export/backbone"
    assert pairs_long[-2:] == [("ridge ssl (--also ssl)", "ridge ssl"), ("ft_ssl_10pct_lpft", "ssl lpft 10pct")]
    out = tmp_path / "s0"
    for run in ssl_skies.needed(ssl_skies.target_runs()):
        (out / "runs" / run).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no ssl_long/export/backbone, ft_long_10pct_lpft/export under runs.*--also"):
        ssl_skies.sky_seed(out, runs=runs)
    skies = {tmp_path / f"s{seed}": seed for seed in (0, 1)}
    arms = {out: _sky(out, seed) for out, seed in skies.items()}

    def fake_arms(out, survey, runs):  # the other runs: as good as the recipe's on sky 0, as random/scratch on 1
        worse = out.name == "s1"
        return {**arms[out][survey],
                "ridge long": arms[out][survey]["ridge random" if worse else "ridge ssl"],
                "ft_long_10pct_lpft": arms[out][survey]["scratch 10pct" if worse else "ssl lpft 10pct"]}
    monkeypatch.setattr(ssl_skies, "sky_seed", lambda out, *_: skies[out])
    monkeypatch.setattr(ssl_skies, "target_arms", fake_arms)
    rows = ssl_skies.pool(list(skies), 200, ["ssl_long", "ft_long_10pct_lpft"])
    pooled = next(row for row in rows if row["sky"] == "pooled")
    for arm in ("ridge long", "ft_long_10pct_lpft"):
        each = [next(p for p in row["pairs"] if p["a"] == arm)["r"] for row in rows[:2]]
        gap = next(p for p in pooled["pairs"] if p["a"] == arm)
        assert each[0] == 0.0 and each[1] < -0.1
        assert gap["r"] == pytest.approx(each[1] / 2) and gap["hi"] < 0


def test_another_arm_can_be_judged_in_the_recipes_place(tmp_path, monkeypatch):
    from bench.ssl_targets import TARGET_RUNS, target_runs
    long = target_runs("long")
    assert long == {**TARGET_RUNS, "ridge ssl": "ssl_long/export/backbone", "mlp ssl": "mlp_head_long",
                    "ssl lpft 10pct": "ft_long_10pct_lpft"}
    assert target_runs() == TARGET_RUNS
    out = tmp_path / "s0"
    for run in ssl_skies.needed(TARGET_RUNS):
        (out / "runs" / run).mkdir(parents=True)
    missing = r"ssl_long/export/backbone, mlp_head_long/export, ft_long_10pct_lpft/export.*'long' arm"
    with pytest.raises(ValueError, match=missing):
        ssl_skies.sky_seed(out, "long")
    # The judged arms are read from the recipe's runs: the verdict follows them.
    arms = _sky(out, 0)
    worse = {survey: {**a, "ssl lpft 10pct": a["scratch 10pct"]} for survey, a in arms.items()}
    monkeypatch.setattr(ssl_skies, "sky_seed", lambda *_: 0)
    monkeypatch.setattr(ssl_skies, "target_arms", lambda _, survey, runs: (
        worse if runs["ssl lpft 10pct"] == "ft_long_10pct_lpft" else arms)[survey])
    assert all(row["met"]["10pct"] for row in ssl_skies.pool([out], 100))
    assert not any(row["met"]["10pct"] for row in ssl_skies.pool([out], 100, recipe="long"))
