"""The README's main command at --quick scale: the held-out-survey study end to end, every named file kept."""

import json
from pathlib import Path

import pytest

from launch import demo


@pytest.mark.slow
def test_quick_demo_runs_the_study_and_the_trained_model_beats_the_untrained_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--out", str(out), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out"] == "ukidss" and {"sdss_only", "mixed"} <= set(summary["runs"])
    for run in summary["runs"].values():
        assert (Path(run["export"]) / "export.json").is_file() and (Path(run["export"]) / "model.safetensors").is_file()
        assert "ukidss" in run["preds"] and all(Path(p).is_file() for p in run["preds"].values())
    assert set(summary["runs"]["mixed"]["preds"]) == {"ukidss", "sdss", "decals", "hst"}
    assert set(summary["runs"]["sdss_only"]["preds"]) == {"ukidss", "sdss"}
    assert (out / "report.html").is_file() and "mixed - sdss_only on ukidss" in printed
    ood = summary["ood"]
    held = json.loads((out / "shards" / "ukidss" / "manifest.json").read_text())["num_samples"]
    assert ood["n"] == held  # every UKIDSS galaxy, none of which any run trained on
    trained, untrained = ood["runs"]["mixed"]["mean"], ood["runs"]["untrained"]["mean"]
    # Training must have taught the model something that carries to a survey it never saw.
    assert trained["r_ci"][0] > untrained["r_ci"][1], (trained, untrained)
    # One sky: UKIDSS galaxies with an SDSS twin exist, twins share splits, and the table separates new galaxies.
    assert "sdss - ukidss" in printed and "FAIL" not in printed.split("verify")[-1].split("===")[0]
    for run in ood["runs"].values():
        subsets = run["subsets"]
        assert subsets["new"]["n"] + subsets["twin"]["n"] == held and subsets["twin"]["n"] > 0
    assert "new galaxies" in printed and "with a training twin" in printed
    agreement = json.loads((out / "eval" / "agree.json").read_text())
    assert "sdss-decals" in agreement["survey_pairs"]  # twins in both test splits, predicted on both sides
    rejects = json.loads((out / "shards" / "sdss" / "manifest.json").read_text())["num_rejects"]
    assert rejects > 0  # the deliberately corrupt inputs were recorded, not lost
