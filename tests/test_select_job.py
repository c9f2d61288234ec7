"""`python -m eval select` on the tiny mock shards: picks, exclusions, quotas, upload manifest, resume."""

import numpy as np
import pandas as pd
import pytest

from eval import __main__ as eval_main
from eval import select_job
from eval.store import read_metadata
from loaders.shards import load_survey_shards


def _train_keys(root, survey):
    info = load_survey_shards(root / survey, "train")
    return [e.key for entries in info.index for e in entries]


def _args(model, root, out, strategy, *extra):
    return ["--model", str(model), "--pool", str(root), "--surveys", "decals,sdss", "--split", "train",
            "--budget", "6", "--strategy", strategy, "--out", str(out), "--mc-samples", "3", "--chunk-rows", "16",
            "--batch-size", "8", "--device", "cpu", "--no-progress", *extra]


def test_select_hybrid_excludes_quotas_writes_the_upload_and_resumes(eval_shards, eval_exports, tmp_path, capsys):
    _, root = eval_shards
    decals = _train_keys(root, "decals")
    excluded = decals[:10]
    (tmp_path / "labelled.txt").write_text("\n".join(excluded) + "\n")
    out = tmp_path / "picks.parquet"
    argv = _args(eval_exports["mixed"], root, out, "hybrid", "--exclude", str(tmp_path / "labelled.txt"),
                 "--quota", "decals=0.5,sdss=0.5", "--candidates", "8")
    assert eval_main.main(["select", *argv]) == 0
    picks = pd.read_parquet(out)
    assert list(picks.columns) == ["key", "survey", "object_id", "ra", "dec", "score", "rank", "strategy"]
    assert len(picks) == 6 and picks["key"].is_unique and not set(picks["key"]) & set(excluded)
    assert picks["survey"].value_counts().to_dict() == {"decals": 3, "sdss": 3}
    assert set(picks["key"]) <= set(decals) | set(_train_keys(root, "sdss"))  # train split only
    assert list(picks["rank"]) == list(range(1, 7)) and (picks["score"] >= 0).all()
    manifest = pd.read_csv(tmp_path / "picks.manifest.csv")
    assert list(manifest["id"]) == list(picks["key"])
    for name in manifest["image_1"]:
        assert (tmp_path / "picks_images" / name).read_bytes()[:2] == b"\xff\xd8"  # the shard's own JPEG
    assert (tmp_path / "picks.png").read_bytes()[:4] == b"\x89PNG"
    assert read_metadata(out)["signature"]["strategy"] == "hybrid"
    capsys.readouterr()
    stamp = out.stat().st_mtime_ns
    assert select_job.main(argv) == 0  # same arguments: finished, nothing recomputed
    assert "already finished" in capsys.readouterr().out and out.stat().st_mtime_ns == stamp


def test_select_uncertainty_is_the_top_of_the_whole_pool_and_random_is_seeded(eval_shards, eval_exports, tmp_path):
    _, root = eval_shards
    model = eval_exports["mixed"]
    assert select_job.main(_args(model, root, tmp_path / "u.parquet", "uncertainty")) == 0
    small = pd.read_parquet(tmp_path / "u.parquet")
    assert select_job.main(_args(model, root, tmp_path / "u2.parquet", "uncertainty", "--chunk-rows", "1000")) == 0
    pd.testing.assert_frame_equal(small, pd.read_parquet(tmp_path / "u2.parquet"))  # chunking changes nothing
    assert np.all(np.diff(small["score"]) <= 0)
    one = select_job.main(_args(model, root, tmp_path / "r1.parquet", "random", "--seed", "1"))
    two = select_job.main(_args(model, root, tmp_path / "r2.parquet", "random", "--seed", "2"))
    assert one == two == 0
    assert set(pd.read_parquet(tmp_path / "r1.parquet")["key"]) != set(pd.read_parquet(tmp_path / "r2.parquet")["key"])
    assert select_job.main(_args(model, root, tmp_path / "d.parquet", "diversity")) == 0
    assert pd.read_parquet(tmp_path / "d.parquet")["key"].is_unique


def test_select_uncertainty_of_an_mse_model_is_its_mc_variance(eval_shards, tmp_path):
    from eval_cases import make_export

    _, root = eval_shards
    model = make_export(tmp_path / "mse", root, "decals=1.0", seed=5, loss="mse")
    assert select_job.main(_args(model, root, tmp_path / "m.parquet", "uncertainty")) == 0
    picks = pd.read_parquet(tmp_path / "m.parquet")
    assert len(picks) == 6 and (picks["score"] > 0).all() and np.all(np.diff(picks["score"]) <= 0)


def test_select_errors_name_the_fix(eval_shards, eval_exports, tmp_path, capsys):
    _, root = eval_shards
    assert select_job.main(_args(eval_exports["mixed"], root, tmp_path / "x.parquet", "hybrid", "--quota",
                                 "hst=1")) == 2
    assert "--quota" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        select_job.main(["--help"])
    assert "python -m eval select" in capsys.readouterr().out
