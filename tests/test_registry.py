"""The model registry on a real SQLite-backed MLflow store: add, promote, rollback, resolve, the pyfunc against eval
predict, metric tags from a real `eval metrics` JSON, bad inputs; and a training run logged to MLflow."""

import json
import logging
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from eval import predict, score
from eval.infer import infer
from eval.source import load_model, open_source
from launch import registry
from launch.registry_text import parse_spec
from models.io import WEIGHTS_FILE
from sharding.writer import sha256_of
from train_cases import _command, _env, _overrides, REPO

logging.getLogger("alembic").setLevel(logging.WARNING)
logging.getLogger("mlflow").setLevel(logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")  # MLflow's store


@pytest.fixture(scope="module")
def quiet_mlflow():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        yield


@pytest.fixture(scope="module")
def sdss_test(eval_shards, eval_exports, tmp_path_factory):
    """The sdss test split through `eval predict` and `eval metrics` with the sdss-only export: (predictions, JSON)."""
    root, folder = eval_shards[1], tmp_path_factory.mktemp("registry_eval")
    preds, metrics = folder / "sdss.parquet", folder / "sdss.json"
    assert predict.main(["--model", str(eval_exports["sdss_only"]), "--shards", str(root), "--surveys", "sdss",
                         "--split", "test", "--out", str(preds), "--no-progress", "--device", "cpu"]) == 0
    assert score.main([str(preds), "--bootstrap", "20", "--json", str(metrics)]) == 0
    return pd.read_parquet(preds), metrics


@pytest.fixture(scope="module")
def store(tmp_path_factory, quiet_mlflow, mlflow_template):
    """(Store, its folder): a new SQLite store (a copy of the session's empty one), and one more copy still empty
    (template.db, for the training run)."""
    folder = tmp_path_factory.mktemp("mlflow")
    opened = registry.open_store(mlflow_template(folder))
    shutil.copy(folder / "mlflow.db", folder / "template.db")
    return opened, folder


@pytest.fixture(scope="module")
def training(eval_shards, store, tmp_path_factory):
    """A two-step tiny run with tracking.mlflow=true into its own store, started before the registry tests and run
    beside them: (process, run folder, tracking URI, log file)."""
    folder = tmp_path_factory.mktemp("tracked")
    shutil.copy(store[1] / "template.db", folder / "train.db")
    uri, out, log = f"sqlite:///{folder}/train.db", folder / "run", folder / "train.log"
    overrides = _overrides(eval_shards[1], **{"data.mix": "sdss=1.0", "data.loader.image_size": 32,
                                               "data.val_max_samples": 8, "tracking.mlflow": "true",
                                               "tracking.uri": uri})
    with open(log, "w") as sink:
        process = subprocess.Popen(_command(1, out, 2, overrides), cwd=REPO, env=_env(), stdout=sink,
                                   stderr=subprocess.STDOUT)
    yield process, out, uri, log
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def mixed_run(eval_exports, tmp_path_factory):
    """A run folder holding the mixed export as export/, as training leaves it."""
    run = tmp_path_factory.mktemp("mixed_run")
    shutil.copytree(eval_exports["mixed"], run / "export")
    return run


@pytest.fixture(scope="module")
def versions(training, store, eval_exports, mixed_run, sdss_test, tmp_path_factory):
    """v1: the sdss-only export with its metrics and a drift reference; v2: the mixed run (its export/)."""
    reference = tmp_path_factory.mktemp("reference") / "reference.json"
    reference.write_text(json.dumps({"kind": "drift reference"}))
    v1 = registry.add(store[0], eval_exports["sdss_only"], "morphology", [sdss_test[1]], reference)
    v2 = registry.add(store[0], mixed_run, "morphology")
    return v1, v2, reference


def _sha(ref) -> str:
    return sha256_of(ref.export_dir / WEIGHTS_FILE)


def test_promote_rollback_and_resolve_every_form(store, versions, eval_exports, mixed_run, tmp_path):
    st, folder = store
    v1, v2, reference = versions
    assert (str(v1.version), str(v2.version)) == ("1", "2")
    sha = {name: sha256_of(path / WEIGHTS_FILE) for name, path in eval_exports.items()}
    assert (folder / "mlartifacts").is_dir()  # artifacts beside the SQLite file, not in ./mlruns
    assert registry.promote(st, "morphology", "1", "production").endswith("unset -> version 1")
    assert registry.promote(st, "morphology", "2", "production").endswith("version 1 -> version 2")
    assert registry.alias_version("morphology", "production", st.uri) == "2"
    cache = tmp_path / "cache"
    for uri, expected in [("models:/morphology@production", "mixed"), ("morphology@production", "mixed"),
                          ("models:/morphology/1", "sdss_only"), (str(eval_exports["sdss_only"]), "sdss_only"),
                          (str(mixed_run), "mixed")]:  # a run folder holding export/
        ref = registry.resolve(uri, st.uri, cache)
        assert _sha(ref) == sha[expected], uri
        assert ref.tags["weights_sha256"] == sha[expected] and ref.uri == uri
    local = registry.resolve(str(eval_exports["mixed"]), st.uri, cache)
    assert (local.name, local.version, local.reference) == (None, "local", None)
    prod = registry.resolve("models:/morphology@production", st.uri, cache)
    assert (prod.name, prod.version, prod.aliases) == ("morphology", "2", ("production",))
    assert prod.export_dir.is_relative_to(cache) and prod.reference is None
    first = registry.resolve("models:/morphology/1", st.uri, cache)
    assert first.reference.read_text() == reference.read_text()
    assert open_source(first.export_dir).names == json.loads(first.tags["schema.features"])
    assert registry.rollback(st, "morphology", "production").endswith("version 2 -> version 1 (rolled back)")
    assert registry.alias_version("morphology", "production", st.uri) == "1"
    assert _sha(registry.resolve("morphology@production", st.uri, cache)) == sha["sdss_only"]
    with pytest.raises(ValueError, match="nothing to roll back to: morphology@production is version 1"):
        registry.rollback(st, "morphology", "production")
    # A cache copy recorded with other weights (an older or half-replaced one) is fetched again.
    (first.export_dir / WEIGHTS_FILE).write_bytes(b"damaged")
    (first.export_dir.parent.parent / ".weights_sha256").write_text("0" * 64)
    assert _sha(registry.resolve("models:/morphology/1", st.uri, cache)) == sha["sdss_only"]
    # Stored artifacts that no longer match the version's weights_sha256 are refused, and nothing is cached.
    stored = Path(st.client.get_model_version_download_uri("morphology", "2").removeprefix("file://"))
    weights = stored / "artifacts" / "export" / WEIGHTS_FILE
    original = weights.read_bytes()
    weights.write_bytes(original[:-8] + b"\0" * 8)
    try:
        with pytest.raises(ValueError, match="morphology/2: the downloaded export does not match"):
            registry.resolve("models:/morphology/2", st.uri, tmp_path / "fresh")
    finally:
        weights.write_bytes(original)
    assert not any((tmp_path / "fresh").rglob(WEIGHTS_FILE))


def test_tags_hold_provenance_schema_input_and_the_eval_metrics(store, versions, sdss_test, eval_exports):
    st, _ = store
    tags = registry.lookup(st, "morphology", "1").tags
    source = open_source(eval_exports["sdss_only"])
    metrics = json.loads(sdss_test[1].read_text())["surveys"]["sdss"]
    assert float(tags["metric.surveys.sdss.mean.r"]) == pytest.approx(metrics["mean"]["r"], rel=1e-12)
    assert int(tags["metric.surveys.sdss.n"]) == metrics["n"] == len(sdss_test[0])
    assert json.loads(tags["metric.surveys.sdss.mean.r_ci"]) == pytest.approx(metrics["mean"]["r_ci"])
    feature = source.names[0]
    assert float(tags[f"metric.surveys.sdss.features.{feature}.mae"]) == \
        pytest.approx(metrics["features"][feature]["mae"])
    assert not any(k.startswith(("metric.model", "metric.seed")) for k in tags)  # provenance, not metrics
    assert tags["input.image_size"] == "32" and json.loads(tags["input.mean"]) == list(source.input_spec().mean)
    assert json.loads(tags["schema.features"]) == source.names and tags["provenance.stage"] == "head"
    assert json.loads(tags["provenance.mix"]) == {"sdss": 1.0}
    assert len(tags["provenance.config_sha256"]) == 64 and tags["reference"] == "reference.json"


def test_the_pyfunc_predicts_what_eval_predict_does(store, versions, eval_shards, eval_exports, sdss_test):
    """Through mlflow.pyfunc.load_model (what `mlflow models serve` loads): shard JPEG bytes in a DataFrame, and a
    normalised batch, against `eval predict`'s parquet and eval.infer."""
    import mlflow

    st, _ = store
    frame = sdss_test[0].set_index("key")
    images = {}
    for shard in sorted((eval_shards[1] / "sdss").glob("sdss-test-*.tar")):
        with tarfile.open(shard) as tar:
            images.update({m.name.rsplit(".", 1)[0]: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")})
    keys = sorted(images)
    assert keys == sorted(frame.index)
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(st.uri)
    mlflow.set_registry_uri(st.uri)
    try:
        model = mlflow.pyfunc.load_model("models:/morphology/1")
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    names = json.loads(st.client.get_model_version("morphology", "1").tags["schema.features"])
    out = model.predict(pd.DataFrame({"image": [images[k] for k in keys]}))
    assert list(out.columns) == names and len(out) == len(keys)
    np.testing.assert_allclose(out.to_numpy(), frame.loc[keys, names].to_numpy(), atol=1e-5)
    batch = torch.randn(3, 3, 32, 32)
    expected = infer(load_model(open_source(eval_exports["sdss_only"])), batch).fractions
    assert np.allclose(model.predict(batch.numpy()).to_numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(n, 3, 32, 32\)"):
        model.predict(np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="row 1: not a readable JPEG/PNG image"):
        model.predict(pd.DataFrame({"image": [images[keys[0]], b"not an image"]}))
    with pytest.raises(ValueError, match="needs a column 'image'"):
        model.predict(pd.DataFrame({"pixels": [images[keys[0]]]}))


def test_bad_inputs_name_what_is_wrong(store, versions, eval_exports, tmp_path):
    st, _ = store
    (tmp_path / "empty").mkdir()
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model": {"weights_sha256": "f" * 64}, "surveys": {"sdss": {"n": 3}}}))
    export = eval_exports["mixed"]
    cases = [
        (lambda: registry.add(st, tmp_path / "empty", "morphology"), "neither a model export"),
        (lambda: registry.add(st, export, "bad/name"), "--name 'bad/name'"),
        (lambda: registry.add(st, export, "morphology", [bad_json]), "--metrics .*bad.json: not a readable JSON"),
        (lambda: registry.add(st, export, "morphology", [other]), "other.json scored another model"),
        (lambda: registry.add(st, export, "morphology", [], tmp_path / "nope.zarr"), "--reference .*nope.zarr"),
        (lambda: registry.lookup(st, "nosuch", "1"), "no registered model 'nosuch'.*registered: morphology"),
        (lambda: registry.lookup(st, "morphology", "9"), r"morphology has no version 9 \(versions: \[1, 2\]\)"),
        (lambda: registry.lookup(st, "morphology", alias="canary"), "morphology has no alias 'canary'"),
        (lambda: registry.alias_version("morphology", "canary", st.uri), "no alias 'canary'"),
        (lambda: registry.promote(st, "morphology", "9", "production"), "no version 9"),
        (lambda: registry.promote(st, "morphology", "1", "3"), "not a bare number"),
        (lambda: registry.rollback(st, "morphology", "canary"), "no alias 'canary' to roll back"),
        (lambda: registry.resolve("morphology", st.uri), "needs a version or alias"),
        (lambda: registry.resolve(str(tmp_path / "missing_run"), st.uri), "is no folder"),
        (lambda: registry.resolve(str(tmp_path / "empty"), st.uri), "neither a model export"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert [str(v.version) for v in st.client.search_model_versions("name = 'morphology'")].count("3") == 0
    assert parse_spec("models:/m.v2@prod") == ("m.v2", None, "prod")
    assert parse_spec("models:/m/12") == ("m", "12", None) and parse_spec("m") == ("m", None, None)
    assert registry.default_tracking_uri({}) == "sqlite:///runs/mlflow.db"
    assert registry.default_tracking_uri({"MLFLOW_TRACKING_URI": "http://h:5000"}) == "http://h:5000"


def test_the_command_line(store, versions, capsys):
    st, _ = store
    assert registry.main(["list", "--tracking-uri", st.uri]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["MODEL", "VERSION", "ALIASES"] and len(table) == 3
    assert "sdss r " in table[1] and table[2].split()[:2] == ["morphology", "2"]
    assert registry.main(["show", "morphology/1", "--tracking-uri", st.uri]) == 0
    shown = capsys.readouterr().out
    assert "artifacts: file://" in shown and "weights_sha256 = " in shown and "per-feature metric tags" in shown
    assert registry.main(["promote", "morphology", "--tracking-uri", st.uri]) == 2
    assert "promote a version, NAME/VERSION" in capsys.readouterr().err


def test_training_logs_params_metrics_and_the_export_to_mlflow(training, store):
    """The tracked run (started by the fixture); then registered, the version names that run."""
    st, _ = store
    process, out, uri, log = training
    assert process.wait(timeout=300) == 0, log.read_text()[-5000:]
    client = registry.open_store(uri).client
    record = json.loads((out / "mlflow_run.json").read_text())
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "run"  # tracking.experiment defaults to it
    params = run.data.params
    assert params["data.mix"] == "sdss=1.0" and params["tracking.mlflow"] == "true" and params["max_steps"] == "2"
    assert params["data.loader.image_size"] == "32" and run.data.tags["world_size"] == "1"
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in logged if "event" not in r}
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(losses) and sorted(losses) == [1, 2]
    assert client.get_metric_history(run.info.run_id, "val/sdss/mae")[-1].step == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert {"export/export.json", "export/model.safetensors"} <= artifacts
    version = registry.add(st, out, "trained")
    assert version.tags["provenance.training_run_id"] == run.info.run_id
    assert version.tags["provenance.step"] == "2"
    # A resume continues the same MLflow run; params are immutable there, so a changed one is named in a tag.
    from train import mlflow_tracking
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["max_steps"] = 4
    assert mlflow_tracking.start(out, config, uri=uri, experiment=None, rank=1, world_size=2, resumed=True) is None
    tracker = mlflow_tracking.start(out, config, uri=uri, experiment=None, rank=0, world_size=2, resumed=True)
    assert tracker.run_id == run.info.run_id and client.get_run(run.info.run_id).info.status == "RUNNING"
    tracker.log_scalars(3, {"train/loss": 1.5, "lr/head group": 0.1})
    tracker.close()  # no export logged: KILLED, for the next resume to continue
    again = client.get_run(run.info.run_id)
    assert again.info.status == "KILLED" and again.data.params["max_steps"] == "2"
    assert json.loads(again.data.tags["changed_on_resume"]) == ["max_steps"] and again.data.tags["world_size"] == "2"
    assert again.data.metrics["train/loss"] == 1.5 and again.data.metrics["lr/head group"] == 0.1


def test_tracking_config_and_a_missing_mlflow(monkeypatch):
    import importlib.util

    from train import mlflow_tracking
    from train.config import load_train_config
    from train_cases import TINY

    cfg = load_train_config(TINY, ["tracking.mlflow=true", "tracking.experiment=morph"])
    assert (cfg.tracking.mlflow, cfg.tracking.experiment, cfg.tracking.uri) == (True, "morph", None)
    assert load_train_config(TINY).tracking.mlflow is False
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['server'\]"):
        load_train_config(TINY, ["tracking.server=x"])
    assert mlflow_tracking.flatten_params({"a": {"b": [1, 2], "c": None, "d": {}}, "e": "x" * 7000}) == \
        {"a.b": "[1, 2]", "a.c": "null", "a.d": "{}", "e": "x" * 5997 + "..."}
    assert mlflow_tracking.artifact_location("sqlite:////data/runs/mlflow.db") == "file:///data/runs/mlartifacts"
    assert mlflow_tracking.artifact_location("http://host:5000") is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"needs mlflow.*pip install 'galaxy-sommelier\[serve\]'"):
        mlflow_tracking.check_available()
