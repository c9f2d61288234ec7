"""data.include_keys: a survey's training samples restricted to listed keys, the same batches on any world size."""

import numpy as np
import pandas as pd
import pytest

from loaders.include import read_key_file, read_key_files, restrict_to_keys
from loaders.loader import LoaderConfig, build_loader
from loaders.sampler import MixConfig
from loaders.shards import load_shard_root
from sharding.config import CONFIG_ROOT
from train.config import load_train_config


def _keys(info):
    return [e.key for entries in info.index for e in entries]


def test_key_files_parquet_csv_and_text(tmp_path):
    pd.DataFrame({"key": ["a_1", "a_2"], "score": [1.0, 2.0]}).to_parquet(tmp_path / "p.parquet")
    pd.DataFrame({"key": ["b_1"]}).to_csv(tmp_path / "k.csv", index=False)
    (tmp_path / "k.txt").write_text("# picks\nc_1\n\nc_2\n")
    assert read_key_file(tmp_path / "p.parquet") == ["a_1", "a_2"]
    assert read_key_files([tmp_path / "k.csv", tmp_path / "k.txt"]) == {"b_1", "c_1", "c_2"}
    pd.DataFrame({"id": ["x"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no `key` column"):
        read_key_file(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="does not exist"):
        read_key_file(tmp_path / "missing.txt")
    cfg = load_train_config(CONFIG_ROOT / "train" / "tiny.yaml", [f"data.include_keys=[{tmp_path / 'k.txt'}]"])
    assert cfg.data.include_keys == [str(tmp_path / "k.txt")]


def test_restrict_keeps_listed_samples_of_listed_surveys_only(shard_root):
    surveys = load_shard_root(shard_root, ["sdss", "hst"])
    sdss = _keys(surveys[0])
    chosen = set(sdss[3:20:2])
    out = restrict_to_keys(surveys, chosen)
    assert _keys(out[0]) == [k for k in sdss if k in chosen]  # shard order kept
    assert out[1] is surveys[1]  # no hst key listed: untouched
    rows = [sdss.index(k) for k in _keys(out[0])]
    np.testing.assert_array_equal(out[0].votes, surveys[0].votes[rows])
    with pytest.raises(ValueError, match=r"1 of 10 keys are in no train sample.*sdss_nope"):
        restrict_to_keys(surveys, chosen | {"sdss_nope"})


def test_include_keys_batches_identical_on_world_size_1_and_4(shard_root, tmp_path):
    surveys = load_shard_root(shard_root, ["sdss", "hst"])
    chosen = _keys(surveys[0])[::3]  # 1 in 3 sdss train samples; hst stays whole
    pd.DataFrame({"key": chosen}).to_parquet(tmp_path / "picks.parquet")
    keys = read_key_files([tmp_path / "picks.parquet"])
    mix = MixConfig(ratios="sdss=0.5,hst=0.5", global_batch_size=8, epoch_samples=24, seed=4)
    cfg = LoaderConfig(shard_root=str(shard_root), backend="torch", image_size=16, num_workers=0)
    per_world = {}
    for world_size in (1, 4):
        ranks = []
        for rank in range(world_size):
            loader = build_loader(cfg, mix, rank, world_size, include_keys=keys)
            ranks.append([b.keys for b in loader])
            counts = {name: sum(c) for name, c in loader.sampler.shard_counts.items()}
            loader.close()
        per_world[world_size] = [sum((r[i] for r in ranks), []) for i in range(len(ranks[0]))]
    assert counts == {"sdss": len(chosen), "hst": surveys[1].num_samples}
    assert per_world[1] == per_world[4] and len(per_world[1]) == 3
    for batch in per_world[1]:
        sdss = [k for k in batch if k.startswith("sdss_")]
        assert len(sdss) == 4 and set(sdss) <= keys
