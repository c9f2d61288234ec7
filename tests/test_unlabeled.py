"""Unlabeled surveys (build, manifest, mixing, refusal by supervised stages) and the label fraction."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from loaders.loader import LoaderConfig, build_loader
from loaders.sampler import MixConfig, global_order, mixing_report
from loaders.shards import check_labelled, keep_label_fraction, label_kept, load_shard_root, load_survey_shards, \
    unlabeled_surveys
from sharding import build, verify
from sharding.config import CONFIG_ROOT
from sharding.mock import main as mock_main
from sharding.registry import load_survey
from sharding.schema import load_schema, total_votes_column, votes_column
from train.config import DataConfig, load_train_config


def _build(raw: Path, catalog: Path, out: Path, *extra: str) -> int:
    return build.main(["--survey", "ukidss", "--catalog", str(catalog), "--images", str(raw / "images"), "--out",
                       str(out), "--image-size", "64", "--samples-per-shard", "8", "--no-progress", *extra])


@pytest.fixture(scope="module")
def mixed_root(shard_root, tmp_path_factory):
    """(raw ukidss, shard root): the session's sdss/decals/hst (linked) and a mock UKIDSS built --unlabeled."""
    raw, root = tmp_path_factory.mktemp("raw_ukidss"), tmp_path_factory.mktemp("unlabeled_root")
    assert mock_main(["--survey", "ukidss", "--num-galaxies", "48", "--out", str(raw), "--seed", "5",
                      "--corrupt-fraction", "0.1", "--no-progress"]) == 0
    for survey in ("sdss", "decals", "hst"):
        (root / survey).symlink_to(shard_root / survey)
    assert _build(raw, raw / Path(load_survey("ukidss").catalog).name, root, "--unlabeled") == 0
    return raw, root


def test_unlabeled_build_keeps_ids_positions_and_rejects_without_labels(mixed_root):
    _, root = mixed_root
    schema = load_schema()
    manifest = json.loads((root / "ukidss" / "manifest.json").read_text())
    assert manifest["labelled"] is False and manifest["build"]["unlabeled"] is True
    assert json.loads((root / "sdss" / "manifest.json").read_text())["labelled"] is True
    labels = pd.read_parquet(root / "ukidss" / "labels.parquet")
    assert len(labels) == manifest["num_samples"] > 20
    assert labels["key"].str.startswith("ukidss_").all() and labels["object_id"].str.len().gt(0).all()
    assert np.isfinite(labels[["ra", "dec"]].to_numpy()).all()
    assert labels[schema.names].isna().all().all()
    assert (labels[[votes_column(f) for f in schema.names]] == 0).all().all()
    assert (labels[[total_votes_column(q) for q in schema.question_names]] == 0).all().all()
    assert len(pd.read_parquet(root / "ukidss" / "rejects.parquet")) == manifest["num_rejects"] > 0
    assert verify.verify_survey(root / "ukidss") == []


def test_a_catalog_without_answer_columns_builds_unlabeled(mixed_root, tmp_path, capsys):
    raw, root = mixed_root
    survey = load_survey("ukidss")
    catalog = pd.read_csv(raw / Path(survey.catalog).name)
    bare = tmp_path / "positions.csv"
    catalog[[survey.id_column, survey.ra_column, survey.dec_column]].to_csv(bare, index=False)
    assert _build(raw, bare, tmp_path / "shards") == 0
    assert "none of the survey's answer columns" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "shards" / "ukidss" / "manifest.json").read_text())
    assert manifest["labelled"] is False
    keys = pd.read_parquet(tmp_path / "shards" / "ukidss" / "labels.parquet")["key"]
    assert keys.tolist() == pd.read_parquet(root / "ukidss" / "labels.parquet")["key"].tolist()


def test_unlabeled_and_labelled_surveys_mix_exactly(mixed_root):
    _, root = mixed_root
    mix = MixConfig(ratios="sdss=0.5,ukidss=0.5", global_batch_size=8, epoch_samples=24, seed=1)
    surveys = load_shard_root(root, list(mix.ratios))
    assert [s.labelled for s in surveys] == [True, False]
    report = mixing_report(global_order({s.name: s.shard_counts for s in surveys}, mix, 0), mix)
    assert report["allocation_exact"] and report["drift_below_one"]
    loader = build_loader(LoaderConfig(shard_root=str(root), backend="torch", image_size=32, num_workers=0), mix)
    try:
        batches = list(loader)
    finally:
        loader.close()
    assert len(batches) == 3
    for batch in batches:
        ukidss = batch.survey == 1
        assert int(ukidss.sum()) == 4
        assert not batch.feature_mask[ukidss].any() and batch.feature_mask[~ukidss].any()
        assert (batch.votes[ukidss] == 0).all() and (batch.total_votes[ukidss] == 0).all()
        assert (batch.features[ukidss] == 0).all()


def test_supervised_stages_refuse_unlabeled_surveys_by_name(mixed_root, tmp_path):
    _, root = mixed_root
    assert unlabeled_surveys(root, ["sdss", "ukidss", "hst"]) == ["ukidss"]
    assert unlabeled_surveys(root, ["sdss", "nonexistent"]) == []
    check_labelled(root, ["sdss", "hst"], "stage 'full'")
    with pytest.raises(ValueError, match=r"stage 'full'.*\['ukidss'\]"):
        check_labelled(root, ["sdss", "ukidss"], "stage 'full'")
    from train.loop import setup
    from train.world import World
    for stage, mix, val in (("full", "sdss=0.5,ukidss=0.5", []), ("head", "sdss=1.0", ["ukidss"])):
        cfg = load_train_config(CONFIG_ROOT / "train" / "tiny.yaml", [
            f"stage={stage}", f"data.mix={mix}", f"data.val_surveys={val}", f"data.loader.shard_root={root}",
            f"out_dir={tmp_path / stage}"])
        with pytest.raises(ValueError, match=r"\['ukidss'\].*built unlabeled"):
            setup(cfg, World(), None)
        assert not (tmp_path / stage).exists()  # refused before anything was set up


def test_label_fraction_keeps_a_stable_nested_subset(shard_root):
    info = load_survey_shards(shard_root / "sdss", "train")
    keys = [e.key for entries in info.index for e in entries]
    half, tenth = keep_label_fraction(info, 0.5), keep_label_fraction(info, 0.25)
    half_keys = [e.key for entries in half.index for e in entries]
    tenth_keys = [e.key for entries in tenth.index for e in entries]
    assert half_keys == [k for k in keys if label_kept(k, 0.5)] and 0.3 < len(half_keys) / len(keys) < 0.7
    assert set(tenth_keys) < set(half_keys) and tenth_keys
    assert keep_label_fraction(info, 1.0) is info
    # Labels stay aligned with the kept samples.
    rows = [keys.index(k) for k in half_keys]
    np.testing.assert_array_equal(half.votes, info.votes[rows])
    assert half.key(1, 0) == half.index[1][0].key and half.row(1, 0) == len(half.index[0])
    with pytest.raises(ValueError, match="label_fraction"):
        keep_label_fraction(info, 0.0)
    with pytest.raises(ValueError, match="label_fraction"):
        DataConfig(label_fraction=1.5)
    cfg = load_train_config(CONFIG_ROOT / "train" / "tiny.yaml", ["data.label_fraction=0.1"])
    assert cfg.data.label_fraction == 0.1


def test_loader_label_fraction_mixes_the_kept_samples_exactly_on_any_world_size(shard_root):
    mix = MixConfig(ratios="sdss=0.5,hst=0.5", global_batch_size=8, epoch_samples=16, seed=2)
    cfg = LoaderConfig(shard_root=str(shard_root), backend="torch", image_size=16, num_workers=0)
    runs = []
    for rank, world_size in ((0, 1), (0, 2), (1, 2)):
        loader = build_loader(cfg, mix, rank, world_size, label_fraction=0.5)
        runs.append([b.keys for b in loader])
        counts = loader.sampler.shard_counts
        loader.close()
    kept = {s.name: keep_label_fraction(s, 0.5) for s in load_shard_root(shard_root, list(mix.ratios))}
    assert {name: sum(c) for name, c in counts.items()} == {name: s.num_samples for name, s in kept.items()}
    whole = runs[0]
    assert [a + b for a, b in zip(runs[1], runs[2])] == whole
    for keys in whole:
        assert all(label_kept(k, 0.5) for k in keys)
        assert sum(k.startswith("sdss_") for k in keys) == 4
