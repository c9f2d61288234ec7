"""launch study: the study config loader, the planner, the tiny study run locally (dependency order, skipping what
is done by provenance, re-running what changed) and on a private SLURM cluster (afterok dependencies, a failed arm's
dependants never running, a re-submit running only what is missing)."""

import contextlib
import io
import json
import time
import warnings
from pathlib import Path

import pytest
import yaml

from launch.__main__ import main as launch_main
from launch.study_config import load_study
from launch.study_graph import plan
from launch.study_state import CONFIG_FILE, RECORD_FILE, RESULT_FILE, stamp, state
from sharding.config import CONFIG_ROOT

TINY = CONFIG_ROOT / "studies" / "tiny.yaml"


def _study(path: Path, edit=None) -> Path:
    """tiny.yaml (or an edited copy) at `path`; the study's name is the file's stem."""
    data = yaml.safe_load(TINY.read_text())
    if edit:
        edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _launch(*argv) -> tuple[int, str]:
    with contextlib.redirect_stdout(io.StringIO()) as printed, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # eval's r on a handful of test galaxies
        code = launch_main([str(a) for a in argv])
    return code, printed.getvalue()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["arms"]["sdss"].update(epochs=3), "unknown key(s) ['epochs'] for ArmConfig"),
    (lambda d: d.update(evaluation={}), "unknown key(s) ['evaluation'] for StudyConfig"),
    (lambda d: d["arms"]["mixed"].update(init_from="mixed_ft"), "cycle: mixed -> mixed_ft -> mixed"),
    (lambda d: d["arms"]["mixed_ft"].update(init_from="sdss_only"), "'mixed_ft' starts from 'sdss_only', which is "
                                                                    "not an arm"),
    (lambda d: d["evaluations"]["heldout"].update(arms=["sdss", "nosuch"]), "arms ['nosuch'] are not arms"),
    (lambda d: d["evaluations"]["heldout"]["pairs"].append(["sdss"]), "each pair is [a, b]"),
    (lambda d: d["arms"].update({"Mixed 2": {"config": "tiny"}}), "arm name 'Mixed 2' must be"),
])
def test_study_config_errors_name_the_problem(tmp_path, edit, message):
    with pytest.raises(ValueError, match="tiny.yaml") as err:
        load_study(_study(tmp_path / "tiny.yaml", edit))
    assert message in str(err.value)


def test_plan_runs_parents_first_and_starts_arms_from_exports(shard_root, tmp_path):
    def reorder(d):
        d["arms"] = {"mixed_ft": d["arms"]["mixed_ft"], **{k: v for k, v in d["arms"].items() if k != "mixed_ft"}}

    nodes = plan(load_study(_study(tmp_path / "tiny.yaml", reorder)), tmp_path / "out", shard_root)
    assert [(n.name, n.deps) for n in nodes] == [("mixed", ()), ("mixed_ft", ("mixed",)), ("sdss", ()),
                                                 ("eval-heldout", ("sdss", "mixed", "mixed_ft"))]
    ft = nodes[1].spec
    assert ft["config"]["init_from"] == str(tmp_path / "out" / "arms" / "mixed" / "export")
    assert ft["config"]["data"]["loader"]["shard_root"] == str(shard_root) and ft["config"]["max_steps"] == 4
    assert ft["config"]["optim"]["lr"] == 0.001 and ft["config"]["stage"] == "full"
    # Provenance hashes the config with the folders as placeholders: moving the study or the shards changes nothing.
    assert ft["hashed"]["init_from"] == "<study>/arms/mixed/export"
    assert ft["hashed"]["out_dir"] == "<study>/arms/mixed_ft"
    assert ft["hashed"]["data"]["loader"]["shard_root"] == "<shards>"
    assert ft["reads"] == ["sdss", "decals"] and list(ft["parents"]) == ["mixed"]
    ev = nodes[-1].spec
    assert ev["held_out"] == "hst" and ev["reads"] == ["decals", "hst", "sdss"]


def test_plan_starts_from_an_ssl_export_by_its_backbone_and_refuses_a_trained_on_held_out_survey(shard_root, tmp_path):
    def ssl(d):
        d["arms"]["mixed"] = {"config": "ssl_cpu", "overrides": {"stage": "ssl", "data.mix": "sdss=0.5,decals=0.5"}}
        d["arms"]["mixed_ft"]["overrides"]["model_overrides"] = ["head.dropout=0.2"]

    nodes = {n.name: n for n in plan(load_study(_study(tmp_path / "tiny.yaml", ssl)), tmp_path, shard_root)}
    ft = nodes["mixed_ft"].spec["config"]
    assert nodes["mixed"].spec["stage"] == "ssl" and ft["init_from"] is None
    backbone = tmp_path / "arms" / "mixed" / "export" / "backbone"
    assert ft["model_overrides"] == ["head.dropout=0.2", f"pretrained={backbone}"]
    held = load_study(_study(tmp_path / "tiny.yaml", lambda d: d["evaluations"]["heldout"].update(held_out="decals")))
    with pytest.raises(ValueError, match=r"arms \['mixed', 'mixed_ft'\] train on decals, its held-out survey"):
        plan(held, tmp_path, shard_root)
    missing = load_study(_study(tmp_path / "tiny.yaml", lambda d: d["arms"]["sdss"]["overrides"].update(
        {"data.mix": "sdss=0.5,ukidss=0.5"})))
    with pytest.raises(ValueError, match=r"arm 'sdss' reads \['ukidss'\], which .* does not hold"):
        plan(missing, tmp_path, shard_root)


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def test_tiny_study_runs_in_order_skips_what_is_done_and_reruns_what_changed(shard_root, tmp_path):
    study, out = _study(tmp_path / "tiny.yaml"), tmp_path / "study"
    args = ["study", study, "--local", "--shards", shard_root, "--out", out]
    code, printed = _launch(*args)
    assert code == 0, printed
    arms = {a: out / "arms" / a for a in ("sdss", "mixed", "mixed_ft")}
    finished = {**{a: d / "export" / "export.json" for a, d in arms.items()},
                "heldout": out / "eval" / "heldout" / RESULT_FILE}
    # Dependency order: a node's provenance is stamped when it starts, after what it needs has finished.
    assert _mtime(arms["mixed_ft"] / RECORD_FILE) >= _mtime(finished["mixed"])
    started_eval = _mtime(out / "eval" / "heldout" / RECORD_FILE)
    assert all(started_eval >= _mtime(finished[a]) for a in arms)
    result = json.loads((out / "study.json").read_text())
    assert [n["finished"] for n in result["nodes"]] == [True] * 4
    ev = result["evaluations"]["heldout"]
    assert set(ev["matrix"]["rows"]) == set(arms) and set(ev["matrix"]["rows"]["sdss"]["cells"]) == {"sdss", "decals"}
    held = ev["held_out"]
    assert held["n"] > 0 and set(held["arms"]) == set(arms) and held["arms"]["mixed"]["held_out_ceiling_r"] > 0
    assert [(p["a"], p["b"]) for p in held["pairs"]] == [("mixed", "sdss"), ("mixed_ft", "mixed")]
    assert [p["arm"] for p in held["curve"]] == ["sdss", "mixed"]
    assert "data:image/png;base64" in (out / "report.html").read_text()
    assert "report/heldout-matrix.png" in (out / "report.md").read_text()

    before = {name: _mtime(path) for name, path in finished.items()}
    code, printed = _launch(*args)
    assert code == 0 and "0 ran, 4 up to date" in printed, printed
    assert {name: _mtime(path) for name, path in finished.items()} == before

    # Another learning rate for mixed_ft: it and the evaluation after it run again; sdss and mixed do not (that a
    # changed parent export re-runs its dependants is test_provenance_follows_settings_manifests_and_parent_weights).
    _study(study, lambda d: d["arms"]["mixed_ft"]["overrides"].update({"optim.lr": 0.002}))
    code, printed = _launch(*args)
    assert code == 0 and "2 ran, 2 up to date" in printed, printed
    assert "arm mixed_ft: changed since it ran (settings): runs again" in printed
    assert "evaluation heldout: changed since it ran (mixed_ft's export): runs again" in printed
    assert all(_mtime(finished[n]) == before[n] for n in ("sdss", "mixed"))
    assert all(_mtime(finished[n]) > before[n] for n in ("mixed_ft", "heldout"))
    assert yaml.safe_load((arms["mixed_ft"] / CONFIG_FILE).read_text())["optim"]["lr"] == 0.002


def test_provenance_follows_settings_manifests_and_parent_weights(tmp_path):
    shards, parent, child = tmp_path / "shards", tmp_path / "parent" / "export", tmp_path / "child"
    (shards / "sdss").mkdir(parents=True)
    (shards / "sdss" / "manifest.json").write_text("{}")
    parent.mkdir(parents=True)
    (parent / "model.safetensors").write_bytes(b"weights 1")
    spec = {"kind": "arm", "name": "child", "dir": str(child), "hashed": {"lr": 1}, "reads": ["sdss"],
            "shards": str(shards), "parents": {"parent": str(parent)}}
    assert state(spec, []) == (False, "an input is missing")  # the parent has not exported
    (parent / "export.json").write_text("{}")
    assert state(spec, ["parent"])[1] == "waits for parent"
    assert state(spec, []) == (False, "not run yet") and stamp(spec) == "starts"
    (child / "checkpoints").mkdir()
    assert state(spec, [])[1] == "interrupted: continues from its last checkpoint" and stamp(spec) == "continues from its last checkpoint"
    (child / "export").mkdir()
    (child / "export" / "export.json").write_text("{}")
    assert state(spec, [])[0]
    (parent / "model.safetensors").write_bytes(b"weights 2")  # the parent trained again
    assert state(spec, []) == (False, "changed since it ran (parent's export): runs again")
    assert stamp(spec) == "starts over (parent's export changed)" and not (child / "checkpoints").exists()
    (shards / "sdss" / "manifest.json").write_text('{"rebuilt": true}')
    assert state({**spec, "hashed": {"lr": 2}}, [])[1] == "changed since it ran (settings, sdss shards): runs again"


def _wait_for(predicate, timeout: float = 240, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


def _stamp(value: str) -> float:
    return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))


def _two_arms(d: dict) -> None:
    """tiny.yaml without its sdss arm: a parent, the arm starting from it and the evaluation of both."""
    del d["arms"]["sdss"]
    d["evaluations"]["heldout"].update(arms=["mixed", "mixed_ft"], pairs=[["mixed_ft", "mixed"]], curve=[])


@pytest.mark.slurm
def test_tiny_study_on_slurm_honours_dependencies_and_resubmits_only_what_failed(slurm_cluster, shard_root, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "study"
    # Valid as a config, fatal when the run builds its model: mixed_ft fails, the evaluation after it never runs.
    study = _study(tmp_path / "tiny.yaml", lambda d: (_two_arms(d), d["arms"]["mixed_ft"]["overrides"].update(
        model_overrides=["pretrained=/nonexistent/dinov2"])))
    args = ["study", study, "--slurm", "--shards", shard_root, "--out", out, "--nodes", "1", "--gpus-per-node", "0",
            "--cpus-per-task", "1", "--time", "15"]
    code, printed = _launch(*args)
    assert code == 0, printed
    jobs = {n: r["job_id"] for n, r in json.loads((out / "study_jobs.json").read_text()).items()}
    assert set(jobs) == {"mixed", "mixed_ft", "eval-heldout"}
    assert slurm_cluster.job_state(jobs["mixed"])["JobName"] == "tiny-mixed"
    assert slurm_cluster.job_state(jobs["eval-heldout"])["JobName"] == "tiny-eval-heldout"
    assert slurm_cluster.wait(jobs["mixed_ft"])["JobState"] == "FAILED"
    _wait_for(lambda: slurm_cluster.job_state(jobs["eval-heldout"]).get("Reason") == "DependencyNeverSatisfied",
              60, "the evaluation after a failed arm is not DependencyNeverSatisfied")
    mixed = slurm_cluster.wait(jobs["mixed"])
    assert mixed["JobState"] == "COMPLETED", mixed
    assert _stamp(slurm_cluster.job_state(jobs["mixed_ft"])["StartTime"]) >= _stamp(mixed["EndTime"])
    code, printed = _launch("study", "status", out)
    assert code == 0 and "DependencyNeverSatisfied" in printed and "never run: eval-heldout" in printed, printed
    assert "mixed_ft failed" in printed

    _study(study, _two_arms)  # fixed: a re-submit runs mixed_ft and the evaluation, and nothing that finished
    code, printed = _launch(*args)
    assert code == 0, printed
    assert "arm mixed: up to date" in printed
    assert f"cancelled job {jobs['eval-heldout']} (" in printed
    again = {n: r["job_id"] for n, r in json.loads((out / "study_jobs.json").read_text()).items()}
    assert again["mixed"] == jobs["mixed"]
    assert again["mixed_ft"] != jobs["mixed_ft"] and again["eval-heldout"] != jobs["eval-heldout"]
    ev = slurm_cluster.wait(again["eval-heldout"], timeout=300)
    assert ev["JobState"] == "COMPLETED", ev
    ft = slurm_cluster.job_state(again["mixed_ft"])
    assert ft["JobState"] == "COMPLETED" and _stamp(ev["StartTime"]) >= _stamp(ft["EndTime"])
    result = json.loads((out / "study.json").read_text())  # the evaluation's job rebuilt it
    assert all(n["finished"] for n in result["nodes"]) and result["evaluations"]["heldout"]["finished"]
    code, printed = _launch("study", "status", out)
    rows = [line for line in printed.splitlines() if line.split()[:1] in (["mixed"], ["mixed_ft"], ["eval-heldout"])]
    assert len(rows) == 3 and all(line.endswith("done") for line in rows), printed


def test_phase3_plans_data_first_then_arms_then_evaluations(tmp_path):
    from dataclasses import fields

    from train.config import DataConfig, TrainConfig

    absent = [name for name, cls in (("dann", TrainConfig), ("mix_schedule", DataConfig))
              if name not in {f.name for f in fields(cls)}]
    if absent:
        pytest.skip(f"train/config.py has no {absent} yet: phase3's schedule and dann arms need them")
    nodes = plan(load_study("phase3"), tmp_path, tmp_path / "shards")
    names = [n.name for n in nodes]
    assert names[0] == "data" and names[-2:] == ["eval-matrix", "eval-ukidss"]
    assert all("data" in n.deps for n in nodes[1:]) and names.index("ssl") < names.index("ssl_mixed")
    spec = {n.name: n.spec for n in nodes}
    assert spec["ssl"]["stage"] == "ssl" and spec["ssl_mixed"]["config"]["model_overrides"][-1] == \
        f"pretrained={tmp_path / 'arms' / 'ssl' / 'export'}/backbone"
    assert spec["dann"]["reads"] == ["sdss", "decals", "hst", "ukidss_unlabeled"]
    assert spec["data"]["makes"] == ["sdss", "decals", "hst", "ukidss", "ukidss_unlabeled", "hst_as_sdss"]


def test_ceiling_shares_and_the_plans_target():
    """The held-out and ID shares of the noise ceiling and their gap, against a hand computation."""
    from launch.study_report import add_ceiling_shares

    cell = lambda ceiling: {"r": 0.3, "r_ci": [0.2, 0.4], "ceiling_r": ceiling}  # noqa: E731
    matrix = {"rows": {"a": {"training_surveys": ["a"], "cells": {"a": cell(0.8), "b": cell(0.5)}}}}
    arms = {"ab": {"held_out_r": 0.2, "held_out_ceiling_r": 0.5, "id_r_by_survey": {"a": 0.4, "b": 0.3}},
            "ac": {"held_out_r": 0.2, "held_out_ceiling_r": 0.5, "id_r_by_survey": {"a": 0.4, "c": 0.3}}}
    evaluations = {"m": {"matrix": matrix}, "h": {"held_out": {"arms": arms}}}
    add_ceiling_shares(evaluations)
    ab = evaluations["h"]["held_out"]["arms"]["ab"]
    id_share = (0.4 / 0.8 + 0.3 / 0.5) / 2  # 0.55
    assert ab["held_out_share"] == pytest.approx(0.4) and ab["id_share"] == pytest.approx(id_share)
    assert ab["share_gap"] == pytest.approx(1 - 0.4 / id_share) and ab["meets_target"] is False
    assert evaluations["h"]["held_out"]["arms"]["ac"]["id_share"] is None  # no matrix row scores survey c
