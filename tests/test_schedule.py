"""Mix schedules (issue 19 §2): exact per-batch allocation, the schedule's integral, world sizes, resume, inspect."""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction

import numpy as np
import pytest

from loaders.inspect import main as inspect_main
from loaders.sampler import MixConfig, MixingSampler, epoch_allocation, global_order, mixing_report
from loaders.schedule import make_schedule, parse_schedule, schedule_allocation, schedule_from_phases
from mixing_cases import SHARD_COUNTS
from train.config import load_train_config

ISSUE = "0:hst=2.5,sdss=1,decals=1.1;20:sdss=1,decals=1,hst=1"


def brute_force_shares(phases: list[tuple[int, dict[str, int]]], names: list[str], step: int,
                       linear: bool) -> list[Fraction]:
    """The schedule's shares at `step`, computed directly from integer weights (independent of loaders.schedule)."""
    k = max(i for i, (start, _) in enumerate(phases) if start <= step)
    def norm(weights):
        total = sum(weights.values())
        return [Fraction(weights.get(n, 0), total) for n in names]
    here = norm(phases[k][1])
    if not linear or k == len(phases) - 1:
        return here
    there, a = norm(phases[k + 1][1]), Fraction(step - phases[k][0], phases[k + 1][0] - phases[k][0])
    return [x + (y - x) * a for x, y in zip(here, there)]


def check_against_integral(counts: np.ndarray, phases, names, batch_size: int, linear: bool) -> None:
    running = [Fraction(0)] * len(names)
    totals = [0] * len(names)
    for t, row in enumerate(counts):
        assert int(row.sum()) == batch_size
        for s, share in enumerate(brute_force_shares(phases, names, t, linear)):
            exact = batch_size * share
            assert math.floor(exact) <= row[s] <= math.ceil(exact), (t, names[s], row[s], exact)
            running[s] += exact
            totals[s] += int(row[s])
            assert abs(totals[s] - running[s]) < 1, (t, names[s], totals[s], running[s])


@pytest.mark.parametrize("seed", range(4))
def test_allocation_stays_within_one_sample_of_the_integral(seed):
    """Random schedules (surveys entering and leaving, 1-6 surveys, both interpolations) against a brute-force
    integral; restarting PD2 at each phase, or greedily serving the most-behind survey, fails some of these."""
    rng = random.Random(seed)
    for _ in range(25):
        names = [f"s{i}" for i in range(rng.randint(1, 6))]
        starts = [0, *sorted(rng.sample(range(1, 50), rng.randint(0, 3)))]
        phases = []
        for start in starts:
            weights = {n: rng.randint(1, 11) for n in names if rng.random() < 0.7} or {names[0]: 1}
            phases.append((start, weights))
        linear = rng.random() < 0.5
        schedule = make_schedule(phases, "linear" if linear else "step")
        batch_size = rng.choice([1, 4, 7, 12, 32, 64])
        counts = schedule_allocation(schedule, batch_size, 0, 130)
        check_against_integral(counts, phases, list(schedule.names), batch_size, linear)
        assert np.array_equal(schedule_allocation(schedule, batch_size, 41, 117), counts[41:117])


def test_the_issue_schedule_and_its_forms():
    phases = [(0, {"hst": 25, "sdss": 10, "decals": 11}), (2000, {"sdss": 1, "decals": 1, "hst": 1})]
    text = parse_schedule("0:hst=2.5,sdss=1,decals=1.1;2000:sdss=1,decals=1,hst=1")
    yaml_form = schedule_from_phases([{"until_step": 2000, "mix": "hst=2.5,sdss=1,decals=1.1"},
                                      {"mix": "sdss=1,decals=1,hst=1"}])
    assert text == yaml_form and text.names == ("hst", "sdss", "decals")
    counts = schedule_allocation(text, 64, 0, 2600)
    check_against_integral(counts, phases, ["hst", "sdss", "decals"], 64, linear=False)
    for bad, match in [("5:sdss=1", "step 0"), ("0:sdss=1;0:hst=1", "increase"), ("sdss=1", "STEP:")]:
        with pytest.raises(ValueError, match=match):
            parse_schedule(bad)
    with pytest.raises(ValueError, match="until_step"):
        schedule_from_phases([{"mix": "sdss=1"}, {"mix": "hst=1"}])
    with pytest.raises(ValueError, match="keys are"):
        schedule_from_phases([{"mix": "sdss=1", "until": 3}])


def scheduled_mix(batch_size: int = 24, epoch_batches: int = 9) -> MixConfig:
    # Phase changes at steps 6 and 14 fall inside epochs 0 and 1; ukidss enters only in the last phase.
    schedule = parse_schedule("0:hst=2.5,sdss=1,decals=1.1;6:sdss=1,decals=1,hst=1;14:sdss=2,ukidss=1,hst=1")
    return MixConfig(ratios={}, global_batch_size=batch_size, seed=3, epoch_samples=epoch_batches * batch_size,
                     on_exhausted="repeat", shuffle_window_shards=3, schedule=schedule)


def test_epochs_continue_the_schedule_and_orders_are_exact():
    mix = scheduled_mix()
    epochs = [epoch_allocation(SHARD_COUNTS, mix, e) for e in range(3)]
    assert np.array_equal(np.concatenate(epochs), schedule_allocation(mix.schedule, 24, 0, 27))
    report = mixing_report(global_order(SHARD_COUNTS, mix, 1), mix, epoch=1)
    assert report["allocation_exact"] and report["drift_below_one"]
    assert report["survey_names"] == ["hst", "sdss", "decals", "ukidss"]
    assert epochs[0][:, 3].sum() == 0 and epochs[2][:, 3].min() > 0  # ukidss only from step 14 on
    with pytest.raises(ValueError, match="repeat"):
        MixConfig(ratios={}, global_batch_size=8, epoch_samples=80, on_exhausted="stop", schedule=mix.schedule)


def read_epoch(sampler: MixingSampler, world_size: int) -> list[np.ndarray]:
    """Each global batch of the rest of the epoch, glued from the ranks' slices in rank order."""
    per_rank = [list(sampler.rank_batches(rank, world_size)) for rank in range(world_size)]
    assert len({tuple(b for b, _ in batches) for batches in per_rank}) == 1
    return [np.concatenate([per_rank[r][i][1] for r in range(world_size)]) for i in range(len(per_rank[0]))]


def test_world_sizes_1_and_4_read_the_same_batches_across_phase_changes():
    mix = scheduled_mix()
    for epoch in (0, 1):
        one = read_epoch(MixingSampler(SHARD_COUNTS, mix, epoch), 1)
        four = read_epoch(MixingSampler(SHARD_COUNTS, mix, epoch), 4)
        assert len(one) == 9 and all(np.array_equal(a, b) for a, b in zip(one, four))
        expected = global_order(SHARD_COUNTS, mix, epoch).samples.reshape(9, 24, 3)
        assert all(np.array_equal(a, b) for a, b in zip(one, expected))


@pytest.mark.parametrize("step", [3, 7, 15, 22])  # inside phase 1, phase 2 (both epoch 0), phase 2 and 3 (epoch 1+)
def test_resume_inside_each_phase_on_another_world_size(step):
    mix = scheduled_mix()
    straight = MixingSampler(SHARD_COUNTS, mix)
    straight.advance(step)
    state = json.loads(json.dumps(straight.state_dict()))
    expected = read_epoch(straight, 1)
    resumed = MixingSampler(SHARD_COUNTS, mix)
    resumed.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(read_epoch(resumed, 4), expected))
    other = MixingSampler(SHARD_COUNTS, scheduled_mix_other())
    with pytest.raises(ValueError, match="differ"):
        other.load_state_dict(state)


def scheduled_mix_other() -> MixConfig:
    schedule = parse_schedule("0:hst=2.5,sdss=1,decals=1.1;7:sdss=1,decals=1,hst=1;14:sdss=2,ukidss=1,hst=1")
    return MixConfig(ratios={}, global_batch_size=24, seed=3, epoch_samples=9 * 24, on_exhausted="repeat",
                     shuffle_window_shards=3, schedule=schedule)


def test_training_config_and_inspect(shard_root, capsys):
    cfg = load_train_config("tiny", ["data.mix_schedule=[{until_step: 4, mix: 'sdss=3,hst=1'}, {mix: 'sdss=1,decals=1'}]",
                                     "data.mix_interpolation=linear"])
    mix = cfg.data.mix_config(0)
    assert mix.schedule.names == ("sdss", "hst", "decals") and mix.schedule.interpolation == "linear"
    assert mix.schedule.shares_at(2) == (Fraction(5, 8), Fraction(1, 8), Fraction(1, 4))
    with pytest.raises(ValueError, match="unknown key"):
        load_train_config("tiny", ["data.mix_schedule=[{mix: 'sdss=1', until: 3}]"])
    args = ["--shards", str(shard_root), "--mix-schedule", "0:sdss=3,hst=1;3:sdss=1,decals=1,hst=2",
            "--global-batch-size", "8", "--world-size", "4", "--steps", "6", "--epoch-samples", "48"]
    assert inspect_main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["counts_within_floor_ceil"] and report["max_drift"] < 1
    assert [s["counts"]["decals"] for s in report["steps"]] == [0, 0, 0, 2, 2, 2]
    assert report["schedule"]["starts"] == [0, 3]
    assert inspect_main([*args, "--resume-from-step", "4"]) == 0
    assert "mix schedule 0: sdss 0.750, hst 0.250; 3: sdss 0.250, hst 0.500, decals 0.250" in capsys.readouterr().out
