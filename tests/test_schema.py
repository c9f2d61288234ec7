"""Config loading, the 26-feature schema, the survey registry and native-column mapping per survey."""

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sharding.catalog import (check_columns, load_labels, make_key, map_labels, parse_splits, read_catalog,
                              split_of)
from sharding.config import CONFIG_ROOT, from_dict, load_config, parse_overrides
from sharding.registry import list_surveys, load_survey
from sharding.schema import load_schema, total_votes_column, votes_column

SHARED = Path(__file__).resolve().parents[1] / "sharding" / "gz_schemas"


@dataclass
class Inner:
    rate: float = 0.1
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    steps: int
    inner: Inner = field(default_factory=Inner)
    mode: str | None = None


def test_config_overrides_types_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 3\ninner: {rate: 1}\n")
    cfg = load_config(Outer, path, ["inner.names=[a, b]", "mode=fast"])
    assert cfg == Outer(steps=3, inner=Inner(rate=1.0, names=["a", "b"]), mode="fast")
    with pytest.raises(ValueError, match="unknown key"):
        load_config(Outer, path, ["inner.rat=2"])
    with pytest.raises(ValueError, match="expected int"):
        from_dict(Outer, {"steps": "three"})
    with pytest.raises(ValueError, match="missing required key 'steps'"):
        from_dict(Outer, {})
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}
    assert load_config(Outer, path, ["inner.rate=3e-4"]).inner.rate == 3e-4  # YAML 1.1 reads this as a string


def _validate_config(kind: str, path: Path) -> object:
    """Load a configs/<kind>/*.yaml with the dataclass that owns it (unknown keys and wrong types fail)."""
    if kind == "train":
        from train.config import load_train_config
        return load_train_config(path)
    if kind == "models":
        from models.config import load_model_config
        return load_model_config(path)
    if kind == "surveys":
        return load_survey(path)
    if kind == "features":
        return load_schema(path)
    if kind == "eval":
        from eval.ood import OODConfig
        return load_config(OODConfig, path)
    if kind == "studies":  # the study's structure, and every arm's training config with its overrides
        from launch.study_config import load_study
        from launch.study_graph import resolve_arms
        return resolve_arms(load_study(path), "<study>", "<shards>")
    raise AssertionError(f"configs/{kind}/ has no dataclass in this test: add it")


@pytest.mark.parametrize("path", sorted(CONFIG_ROOT.rglob("*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_yaml_in_configs_validates_with_its_dataclass(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict), path
    _validate_config(path.parent.name, path)


def test_config_validation_catches_what_parsing_does_not(tmp_path):
    for kind, text, error in [("train", "base: tiny.yaml\noptim: {lr: fast}\n", "expected float"),
                              ("models", "name: bad\nhead: {dropout: 0.1, width: 3}\n", "unknown key"),
                              ("eval", "runs: {a: runs/a}\nbootstrap: many\n", "expected int")]:
        path = tmp_path / kind / "bad.yaml"
        path.parent.mkdir()
        path.write_text(text)
        assert isinstance(yaml.safe_load(path.read_text()), dict)
        with pytest.raises(ValueError, match=error):
            _validate_config(kind, path)


def test_schema_matches_shared_cross_survey_table():
    schema = load_schema()
    rows = list(csv.DictReader(open(SHARED / "cross_survey_26_features.csv")))
    assert schema.names == [r["feature"] for r in rows]
    assert len(schema.features) == 26
    assert schema.question_names[:3] == ["smooth-or-featured", "disk-edge-on", "has-spiral-arms"]
    approx = [f.name for f in schema.features if f.mapping == "approximate"]
    assert approx == ["bulge-size_none", "bulge-size_dominant"]
    assert schema.features[schema.index("bar_yes")].mapping == "merged"
    for question, sl in schema.question_slices():
        assert all(n.startswith(question + "_") for n in schema.names[sl])
    with pytest.raises(ValueError, match="unknown feature"):
        schema.index("bar_maybe")


@pytest.mark.parametrize("name", ["sdss", "decals", "hst", "ukidss"])
def test_survey_yaml_uses_real_native_columns(name):
    survey = load_survey(name)
    rows = list(csv.DictReader(open(SHARED / "cross_survey_26_features.csv")))
    assert set(survey.features) == {r["feature"] for r in rows}
    if name == "sdss":
        hart = {r["hart16_answer_prefix"] for r in csv.DictReader(open(SHARED / "gz2_hart16_to_ortho.csv"))}
        assert all(b in hart for bases in survey.features.values() for b in bases)
        assert survey.count_columns("smooth-or-featured_smooth") == ["t01_smooth_or_features_a01_smooth_count"]
        assert survey.id_column == "dr7objid"
    if name == "decals":
        assert survey.count_columns("bar_yes") == ["bar_strong", "bar_weak"]
        assert survey.fraction_columns("smooth-or-featured_smooth") == ["smooth-or-featured_smooth_fraction"]
        assert survey.question_totals["smooth-or-featured"] == ["smooth-or-featured_total-votes"]
    if name == "hst":
        gzh = {r["gzh_answer_prefix"] for r in csv.DictReader(open(SHARED / "gz_hubble_willett17_to_ortho.csv"))}
        assert all(b in gzh for bases in survey.features.values() for b in bases)
    if name == "ukidss":
        assert survey.fraction_columns("how-rounded_cigar-shaped") == ["how-rounded-ukidss_cigar_fraction"]


def test_unknown_survey_and_bad_feature_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown survey 'jwst'.*Known surveys"):
        load_survey("jwst")
    bad = yaml.safe_load((CONFIG_ROOT / "surveys" / "sdss.yaml").read_text())
    bad["features"]["bar_maybe"] = ["t03_bar_a06_bar"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="bar_maybe.*not in the standard26 schema"):
        load_survey(path)
    assert list_surveys() == ["decals", "hst", "sdss", "ukidss"]


def _synthetic_catalog(survey, n=6, seed=0):
    """A catalog with every column the survey maps: counts, fractions, totals in native names."""
    rng = np.random.default_rng(seed)
    data = {survey.id_column: [f"id{i}" for i in range(n)], survey.ra_column: rng.uniform(0, 360, n),
            survey.dec_column: rng.uniform(-10, 10, n)}
    for feature in survey.features:
        for col in survey.count_columns(feature):
            data.setdefault(col, rng.integers(0, 10, n).astype(float))
    for question, total_cols in survey.question_totals.items():
        answered = [c for f in survey.features if f.startswith(question + "_") for c in survey.count_columns(f)]
        total = sum(data[c] for c in dict.fromkeys(answered)) + rng.integers(0, 5, n)
        for col in total_cols:  # GZ2/GZH totals are sums of answer columns; fill only the missing ones
            data.setdefault(col, total / len(total_cols))
    return pd.DataFrame(data)


def test_decals_bar_yes_is_strong_plus_weak():
    survey, schema = load_survey("decals"), load_schema()
    df = pd.DataFrame({"iauname": ["J1"], "ra": [1.0], "dec": [2.0]})
    for feature in survey.features:
        for base in survey.features[feature]:
            df[base] = 1.0
            df[base + "_fraction"] = 0.1
    for cols in survey.question_totals.values():
        df[cols[0]] = 10.0
    df["bar_strong"], df["bar_weak"] = 3.0, 4.0
    df["bar_strong_fraction"], df["bar_weak_fraction"] = 0.3, 0.4
    labels = map_labels(df, survey, schema)
    assert labels["bar_yes"].iloc[0] == pytest.approx(0.7)
    assert labels[votes_column("bar_yes")].iloc[0] == 7.0
    assert labels[total_votes_column("bar")].iloc[0] == 10.0


def test_absent_feature_is_nan_and_counts_give_fractions(tmp_path):
    survey = load_survey("sdss", overrides=None)
    schema = load_schema()
    doc = yaml.safe_load((CONFIG_ROOT / "surveys" / "sdss.yaml").read_text())
    del doc["features"]["bar_yes"]  # a survey that never asked this answer
    path = tmp_path / "partial.yaml"
    path.write_text(yaml.safe_dump(doc))
    partial = load_survey(path)
    df = _synthetic_catalog(survey)
    df.loc[0, survey.question_totals["how-rounded"]] = 0.0  # nobody answered how-rounded for row 0
    labels = map_labels(df, partial, schema)
    assert labels["bar_yes"].isna().all() and labels[votes_column("bar_yes")].isna().all()
    assert labels["bar_no"].notna().all()
    total = df[survey.question_totals["bar"]].sum(axis=1)
    expected = df["t03_bar_a07_no_bar_count"] / total
    np.testing.assert_allclose(labels["bar_no"].to_numpy(), expected.to_numpy(dtype=np.float32), rtol=1e-6)
    assert np.isnan(labels["how-rounded_round"].iloc[0]) and labels[votes_column("how-rounded_round")].iloc[0] >= 0


def test_row_checks_reject_bad_rows_with_reasons():
    survey, schema = load_survey("ukidss"), load_schema()
    df = _synthetic_catalog(survey, n=8)
    df.loc[2, "smooth-or-featured-ukidss_smooth"] = np.nan
    df.loc[3, "bar-ukidss_yes"] = -4
    df.loc[5, "id_str"] = "id1"
    df.loc[6, "ra"] = np.nan
    labels, rejects = load_labels(df, survey, schema, {"train": 1.0})
    by_row = {r.row: r for r in rejects}
    assert by_row[2].reason == "nan-votes" and "smooth-or-featured-ukidss_smooth" in by_row[2].detail
    assert by_row[3].reason == "negative-votes"
    assert by_row[5].reason == "duplicate-id" and "row 1" in by_row[5].detail
    assert by_row[6].reason == "bad-coordinates"
    assert list(labels["row"]) == [0, 1, 4, 7]
    assert all(c.startswith("native:") for c in labels.columns if c.startswith("native:"))
    assert "native:bar-ukidss_yes" in labels.columns


def test_missing_column_fails_naming_column_and_yaml():
    survey = load_survey("sdss")
    df = _synthetic_catalog(survey).drop(columns=["t03_bar_a06_bar_count"])
    with pytest.raises(ValueError, match=r"t03_bar_a06_bar_count.*configs/surveys/sdss.yaml"):
        check_columns(df.columns, survey, "gz2.csv")


def test_catalog_formats_round_trip(tmp_path):
    from astropy.table import Table
    df = pd.DataFrame({"dr7objid": [587722981741363294, 587722981741363295], "ra": [1.5, 2.5], "dec": [0.1, 0.2]})
    df.to_csv(tmp_path / "c.csv", index=False)
    df.to_parquet(tmp_path / "c.parquet")
    Table.from_pandas(df).write(tmp_path / "c.fits")
    for name in ("c.csv", "c.parquet", "c.fits"):
        back = read_catalog(tmp_path / name)
        assert list(back["dr7objid"]) == list(df["dr7objid"]), name
    with pytest.raises(ValueError, match="catalog not found"):
        read_catalog(tmp_path / "nope.csv")


def test_keys_are_dali_safe_and_splits_stable():
    assert make_key("decals", "J112953.88-000427.4") == "decals_J112953p88-000427p4"
    assert "." not in make_key("x", "a.b/c d") and "/" not in make_key("x", "a.b/c d")
    splits = parse_splits("train=0.8,val=0.1,test=0.1")
    ids = [str(i) for i in range(5000)]
    assigned = [split_of(i, splits) for i in ids]
    assert assigned == [split_of(i, splits) for i in ids]  # stable
    share = pd.Series(assigned).value_counts(normalize=True)
    assert abs(share["train"] - 0.8) < 0.03 and abs(share["test"] - 0.1) < 0.03
    with pytest.raises(ValueError, match="sum to 1"):
        parse_splits("train=0.8,val=0.3")
