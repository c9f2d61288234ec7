"""Property tests of the mixing shard sampler and its PD2 allocation over grids of ratios, batches and worlds."""

from __future__ import annotations


import numpy as np
import pytest

import loaders.streams as streams_module
from loaders.pfair import (allocate_batches)
from loaders.sampler import (EpochOrder, MixConfig, MixingSampler, epoch_allocation, epoch_length,
                             global_order, iter_rank_batches, mix_fingerprint, mixing_report,
                             rank_batch_indices, survey_stream)

# Exact shares the float ratios stand for, written independently of exact_ratios().
from mixing_cases import (RATIO_CASES, BATCH_SIZES, SEEDS, SHARD_COUNTS, check_allocation, mix_for, rank_stream)


def test_epoch_sizing_policies():
    ratios = RATIO_CASES["0.33/0.33/0.34"][0]
    mix = MixConfig(ratios=ratios, global_batch_size=32, epoch_samples=1000, on_exhausted="repeat")
    num_batches, demand = epoch_length(SHARD_COUNTS, mix)
    assert num_batches == 1000 // 32 and demand.sum() == num_batches * 32
    mix = MixConfig(ratios=ratios, global_batch_size=32, epoch_multiplier=3, on_exhausted="repeat")
    assert epoch_length(SHARD_COUNTS, mix)[0] == 191 * 3 // 32  # min(available) is hst's 191
    mix = MixConfig(ratios=ratios, global_batch_size=32, epoch_multiplier=1.5, on_exhausted="repeat")
    assert epoch_length(SHARD_COUNTS, mix)[0] == 286 // 32
    for batch_size in BATCH_SIZES:  # "stop": the last full batch before any survey would run out
        mix = MixConfig(ratios=ratios, global_batch_size=batch_size, epoch_samples=10**6)
        counts = epoch_allocation(SHARD_COUNTS, mix)
        available = np.array([sum(SHARD_COUNTS[name]) for name in ratios])
        assert (counts.sum(axis=0) <= available).all()
        longer = allocate_batches(ratios, batch_size, len(counts) + 1).sum(axis=0)
        assert (longer > available).any()
        assert np.array_equal(counts, allocate_batches(ratios, batch_size, len(counts)))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        epoch_length(SHARD_COUNTS, MixConfig(ratios=ratios, global_batch_size=64, epoch_samples=63))
    with pytest.raises(ValueError, match="no full global batch"):
        epoch_length({"a": [3], "b": [100]}, MixConfig(ratios="a=0.5,b=0.5", global_batch_size=8,
                                                       epoch_samples=80))
    for counts, message in [({"a": [3]}, "no shards for survey"), ({"a": [0], "b": [5]}, "no train samples"),
                            ({"a": [1.5], "b": [5]}, "non-negative"), ({"a": [-1, 3], "b": [5]}, "non-negative")]:
        with pytest.raises(ValueError, match=message):
            epoch_length(counts, MixConfig(ratios="a=0.5,b=0.5", global_batch_size=2, epoch_samples=4))


# ---------------------------------------------------------------- the global order


@pytest.mark.parametrize("case", RATIO_CASES)
def test_global_order_mixes_exactly_and_never_repeats_too_early(case):
    ratios, shares = RATIO_CASES[case]
    available = np.array([sum(SHARD_COUNTS[name]) for name in ratios])
    for batch_size in BATCH_SIZES:
        for on_exhausted in ("stop", "repeat"):
            for seed in SEEDS:
                mix = mix_for(case, batch_size, seed, on_exhausted, epoch_batches=40 if batch_size > 7 else 400)
                order = global_order(SHARD_COUNTS, mix, epoch=1)
                samples = order.samples
                assert samples.shape == (order.num_batches * batch_size, 3)
                counts = np.stack([np.bincount(batch, minlength=len(ratios)) for batch in
                                   samples[:, 0].reshape(order.num_batches, batch_size)])
                assert np.array_equal(counts, order.counts)
                check_allocation(counts, shares, batch_size)
                for s, name in enumerate(ratios):
                    rows = samples[samples[:, 0] == s, 1:]
                    assert (rows[:, 1] < np.asarray(SHARD_COUNTS[name])[rows[:, 0]]).all()
                    # A survey's samples appear in stream order; passes are permutations of the pool.
                    assert np.array_equal(rows, survey_stream(SHARD_COUNTS, mix, 1, name, len(rows)))
                    keys = rows[:, 0] * 1000 + rows[:, 1]
                    for start in range(0, len(keys), available[s]):
                        chunk = keys[start:start + available[s]]
                        assert len(np.unique(chunk)) == len(chunk)
                    if on_exhausted == "stop":
                        assert len(rows) <= available[s]
                report = mixing_report(order, mix)
                assert report["allocation_exact"] and report["drift_below_one"]
                if on_exhausted == "stop":
                    assert sum(report["num_duplicates"]) == 0


def test_repeat_continues_with_fresh_permutations():
    mix = MixConfig(ratios="sdss=0.5,hst=0.5", global_batch_size=10, epoch_samples=1000, on_exhausted="repeat")
    rows = survey_stream(SHARD_COUNTS, mix, 0, "hst", 3 * 191)
    passes = [rows[i * 191:(i + 1) * 191] for i in range(3)]
    for one in passes:
        assert len(np.unique(one, axis=0)) == 191
    assert not np.array_equal(passes[0], passes[1]) and not np.array_equal(passes[1], passes[2])
    report = mixing_report(global_order(SHARD_COUNTS, mix, 0), mix)
    assert report["num_duplicates"][1] == 500 - 191 and report["num_duplicates"][0] == 0


def test_report_catches_a_broken_order():
    mix = MixConfig(ratios="sdss=0.7,decals=0.3", global_batch_size=10, epoch_samples=100)
    order = global_order(SHARD_COUNTS, mix, 0)
    assert mixing_report(order, mix)["drift_below_one"]
    sdss = np.flatnonzero(order.samples[:, 0] == 0)
    duplicated = order.samples.copy()
    duplicated[sdss[9]] = duplicated[sdss[2]]
    report = mixing_report(EpochOrder(order.survey_names, 10, order.counts, duplicated), mix)
    assert report["num_duplicates"] == [1, 0] and report["allocation_exact"]
    swapped = order.samples.copy()
    swapped[sdss[0]] = swapped[np.flatnonzero(order.samples[:, 0] == 1)[-1]]  # a decals sample in batch 0
    report = mixing_report(EpochOrder(order.survey_names, 10, order.counts, swapped), mix)
    assert not report["allocation_exact"] and not report["drift_below_one"]
    assert report["max_drift"] == [1.0, 1.0] and report["num_duplicates"] == [0, 1]


def test_order_depends_on_seed_and_epoch_only():
    mix = mix_for("4 surveys", 64)
    base = global_order(SHARD_COUNTS, mix, 0).samples
    assert np.array_equal(base, global_order(SHARD_COUNTS, mix, 0).samples)
    assert not np.array_equal(base, global_order(SHARD_COUNTS, mix, 1).samples)
    assert not np.array_equal(base, global_order(SHARD_COUNTS, mix_for("4 surveys", 64, seed=1), 0).samples)
    # A survey's stream is keyed by its name, so it does not change with the rest of the mix.
    other = MixConfig(ratios="hst=0.2,sdss=0.8", global_batch_size=64, epoch_samples=640,
                      shuffle_window_shards=3)
    assert np.array_equal(survey_stream(SHARD_COUNTS, mix, 0, "sdss", 300),
                          survey_stream(SHARD_COUNTS, other, 0, "sdss", 300))


def test_shard_locality_within_window():
    for window in (1, 2, 3, 5):
        mix = MixConfig(ratios="sdss=0.5,decals=0.5", global_batch_size=8, epoch_samples=8,
                        shuffle_window_shards=window, on_exhausted="repeat")
        for name in ("sdss", "decals"):
            rows = survey_stream(SHARD_COUNTS, mix, 2, name, sum(SHARD_COUNTS[name]))
            shards = np.unique(rows[:, 0])
            first = np.array([np.flatnonzero(rows[:, 0] == k)[0] for k in shards])
            last = np.array([np.flatnonzero(rows[:, 0] == k)[-1] for k in shards])
            events = np.zeros(len(rows) + 1, dtype=np.int64)
            np.add.at(events, first, 1)
            np.add.at(events, last + 1, -1)
            open_shards = np.cumsum(events)[:-1]  # shards started but not finished at each position
            assert open_shards.max() <= window
            if window > 1:  # shuffled: not simply shard after shard
                assert open_shards.max() > 1
            assert not np.array_equal(shards[np.argsort(first)], np.sort(shards))  # shard order shuffled


# ---------------------------------------------------------------- ranks, workers, resume


@pytest.mark.parametrize("case,batch_size", [("0.33/0.33/0.34", 96), ("thirds", 256), ("5%", 64),
                                             ("2 surveys", 7), ("4 surveys", 32), ("thirds", 1)])
def test_same_global_order_for_every_world_size_and_worker_count(case, batch_size):
    mix = mix_for(case, batch_size, epoch_batches=10)
    order = global_order(SHARD_COUNTS, mix, 0)
    worlds = [w for w in range(1, 65) if batch_size % w == 0]
    for i, world_size in enumerate(worlds):
        num_workers = (0, 1, 2, 3, 5, 8)[i % 6]
        per_rank = [rank_stream(mix, 0, rank, world_size, num_workers) for rank in range(world_size)]
        assert {len(stream) for stream in per_rank} == {order.num_batches}  # every rank as many batches
        for rank, stream in enumerate(per_rank):
            assert [b for b, _ in stream] == list(range(order.num_batches))  # in order, no overlap
            for b, rows in stream:
                assert np.array_equal(rows, order.samples[rank_batch_indices(order, rank, world_size, b)])
        assert np.array_equal(glue(per_rank, order.num_batches), order.samples)


def test_workers_split_batches_without_overlap():
    mix = mix_for("5%", 32, epoch_batches=13)
    for num_workers in range(0, 9):
        taken = [[b for b, _ in iter_rank_batches(SHARD_COUNTS, mix, 0, 1, 4, k, num_workers, 64)]
                 for k in range(max(num_workers, 1))]
        for k, batches in enumerate(taken):
            assert batches == list(range(2 + k, 13, max(num_workers, 1)))
        assert sorted(sum(taken, [])) == list(range(2, 13))


def test_resume_from_any_step_on_any_world_size():
    mix = mix_for("0.33/0.33/0.34", 64, epoch_batches=9)
    orders = [global_order(SHARD_COUNTS, mix, epoch) for epoch in range(3)]
    num_batches = orders[0].num_batches
    worlds = [(1, 4, 2), (8, 2, 0), (4, 16, 3), (64, 1, 1), (2, 64, 8)]
    for consumed in range(0, 2 * num_batches + 1):
        old_world, new_world, num_workers = worlds[consumed % len(worlds)]
        trainer = MixingSampler(SHARD_COUNTS, mix)
        trainer.advance(consumed)
        state = trainer.state_dict()
        assert (state["epoch"], state["samples_consumed"] // 64) == divmod(consumed, num_batches)
        resumed = MixingSampler(SHARD_COUNTS, mix)
        resumed.load_state_dict(dict(state))
        epoch, done = resumed.epoch, resumed.batch_index
        before = [rank_stream(mix, epoch, r, old_world, 1)[:done] for r in range(old_world)]
        after = [rank_stream(mix, epoch, r, new_world, num_workers, resumed.samples_consumed)
                 for r in range(new_world)]
        assert {len(a) for a in after} == {num_batches - done}  # every rank as many batches
        assert [b for b, _ in after[0]] == list(range(done, num_batches))
        parts = [glue(before, done), glue(after, num_batches - done)]
        assert np.array_equal(np.concatenate(parts), orders[epoch].samples)
        via_sampler = [rows for _, rows in resumed.rank_batches(0, 1)]
        assert np.array_equal(np.concatenate(via_sampler), orders[epoch].samples[done * 64:])


def glue(per_rank: list[list[tuple[int, np.ndarray]]], num_batches: int) -> np.ndarray:
    """Concatenate the ranks' slices of each batch back into global batches."""
    if num_batches == 0:
        return np.empty((0, 3), dtype=np.int64)
    slices = [np.concatenate([rows for _, rows in stream]).reshape(num_batches, -1, 3) for stream in per_rank]
    return np.concatenate(slices, axis=1).reshape(-1, 3)


def test_torch_dataloader_round_robin_yields_batches_in_order():
    torch_data = pytest.importorskip("torch.utils.data")
    mix = mix_for("0.33/0.33/0.34", 32, epoch_batches=11)

    class RankBatches(torch_data.IterableDataset):
        def __iter__(self):
            info = torch_data.get_worker_info()
            worker_id, num_workers = (info.id, info.num_workers) if info else (0, 0)
            return iter_rank_batches(SHARD_COUNTS, mix, 0, 1, 2, worker_id, num_workers, start_sample=64)

    order = global_order(SHARD_COUNTS, mix, 0)
    for num_workers in (0, 2):
        loader = torch_data.DataLoader(RankBatches(), batch_size=None, num_workers=num_workers,
                                       multiprocessing_context="fork" if num_workers else None)
        got = [(int(b), rows.numpy()) for b, rows in loader]
        assert [b for b, _ in got] == list(range(2, order.num_batches))
        for b, rows in got:
            assert np.array_equal(rows, order.samples[rank_batch_indices(order, 1, 2, b)])


def test_resume_builds_only_the_windows_it_reads(monkeypatch):
    built = []
    real = streams_module._window_rows
    monkeypatch.setattr(streams_module, "_window_rows", lambda *args: built.append(args[1:4]) or real(*args))
    mix = mix_for("thirds", 32, window=1, epoch_batches=100)
    num_batches = epoch_length(SHARD_COUNTS, mix)[0]
    batch, rows = next(iter_rank_batches(SHARD_COUNTS, mix, 0, 0, 1, start_sample=(num_batches - 1) * 32))
    assert batch == num_batches - 1 and len(rows) == 32
    assert len(built) <= 2 * 3  # at most two windows per survey, not the whole history
    full = sum(1 for _ in iter_rank_batches(SHARD_COUNTS, mix, 0, 0, 1))
    assert full == num_batches and len(built) > 3 * 3


def test_sampler_state_rollover_and_refused_resumes():
    mix = mix_for("5%", 32, epoch_batches=10)
    sampler = MixingSampler(SHARD_COUNTS, mix, epoch=2)
    assert sampler.num_batches == 10
    sampler.advance(3)
    assert sampler.state_dict() == {"epoch": 2, "samples_consumed": 96, "global_batch_size": 32,
                                    "mix_fingerprint": mix_fingerprint(SHARD_COUNTS, mix)}
    sampler.advance(7)
    assert (sampler.epoch, sampler.samples_consumed) == (3, 0)
    sampler.advance(25)
    assert (sampler.epoch, sampler.batch_index) == (5, 5)
    state = sampler.state_dict()
    bigger = MixingSampler(SHARD_COUNTS, mix_for("5%", 64, epoch_batches=10))
    with pytest.raises(ValueError, match="global_batch_size"):
        bigger.load_state_dict(state)
    bigger.load_state_dict({**state, "samples_consumed": 0})  # an epoch boundary: any batch size
    assert (bigger.epoch, bigger.samples_consumed) == (5, 0)
    reseeded = MixingSampler(SHARD_COUNTS, mix_for("5%", 32, seed=9, epoch_batches=10))
    with pytest.raises(ValueError, match="differ"):
        reseeded.load_state_dict(state)
    for bad in [{**state, "samples_consumed": 33}, {**state, "samples_consumed": 352},
                {**state, "epoch": -1}, {"samples_consumed": 0}, {**state, "samples_consumed": "64"}]:
        with pytest.raises(ValueError):
            sampler.load_state_dict(bad)
    sampler.load_state_dict({**state, "samples_consumed": 320})  # a whole epoch: the next one's start
    assert (sampler.epoch, sampler.samples_consumed) == (6, 0)


def test_rank_and_worker_arguments_are_checked():
    mix = mix_for("thirds", 96)
    for kwargs, message in [({"world_size": 5}, "not divisible"), ({"rank": 4, "world_size": 4}, "rank"),
                            ({"worker_id": 2, "num_workers": 2}, "worker_id"),
                            ({"start_sample": 95}, "whole number"), ({"start_sample": 96 * 13}, "whole number"),
                            ({"epoch": -1}, "epoch")]:
        args = {"rank": 0, "world_size": 1, "epoch": 0, **kwargs}
        with pytest.raises(ValueError, match=message):
            iter_rank_batches(SHARD_COUNTS, mix, **args)
    order = global_order(SHARD_COUNTS, mix, 0)
    assert rank_batch_indices(order, 3, 4, 2) == slice(2 * 96 + 72, 3 * 96)
    with pytest.raises(ValueError, match="batch_index"):
        rank_batch_indices(order, 0, 4, order.num_batches)


@pytest.mark.parametrize("case", RATIO_CASES)
def test_repeat_never_puts_a_galaxy_twice_in_one_global_batch(case):
    """Where one pass of a survey ends and the next begins inside a batch, the two do not share a galaxy."""
    ratios, _ = RATIO_CASES[case]
    for batch_size in (16, 48):
        for seed in SEEDS:
            mix = MixConfig(ratios=ratios, global_batch_size=batch_size, epoch_samples=2000, seed=seed,
                            on_exhausted="repeat", shuffle_window_shards=2)
            try:
                order = global_order(SHARD_COUNTS, mix, epoch=0)
            except ValueError as err:  # a survey smaller than its share of a batch is refused, not repeated
                assert "twice" in str(err)
                continue
            for batch in order.samples.reshape(order.num_batches, batch_size, 3):
                assert len(np.unique(batch, axis=0)) == batch_size


def test_a_survey_smaller_than_its_share_of_a_batch_is_refused_in_repeat_mode():
    mix = MixConfig(ratios="a=0.5,b=0.5", global_batch_size=40, epoch_samples=400, on_exhausted="repeat")
    with pytest.raises(ValueError, match="fewer train samples than their share"):
        global_order({"a": [10, 5], "b": [100]}, mix, epoch=0)
