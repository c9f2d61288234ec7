"""`python -m loaders.inspect` on the mock shard root: JSON report, resume, world-size independence, errors."""

import io
import json
import math
from fractions import Fraction

import numpy as np
import pytest

from loaders import inspect as inspect_module
from loaders.sampler import MixingSampler
from loaders.shards import SampleReader, load_shard_root

MIX = "sdss=0.33,decals=0.33,hst=0.34"
SHARES = {"sdss": Fraction(33, 100), "decals": Fraction(33, 100), "hst": Fraction(34, 100)}


def run_json(capsys, shard_root, *extra: str, batch_size: int = 12, world_size: int = 4,
             expect_rc: int = 0) -> dict:
    argv = ["--shards", str(shard_root), "--mix", MIX, "--global-batch-size", str(batch_size),
            "--world-size", str(world_size), "--json", *extra]
    rc = inspect_module.main(argv)
    out = capsys.readouterr().out
    assert rc == expect_rc, out
    return json.loads(out)  # one JSON object and nothing else on stdout


def concatenated_keys(report: dict) -> dict[int, list[str]]:
    """Per step, the ranks' slices glued back into the global batch."""
    return {s["step"]: [key for keys in s["keys_by_rank"] for key in keys] for s in report["steps"]}


def test_json_report_is_complete_and_consistent(capsys, shard_root):
    report = run_json(capsys, shard_root, "--steps", "100")
    assert {"surveys", "steps", "totals", "max_drift", "duplicates"} <= set(report)
    assert report["surveys"] == ["sdss", "decals", "hst"]
    surveys = load_shard_root(shard_root, report["surveys"])
    index_keys = {s.name: {e.key for entries in s.index for e in entries} for s in surveys}
    # "stop": the epoch ends before the smallest survey (hst) would run out; 12 * 0.34 = 4.08 hst per batch.
    num_hst = len(index_keys["hst"])
    assert report["epoch_batches"] == len(report["steps"]) == math.floor((num_hst + 1) / Fraction(408, 100))
    assert [s["step"] for s in report["steps"]] == list(range(report["epoch_batches"]))
    seen: dict[str, int] = {}
    for step in report["steps"]:
        assert sum(step["counts"].values()) == 12
        for name, share in SHARES.items():
            assert step["counts"][name] in (math.floor(12 * share), math.ceil(12 * share))
        assert [len(keys) for keys in step["keys_by_rank"]] == [3] * 4
        for rank, keys in enumerate(step["keys_by_rank"]):
            for key in keys:
                assert key not in seen, f"{key} read by rank {seen.get(key)} and rank {rank}"
                seen[key] = rank
        glued = [key for keys in step["keys_by_rank"] for key in keys]
        for name in SHARES:  # counts agree with the keys themselves, and keys come from the index files
            from_keys = [k for k in glued if k.startswith(name + "_")]
            assert len(from_keys) == step["counts"][name] and set(from_keys) <= index_keys[name]
    totals = {name: sum(s["counts"][name] for s in report["steps"]) for name in SHARES}
    assert report["totals"] == totals
    running, drift = {name: 0 for name in SHARES}, Fraction(0)
    for number, step in enumerate(report["steps"], start=1):
        for name, share in SHARES.items():
            running[name] += step["counts"][name]
            drift = max(drift, abs(running[name] - share * 12 * number))
    assert report["max_drift"] == pytest.approx(float(drift)) and report["max_drift"] < 1
    assert report["duplicates"] == 0 and report["duplicates_in_steps"] == 0
    assert report["rank_disjoint"] and report["matches_global_order"]
    assert report["batches_per_rank"] == [report["epoch_batches"]] * 4
    assert report["ok"] and report["problems"] == []


def test_resume_gives_the_rest_of_an_uninterrupted_run(capsys, shard_root):
    full = run_json(capsys, shard_root, world_size=2)
    num_batches = full["epoch_batches"]
    assert num_batches > 5
    for resume_from, world_size in [(4, 2), (4, 4), (1, 1), (num_batches - 1, 3)]:
        resumed = run_json(capsys, shard_root, "--resume-from-step", str(resume_from), world_size=world_size)
        assert resumed["resume_from_step"] == resume_from
        assert [s["step"] for s in resumed["steps"]] == list(range(resume_from, num_batches))
        assert resumed["batches_per_rank"] == [num_batches - resume_from] * world_size
        full_keys = concatenated_keys(full)
        assert concatenated_keys(resumed) == {step: full_keys[step] for step in range(resume_from, num_batches)}
        assert resumed["max_drift"] == full["max_drift"]  # running totals count from the epoch start
        if world_size == 2:  # the same world size: every rank reads exactly what it would have read
            assert resumed["steps"] == full["steps"][resume_from:]
        assert resumed["ok"]
    unresumed = run_json(capsys, shard_root, world_size=4)
    resumed = run_json(capsys, shard_root, "--resume-from-step", "4", world_size=4)
    assert resumed["steps"] == unresumed["steps"][4:]


def test_resume_goes_through_the_sampler_state(monkeypatch, capsys, shard_root):
    loaded = []
    real = MixingSampler.load_state_dict
    monkeypatch.setattr(MixingSampler, "load_state_dict", lambda self, state: loaded.append(dict(state))
                        or real(self, state))
    run_json(capsys, shard_root, "--resume-from-step", "3", "--steps", "2", batch_size=12)
    assert len(loaded) == 1 and loaded[0]["samples_consumed"] == 3 * 12 and loaded[0]["epoch"] == 0


def test_global_order_does_not_depend_on_world_size(capsys, shard_root):
    reports = {w: run_json(capsys, shard_root, "--steps", "6", world_size=w) for w in (1, 2, 4)}
    glued = {w: concatenated_keys(r) for w, r in reports.items()}
    assert glued[1] == glued[2] == glued[4] and len(glued[1]) == 6
    assert reports[2]["steps"][0]["keys_by_rank"][0] != glued[1][0]  # the ranks really read slices
    other_seed = run_json(capsys, shard_root, "--steps", "6", "--seed", "1", world_size=2)
    assert concatenated_keys(other_seed) != glued[2]
    other_epoch = run_json(capsys, shard_root, "--steps", "6", "--epoch", "1", world_size=2)
    assert concatenated_keys(other_epoch) != glued[2]


def test_repeat_allows_and_counts_duplicates(capsys, shard_root):
    report = run_json(capsys, shard_root, "--on-exhausted", "repeat", "--epoch-samples", "600", "--steps", "1000",
                      batch_size=64)
    assert report["epoch_batches"] == len(report["steps"]) == 600 // 64
    keys = [key for s in report["steps"] for keys in s["keys_by_rank"] for key in keys]
    assert report["duplicates"] == report["duplicates_in_steps"] == len(keys) - len(set(keys)) > 0
    assert report["duplicates_allowed"] and report["max_drift"] < 1 and report["ok"]
    stop = run_json(capsys, shard_root, "--epoch-samples", "600", "--steps", "1000", batch_size=64)
    assert stop["epoch_batches"] < report["epoch_batches"] and stop["duplicates"] == 0


def test_broken_rank_slicing_is_reported(monkeypatch, capsys, shard_root):
    real = MixingSampler.rank_batches
    # Every rank reads rank 0's slice: overlapping ranks, and the slices no longer glue into the global order.
    monkeypatch.setattr(MixingSampler, "rank_batches", lambda self, rank, world_size: real(self, 0, world_size))
    report = run_json(capsys, shard_root, expect_rc=1)
    assert not report["ok"] and report["rank_overlap"] > 0 and not report["matches_global_order"]
    assert any("two ranks" in p for p in report["problems"])
    # A rank that stops early: the ranks no longer get the same number of batches.
    monkeypatch.setattr(MixingSampler, "rank_batches", lambda self, rank, world_size:
                        (item for i, item in enumerate(real(self, rank, world_size)) if rank or i < 2))
    report = run_json(capsys, shard_root, expect_rc=1)
    assert report["batches_per_rank"][0] == 2 and report["batches_per_rank"][1] == report["epoch_batches"]
    assert any("remaining batches" in p for p in report["problems"])


def test_human_report(capsys, shard_root):
    argv = ["--shards", str(shard_root), "--mix", MIX, "--global-batch-size", "12", "--world-size", "4"]
    assert inspect_module.main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["step", "sdss", "decals", "hst"])
    assert lines[header + 1].split() == ["0", "4", "4", "4"]
    assert lines[header + inspect_module.NUM_TABLE_STEPS + 1].split()[0] == "..."
    assert "max drift of a running total from its target" in out and "on_exhausted=stop allows none: ok" in out
    assert "batches per rank: 11 on each of 4 rank(s): ok" in out
    assert lines[-1].startswith("verdict: OK")
    assert inspect_module.main(["--help"]) == 0
    help_text = capsys.readouterr().out
    assert "cluster hours" in help_text and "--resume-from-step" in help_text and "Exit code" in help_text


@pytest.mark.parametrize("extra, message", [
    (["--mix", "sdss=0.5,ukidss=0.5"], "no built shards for ['ukidss']"),
    (["--mix", "sdss=0.5,hst=-0.5"], "positive share"),
    (["--mix", "sdss:0.5,hst=0.5"], "survey=share"),
    (["--world-size", "5"], "not divisible by --world-size 5"),
    (["--resume-from-step", "1000"], "outside the epoch's"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--epoch-samples", "3"], "fewer than one global batch"),
])
def test_bad_input_exits_2_with_a_message(capsys, shard_root, extra, message):
    argv = ["--shards", str(shard_root), "--mix", MIX, "--global-batch-size", "12", *extra]
    assert inspect_module.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


def test_bad_arguments_exit_2(capsys, tmp_path):
    assert inspect_module.main(["--shards", str(tmp_path), "--mix", MIX, "--global-batch-size", "x"]) == 2
    assert "invalid int value" in capsys.readouterr().err
    assert inspect_module.main(["--shards", str(tmp_path), "--mix", MIX, "--global-batch-size", "8"]) == 2
    assert "no built shards" in capsys.readouterr().err


def tile_origin(index: int, num_tiles: int, size: int) -> tuple[int, int]:
    """Top-left pixel of tile `index`'s frame in a contact sheet of `num_tiles` tiles of `size` px."""
    columns = math.ceil(math.sqrt(num_tiles))
    return (index % columns) * (size + 6), 34 + (index // columns) * (size + 6 + 14)


def test_grid_is_a_labelled_contact_sheet_of_the_loaders_batch(capsys, shard_root, tmp_path):
    from PIL import Image

    path = tmp_path / "grid" / "batch.png"
    report = run_json(capsys, shard_root, "--steps", "2", "--grid", str(path), "--image-size", "32",
                      "--backend", "torch")
    grid = report["grid"]
    assert grid["path"] == str(path) and grid["num_tiles"] == 12 and grid["step"] == 0
    assert grid["keys_match_sampler"] and grid["counts"] == report["steps"][0]["counts"]
    sheet = np.asarray(Image.open(path).convert("RGB"))
    assert sheet.shape[0] == 34 + 3 * (32 + 6 + 14) and sheet.shape[1] >= 4 * (32 + 6)
    keys = concatenated_keys(report)[0]
    borders = []
    for i, key in enumerate(keys):
        left, top = tile_origin(i, 12, 32)
        survey = report["surveys"].index(key.split("_")[0])
        borders.append(tuple(sheet[top, left]))
        assert borders[-1] == inspect_module.SURVEY_COLOURS[survey], f"tile {i} ({key})"
        assert sheet[top + 3:top + 35, left + 3:left + 35].std() > 5  # a galaxy, not a blank tile
    assert len(set(borders)) == 3


def test_grid_undoes_the_normalisation_and_follows_resume(capsys, shard_root, tmp_path):
    from PIL import Image

    path = tmp_path / "plain.png"
    report = run_json(capsys, shard_root, "--steps", "1", "--resume-from-step", "3", "--grid", str(path),
                      "--image-size", "64", "--no-augment", world_size=2)
    assert report["grid"]["step"] == 3 and report["grid"]["keys_match_sampler"]
    sheet = np.asarray(Image.open(path).convert("RGB")).astype(np.float32)
    surveys = load_shard_root(shard_root, report["surveys"])
    by_key = {e.key: (s, shard, i) for s, info in enumerate(surveys)
              for shard, entries in enumerate(info.index) for i, e in enumerate(entries)}
    reader = SampleReader(surveys)
    for i, key in enumerate(concatenated_keys(report)[3]):
        source = np.asarray(Image.open(io.BytesIO(reader.read(*by_key[key]))).convert("RGB")).astype(np.float32)
        left, top = tile_origin(i, 12, 64)
        assert np.abs(sheet[top + 3:top + 67, left + 3:left + 67] - source).mean() < 2, key
    reader.close()
