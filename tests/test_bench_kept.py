"""bench.kept: a benchmark re-run reuses a kept run only when it was trained on the shards the benchmark has now."""

import json
import os

import pandas as pd
import pytest

from bench.kept import RECORD, kept, newest_manifest_time, record_run, shard_fingerprint


def _survey(root, name, shard_sha, label):
    folder = root / name
    folder.mkdir(parents=True)
    pd.DataFrame({"key": ["a"], "x": [label]}).to_parquet(folder / "labels.parquet")
    (folder / "manifest.json").write_text(json.dumps({"shards": [{"sha256": shard_sha}], "labels": "labels.parquet"}))


def _finished_run(tmp_path, name="run"):
    run = tmp_path / "runs" / name
    (run / "export").mkdir(parents=True)
    return run


def test_fingerprint_follows_shard_bytes_and_labels(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _survey(a, "sdss", "00", 0.5)
    _survey(b, "sdss", "01", 0.5)  # another shard
    _survey(c, "sdss", "00", 0.6)  # other labels
    prints = {shard_fingerprint(root) for root in (a, b, c)}
    assert len(prints) == 3
    assert shard_fingerprint(a) == shard_fingerprint(a)
    with pytest.raises(ValueError, match="no built survey"):
        shard_fingerprint(tmp_path / "empty")


def test_kept_reuses_only_runs_on_the_same_shards(tmp_path):
    run = _finished_run(tmp_path)
    assert not kept(run, False, "f1", 0.0)  # no finished export: train it
    record_run(run, "f1")
    assert kept(run, True, "f1", 0.0)
    with pytest.raises(ValueError, match="other shards.*another --out"):
        kept(run, True, "f2", 0.0)


def test_runs_without_a_record_are_judged_by_age(tmp_path):
    shards = tmp_path / "shards"
    _survey(shards, "sdss", "00", 0.5)
    built = newest_manifest_time(shards)
    newer = _finished_run(tmp_path, "newer")
    os.utime(newer / "export", (built + 10, built + 10))
    assert kept(newer, True, "f1", built)
    assert json.loads((newer / RECORD).read_text()) == {"shards": "f1"}  # adopted: recorded from now on
    older = _finished_run(tmp_path, "older")
    os.utime(older / "export", (built - 10, built - 10))
    with pytest.raises(ValueError, match="older"):
        kept(older, True, "f1", built)
