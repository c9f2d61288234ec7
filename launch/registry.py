"""`python -m launch registry`: model exports as versions of an MLflow registered model, with aliases that move.

A version is an MLflow pyfunc model (logged as code, no pickle) whose artifacts are the export folder and, when one
is given, a drift reference; its tags record the export's provenance, schema, input size and normalisation and the
numbers of eval JSON files (`metric.<path>`). `promote` moves an alias and remembers who held it (the model tag
`alias_history.<alias>`), so `rollback` walks back. `resolve` is what the service loads: a registry reference or a
plain folder -> a local export folder (downloaded once into a cache, checked against its weights sha256).

The only project module that imports mlflow for the registry; only its CLI reads MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from eval.infer import infer, resolve_device
from eval.source import load_model, open_source
from launch.registry_text import (NAME_PATTERN, VERSION_HEADER, export_tags, format_table, format_tags, metric_tags,
                                  parse_args, parse_spec, version_row, when)
from loaders.evaluation import plain_image
from loaders.loader import LoaderConfig
from models.io import WEIGHTS_FILE
from sharding.writer import sha256_of
from train.mlflow_tracking import DEFAULT_TRACKING_URI, RUN_FILE, experiment_id, open_client

EXPERIMENT = "model-registry"  # the MLflow experiment holding the runs that log registered versions
MODEL_ARTIFACT = "model"
DEFAULT_CACHE = Path("runs") / "registry-cache"
IMAGE_COLUMN = "image"
BATCH_SIZE = 64
HISTORY_KEEP = 50  # alias_history.<alias> holds at most this many earlier holders
PYFUNC_CODE = """# The galaxy-sommelier morphology model as MLflow pyfunc (models from code: nothing pickled).
import mlflow
from launch.registry import MorphologyPyfunc
mlflow.models.set_model(MorphologyPyfunc())
"""


@dataclass(frozen=True)
class ModelRef:
    name: str | None  # registered name, None for a plain folder
    version: str  # registry version as a string, "local" for a plain folder
    uri: str  # what the user asked for
    export_dir: Path  # a local export folder
    aliases: tuple[str, ...]
    tags: dict[str, str]  # version tags (provenance, metrics, schema...)
    reference: Path | None  # local path of the drift reference artifact, if one was registered


def default_tracking_uri(env: Mapping[str, str]) -> str:
    return env.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class MorphologyPyfunc(PythonModel):
    """Encoded images (a DataFrame column `image`: JPEG/PNG bytes, or base64 text as JSON carries them) or a
    normalised (n, 3, S, S) batch in; a DataFrame with one column per feature NAME out. Images take the path
    `eval predict` takes from shards: loaders.evaluation.plain_image, then eval.infer."""

    def load_context(self, context):
        self.source = open_source(context.artifacts["export"])
        spec = self.source.input_spec()
        self.loader = LoaderConfig(backend="torch", image_size=spec.image_size, mean=spec.mean, std=spec.std)
        self.model = load_model(self.source, resolve_device("auto"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        # A DataFrame hint is one MLflow leaves unvalidated: a numpy batch passes through unchanged too.
        chunks = [infer(self.model, batch).fractions for batch in self._batches(model_input)]
        names = self.source.names
        return pd.DataFrame(np.concatenate(chunks) if chunks else np.zeros((0, len(names)), np.float32), columns=names)

    def _batches(self, model_input):
        size = self.loader.image_size
        if isinstance(model_input, pd.DataFrame):
            if IMAGE_COLUMN not in model_input.columns:
                raise ValueError(f"the input DataFrame needs a column {IMAGE_COLUMN!r} of encoded JPEG/PNG images; "
                                 f"it has {list(model_input.columns)}")
            values = list(model_input[IMAGE_COLUMN])
            for first in range(0, len(values), BATCH_SIZE):
                yield torch.stack([self._decode(v, first + i) for i, v in enumerate(values[first:first + BATCH_SIZE])])
            return
        batch = torch.as_tensor(np.asarray(model_input), dtype=torch.float32)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise ValueError(f"an image batch must be (n, 3, {size}, {size}) normalised floats, got shape "
                             f"{tuple(batch.shape)}; or pass a DataFrame with a column {IMAGE_COLUMN!r} of image bytes")
        yield from batch.split(BATCH_SIZE)

    def _decode(self, value, row: int) -> torch.Tensor:
        if not isinstance(value, (bytes, bytearray, memoryview, str)):
            raise ValueError(f"row {row}: {IMAGE_COLUMN!r} holds {type(value).__name__}, not encoded image bytes")
        try:
            return plain_image(base64.b64decode(value, validate=True) if isinstance(value, str) else bytes(value),
                               self.loader)
        except Exception as err:  # PIL's many exception types for what is not an image
            raise ValueError(f"row {row}: not a readable JPEG/PNG image ({type(err).__name__}: {err})") from None


# --- the store ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Store:
    client: mlflow.MlflowClient
    uri: str


@functools.lru_cache(maxsize=8)
def open_store(uri: str) -> Store:
    return Store(open_client(uri), uri)


def _registered(store: Store, name: str):
    try:
        return store.client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    known = sorted(m.name for m in store.client.search_registered_models())
    raise ValueError(f"no registered model {name!r} in {store.uri} (registered: {', '.join(known) or 'none'}); "
                     f"register one with `python -m launch registry add RUN --name {name}`")


def lookup(store: Store, name: str, version: str | None = None, alias: str | None = None):
    """The ModelVersion NAME/VERSION or NAME@ALIAS; ValueError naming what exists instead."""
    model = _registered(store, name)
    if alias is not None:
        version = _alias_target(model, alias)
    if version is None or not str(version).isdigit():
        raise ValueError(f"{name}: give a version number or an alias (NAME/3, NAME@production), got {version!r}")
    try:
        return store.client.get_model_version(name, str(version))
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    versions = sorted(int(v.version) for v in store.client.search_model_versions(f"name = '{name}'"))
    raise ValueError(f"{name} has no version {version} (versions: {versions or 'none'})")


def _alias_target(model, alias: str) -> str:
    if alias not in model.aliases:
        raise ValueError(f"{model.name} has no alias {alias!r} (aliases: {_aliases_text(model.aliases)}); set one "
                         f"with `python -m launch registry promote {model.name}/VERSION --alias {alias}`")
    return str(model.aliases[alias])


def _aliases_text(aliases: Mapping[str, str]) -> str:
    return ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"


def add(store: Store, run: str | Path, name: str, metrics: list[Path] = (), reference: Path | None = None):
    """Register the export of `run` (a run folder or its export/) as a new version of `name`; the ModelVersion."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"--name {name!r}: use letters, digits, _ . - (no / or @, which name versions and aliases)")
    source = open_source(run)
    tags = export_tags(source)
    tags.update(metric_tags(list(metrics), tags["weights_sha256"]))
    training = source.path.parent / RUN_FILE  # the MLflow run that trained it (tracking.mlflow)
    if training.is_file():
        tags["provenance.training_run_id"] = json.loads(training.read_text())["run_id"]
    artifacts = {"export": str(source.path)}
    if reference is not None:
        if not Path(reference).exists():
            raise ValueError(f"--reference {reference}: no such file or folder")
        artifacts["reference"] = str(reference)
        tags["reference"] = Path(reference).name
    client = store.client
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "morphology_model.py"
        code.write_text(PYFUNC_CODE)
        pyfunc_log = logging.getLogger("mlflow.pyfunc")
        level, pyfunc_log.level = pyfunc_log.level, logging.ERROR  # no signature, on purpose: a DataFrame or a batch
        try:
            mlflow.pyfunc.save_model(Path(tmp) / MODEL_ARTIFACT, python_model=str(code), artifacts=artifacts,
                                     pip_requirements=["galaxy-sommelier[serve]", f"mlflow=={mlflow.__version__}"])
        finally:
            pyfunc_log.setLevel(level)
        run_info = client.create_run(experiment_id(client, EXPERIMENT, store.uri),
                                     run_name=f"{name}-{source.path.resolve().parent.name}",
                                     tags={"registered_model": name, "export": str(source.path.resolve())}).info
        client.log_artifacts(run_info.run_id, str(Path(tmp) / MODEL_ARTIFACT), MODEL_ARTIFACT)
        client.set_terminated(run_info.run_id)
    try:
        client.create_registered_model(name, description="galaxy-sommelier morphology model")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(name, f"{run_info.artifact_uri}/{MODEL_ARTIFACT}", run_id=run_info.run_id,
                                       tags=tags, description=f"export {source.path.resolve()}")


def _aliases(model) -> dict[str, str]:
    return {alias: str(version) for alias, version in model.aliases.items()}


def _history(model, alias: str) -> list[str]:
    return [str(v) for v in json.loads(model.tags.get(f"alias_history.{alias}", "[]"))]


def promote(store: Store, name: str, version: str, alias: str) -> str:
    """Point NAME@ALIAS at VERSION, remembering the version it leaves (what `rollback` returns to)."""
    if not NAME_PATTERN.fullmatch(alias) or alias.isdigit():
        raise ValueError(f"--alias {alias!r}: an alias is letters, digits, _ . - and not a bare number")
    target = str(lookup(store, name, version).version)
    model = store.client.get_registered_model(name)
    current = _aliases(model).get(alias)
    if current == target:
        return f"{name}@{alias} is already version {current}"
    if current is not None:  # recorded first: a crash before the move leaves a duplicate that rollback skips
        history = (_history(model, alias) + [current])[-HISTORY_KEEP:]
        store.client.set_registered_model_tag(name, f"alias_history.{alias}", json.dumps(history))
    store.client.set_registered_model_alias(name, alias, target)
    return f"{name}@{alias}: {'version ' + current if current else 'unset'} -> version {target}"


def rollback(store: Store, name: str, alias: str) -> str:
    """Move NAME@ALIAS back to the version that held it before; each call walks one promotion further back."""
    model = _registered(store, name)
    current = _aliases(model).get(alias)
    if current is None:
        raise ValueError(f"{name} has no alias {alias!r} to roll back (aliases: {_aliases_text(model.aliases)})")
    history = _history(model, alias)
    existing = {str(v.version) for v in store.client.search_model_versions(f"name = '{name}'")}
    previous = None
    while history and previous is None:
        candidate = history.pop()
        previous = candidate if candidate != current and candidate in existing else None
    store.client.set_registered_model_tag(name, f"alias_history.{alias}", json.dumps(history))
    if previous is None:
        raise ValueError(f"nothing to roll back to: {name}@{alias} is version {current} and no earlier holder of "
                         f"the alias is recorded; choose one with `python -m launch registry promote {name}/VERSION "
                         f"--alias {alias}`")
    store.client.set_registered_model_alias(name, alias, previous)
    return f"{name}@{alias}: version {current} -> version {previous} (rolled back)"


# --- resolving what a service loads ---------------------------------------------------------------------------

def alias_version(name: str, alias: str, tracking_uri: str | None = None) -> str:
    """The version NAME@ALIAS points at now (a cheap poll: one registry query)."""
    return _alias_target(_registered(open_store(tracking_uri or DEFAULT_TRACKING_URI), name), alias)


def resolve(uri: str, tracking_uri: str | None = None, cache_dir: Path | None = None) -> ModelRef:
    """"models:/NAME@ALIAS", "models:/NAME/3", "NAME@ALIAS" (also "NAME/3") or a run/export folder -> a ModelRef
    with a local export folder. `tracking_uri` None is the embedded default store (the CLI passes
    default_tracking_uri(os.environ)); registry versions are downloaded into `cache_dir` once."""
    if not uri.startswith("models:/") and Path(uri).exists():
        source = open_source(uri)
        return ModelRef(None, "local", uri, source.path, (), export_tags(source), None)
    try:
        name, version, alias = parse_spec(uri)
    except ValueError as err:
        raise ValueError(f"{uri!r} is no folder, and not a registry reference: {err}") from None
    if version is None and alias is None:
        raise ValueError(f"{uri!r} is no folder; a registered model needs a version or alias: models:/{name}/3, "
                         f"models:/{name}@production or {name}@production")
    store = open_store(tracking_uri or DEFAULT_TRACKING_URI)
    found = lookup(store, name, version, alias)
    paths = _download(store, found, Path(cache_dir or DEFAULT_CACHE))
    return ModelRef(name, str(found.version), uri, paths["export"], tuple(sorted(found.aliases)), dict(found.tags),
                    paths.get("reference"))


def _artifacts(model_dir: Path) -> dict[str, Path]:
    """The pyfunc's artifacts (export, reference) by name: local paths, as its MLmodel file records them."""
    flavor = mlflow.models.Model.load(str(model_dir)).flavors["python_function"]
    return {name: model_dir / entry["path"] for name, entry in flavor.get("artifacts", {}).items()}


def _download(store: Store, found, cache_dir: Path) -> dict[str, Path]:
    """The version's artifacts in <cache>/<store>/<name>/<version>, a folder kept while its weights match the tag.

    Downloaded beside it and renamed into place, so a concurrent replica or a killed download never leaves a
    folder that looks complete."""
    key = hashlib.sha256(store.uri.encode()).hexdigest()[:12]
    target = cache_dir / key / found.name / str(found.version)
    expected = found.tags.get("weights_sha256")
    if _cached_sha(target) == expected:
        return _artifacts(target)
    tmp = target.parent / f".{found.version}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        store.client.download_artifacts(found.run_id, MODEL_ARTIFACT, str(tmp))
        weights = _artifacts(tmp / MODEL_ARTIFACT)["export"] / WEIGHTS_FILE
        if not weights.is_file() or sha256_of(weights) != expected:
            raise ValueError(f"{found.name}/{found.version}: the downloaded export does not match the version's "
                             f"weights_sha256 tag; its artifacts in {store.uri} are damaged or were replaced")
        (tmp / MODEL_ARTIFACT / ".weights_sha256").write_text(expected)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp / MODEL_ARTIFACT, target)
    except OSError:
        if _cached_sha(target) != expected:  # another process did not put a good copy in place either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _artifacts(target)


def _cached_sha(folder: Path) -> str | None:
    try:
        return (folder / ".weights_sha256").read_text()
    except OSError:
        return None


# --- the command line ---------------------------------------------------------------------------------------------

def version_rows(store: Store, name: str) -> list[list[str]]:
    """Every version of `name` as a table row (search results carry no aliases: the model's are inverted)."""
    held: dict[str, list[str]] = {}
    for alias, version in _aliases(_registered(store, name)).items():
        held.setdefault(version, []).append(alias)
    found = sorted(store.client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    return [version_row(v, held.get(str(v.version), [])) for v in found]


def cmd_list(args: argparse.Namespace, store: Store) -> int:
    models = sorted(m.name for m in store.client.search_registered_models())
    if not models:
        print(f"no registered models in {store.uri}; add one with `python -m launch registry add RUN --name NAME`")
        return 0
    print(format_table(VERSION_HEADER, [row for name in models for row in version_rows(store, name)]))
    return 0


def cmd_show(args: argparse.Namespace, store: Store) -> int:
    name, version, alias = parse_spec(args.spec)
    if version is None and alias is None:
        model = _registered(store, name)
        print(f"{name}: {model.description or ''}\naliases: {_aliases_text(model.aliases)}")
        print("tags:", *(format_tags(model.tags) or ["  -"]), sep="\n")
        print(format_table(VERSION_HEADER, version_rows(store, name)))
        return 0
    v = lookup(store, name, version, alias)
    print(f"{name}/{v.version}  aliases: {', '.join(sorted(v.aliases)) or '-'}  created {when(v.creation_timestamp)}"
          f"  status {v.status}\nartifacts: {store.client.get_model_version_download_uri(name, v.version)}"
          f"\nrun: {v.run_id}\n{v.description or ''}\ntags:")
    print("\n".join(format_tags(v.tags, args.all)))
    return 0


def cmd_add(args: argparse.Namespace, store: Store) -> int:
    v = add(store, args.run, args.name, args.metrics, args.reference)
    print(f"registered {v.name}/{v.version} from {v.description.removeprefix('export ')} "
          f"(weights {v.tags['weights_sha256'][:12]}, {sum(k.startswith('metric.') for k in v.tags)} metric tags)")
    print(f"promote it with `python -m launch registry promote {v.name}/{v.version} --alias production`")
    return 0


def cmd_promote(args: argparse.Namespace, store: Store) -> int:
    name, version, alias = parse_spec(args.spec)
    if version is None:
        raise ValueError(f"{args.spec!r}: promote a version, NAME/VERSION (e.g. {name}/3)")
    print(promote(store, name, version, args.alias))
    return 0


def cmd_rollback(args: argparse.Namespace, store: Store) -> int:
    print(rollback(store, args.name, args.alias))
    return 0


COMMANDS = {"add": cmd_add, "list": cmd_list, "show": cmd_show, "promote": cmd_promote, "rollback": cmd_rollback}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the SQLite store's schema migrations, on first use
    try:
        store = open_store(args.tracking_uri or default_tracking_uri(os.environ))
        return COMMANDS[args.command](args, store)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
