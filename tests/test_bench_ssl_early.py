"""bench/ssl_early.py: each arm of the 10%-label comparison at its best validation step, read from its checkpoints."""

import json

import pytest
import torch

from bench import ssl_early
from bench_cases import noisy_sky
from train_cases import _command, _overrides, _run


def _log(run, curve):
    run.mkdir(parents=True)
    events = [{"event": "step", "step": 1, "loss": 0.1}]
    events += [{"event": "validation", "step": step, "surveys": {s: {"r": r + i * 0.01} for i, s in
                                                                 enumerate(("sdss", "decals", "hst"))}}
               for step, r in curve.items()]
    (run / "log.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")


def test_the_best_val_step_is_the_earliest_of_ties(tmp_path):
    _log(tmp_path / "a", {100: 0.2, 200: 0.3, 300: 0.3, 400: 0.25})
    curve = ssl_early.val_curve(tmp_path / "a")
    assert curve == pytest.approx({100: 0.21, 200: 0.31, 300: 0.31, 400: 0.26})  # mean over the three surveys
    assert ssl_early.best_step(curve) == 200
    _log(tmp_path / "b", {})
    with pytest.raises(ValueError, match="val_every=N"):
        ssl_early.val_curve(tmp_path / "b")
    with pytest.raises(ValueError, match="NAME=RUN"):
        ssl_early.parse_runs(["x_es_lpft", "scratch=x_es_scratch"])
    with pytest.raises(ValueError, match="four"):
        ssl_early.parse_runs(["a=x", "b=y", "c=z"])
    assert ssl_early.pairs_of(["a", "b", "c", "d"])[:6] == [
        ("a best", "b best"), ("a last", "b last"), ("c best", "d best"), ("c last", "d last"), ("a last", "c last"),
        ("b last", "d last")]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_checkpoint_step_gives_the_weights_training_had_then(shard_root, tmp_path, zero_stage):
    """A real 2-process run: its last checkpoint read by model_at is the export training wrote (another writer;
    under ZeRO-3 each rank saved only its partition), an earlier one differs, and a step without a checkpoint says
    how to make one."""
    from models.io import load_export
    out = tmp_path / "run"
    _run(_command(2, out, 4, _overrides(shard_root, stage="full", zero_stage=zero_stage, checkpoint_every=2,
                                        val_every=2, keep_checkpoints=10)))
    assert sorted(ssl_early.val_curve(out)) == [2, 4]
    exported = load_export(out / "export").state_dict()
    last, early = ssl_early.model_at(out, 4).state_dict(), ssl_early.model_at(out, 2).state_dict()
    assert set(last) == set(exported) and all(torch.equal(last[k], exported[k]) for k in exported)
    assert any(not torch.equal(early[k], last[k]) for k in last)
    with pytest.raises(ValueError, match="checkpoint_every"):
        ssl_early.model_at(out, 3)


def test_a_zero0_checkpoint_is_read_in_fp32_and_refused_in_bf16(tmp_path):
    from train.engine import saved_weights
    folder = tmp_path / "step2"
    folder.mkdir()
    torch.save({"module": {"w": torch.arange(3.0), "count": torch.tensor(7)}}, folder / "mp_rank_00_model_states.pt")
    weights = saved_weights(tmp_path, "step2")
    assert torch.equal(weights["w"], torch.arange(3.0)) and int(weights["count"]) == 7
    torch.save({"module": {"w": torch.arange(3.0).bfloat16()}}, folder / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match=r"step2 is a ZeRO stage 0 checkpoint in torch.bfloat16 \(w"):
        saved_weights(tmp_path, "step2")


def _sky(root, seed):
    """At their best step SSL and scratch are level; at their last step scratch has overfit (noisier)."""
    return noisy_sky(root, seed, {"ssl lpft best": 0.3, "ssl lpft last": 0.3, "scratch best": 0.3, "scratch last": 0.6},
                     num=200)


def test_a_gain_that_early_stopping_takes_away_is_not_met(tmp_path, monkeypatch):
    skies = {tmp_path / f"s{seed}": seed for seed in (0, 1)}
    arms = {out: _sky(out, seed) for out, seed in skies.items()}
    monkeypatch.setattr(ssl_early, "sky_seed", lambda out, runs: skies[out])
    monkeypatch.setattr(ssl_early, "val_curve", lambda run: {100: 0.3, 400: 0.35, 1000: 0.3})
    monkeypatch.setattr(ssl_early, "sky_arms", lambda out, runs, steps: arms[out])
    runs = ssl_early.parse_runs(["ssl lpft=x_es_lpft", "scratch=x_es_scratch"])
    rows, chosen = ssl_early.pool(list(skies), runs, num_resamples=300)
    assert chosen[0]["scratch"] == {"step": 400, "val_r": 0.35, "last": 1000, "val_r_last": 0.3}
    assert [row["sky"] for row in rows] == [0, 0, 0, 1, 1, 1, "pooled", "pooled", "pooled"]
    for row in rows:
        best, last = row["pairs"][0], row["pairs"][1]
        assert (best["a"], best["b"], last["a"], last["b"]) == ("ssl lpft best", "scratch best", "ssl lpft last",
                                                                "scratch last")
        assert last["lo"] > 0 and abs(best["r"]) < 0.05  # at the last step SSL leads; at the best steps it does not
        assert row["met"] == {"10pct at the best val steps": False, "10pct at the last step": True}
