"""eval compare (by feature name), ood, robustness, neighbors and the HTML report in a real browser."""

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from eval import compare, neighbors, ood, predict, report, robustness, score
from eval.store import EmbeddingStore
from loaders.shards import load_survey_shards
from sharding.schema import load_schema

STANDARD = load_schema().names


@pytest.fixture(scope="module")
def preds26(eval_shards, eval_exports, tmp_path_factory):
    path = tmp_path_factory.mktemp("preds") / "p26.parquet"
    assert predict.main(["--model", str(eval_exports["mixed"]), "--shards", str(eval_shards[1]), "--surveys",
                         "ukidss", "--split", "all", "--out", str(path), "--batch-size", "16", "--no-progress"]) == 0
    return path


def _feature_r(path: str, root, survey: str, features: list[str], keys=None) -> dict[str, float]:
    """Pearson r per feature from a prediction file and labels.parquet, on labels whose question got >= 2 votes."""
    pred = pd.read_parquet(path).set_index("key")
    pred = pred if keys is None else pred.loc[sorted(set(pred.index) & set(keys))]
    labels = pd.read_parquet(root / survey / "labels.parquet").set_index("key").loc[pred.index]
    question_of = {f.name: q.name for q in load_schema().questions for f in q.features}
    out = {}
    for name in features:
        ok = labels[name].notna() & (labels[f"{question_of[name]}_total-votes"] >= 2)
        x, y = pred.loc[ok, name].to_numpy(np.float64), labels.loc[ok, name].to_numpy(np.float64)
        out[name] = stats.pearsonr(x, y)[0] if ok.sum() >= 3 and x.std() > 0 and y.std() > 0 else np.nan
    return out


def _variant(base: pd.DataFrame, keep: list[str], extra: list[str], path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    frame = base[["key", "survey", "object_id", "split"]].copy()
    for name in keep:
        frame[name] = np.clip(base[name] + rng.normal(0, 0.05 * seed, len(base)), 0, 1).astype(np.float32)
    for name in extra:
        frame[name] = rng.random(len(base)).astype(np.float32)
    frame.to_parquet(path, index=False)
    return str(path)


def test_compare_matches_features_by_name_whatever_the_widths(preds26, eval_shards, tmp_path, capsys):
    base = pd.read_parquet(preds26)
    shared_unlabelled = ["merging_yes"]  # predicted by every input, but no survey labels it
    inputs = [_variant(base, STANDARD, [f"gz2-only_{i}" for i in range(47)] + shared_unlabelled, tmp_path / "m74.parquet", 1),
              _variant(base, STANDARD[::-1], [f"extra_{i}" for i in range(25)] + shared_unlabelled, tmp_path / "m52.parquet", 2),
              _variant(base, STANDARD[:25], shared_unlabelled, tmp_path / "m26.parquet", 3),
              _variant(base, STANDARD[:13], shared_unlabelled, tmp_path / "m14.parquet", 4)]
    assert [len(pd.read_parquet(p).columns) - 4 for p in inputs] == [74, 52, 26, 14]
    assert compare.main([*inputs, "--shards", str(eval_shards[1]), "--bootstrap", "100",
                         "--json", str(tmp_path / "c.json")]) == 0
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["features"] == STANDARD[:13]  # the names all four predict, in the first input's order
    reasons = result["dropped_reasons"]
    assert reasons["m74"]["merging_yes"] == "not a label column"
    assert reasons["m74"]["gz2-only_0"] == "not predicted by m52, m26, m14"
    assert reasons["m52"][STANDARD[20]] == "not predicted by m14"
    assert len(result["dropped"]["m74"]) == 74 - 13 and result["dropped"]["m14"] == ["merging_yes"]
    assert len(result["pairs"]) == 6 and result["n"] == len(base)
    # The first model's r on a shared feature is its r on that feature alone, by name, whatever the column order.
    alone = score.score(inputs[1], eval_shards[1], bootstrap=0, log=lambda *_: None)
    feature = STANDARD[5]
    assert result["models"]["m52"]["features"][feature]["r"] == pytest.approx(
        alone["surveys"]["ukidss"]["features"][feature]["r"], abs=1e-9)
    noisier = next(p for p in result["pairs"] if (p["a"], p["b"]) == ("m74", "m14"))
    assert noisier["mae"]["diff"] < 0  # less noise added to m74 than to m14
    disjoint = _variant(base, [], ["something_else"], tmp_path / "none.parquet", 5)
    capsys.readouterr()
    assert compare.main([inputs[0], disjoint, "--shards", str(eval_shards[1])]) == 2
    assert "no feature in common" in capsys.readouterr().err


def test_compare_predicts_a_retrained_model_and_another_split_anew(eval_shards, eval_exports, tmp_path):
    _, root = eval_shards
    model = tmp_path / "run" / "export"
    shutil.copytree(eval_exports["mixed"], model)
    other = str(eval_exports["sdss_only"])

    def compared(split: str) -> dict:
        assert compare.main([str(model), other, "--shards", str(root), "--survey", "hst", "--split", split,
                             "--work", str(tmp_path / "work"), "--bootstrap", "0", "--json",
                             str(tmp_path / "c.json")]) == 0
        return json.loads((tmp_path / "c.json").read_text())

    first = compared("all")
    assert first["n"] == sum(load_survey_shards(root / "hst", s).num_samples for s in ("train", "val", "test"))
    assert compared("test")["n"] == load_survey_shards(root / "hst", "test").num_samples  # not the cached "all"
    # Retrained in place (other weights, same folder): predicted again, and the comparison names the new weights.
    shutil.copy(eval_exports["sdss_only"] / "model.safetensors", model / "model.safetensors")
    again = compared("all")
    weights = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    assert again["models"]["run"]["model"]["weights_sha256"] == weights
    assert first["models"]["run"]["model"]["weights_sha256"] != weights
    assert again["models"]["run"]["mean"]["mae"] == pytest.approx(again["models"]["sdss_only"]["mean"]["mae"])


def _truth_twins(raw, root, held: str, surveys: list[str]) -> set[str]:
    """Held-out keys whose galaxy (the mock's sky_id, not a positional match) is in a training survey's train split."""
    def keyed(survey):
        truth = pd.read_parquet(raw / survey / "truth.parquet")
        labels = pd.read_parquet(root / survey / "labels.parquet", columns=["key", "object_id", "split"])
        truth["object_id"] = truth["catalog_id"].astype(str).str.strip()
        return truth.merge(labels, on="object_id")
    trained = set().union(*(set(keyed(s).query("split == 'train'")["sky_id"]) for s in surveys))
    held_frame = keyed(held)
    return set(held_frame.loc[held_frame["sky_id"].isin(trained), "key"])


def test_ood_study_table_gain_plot_and_held_out_check(eval_shards, eval_exports, tmp_path, capsys):
    raw, root = eval_shards
    config = tmp_path / "study.yaml"
    config.write_text(f"runs: {{sdss_only: {eval_exports['sdss_only']}, mixed: {eval_exports['mixed']}}}\n"
                      f"held_out: ukidss\nshards: {root}\nout: {tmp_path / 'ood'}\nbootstrap: 100\nbatch_size: 16\n")
    assert ood.main(["--config", str(config), "--no-progress"]) == 0
    result = json.loads((tmp_path / "ood" / "ood.json").read_text())
    held = json.loads((root / "ukidss" / "manifest.json").read_text())["num_samples"]
    assert result["n"] == held and set(result["runs"]) == {"sdss_only", "mixed"}
    mixed = result["runs"]["mixed"]
    assert mixed["training_surveys"] == ["sdss", "decals", "hst"]
    assert set(mixed["in_distribution"]["surveys"]) == {"sdss", "decals", "hst"}
    assert {"r", "r_ci", "r2", "r2_ci", "mae", "mae_ci"} <= set(mixed["mean"])
    assert set(mixed["questions"]) == set(result["questions"]) and "how-rounded" in result["questions"]
    # In-distribution r is each training survey's own r, then their mean: never r over the surveys pooled.
    for run in result["runs"].values():
        per_survey = [s["mean"]["r"] for s in run["in_distribution"]["surveys"].values()]
        assert "pooled" not in run["in_distribution"]
        assert run["in_distribution"]["mean"]["r"] == pytest.approx(np.nanmean(per_survey))  # defined surveys
    assert result["runs"]["sdss_only"]["in_distribution"]["mean"]["r"] == \
        result["runs"]["sdss_only"]["in_distribution"]["surveys"]["sdss"]["mean"]["r"]
    # The drop, recomputed from the prediction files with scipy: per survey, on the features both sides define.
    drops = []
    for survey in mixed["training_surveys"]:
        ind = _feature_r(mixed["preds"][survey], root, survey, result["features"])
        held = {f: mixed["features"][f]["r"] for f in result["features"]}
        both = [f for f in result["features"] if np.isfinite(ind[f]) and np.isfinite(held[f])]
        drops.append(np.mean([ind[f] - held[f] for f in both]) if both else np.nan)
    assert mixed["drop"]["r"] == pytest.approx(np.nanmean(drops), abs=1e-9)
    # New galaxies (no twin in a training survey's train split) and twins: counted against the mock's truth.
    all_keys = pd.read_parquet(root / "ukidss" / "labels.parquet", columns=["key"])["key"]
    for run in result["runs"].values():
        twins = _truth_twins(raw, root, "ukidss", run["training_surveys"])
        assert run["subsets"]["twin"]["n"] == len(twins) and run["subsets"]["new"]["n"] == result["n"] - len(twins)
    twins = _truth_twins(raw, root, "ukidss", mixed["training_surveys"])
    assert len(twins) >= 1
    new_r = _feature_r(mixed["preds"]["ukidss"], root, "ukidss", result["features"], set(all_keys) - twins)
    all_r = _feature_r(mixed["preds"]["ukidss"], root, "ukidss", result["features"])
    assert mixed["mean"]["r"] == pytest.approx(np.nanmean(list(all_r.values())), abs=1e-6)  # same votes rule as ID
    assert mixed["subsets"]["new"]["r"] == pytest.approx(np.nanmean(list(new_r.values())), abs=1e-6)
    assert "held-out r on new galaxies" in capsys.readouterr().out
    pair = result["pairs"][0]
    assert pair["subsets"]["new"]["n"] == result["n"] - len(twins)  # sdss_only's twins are a subset of mixed's
    assert (pair["a"], pair["b"]) == ("mixed", "sdss_only")
    assert pair["r"]["diff"] == pytest.approx(mixed["mean"]["r"] - result["runs"]["sdss_only"]["mean"]["r"], abs=1e-9)
    assert (tmp_path / "ood" / "gain.png").read_bytes()[:4] == b"\x89PNG"
    folder = tmp_path / "ood" / "preds" / "mixed"
    assert sorted(mixed["preds"]) == ["decals", "hst", "sdss", "ukidss"]
    assert all(Path(path).parent == folder and Path(path).is_file() for path in mixed["preds"].values())
    capsys.readouterr()
    assert ood.main(["--runs", f"x={eval_exports['mixed']}", "--held-out", "hst", "--shards", str(root),
                     "--out", str(tmp_path / "bad")]) == 2
    assert "trained on hst" in capsys.readouterr().err


def _spread_px(image: torch.Tensor) -> float:
    """RMS radius per axis (second moment about the centroid) of an image's light above its minimum, in pixels."""
    light = image.double().mean(dim=0)
    light = light - light.min()
    y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in light.shape), indexing="ij")
    total = light.sum()
    cx, cy = (light * x).sum() / total, (light * y).sum() / total
    return float(torch.sqrt((light * (x - cx) ** 2).sum() / total))


def test_perturbation_strengths_measured_on_the_output():
    """Each perturbation does what its strength says, measured on its output by an independent computation."""
    # PSF: a point source blurred to the requested FWHM (arcsec through the pixel scale), from its second moment
    # and from the area above half its peak.
    point = torch.zeros(3, 129, 129)
    point[:, 64, 64] = 255.0
    for fwhm_arcsec in (0.5, 1.0, 2.0):
        blurred = robustness.perturbation("psf", fwhm_arcsec, 0.25, seed=0)(point.clone(), 0)
        fwhm_px = fwhm_arcsec / 0.25
        assert _spread_px(blurred) * 2 * np.sqrt(2 * np.log(2)) == pytest.approx(fwhm_px, rel=0.02)
        if fwhm_px >= 4:
            light = blurred.mean(dim=0)
            area = float((light >= light.max() / 2).sum())
            assert 2 * np.sqrt(area / np.pi) == pytest.approx(fwhm_px, rel=0.05)
    # Apparent size: a Gaussian galaxy of sigma 4 px grows or shrinks by the factor.
    y, x = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    galaxy = (200 * torch.exp(-((x - 64) ** 2 + (y - 64) ** 2) / (2 * 4.0 ** 2))).expand(3, -1, -1).clone()
    for factor in (0.5, 0.71, 1.41, 2.0):
        resized = robustness.perturbation("resolution", factor, 0.25, seed=0)(galaxy.clone(), 0)
        assert _spread_px(resized) / 4.0 == pytest.approx(factor, rel=0.04)
    # Noise: the peak signal-to-noise of the added noise, measured on the output.
    disc = (60 + 140 * torch.exp(-((x - 64) ** 2 + (y - 64) ** 2) / (2 * 10.0 ** 2))).expand(3, -1, -1).clone()
    signal = float(disc.mean(dim=0).max() - disc.mean(dim=0).median())
    for peak_sn in (50.0, 20.0, 10.0, 5.0):
        noisy = robustness.perturbation("noise", peak_sn, 0.25, seed=3)(disc.clone(), 7)
        assert signal / float((noisy - disc).std()) == pytest.approx(peak_sn, rel=0.03)
    # Right-angle rotations turn the pixel grid exactly.
    image = torch.rand(3, 16, 16) * 255
    for name, turns in (("rot90", 1), ("rot180", 2)):
        turned = robustness.perturbation("rotation", name, 0.25, seed=0)(image.clone(), 0)
        torch.testing.assert_close(turned, torch.rot90(image, turns, dims=(1, 2)), atol=1e-3, rtol=0)


def test_robustness_job_end_to_end(eval_shards, eval_exports, tmp_path):
    _, root = eval_shards
    out = tmp_path / "rob"
    assert robustness.main(["--model", str(eval_exports["mixed"]), "--shards", str(root), "--survey", "decals",
                            "--split", "train", "--max-galaxies", "16", "--bootstrap", "20", "--mc-samples", "3",
                            "--out", str(out)]) == 0
    result = json.loads((out / "robustness.json").read_text())
    kinds = result["kinds"]
    assert set(kinds) == {"resolution", "noise", "psf", "rotation"} and result["n"] == 16
    # The mock FITS the build read are still there: noise and PSF act on them in flux, before the stretch.
    assert result["pixels"]["float_input"] == "source FITS" and result["pixels"]["arcsec_per_float_px"] == 0.262
    assert result["pixels"]["space"] == {"resolution": "8-bit", "noise": "flux", "psf": "flux", "rotation": "8-bit"}
    identity = {"resolution": 1.0, "noise": 0.0, "psf": 0.0, "rotation": "none"}
    for kind, points in kinds.items():
        by_strength = {p["strength"]: p for p in points}
        assert by_strength[identity[kind]]["shift"] == 0.0
        assert max(p["shift"] for p in points) > 0
    calibration = result["calibration"]
    assert calibration["predictive"].startswith("Dirichlet-multinomial") and calibration["num_answers"] > 0
    assert [p["nominal"] for p in calibration["curve"]][0] == 0.5
    assert all(0 <= p["coverage"] <= 1 for p in calibration["curve"])
    assert result["rejects"] == [] and pd.read_parquet(out / "rejects.parquet").empty
    assert (out / "robustness.png").is_file() and (out / "calibration.png").is_file()


def test_robustness_float_pixels_source_fits_then_npy_then_none(eval_shards, tmp_path):
    """Noise and PSF act in flux on the source FITS, else on --keep-float .npy members; else all act in 8-bit."""
    from eval import reading
    from eval.labels import read_labels
    from sharding import build, flux, render

    raw, _ = eval_shards
    root = tmp_path / "shards"
    assert build.main(["--survey", "hst", "--catalog", str(raw / "hst" / "gz_hubble_main.fits"), "--images",
                       str(raw / "hst" / "images"), "--out", str(root), "--image-size", "64", "--keep-float",
                       "--split-by", "id", "--no-progress"]) == 0
    manifest = json.loads((root / "hst" / "manifest.json").read_text())
    info = load_survey_shards(root / "hst", "train")
    refs, labels = reading.split_refs(info), read_labels(root, "hst").frame
    pixels, note = robustness.float_pixels(manifest, info, refs, labels, 0, 0.1)
    assert pixels.origin == "source FITS" and pixels.arcsec_per_px == 0.05 and "source FITS" in note
    assert pixels.read(3).shape == (2, 128, 128)
    gone = {**manifest, "build": {**manifest["build"], "images": str(tmp_path / "gone")}}
    pixels, note = robustness.float_pixels(gone, info, refs, labels, 0, 0.1)
    assert pixels.origin == "npy members" and pixels.arcsec_per_px == 0.1 and pixels.read(3).shape == (2, 64, 64)
    assert robustness.float_pixels({**gone, "members": ["jpg"]}, info, refs, labels, 0, 0.1)[0] is None
    # In flux: strength 0 is the build's own rendering of the floats; a PSF is sharding.flux's convolution.
    data = pixels.read(3)
    same = robustness.flux_perturbation("psf", 0.0, pixels, 64, seed=0)(None, 3)
    torch.testing.assert_close(same, torch.from_numpy(render.render_float(data, 64).astype(np.float32)))
    blurred = robustness.flux_perturbation("psf", 1.0, pixels, 64, seed=0)(None, 3)
    expected = render.render_float(flux.convolve_kernel(data, flux.psf_image(flux.PSF(1.0), 0.1)), 64)
    torch.testing.assert_close(blurred, torch.from_numpy(expected.astype(np.float32)))
    noisy = robustness.flux_perturbation("noise", 5.0, pixels, 64, seed=0)(None, 3)
    assert float((noisy - same).abs().mean()) > 1.0


def test_neighbors_are_the_cosine_nearest(tmp_path, capsys):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 6)).astype(np.float32)
    keys = [f"sdss_{i}" for i in range(50)]
    store = EmbeddingStore(tmp_path / "e.zarr", 6, "float32", chunk_rows=8)
    store.write(0, keys, vectors)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit[7]
    sims[7] = -np.inf
    expected = [keys[i] for i in np.argsort(-sims)[:5]]
    found = neighbors.nearest(store.array, keys, "sdss_7", 5)
    assert [k for k, _ in found] == expected
    assert [s for _, s in found] == pytest.approx(sorted(sims[np.argsort(-sims)[:5]], reverse=True), abs=1e-5)
    neighbors.SCAN_ROWS, saved = 7, neighbors.SCAN_ROWS  # blockwise scan gives the same answer
    try:
        assert neighbors.nearest(store.array, keys, "sdss_7", 5) == found
    finally:
        neighbors.SCAN_ROWS = saved
    assert neighbors.main(["--embeddings", str(tmp_path / "e.zarr"), "--key", "sdss_999"]) == 2
    assert "not in the store" in capsys.readouterr().err


def test_neighbors_contact_sheet_from_predicted_embeddings(eval_shards, eval_exports, tmp_path):
    _, root = eval_shards
    assert predict.main(["--model", str(eval_exports["mixed"]), "--shards", str(root), "--surveys", "hst",
                         "--split", "all", "--out", str(tmp_path / "p.parquet"), "--embeddings",
                         str(tmp_path / "e.zarr"), "--no-progress"]) == 0
    key = pd.read_parquet(tmp_path / "p.parquet")["key"].iloc[3]
    assert neighbors.main(["--embeddings", str(tmp_path / "e.zarr"), "--key", key, "-k", "4", "--grid",
                           str(tmp_path / "grid.png"), "--json", str(tmp_path / "n.json")]) == 0
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((tmp_path / "n.json").read_text())["neighbors"]) == 4


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(preds26, eval_shards, eval_exports, tmp_path):
    _, root = eval_shards
    assert score.main([str(preds26), "--bootstrap", "50", "--json", str(tmp_path / "m.json")]) == 0
    assert compare.main([str(preds26), _variant(pd.read_parquet(preds26), STANDARD, [], tmp_path / "v.parquet", 2),
                         "--bootstrap", "50", "--json", str(tmp_path / "c.json")]) == 0
    assert ood.main(["--runs", f"a={eval_exports['sdss_only']}", f"b={eval_exports['mixed']}", "--held-out",
                     "ukidss", "--shards", str(root), "--out", str(tmp_path / "ood"), "--bootstrap", "50",
                     "--no-progress"]) == 0
    assert robustness.main(["--model", str(eval_exports["mixed"]), "--shards", str(root), "--survey", "sdss",
                            "--split", "train", "--max-galaxies", "8", "--bootstrap", "10",
                            "--out", str(tmp_path / "rob")]) == 0
    inputs = [tmp_path / "m.json", tmp_path / "c.json", tmp_path / "ood" / "ood.json", tmp_path / "rob" / "robustness.json"]
    assert report.main([*map(str, inputs), "--out", str(tmp_path / "report.html"), "--worst", "6"]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained: nothing to fetch
    study = json.loads((tmp_path / "ood" / "ood.json").read_text())
    assert "<th>new galaxies</th>" in page and f"(n={study['runs']['a']['subsets']['new']['n']})" in page
    alts = re.findall(r'<img alt="([^"]+)"', page)
    assert alts == ["r per feature", "ukidss predicted vs true", "ukidss worst galaxies", "per-question gain",
                    "robustness curves"]
    figures = len(alts)
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it as root)")
    # The browser reports, into the DOM it dumps, how many images it decoded to a real size.
    probe = page.replace("</body>", "<script>window.addEventListener('load', () => {const ok = [...document.images]"
                                    ".filter(i => i.complete && i.naturalWidth > 0).length; document.body.setAttribute("
                                    "'data-decoded', ok + '/' + document.images.length);});</script></body>")
    (tmp_path / "probe.html").write_text(probe)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", f"file://{tmp_path / 'probe.html'}"], capture_output=True,
                         text=True, timeout=120).stdout
    assert f'data-decoded="{figures}/{figures}"' in dom
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,2400",
                    f"file://{tmp_path / 'report.html'}"], capture_output=True, timeout=120)
    from PIL import Image
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # text and plots, not a blank page


def test_report_of_an_older_ood_json_says_what_to_rebuild(tmp_path, capsys):
    from eval import report
    old = {"held_out": "ukidss", "runs": {"mixed": {"training_surveys": ["sdss"], "in_distribution": {
        "pooled": {"r": 0.4, "r_ci": [0.3, 0.5]}}, "mean": {}, "drop": {}}}, "pairs": []}
    path = tmp_path / "ood.json"
    path.write_text(json.dumps(old))
    assert report.main([str(path), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "ood JSON without the field 'mean'" in err and "python -m eval ood" in err
    assert not (tmp_path / "r.html").exists()
