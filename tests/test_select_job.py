"""`python -m eval select` on the tiny mock shards: picks, exclusions, quotas, upload manifest, resume."""

import numpy as np
import pandas as pd
import pytest
import torch

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


def test_diversity_starts_from_the_labelled_galaxies(eval_shards, eval_exports, tmp_path):
    """The first k-center pick is the unlabelled galaxy farthest from every labelled one (brute force over the
    model's embeddings, read through eval predict's path); with --labelled-cap 0 it ignores them."""
    from eval.source import load_model, open_source
    from loaders.evaluation import iter_eval_batches
    from loaders.loader import LoaderConfig

    _, root = eval_shards
    model_dir = eval_exports["mixed"]
    source = open_source(model_dir)
    model, spec = load_model(source), source.input_spec()
    cfg = LoaderConfig(shard_root=str(root), backend="torch", image_size=spec.image_size, mean=spec.mean,
                       std=spec.std)
    keys, vectors = [], []
    with torch.no_grad():
        for batch in iter_eval_batches(cfg, "decals", "train", batch_size=16):
            vectors.append(model.embed(batch.images.float()).numpy())
            keys += batch.keys
    vectors = np.concatenate(vectors).astype(np.float64)
    labelled = np.isin(keys, keys[::3])
    (tmp_path / "labelled.txt").write_text("\n".join(np.array(keys)[labelled]) + "\n")
    gap = np.linalg.norm(vectors[~labelled][:, None] - vectors[labelled][None], axis=2).min(axis=1)
    farthest = np.array(keys)[~labelled][int(np.argmax(gap))]
    argv = _args(model_dir, root, tmp_path / "d.parquet", "diversity", "--exclude", str(tmp_path / "labelled.txt"),
                 "--candidates", "1000")
    argv[argv.index("--surveys") + 1] = "decals"
    assert select_job.main(argv) == 0
    picks = pd.read_parquet(tmp_path / "d.parquet")
    assert picks["key"].iloc[0] == farthest and not set(picks["key"]) & set(np.array(keys)[labelled])
    assert read_metadata(tmp_path / "d.parquet")["labelled_embedded"] == labelled.sum()
    assert select_job.main([*argv[:argv.index("--out")], "--out", str(tmp_path / "d0.parquet"),
                            *argv[argv.index("--out") + 2:], "--labelled-cap", "0"]) == 0
    assert read_metadata(tmp_path / "d0.parquet")["labelled_embedded"] == 0


def test_a_killed_selection_continues_from_its_last_chunk(eval_shards, eval_exports, tmp_path, monkeypatch):
    """Killed after three chunks, a re-run scores only the rest and picks what an uninterrupted run picks."""
    _, root = eval_shards
    model = eval_exports["mixed"]
    whole = tmp_path / "whole.parquet"
    assert select_job.main(_args(model, root, whole, "hybrid", "--chunk-rows", "8", "--candidates", "12")) == 0
    calls, killed, real = [], [], select_job.Scorer.score

    class Killed(Exception):
        pass

    def dies_after_three_chunks(self, images, keys, survey):
        calls.append(len(keys))
        if len(calls) == 4 and not killed:
            killed.append(True)
            raise Killed
        return real(self, images, keys, survey)

    monkeypatch.setattr(select_job.Scorer, "score", dies_after_three_chunks)
    out = tmp_path / "killed.parquet"
    argv = _args(model, root, out, "hybrid", "--chunk-rows", "8", "--candidates", "12")
    with pytest.raises(Killed):
        select_job.main(argv)
    assert (tmp_path / "killed.parquet.progress.npz").is_file() and not out.exists()
    calls.clear()
    assert select_job.main(argv) == 0
    total = sum(len(_train_keys(root, s)) for s in ("decals", "sdss"))
    assert sum(calls) == total - 3 * 8  # the three finished chunks are not scored again
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(whole))
    assert not (tmp_path / "killed.parquet.progress.npz").exists()


def _decals_catalog(raw):
    """The mock decals catalog (as sharding.build read it) with each row's key, from the survey's id column."""
    from sharding.catalog import make_key

    catalog = pd.read_parquet(raw / "decals" / "gz_decals_volunteers_5.parquet")
    return catalog, [make_key("decals", str(i)) for i in catalog["iauname"]]


def _catalog_args(model, catalog, images, out, strategy, *extra):
    return ["--model", str(model), "--pool", str(catalog), "--images", str(images), "--survey", "decals",
            "--render-size", "64", "--budget", "6", "--strategy", strategy, "--out", str(out), "--mc-samples", "3",
            "--chunk-rows", "8", "--batch-size", "8", "--device", "cpu", "--no-progress", "--sheet-size", "0", *extra]


def test_a_catalog_pool_picks_what_the_shards_built_from_it_pick(eval_shards, eval_exports, tmp_path):
    """The catalog's train rows (in shard order, so batches and MC seeds line up) rendered on the fly give the same
    uncertainty picks, scores and positions as the shards sharding.build made from the same catalog."""
    raw, root = eval_shards
    model = eval_exports["mixed"]
    argv = _args(model, root, tmp_path / "shards.parquet", "uncertainty", "--chunk-rows", "8", "--sheet-size", "0")
    argv[argv.index("--surveys") + 1] = "decals"
    assert select_job.main(argv) == 0
    catalog, keys = _decals_catalog(raw)
    train = _train_keys(root, "decals")
    catalog.index = keys
    catalog.loc[train].to_parquet(tmp_path / "train.parquet", index=False)
    assert select_job.main(_catalog_args(model, tmp_path / "train.parquet", raw / "decals" / "images",
                                         tmp_path / "cat.parquet", "uncertainty")) == 0
    from_shards, from_catalog = pd.read_parquet(tmp_path / "shards.parquet"), pd.read_parquet(tmp_path / "cat.parquet")
    assert len(from_catalog) == 6 and from_catalog["score"].iloc[0] > 0
    pd.testing.assert_frame_equal(from_catalog, from_shards)
    assert pd.read_parquet(tmp_path / "cat.rejects.parquet").empty
    assert read_metadata(tmp_path / "cat.parquet")["signature"]["pool_content"]["render"]["image_size"] == 64


def test_a_catalog_pool_lists_a_corrupt_image_never_picks_an_excluded_key_and_resumes(
        eval_shards, eval_exports, tmp_path, monkeypatch, capsys):
    """Budget above the pool: the picks are exactly the rows that render and are not excluded; the corrupt row is in
    the rejects table with its catalog row, also after a kill and resume; the excluded rows seed k-center."""
    import shutil

    raw, _ = eval_shards
    catalog, keys = _decals_catalog(raw)
    images = tmp_path / "images"
    shutil.copytree(raw / "decals" / "images", images)
    broken = 3
    (images / catalog["file_loc"].iloc[broken]).write_bytes(b"SIMPLE  =                    T" + b"\0" * 50)
    excluded = keys[5:12]
    (tmp_path / "labelled.txt").write_text("\n".join(excluded) + "\n")
    out = tmp_path / "picks.parquet"
    argv = _catalog_args(eval_exports["mixed"], raw / "decals" / "gz_decals_volunteers_5.parquet", images, out,
                         "hybrid", "--budget", "100", "--exclude", str(tmp_path / "labelled.txt"),
                         "--sheet-size", "4", "--split", "test")
    calls, real = [], select_job.Scorer.score

    class Killed(Exception):
        pass

    def dies_in_the_third_chunk(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return real(self, *args)

    monkeypatch.setattr(select_job.Scorer, "score", dies_in_the_third_chunk)
    with pytest.raises(Killed):
        select_job.main(argv)
    assert select_job.main(argv) == 0  # resumed from the checkpoint after the second chunk
    picks = pd.read_parquet(out)
    assert set(picks["key"]) == set(keys) - set(excluded) - {keys[broken]}  # every row: --split is ignored
    assert picks["key"].is_unique and len(picks) == len(keys) - len(excluded) - 1
    rejects = pd.read_parquet(tmp_path / "picks.rejects.parquet")
    assert rejects[["row", "object_id"]].values.tolist() == [[broken, catalog["iauname"].iloc[broken]]]
    assert rejects["file"].iloc[0].endswith(catalog["file_loc"].iloc[broken]) and rejects["reason"].iloc[0]
    assert "picks.rejects.parquet" in capsys.readouterr().err
    meta = read_metadata(out)
    assert meta["labelled_embedded"] == len(excluded) and meta["unreadable"] == 1
    row = picks.set_index("key").loc[keys[0]]
    assert (row["object_id"], row["ra"], row["dec"]) == tuple(catalog[["iauname", "ra", "dec"]].iloc[0])
    manifest = pd.read_csv(tmp_path / "picks.manifest.csv")
    for name in manifest["image_1"]:
        assert (tmp_path / "picks_images" / name).read_bytes()[:2] == b"\xff\xd8"  # rendered JPEG, as the build
    assert (tmp_path / "picks.png").read_bytes()[:4] == b"\x89PNG"


def test_select_tells_shard_and_catalog_pools_apart(eval_shards, eval_exports, tmp_path, capsys):
    raw, root = eval_shards
    catalog = raw / "decals" / "gz_decals_volunteers_5.parquet"
    model = eval_exports["mixed"]
    base = ["--model", str(model), "--budget", "2", "--strategy", "random", "--out", str(tmp_path / "x.parquet")]
    cases = [(["--pool", str(catalog), "--images", str(raw / "decals" / "images")], "--survey NAME"),
             (["--pool", str(catalog), "--images", str(raw / "decals"), "--survey", "decals", "--surveys", "decals"],
              "--surveys is for a shard pool"),
             (["--pool", str(root), "--surveys", "decals", "--survey", "decals"], "belong to a catalog pool"),
             (["--pool", str(catalog), "--surveys", "decals"], "is a file"),
             (["--pool", str(root), "--images", str(raw / "decals"), "--survey", "decals"], "not a catalog file")]
    for extra, message in cases:
        assert select_job.main(base + extra) == 2
        assert message in capsys.readouterr().err
