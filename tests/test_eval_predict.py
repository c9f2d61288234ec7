"""eval predict: named columns with provenance, MC dropout, embeddings, resume, catalog input, DALI path, mismatches."""

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from eval import predict, score
from eval.source import check_shards, open_source
from eval.store import PartStore, open_embeddings, read_metadata
from sharding.schema import load_schema


def questions_of(names):
    return {q.name: [f.name for f in q.features] for q in load_schema().questions if q.features[0].name in names}


def _predict(export, root, out, *extra):
    return predict.main(["--model", str(export), "--shards", str(root), "--out", str(out), "--batch-size", "8",
                         "--no-progress", *extra])


def test_predict_names_columns_by_feature_and_carries_provenance(eval_shards, eval_exports, tmp_path):
    _, root = eval_shards
    out, emb = tmp_path / "p.parquet", tmp_path / "e.zarr"
    assert _predict(eval_exports["mixed"], root, out, "--surveys", "sdss,ukidss", "--split", "all",
                    "--embeddings", str(emb), "--mc-samples", "3") == 0
    frame = pd.read_parquet(out)
    manifests = {s: json.loads((root / s / "manifest.json").read_text()) for s in ("sdss", "ukidss")}
    assert len(frame) == sum(m["num_samples"] for m in manifests.values())
    names = load_schema().names
    assert list(frame.columns[:4]) == ["key", "survey", "object_id", "split"]
    assert all(frame[n].dtype == np.float32 for n in names)
    assert set(frame["split"]) == {"train", "val", "test"}
    assert (frame[[f"{n}__std" for n in names]] > 0).to_numpy().mean() > 0.9  # dropout spread exists
    other = read_metadata(out)["other_questions"]
    assert other and all(f"{q}__other_logit" in frame for q in other)
    # The raw logits give back the fractions: a softmax over each question's named logits (and its other logit).
    for question, features in questions_of(names).items():
        logits = frame[[f"{f}__logit" for f in features] + ([f"{question}__other_logit"] if question in other else [])]
        expected = np.exp(logits.to_numpy(np.float64))
        expected = (expected / expected.sum(axis=1, keepdims=True))[:, :len(features)]
        np.testing.assert_allclose(frame[features].to_numpy(np.float64), expected, atol=1e-5, err_msg=question)
    meta = read_metadata(out)
    assert meta["model"]["mix"] == {"sdss": 0.33, "decals": 0.33, "hst": 0.34}
    assert meta["model"]["input"]["image_size"] == 32 and meta["names"] == names
    assert meta["model"]["surveys"]["sdss"]["manifest_sha256"]  # the training shards are pinned
    vectors, keys, attrs = open_embeddings(emb)
    assert keys == frame["key"].tolist() and vectors.shape == (len(frame), 128)
    assert attrs["runs"][0]["model"]["weights_sha256"] == meta["model"]["weights_sha256"]
    # Fractions of a complete question sum to 1, as softmax outputs must.
    assert np.allclose(frame[[n for n in names if n.startswith("smooth-or-featured")]].sum(axis=1), 1, atol=1e-5)


def test_mc_dropout_leaves_the_point_predictions_unchanged(eval_shards, eval_exports, tmp_path):
    _, root = eval_shards
    _predict(eval_exports["mixed"], root, tmp_path / "a.parquet", "--surveys", "hst")
    _predict(eval_exports["mixed"], root, tmp_path / "b.parquet", "--surveys", "hst", "--mc-samples", "4")
    a, b = pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet")
    names = load_schema().names
    assert np.array_equal(a[names].to_numpy(), b[names].to_numpy())


def test_a_killed_prediction_resumes_to_the_same_file(eval_shards, eval_exports, tmp_path, monkeypatch):
    _, root = eval_shards
    args = ["--surveys", "sdss,decals", "--split", "all", "--rows-per-part", "16", "--mc-samples", "2"]
    _predict(eval_exports["mixed"], root, tmp_path / "whole.parquet", *args, "--embeddings", str(tmp_path / "w.zarr"))

    original, written = PartStore.write, []

    def dies_after_three(self, *a, **k):
        if len(written) == 3:
            raise KeyboardInterrupt  # what a kill looks like from inside: the fourth part never lands
        written.append(a[:2])
        return original(self, *a, **k)

    monkeypatch.setattr(PartStore, "write", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        _predict(eval_exports["mixed"], root, tmp_path / "resumed.parquet", *args,
                 "--embeddings", str(tmp_path / "r.zarr"))
    monkeypatch.setattr(PartStore, "write", original)
    partial = tmp_path / "resumed.parquet.partial"
    assert len(list(partial.glob("part-*.parquet"))) == 3
    (partial / "part-000-000009.parquet.tmp").write_bytes(b"torn")  # a write cut short by the kill
    assert _predict(eval_exports["mixed"], root, tmp_path / "resumed.parquet", *args,
                    "--embeddings", str(tmp_path / "r.zarr")) == 0
    assert (tmp_path / "resumed.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    assert not partial.exists()
    whole, resumed = open_embeddings(tmp_path / "w.zarr"), open_embeddings(tmp_path / "r.zarr")
    assert whole[1] == resumed[1] and np.array_equal(whole[0][:], resumed[0][:])
    # Other arguments against the same unfinished output are refused, not mixed in.
    _predict(eval_exports["mixed"], root, tmp_path / "x.parquet", "--surveys", "sdss", "--rows-per-part", "8")
    assert _predict(eval_exports["mixed"], root, tmp_path / "x.parquet", "--surveys", "sdss") == 2


def test_predict_from_a_catalog_equals_predict_from_its_shards(eval_shards, eval_exports, tmp_path):
    raw, root = eval_shards
    _predict(eval_exports["mixed"], root, tmp_path / "shards.parquet", "--surveys", "ukidss", "--split", "all")
    assert predict.main(["--model", str(eval_exports["mixed"]), "--catalog", str(raw / "ukidss" / "gz_ukidss.csv"),
                         "--images", str(raw / "ukidss" / "images"), "--survey", "ukidss", "--render-size", "64",
                         "--out", str(tmp_path / "cat.parquet"), "--batch-size", "8", "--no-progress"]) == 0
    shards = pd.read_parquet(tmp_path / "shards.parquet").set_index("key")
    catalog = pd.read_parquet(tmp_path / "cat.parquet").set_index("key")
    # The build also rejects rows for their votes; the catalog path scores any row whose image renders.
    assert set(shards.index) <= set(catalog.index)
    names = load_schema().names
    np.testing.assert_allclose(catalog.loc[shards.index, names].to_numpy(), shards[names].to_numpy(), atol=1e-6)
    assert (catalog.loc[shards.index, "split"] == shards["split"]).all()
    rejects = pd.read_parquet(tmp_path / "cat.rejects.parquet")
    built = pd.read_parquet(root / "ukidss" / "rejects.parquet")
    image_rejects = set(built.loc[built["stage"] == "image", "object_id"])
    assert image_rejects and image_rejects <= set(rejects["object_id"])  # nothing unreadable is lost
    assert set(rejects["reason"]) >= set(built.loc[built["stage"] == "image", "reason"])


def test_dali_and_torch_paths_give_the_same_predictions(eval_shards, eval_exports, tmp_path):
    pytest.importorskip("nvidia.dali")
    _, root = eval_shards
    for backend in ("torch", "dali"):
        _predict(eval_exports["sdss_only"], root, tmp_path / f"{backend}.parquet", "--surveys", "decals",
                 "--backend", backend)
    names = load_schema().names
    torch_p, dali_p = (pd.read_parquet(tmp_path / f"{b}.parquet") for b in ("torch", "dali"))
    assert torch_p["key"].tolist() == dali_p["key"].tolist()
    np.testing.assert_allclose(dali_p[names].to_numpy(), torch_p[names].to_numpy(), atol=5e-3)


def test_mismatched_model_and_shards_give_clear_errors(eval_shards, eval_exports, tmp_path, capsys):
    _, root = eval_shards
    copy = tmp_path / "shards"
    shutil.copytree(root / "sdss", copy / "sdss")
    manifest = json.loads((copy / "sdss" / "manifest.json").read_text())
    manifest["feature_schema"]["version"] = 99
    (copy / "sdss" / "manifest.json").write_text(json.dumps(manifest))
    assert _predict(eval_exports["mixed"], copy, tmp_path / "p.parquet", "--surveys", "sdss") == 2
    assert "feature schema standard26 v99" in capsys.readouterr().err
    assert _predict(eval_exports["mixed"], root, tmp_path / "q.parquet", "--surveys", "sdss", "--image-size", "64") == 2
    assert "trained on 32 px inputs" in capsys.readouterr().err
    # A model fed from 256 px shards, asked to read 64 px shards at 128 px: upsampling is refused.
    export = tmp_path / "big"
    shutil.copytree(eval_exports["mixed"], export)
    meta = json.loads((export / "export.json").read_text())
    meta["metadata"]["input"]["image_size"] = 128
    for info in meta["metadata"]["surveys"].values():
        info["image_size"] = 256
    (export / "export.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="rendered at 64 px but the model takes 128 px"):
        source = open_source(export)
        check_shards(source, root / "sdss", source.input_spec())
    assert predict.main(["--model", str(tmp_path / "nowhere"), "--shards", str(root), "--surveys", "sdss",
                         "--out", str(tmp_path / "n.parquet")]) == 2
    assert "neither a model export" in capsys.readouterr().err


def _independent_nll(frame: pd.DataFrame, labels: pd.DataFrame, question: str, features: list[str]) -> float:
    """Mean Dirichlet-multinomial NLL from scipy, with training's clamped concentrations exp(clip(logit, -10, 10))."""
    alpha = np.exp(np.clip(frame[[f"{f}__logit" for f in features]].to_numpy(np.float64), -10, 10))
    counts = labels.loc[frame.index, [f"{f}_votes" for f in features]].to_numpy(np.float64)
    totals = labels.loc[frame.index, f"{question}_total-votes"].to_numpy(np.float64)
    values = [-stats.dirichlet_multinomial.logpmf(c, a, int(c.sum()))
              for c, a, t in zip(counts, alpha, totals) if t > 0]
    return float(np.mean(values))


def test_metrics_join_by_key_and_match_scipy(eval_shards, eval_exports, tmp_path, capsys):
    _, root = eval_shards
    _predict(eval_exports["mixed"], root, tmp_path / "p.parquet", "--surveys", "sdss,hst", "--split", "all")
    assert score.main([str(tmp_path / "p.parquet"), "--bootstrap", "50", "--json", str(tmp_path / "m.json")]) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    frame = pd.read_parquet(tmp_path / "p.parquet")
    labels = pd.read_parquet(root / "sdss" / "labels.parquet").set_index("key")
    sdss = frame[frame["survey"] == "sdss"].set_index("key")
    question_of = {f.name: q.name for q in load_schema().questions for f in q.features}

    def few_votes(feature):
        totals = labels.loc[sdss.index, f"{question_of[feature]}_total-votes"]
        return labels.loc[sdss.index, feature].notna() & (totals < 2)
    # a feature on which the rule "a label counts with at least 2 votes" matters for these galaxies
    name = next(f for f in load_schema().names if few_votes(f).any() and (~few_votes(f)).sum() > 5)
    totals = labels.loc[sdss.index, f"{question_of[name]}_total-votes"]
    ok = labels.loc[sdss.index, name].notna() & (totals >= 2)
    expected = stats.pearsonr(sdss.loc[ok, name], labels.loc[sdss.index[ok], name])[0]
    row = result["surveys"]["sdss"]["features"][name]
    assert row["r"] == pytest.approx(expected, abs=1e-6) and row["n"] == ok.sum()
    assert row["r_ci"][0] <= row["r"] <= row["r_ci"][1]
    # The noise ceiling on the same galaxies: corr(truth, labels)^2 = 1 - mean binomial noise / label variance.
    f, n = labels.loc[sdss.index[ok], name].to_numpy(), totals[ok].to_numpy()
    assert row["ceiling_r"] == pytest.approx(np.sqrt(1 - np.mean(f * (1 - f) / (n - 1)) / f.var()), abs=1e-9)
    assert {"n", "r", "r_ci", "spearman", "r2", "mae", "mse", "ceiling_r"} <= set(row)
    mean = result["surveys"]["sdss"]["mean"]
    assert {"r", "r_ci", "r2", "mae", "ceiling_r"} <= set(mean) and result["surveys"]["sdss"]["n"] == len(sdss)
    # A Dirichlet model's NLL is scipy's on the clamped concentrations of the logits predict wrote.
    hst = frame[frame["survey"] == "hst"].set_index("key")
    hst_labels = pd.read_parquet(root / "hst" / "labels.parquet").set_index("key")
    question = result["surveys"]["hst"]["questions"]["smooth-or-featured"]
    features = questions_of(load_schema().names)["smooth-or-featured"]
    assert question["nll"] == pytest.approx(_independent_nll(hst, hst_labels, "smooth-or-featured", features), rel=1e-4)
    assert 0 <= question["accuracy"] <= 1 and "nll_absent" not in result["surveys"]["hst"]
    capsys.readouterr()
    assert score.main([str(tmp_path / "p.parquet"), "--bootstrap", "0", "--json", "-"]) == 0
    assert set(json.loads(capsys.readouterr().out)["surveys"]) == {"sdss", "hst"}
    # Keys that the labels do not hold are counted, not silently dropped.
    stray = frame.copy()
    stray.loc[:4, "key"] = [f"sdss_unknown{i}" for i in range(5)]
    stray[stray["survey"] == "sdss"].to_parquet(tmp_path / "stray.parquet", index=False)
    capsys.readouterr()
    assert score.main([str(tmp_path / "stray.parquet"), "--shards", str(root), "--bootstrap", "0"]) == 0
    assert "5 of" in capsys.readouterr().out


def test_embeddings_append_across_predictions_and_refuse_duplicates(eval_shards, eval_exports, tmp_path, capsys):
    _, root = eval_shards
    store = str(tmp_path / "e.zarr")
    for survey in ("sdss", "hst"):
        assert _predict(eval_exports["mixed"], root, tmp_path / f"{survey}.parquet", "--surveys", survey,
                        "--embeddings", store, "--embeddings-dtype", "float32") == 0
    vectors, keys, attrs = open_embeddings(store)
    expected = [k for s in ("sdss", "hst") for k in pd.read_parquet(tmp_path / f"{s}.parquet")["key"]]
    assert keys == expected and vectors.dtype == np.float32 and len(attrs["runs"]) == 2
    assert _predict(eval_exports["mixed"], root, tmp_path / "again.parquet", "--surveys", "sdss",
                    "--embeddings", store, "--embeddings-dtype", "float32") == 2
    assert "already holds" in capsys.readouterr().err
    assert open_embeddings(store)[1] == expected  # nothing was added by the refused run


def test_no_nll_for_a_model_not_trained_with_the_dirichlet_loss(eval_shards, tmp_path, capsys):
    from eval_cases import make_export

    from eval import report

    _, root = eval_shards
    mse = make_export(tmp_path / "mse", root, "sdss=1.0", seed=3, loss="mse")
    assert _predict(mse, root, tmp_path / "p.parquet", "--surveys", "hst", "--split", "all") == 0
    capsys.readouterr()
    assert score.main([str(tmp_path / "p.parquet"), "--bootstrap", "0", "--json", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "m.json").read_text())
    hst = result["surveys"]["hst"]
    assert "nll" not in hst and all("nll" not in q for q in hst["questions"].values())
    assert "trained with the mse loss" in hst["nll_absent"] and "mse loss" in result["nll_absent"]
    assert "trained with the mse loss" in printed and not re.search(r"Dirichlet NLL [-\d]", printed)
    assert report.main([str(tmp_path / "m.json"), "--out", str(tmp_path / "r.html"), "--worst", "0"]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "Dirichlet NLL</th>" not in page and "trained with the mse loss" in page
    # An export that does not record its loss: unknown, so no NLL either, and the reason says so.
    meta = json.loads((mse / "export.json").read_text())
    del meta["metadata"]["loss"]
    (mse / "export.json").write_text(json.dumps(meta))
    assert _predict(mse, root, tmp_path / "q.parquet", "--surveys", "hst") == 0
    unknown = score.score(tmp_path / "q.parquet", bootstrap=0, log=lambda *_: None)
    assert "nll" not in unknown["surveys"]["hst"] and "does not record the loss" in unknown["nll_absent"]


def test_overwrite_starts_a_new_embedding_store(eval_shards, eval_exports, tmp_path):
    _, root = eval_shards
    store = str(tmp_path / "e.zarr")
    assert _predict(eval_exports["mixed"], root, tmp_path / "a.parquet", "--surveys", "sdss",
                    "--embeddings", store) == 0
    assert _predict(eval_exports["mixed"], root, tmp_path / "a.parquet", "--surveys", "hst", "--embeddings", store,
                    "--overwrite") == 0
    vectors, keys, attrs = open_embeddings(store)
    assert keys == pd.read_parquet(tmp_path / "a.parquet")["key"].tolist()  # hst only: the sdss rows are gone
    assert len(attrs["runs"]) == 1 and vectors.shape[0] == len(keys)


def test_mc_passes_of_a_galaxy_do_not_depend_on_its_batch(eval_exports):
    """With per-galaxy seeds, a galaxy's MC-dropout passes are the same alone, in another order or in another batch;
    another seed draws other passes."""
    import torch

    from eval.infer import infer, key_seeds
    from eval.source import load_model, open_source

    source = open_source(eval_exports["mixed"])
    model, size = load_model(source), source.input_spec().image_size
    images = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(0))
    seeds = key_seeds(7, [f"g{i}" for i in range(6)])
    whole = infer(model, images, 4, keep_samples=True, row_seeds=seeds)
    part = infer(model, images[[4, 1]], 4, keep_samples=True, row_seeds=[seeds[4], seeds[1]])
    np.testing.assert_allclose(part.samples, whole.samples[:, [4, 1]], atol=1e-6)
    np.testing.assert_allclose(part.std, whole.std[[4, 1]], atol=1e-6)
    other = infer(model, images[[4]], 4, keep_samples=True, row_seeds=key_seeds(8, ["g4"]))
    assert not np.allclose(other.samples, whole.samples[:, [4]])
    assert (whole.std > 0).all()
