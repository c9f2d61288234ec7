"""Training logged to MLflow (`tracking.mlflow: true`) beside log.jsonl and TensorBoard: the flattened resolved config
as params, the per-step scalars as metrics, the export folder as artifacts. Rank 0 only.

The one train module that imports mlflow, and only when tracking is on (an optional extra: the `serve` one). The
store is `tracking.uri`, else MLflow's own MLFLOW_TRACKING_URI (MLflow reads it), else the embedded default, a
SQLite file under runs/ with artifacts beside it; `python -m launch registry` uses the same default.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
ARTIFACTS_DIR = "mlartifacts"  # beside a SQLite store's file: its experiments' artifacts
RUN_FILE = "mlflow_run.json"  # <out_dir>/: the MLflow run of this training run, continued by a resume
EXPORT_ARTIFACT = "export"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
INSTALL_HINT = "pip install 'galaxy-sommelier[serve]'"


def check_available() -> None:
    """Without importing it (every rank calls this before any collective, so all of them stop together)."""
    if importlib.util.find_spec("mlflow") is None:
        raise ValueError(f"tracking.mlflow=true needs mlflow, which is not installed: {INSTALL_HINT}")


def import_mlflow():
    try:
        import mlflow
    except ImportError as err:
        raise ValueError(f"MLflow is not importable ({err}): {INSTALL_HINT}") from None
    return mlflow


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (sqlite:///runs/x.db is relative, sqlite:////abs/x.db absolute)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str) -> str | None:
    """Where new experiments keep artifacts: beside a SQLite store's file; elsewhere the server's default."""
    path = sqlite_path(uri)
    return (path.parent.resolve() / ARTIFACTS_DIR).as_uri() if path else None


def open_client(uri: str):
    """An MlflowClient for tracking and registry at `uri` (a SQLite store's folder is created)."""
    mlflow = import_mlflow()
    path = sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client, name: str, uri: str) -> str:
    """The experiment `name`, created with its artifacts beside a SQLite store when it is new."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri))
        except MlflowException:  # another process created it first
            experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage != "active":
        raise ValueError(f"MLflow experiment {name!r} at {uri} is deleted; restore it (mlflow experiments restore) "
                         "or choose another with tracking.experiment=NAME")
    return experiment.experiment_id


def flatten_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys -> strings (lists and None as JSON), each within MLflow's param limit."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        out[name] = text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 3] + "..."
    return out


def metric_name(name: str) -> str:
    """MLflow accepts letters, digits, _ - . space / in metric names; anything else becomes _."""
    return re.sub(r"[^\w\-. /]", "_", name)


class MlflowTracker:
    """One MLflow run: metrics queued asynchronously (a remote server never stalls a step), artifacts at the end."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self._pending: list = []
        self.exported = False

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if not scalars:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(metric_name(k), float(v), now, int(step)) for k, v in scalars.items()]
        self._pending.append(self.client.log_batch(self.run_id, metrics=metrics, synchronous=False))

    def log_export(self, folder: Path) -> None:
        self.flush()
        self.client.log_artifacts(self.run_id, str(folder), EXPORT_ARTIFACT)
        self.exported = True

    def flush(self) -> None:
        for operation in self._pending:
            operation.wait()
        self._pending.clear()

    def close(self) -> None:
        """FINISHED once the export is logged; KILLED otherwise (pre-empted, failed: a resume continues the run)."""
        self.flush()
        self.client.set_terminated(self.run_id, "FINISHED" if self.exported else "KILLED")


def _previous_run(client, out_dir: Path, uri: str) -> str | None:
    """The MLflow run a resumed training continues: the one its folder names, if that store still has it."""
    try:
        record = json.loads((out_dir / RUN_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if record.get("tracking_uri") != uri:
        return None
    try:
        run = client.get_run(record["run_id"])
    except Exception:  # deleted or never there: start a new run
        return None
    return run.info.run_id if run.info.lifecycle_stage == "active" else None


def start(out_dir: Path, config: dict[str, Any], *, uri: str | None, experiment: str | None, rank: int,
          world_size: int, resumed: bool) -> MlflowTracker | None:
    """Rank 0: the MLflow run of this training (a resume continues the previous one), its params logged. Others: None.

    Params are immutable in MLflow: a resume logs only the keys the run lacks and names the changed ones in the
    tag `changed_on_resume` (the resolved config of each attempt is in the run folder's config.yaml).
    """
    if rank != 0:
        return None
    mlflow = import_mlflow()
    if uri is None:
        from mlflow.environment_variables import MLFLOW_TRACKING_URI
        uri = MLFLOW_TRACKING_URI.get() or DEFAULT_TRACKING_URI
    client = open_client(uri)
    run_name = Path(out_dir).resolve().name
    params = flatten_params(config)
    run_id = _previous_run(client, Path(out_dir), uri) if resumed else None
    if run_id is None:
        run = client.create_run(experiment_id(client, experiment or run_name, uri), run_name=run_name,
                                tags={"out_dir": str(Path(out_dir).resolve())})
        run_id = run.info.run_id
        logged: dict[str, str] = {}
    else:
        client.update_run(run_id, status="RUNNING")
        logged = client.get_run(run_id).data.params
    new = [mlflow.entities.Param(k, v) for k, v in params.items() if k not in logged]
    changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
    tags = [mlflow.entities.RunTag("world_size", str(world_size))]
    if changed:
        tags.append(mlflow.entities.RunTag("changed_on_resume", json.dumps(changed)[:MAX_PARAM_CHARS]))
    client.log_batch(run_id, params=new, tags=tags)
    (Path(out_dir) / RUN_FILE).write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}) + "\n")
    return MlflowTracker(client, run_id)
