"""eval compare (by feature name), ood, robustness, neighbors and the HTML report in a real browser."""

import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from eval import compare, neighbors, ood, predict, report, robustness, score
from eval.store import EmbeddingStore
from sharding.schema import load_schema

STANDARD = load_schema().names


@pytest.fixture(scope="module")
def preds26(eval_shards, eval_exports, tmp_path_factory):
    path = tmp_path_factory.mktemp("preds") / "p26.parquet"
    assert predict.main(["--model", str(eval_exports["mixed"]), "--shards", str(eval_shards[1]), "--surveys",
                         "ukidss", "--split", "all", "--out", str(path), "--batch-size", "16", "--no-progress"]) == 0
    return path


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


def test_ood_study_table_gain_plot_and_held_out_check(eval_shards, eval_exports, tmp_path, capsys):
    _, root = eval_shards
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
    drop = mixed["drop"]
    assert drop["r"] == pytest.approx(mixed["in_distribution"]["pooled"]["mean"]["r"] - mixed["mean"]["r"])
    pair = result["pairs"][0]
    assert (pair["a"], pair["b"]) == ("mixed", "sdss_only")
    assert pair["r"]["diff"] == pytest.approx(mixed["mean"]["r"] - result["runs"]["sdss_only"]["mean"]["r"], abs=1e-9)
    assert (tmp_path / "ood" / "gain.png").read_bytes()[:4] == b"\x89PNG"
    assert all((tmp_path / "ood" / "preds" / "mixed" / f"{s}.parquet").is_file() for s in ("ukidss", "sdss", "hst"))
    capsys.readouterr()
    assert ood.main(["--runs", f"x={eval_exports['mixed']}", "--held-out", "hst", "--shards", str(root),
                     "--out", str(tmp_path / "bad")]) == 2
    assert "trained on hst" in capsys.readouterr().err


def test_robustness_identity_settings_do_not_move_predictions(eval_shards, eval_exports, tmp_path):
    _, root = eval_shards
    out = tmp_path / "rob"
    assert robustness.main(["--model", str(eval_exports["mixed"]), "--shards", str(root), "--survey", "decals",
                            "--split", "train", "--max-galaxies", "16", "--bootstrap", "20", "--mc-samples", "3",
                            "--out", str(out)]) == 0
    result = json.loads((out / "robustness.json").read_text())
    kinds = result["kinds"]
    assert set(kinds) == {"resolution", "noise", "psf", "rotation"}
    identity = {"resolution": 1.0, "noise": 0.0, "psf": 0.0, "rotation": "none"}
    for kind, points in kinds.items():
        by_strength = {p["strength"]: p for p in points}
        assert by_strength[identity[kind]]["shift"] == 0.0
        assert max(p["shift"] for p in points) > 0
    assert kinds["rotation"][0]["r"] == pytest.approx(kinds["noise"][0]["r"])
    assert [p["nominal"] for p in result["calibration"]][0] == 0.5
    assert (out / "robustness.png").is_file() and (out / "calibration.png").is_file()


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
    score.main([str(preds26), "--bootstrap", "50", "--json", str(tmp_path / "m.json")])
    compare.main([str(preds26), _variant(pd.read_parquet(preds26), STANDARD, [], tmp_path / "v.parquet", 2),
                  "--bootstrap", "50", "--json", str(tmp_path / "c.json")])
    ood.main(["--runs", f"a={eval_exports['sdss_only']}", f"b={eval_exports['mixed']}", "--held-out", "ukidss",
              "--shards", str(root), "--out", str(tmp_path / "ood"), "--bootstrap", "50", "--no-progress"])
    robustness.main(["--model", str(eval_exports["mixed"]), "--shards", str(root), "--survey", "sdss", "--split",
                     "train", "--max-galaxies", "8", "--bootstrap", "10", "--out", str(tmp_path / "rob")])
    inputs = [tmp_path / "m.json", tmp_path / "c.json", tmp_path / "ood" / "ood.json", tmp_path / "rob" / "robustness.json"]
    assert report.main([*map(str, inputs), "--out", str(tmp_path / "report.html"), "--worst", "6"]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained: nothing to fetch
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
