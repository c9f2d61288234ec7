"""eval agree: a perfect model agrees with itself perfectly, a shuffled one not at all; volunteer r equals scipy's on
the same pairs; the report shows the section."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from eval import agree, match, report
from sharding.schema import load_schema, total_votes_column

SCHEMA = load_schema()
NUM_SHARED = 300
MISSING_IN_DECALS = "bar_yes"  # a feature one survey does not ask


def _survey(survey: str, truth: np.ndarray, ra: np.ndarray, dec: np.ndarray, rng) -> pd.DataFrame:
    """labels.parquet rows: vote fractions drawn from the true fractions, some questions with < 2 votes or none."""
    n = len(ra)
    frame = pd.DataFrame({"key": [f"{survey}_{i}" for i in range(n)], "object_id": [str(i) for i in range(n)],
                          "survey": survey, "ra": ra, "dec": dec, "split": "train", "shard": f"{survey}-train-000000"})
    for question in SCHEMA.questions:
        totals = rng.integers(0, 40, n).astype(np.float64)  # 0 and 1 votes: too few, not counted
        frame[total_votes_column(question.name)] = totals
        for feature in question.features:
            j = SCHEMA.names.index(feature.name)
            with np.errstate(invalid="ignore", divide="ignore"):
                fraction = rng.binomial(totals.astype(int), truth[:, j]) / totals
            fraction[rng.random(n) < 0.05] = np.nan
            frame[feature.name] = fraction.astype(np.float32)
    return frame


def _write(root, survey, frame):
    (root / survey).mkdir()
    frame.to_parquet(root / survey / "labels.parquet")
    questions = {q.name: [f.name for f in q.features] for q in SCHEMA.questions}
    (root / survey / "manifest.json").write_text(json.dumps({"labels": "labels.parquet",
                                                             "feature_schema": {"questions": questions}}))


@pytest.fixture
def setup(tmp_path):
    """Shards of sdss, decals (without one feature) and ukidss sharing NUM_SHARED galaxies; the true fractions."""
    rng = np.random.default_rng(3)
    truth = rng.beta(2, 2, (NUM_SHARED + 40, len(SCHEMA.names)))
    ra, dec = rng.uniform(0, 360, NUM_SHARED + 40), rng.uniform(-70, 70, NUM_SHARED + 40)
    root = tmp_path / "shards"
    root.mkdir()
    sdss = _survey("sdss", truth[:NUM_SHARED + 20], ra[:NUM_SHARED + 20], dec[:NUM_SHARED + 20], rng)
    # decals: the shared galaxies in another order, 0.2" away, plus 20 of its own
    order = np.r_[rng.permutation(NUM_SHARED), np.arange(NUM_SHARED + 20, NUM_SHARED + 40)]
    decals = _survey("decals", truth[order], ra[order] + 0.2 / 3600 / np.cos(np.radians(dec[order])), dec[order], rng)
    _write(root, "sdss", sdss)
    _write(root, "decals", decals.drop(columns=[MISSING_IN_DECALS]))
    _write(root, "ukidss", _survey("ukidss", truth[:50], ra[:50], dec[:50], rng))
    pairs = tmp_path / "pairs.parquet"
    assert match.main(["--shards", str(root), "--surveys", "sdss,decals,ukidss", "--out", str(pairs)]) == 0
    return root, pairs, truth, order


def _predictions(path, survey, rows, values):
    frame = pd.DataFrame(values.astype(np.float32), columns=SCHEMA.names)
    frame.insert(0, "key", [f"{survey}_{i}" for i in rows])
    frame.insert(1, "survey", survey)
    frame.to_parquet(path)
    return path


def test_perfect_model_agrees_and_shuffled_model_does_not(setup, tmp_path, capsys):
    root, pairs, truth, order = setup
    sdss = _predictions(tmp_path / "sdss.parquet", "sdss", range(NUM_SHARED + 20), truth[:NUM_SHARED + 20])
    decals = _predictions(tmp_path / "decals.parquet", "decals", range(len(order)), truth[order])
    out = tmp_path / "agree.json"
    assert agree.main(["--pairs", str(pairs), "--predictions", str(sdss), str(decals), "--out", str(out),
                       "--plot", str(tmp_path / "agree.png"), "--bootstrap", "200"]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "agree" and report.kind_of(result) == "agree"
    assert set(result["survey_pairs"]) == {"sdss-decals"}
    assert "no predictions for ukidss" in result["skipped_survey_pairs"]["sdss-ukidss"]
    res = result["survey_pairs"]["sdss-decals"]
    assert res["n_pairs"] == NUM_SHARED == res["n_predicted"]
    assert res["skipped"] == {MISSING_IN_DECALS: "no label column in decals"}
    assert len(res["features"]) == len(SCHEMA.names) - 1
    for row in res["features"].values():
        assert row["model"]["r"] == pytest.approx(1.0, abs=1e-9)
        assert row["model_all_pairs"]["n"] == NUM_SHARED
        assert 0.3 * NUM_SHARED < row["model"]["n"] < NUM_SHARED  # only pairs where both surveys have the answer
        assert row["volunteers"]["r_ci"][0] <= row["volunteers"]["r"] <= row["volunteers"]["r_ci"][1]
    assert res["mean"]["model"]["r"] == pytest.approx(1.0)
    assert res["mean"]["difference"]["diff"] > 0  # finite votes: volunteers agree less than the truth does
    assert (tmp_path / "agree.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "skipped bar_yes: no label column in decals" in capsys.readouterr().out

    shuffled = _predictions(tmp_path / "shuffled.parquet", "decals", range(len(order)),
                            truth[order][np.random.default_rng(0).permutation(len(order))])
    result = agree.agree(pairs, [sdss, shuffled], bootstrap=200, log=lambda _: None)
    rows = result["survey_pairs"]["sdss-decals"]["features"].values()
    for row in rows:
        assert abs(row["model"]["r"]) < 4.5 / np.sqrt(row["model"]["n"])  # r of unrelated values: ~N(0, 1/n)
    n_all = sum(row["model"]["n"] for row in rows)  # the features' r are independent: their mean is ~N(0, 1/sum n)
    assert abs(result["survey_pairs"]["sdss-decals"]["mean"]["model"]["r"]) < 4.5 / np.sqrt(n_all)


def test_volunteer_r_is_scipys_on_the_pairs_where_both_surveys_answer(setup, tmp_path):
    root, pairs, truth, order = setup
    preds = _predictions(tmp_path / "both.parquet", "sdss", range(NUM_SHARED + 20), truth[:NUM_SHARED + 20])
    extra = _predictions(tmp_path / "decals.parquet", "decals", range(len(order)), truth[order] * 0.5)
    result = agree.agree(pairs, [preds, extra], shards=root, bootstrap=0, log=lambda _: None)
    res = result["survey_pairs"]["sdss-decals"]
    table = pd.read_parquet(pairs).query("survey_a == 'sdss' and survey_b == 'decals'")
    a = pd.read_parquet(root / "sdss" / "labels.parquet").set_index("key").loc[table["key_a"]]
    b = pd.read_parquet(root / "decals" / "labels.parquet").set_index("key").loc[table["key_b"]]
    for question in SCHEMA.questions:
        for feature in question.features:
            if feature.name == MISSING_IN_DECALS:
                continue
            total = total_votes_column(question.name)
            ok = (a[feature.name].notna().to_numpy() & b[feature.name].notna().to_numpy()
                  & (a[total].to_numpy() >= 2) & (b[total].to_numpy() >= 2))
            row = res["features"][feature.name]
            assert row["volunteers"]["n"] == ok.sum() == row["model"]["n"]
            x, y = a[feature.name].to_numpy(np.float64), b[feature.name].to_numpy(np.float64)
            expected = stats.pearsonr(x[ok], y[ok])
            assert row["volunteers"]["r"] == pytest.approx(expected[0], abs=1e-10)
            assert np.isnan(row["volunteers"]["r_ci"][0])  # --bootstrap 0: no interval


def test_report_renders_the_agreement_section(setup, tmp_path):
    root, pairs, truth, order = setup
    sdss = _predictions(tmp_path / "sdss.parquet", "sdss", range(NUM_SHARED + 20), truth[:NUM_SHARED + 20])
    decals = _predictions(tmp_path / "decals.parquet", "decals", range(len(order)), truth[order])
    out = tmp_path / "agree.json"
    assert agree.main(["--pairs", str(pairs), "--predictions", str(sdss), str(decals), "--out", str(out),
                       "--bootstrap", "50"]) == 0
    assert report.main([str(out), "--out", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "Cross-survey agreement" in page and "sdss-decals" in page and "skipped bar_yes" in page
    assert re.findall(r'<img alt="([^"]+)"', page) == ["cross-survey agreement"]


def test_errors_name_the_problem(setup, tmp_path, capsys):
    root, pairs, truth, order = setup
    sdss = _predictions(tmp_path / "sdss.parquet", "sdss", range(10), truth[:10])
    assert agree.main(["--pairs", str(pairs), "--predictions", str(sdss)]) == 2
    assert "no survey pair" in capsys.readouterr().err
    assert agree.main(["--pairs", str(pairs), "--predictions", str(sdss), str(sdss)]) == 2
    assert "predicted more than once" in capsys.readouterr().err
    assert agree.main(["--pairs", str(tmp_path / "none.parquet"), "--predictions", str(sdss)]) == 2
    assert "python -m eval match" in capsys.readouterr().err
