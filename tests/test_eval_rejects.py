"""Damaged shards in evaluation: each unreadable sample is a reject (key, shard, reason), the job goes on, and it
stops with an error naming sharding.verify only past the error rate; a resumed prediction keeps the rejects."""

import io
import json
import shutil

import pandas as pd
import pytest
from PIL import Image

from eval import predict, reading, robustness
from eval.store import PartStore
from loaders.shards import load_survey_shards
from loaders.source import check_image


@pytest.fixture
def damaged(eval_shards, tmp_path):
    """A copy of the sdss shards with the test tar and the second train tar cut to half their size."""
    _, root = eval_shards
    copy = tmp_path / "shards"
    shutil.copytree(root / "sdss", copy / "sdss")
    for name in ("sdss-test-000000.tar", "sdss-train-000001.tar"):
        tar = copy / "sdss" / name
        tar.write_bytes(tar.read_bytes()[:tar.stat().st_size // 2])
    return copy


def _unreadable(root, split):
    """Keys whose image bytes lie past the end of their cut tar: what an independent look at the files says."""
    info = load_survey_shards(root / "sdss", split)
    return sorted(entry.key for shard, entries in enumerate(info.index) for entry in entries
                  if sum(entry.members[info.image_ext]) > info.paths[shard].stat().st_size)


def _predict(export, root, out, *extra):
    return predict.main(["--model", str(export), "--shards", str(root), "--surveys", "sdss", "--out", str(out),
                         "--batch-size", "8", "--no-progress", *extra])


def test_predict_on_a_cut_shard_lists_its_lost_samples_and_goes_on(damaged, eval_exports, tmp_path, capsys):
    lost = _unreadable(damaged, "test")
    assert lost
    assert _predict(eval_exports["mixed"], damaged, tmp_path / "p.parquet", "--split", "test") == 0
    assert f"{len(lost)} unreadable inputs listed in" in capsys.readouterr().out
    rejects = pd.read_parquet(tmp_path / "p.rejects.parquet")
    assert sorted(rejects["key"]) == lost
    assert set(rejects["shard"]) == {"sdss-test-000000.tar"} and set(rejects["split"]) == {"test"}
    assert rejects["reason"].str.contains("truncated shard").all()
    frame = pd.read_parquet(tmp_path / "p.parquet")
    info = load_survey_shards(damaged / "sdss", "test")
    assert sorted(frame["key"]) == sorted(set(e.key for es in info.index for e in es) - set(lost))
    assert not (tmp_path / "p.parquet.partial").exists()
    # Past the error rate, a clear error that names the tool to run, and no traceback.
    assert _predict(eval_exports["mixed"], damaged, tmp_path / "q.parquet", "--split", "test",
                    "--error-min-reads", "2") == 2
    err = capsys.readouterr().err
    assert "python -m sharding.verify" in err and "unreadable" in err and "Traceback" not in err


def test_a_resumed_prediction_continues_after_the_lost_samples(damaged, eval_exports, tmp_path, monkeypatch):
    args = ["--split", "train", "--rows-per-part", "8"]
    assert _predict(eval_exports["mixed"], damaged, tmp_path / "whole.parquet", *args) == 0
    original, written = PartStore.write, []

    def dies_after_two(self, *a, **k):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(a[:2])
        return original(self, *a, **k)

    for name, extra in (("resumed", []), ("strict", ["--max-error-rate", "0.09", "--error-min-reads", "25"])):
        written.clear()
        monkeypatch.setattr(PartStore, "write", dies_after_two)  # killed after the part holding the lost samples
        with pytest.raises(KeyboardInterrupt):
            _predict(eval_exports["mixed"], damaged, tmp_path / f"{name}.parquet", *args, *extra)
        monkeypatch.setattr(PartStore, "write", original)
        status = _predict(eval_exports["mixed"], damaged, tmp_path / f"{name}.parquet", *args, *extra)
        # The resumed job counts the earlier parts' rejects: it stops where an uninterrupted job with these limits
        # stops (after all 30 reads, 3 of them lost: 10% > 9%), though it read nothing unreadable itself.
        assert status == (2 if extra else 0)
    assert _predict(eval_exports["mixed"], damaged, tmp_path / "strict_whole.parquet", *args,
                    "--max-error-rate", "0.09", "--error-min-reads", "25") == 2
    assert (tmp_path / "resumed.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    whole, resumed = (pd.read_parquet(tmp_path / f"{n}.rejects.parquet") for n in ("whole", "resumed"))
    assert sorted(resumed["key"]) == _unreadable(damaged, "train") and resumed.equals(whole)


def test_robustness_skips_lost_samples_and_lists_them(damaged, eval_exports, tmp_path):
    out = tmp_path / "rob"
    robustness.SETTINGS, saved = {"rotation": ["none", "rot90"]}, robustness.SETTINGS
    try:
        assert robustness.main(["--model", str(eval_exports["mixed"]), "--shards", str(damaged), "--survey", "sdss",
                                "--split", "test", "--bootstrap", "0", "--out", str(out)]) == 0
    finally:
        robustness.SETTINGS = saved
    result = json.loads((out / "robustness.json").read_text())
    lost = _unreadable(damaged, "test")
    assert sorted(r["key"] for r in result["rejects"]) == lost
    assert sorted(pd.read_parquet(out / "rejects.parquet")["key"]) == lost
    assert result["n"] == sum(load_survey_shards(damaged / "sdss", "test").shard_counts) - len(lost)


def test_reject_reasons_hold_no_object_address():
    with pytest.raises(Exception) as caught:
        check_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "png")
    assert " at 0x" not in str(caught.value) and " at 0x" not in reading.reject_reason(caught.value)
    assert reading.reject_reason(caught.value).startswith("CorruptSample: unreadable header")
    with pytest.raises(Exception) as caught:
        Image.open(io.BytesIO(b"junk"))
    assert " at 0x" in str(caught.value)  # PIL names the in-memory file it could not identify
    assert reading.reject_reason(caught.value) == ("UnidentifiedImageError: cannot identify image file "
                                                   "<_io.BytesIO object>")


def test_thumbnails_of_a_cut_shard_skip_the_lost_images(damaged):
    from eval.thumbnails import read_thumbnails

    lost = _unreadable(damaged, "test")
    info = load_survey_shards(damaged / "sdss", "test")
    keys = [e.key for entries in info.index for e in entries]
    unreadable = {}
    thumbs = read_thumbnails(damaged, keys, unreadable=unreadable)
    assert sorted(unreadable) == lost and sorted(thumbs) == sorted(set(keys) - set(lost))
    assert all(" at 0x" not in reason for reason in unreadable.values())
