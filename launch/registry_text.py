"""The registry's plain-value side: the tags a version records (from an export's provenance and eval JSON files),
references (NAME@ALIAS, NAME/VERSION), and `python -m launch registry`'s options and tables. No mlflow here: the
registry itself is launch/registry.py."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

from eval.source import ModelSource
from models.io import WEIGHTS_FILE
from sharding.writer import sha256_of
from train.mlflow_tracking import DEFAULT_TRACKING_URI

KEY_METRICS = ("mean.r", "mean.mae", "nll")  # what `list` shows of each survey's metric tags
SKIP_METRIC_KEYS = {"model", "predictions", "shards", "bootstrap", "seed", "dropped"}  # provenance, not metrics
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_TAG_KEY = 250  # MLflow's limit on a registry tag's key


def export_tags(source: ModelSource) -> dict[str, str]:
    """Provenance, schema, input size and normalisation of an export, as registry tags (all strings)."""
    prov, spec = source.provenance, source.input_spec()
    config = json.dumps(prov.get("config", {}), sort_keys=True).encode()
    return {"weights_sha256": sha256_of(source.path / WEIGHTS_FILE),
            "provenance.config_sha256": hashlib.sha256(config).hexdigest(),
            "provenance.git_commit": str(prov.get("git_commit")), "provenance.stage": str(prov.get("stage")),
            "provenance.step": str(prov.get("step")), "provenance.loss": str(prov.get("loss")),
            "provenance.model": str(source.meta.get("model", {}).get("name")),
            "provenance.mix": json.dumps(source.mix),
            "provenance.manifests_sha256": json.dumps({s: v.get("manifest_sha256")
                                                       for s, v in prov.get("surveys", {}).items()}),
            "schema.name": source.schema["name"], "schema.version": str(source.schema["version"]),
            "schema.features": json.dumps(source.names),
            "input.image_size": str(spec.image_size), "input.mean": json.dumps(spec.mean),
            "input.std": json.dumps(spec.std)}


def flatten_metrics(data: dict, prefix: str = "metric.") -> dict[str, str]:
    """Numeric leaves of an eval JSON as `metric.<path>` -> text (short numeric lists, e.g. intervals, as JSON)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_metrics(value, f"{path}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[path] = repr(value)
        elif isinstance(value, list) and 0 < len(value) <= 4 and all(isinstance(v, (int, float)) for v in value):
            out[path] = json.dumps(value)
    return out


def metric_tags(paths: list[Path], weights_sha256: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    origin: dict[str, Path] = {}
    for path in map(Path, paths):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--metrics {path}: not a readable JSON file ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"--metrics {path}: expected a JSON object as `python -m eval metrics --json` writes")
        scored = (data.get("model") or {}).get("weights_sha256")
        if scored and scored != weights_sha256:
            raise ValueError(f"--metrics {path} scored another model (weights sha256 {scored[:12]}..., this export "
                             f"has {weights_sha256[:12]}...); give the metrics of this export")
        flat = flatten_metrics({k: v for k, v in data.items() if k not in SKIP_METRIC_KEYS})
        if not flat:
            raise ValueError(f"--metrics {path}: no numbers in it (expected `python -m eval metrics --json` output)")
        for key, value in flat.items():
            if len(key) > MAX_TAG_KEY:
                raise ValueError(f"--metrics {path}: {key[:60]}... is longer than MLflow's 250-character tag key")
            if key in tags and tags[key] != value:
                raise ValueError(f"{key} is {tags[key]} in {origin[key]} but {value} in {path}: give one of them")
            tags[key], origin[key] = value, path
    if paths:
        tags["metrics.files"] = json.dumps([str(p) for p in paths])
    return tags



def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """"models:/NAME@ALIAS", "NAME@ALIAS", "models:/NAME/3", "NAME/3", "NAME" -> (name, version, alias)."""
    text = spec[len("models:/"):] if spec.startswith("models:/") else spec
    name, version, alias = text, None, None
    if "@" in text:
        name, alias = text.split("@", 1)
    elif "/" in text:
        name, version = text.split("/", 1)
        if not version.isdigit():
            raise ValueError(f"{spec!r}: a version is a number (NAME/3), or name an alias (NAME@production)")
    if not NAME_PATTERN.fullmatch(name) or alias == "":
        raise ValueError(f"{spec!r} is not NAME, NAME@ALIAS or NAME/VERSION (a name is letters, digits, _ . -)")
    return name, version, alias


def key_metrics(tags: Mapping[str, str]) -> str:
    """`sdss r 0.812 mae 0.051 nll 3.2; hst ...` from the metric tags of each survey of `eval metrics`."""
    surveys = sorted({m[1] for key in tags if (m := re.fullmatch(r"metric\.surveys\.([^.]+)\.n", key))})
    parts = []
    for survey in surveys:
        values = [f"{k.split('.')[-1]} {float(tags[f'metric.surveys.{survey}.{k}']):.3g}" for k in KEY_METRICS
                  if f"metric.surveys.{survey}.{k}" in tags]
        parts.append(" ".join([survey, *values]))
    return "; ".join(parts) or "-"


VERSION_HEADER = ["MODEL", "VERSION", "ALIASES", "STAGE", "STEP", "WEIGHTS", "CREATED", "METRICS"]


def version_row(v, aliases: list[str]) -> list[str]:
    """A registry ModelVersion and the aliases that point at it as a row under VERSION_HEADER."""
    return [v.name, str(v.version), ",".join(sorted(aliases)) or "-", v.tags.get("provenance.stage", "-"),
            v.tags.get("provenance.step", "-"), v.tags.get("weights_sha256", "-")[:12], when(v.creation_timestamp),
            key_metrics(v.tags)]


def when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if ms else "-"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows])


def format_tags(tags: Mapping[str, str], all_metrics: bool = False) -> list[str]:
    """Tags sorted and indented; per-feature metric tags only counted unless `all_metrics`."""
    per_feature = [k for k in tags if k.startswith("metric.") and ".features." in k]
    lines = [f"  {key} = {tags[key]}" for key in sorted(tags) if all_metrics or key not in per_feature]
    if per_feature and not all_metrics:
        lines.append(f"  (+{len(per_feature)} per-feature metric tags: --all shows them)")
    return lines


EPILOG = """examples:
  python -m launch registry add runs/mixed --name morphology --metrics ukidss.json hst.json --reference ref.zarr
  python -m launch registry list
  python -m launch registry show morphology@production       # or morphology/3, or morphology (every version)
  python -m launch registry promote morphology/3 --alias production
  python -m launch registry rollback morphology --alias production
  python -m launch serve --model models:/morphology@production
  mlflow models serve -m models:/morphology@production --env-manager local   # MLflow's own server, same model
The store: --tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db with artifacts in runs/mlartifacts
(an MLflow server: MLFLOW_TRACKING_URI=http://host:5000)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch registry", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Model exports as versions of an MLflow registered model (an MLflow pyfunc: encoded images or "
                    "a normalised batch in, the features by name out), tagged with their provenance, schema, input "
                    "size and normalisation and eval metrics; aliases such as production that a service follows.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tracking-uri", help="MLflow tracking/registry store (default: MLFLOW_TRACKING_URI, "
                                               f"else {DEFAULT_TRACKING_URI})")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("add", parents=[common], help="register a run's export as a new version")
    p.add_argument("run", help="a training run folder or its export/ folder")
    p.add_argument("--name", required=True, help="registered model name, e.g. morphology")
    p.add_argument("--metrics", nargs="+", default=[], type=Path,
                   help="eval JSON files (python -m eval metrics --json) recorded as metric.<path> tags")
    p.add_argument("--reference", type=Path, help="a drift reference (file or folder) stored beside the model")
    p = sub.add_parser("list", parents=[common], help="every version: aliases, provenance, key metrics")
    p = sub.add_parser("show", parents=[common], help="NAME, NAME@ALIAS or NAME/VERSION: tags, artifacts")
    p.add_argument("spec")
    p.add_argument("--all", action="store_true", help="also every per-feature metric tag")
    p = sub.add_parser("promote", parents=[common], help="point an alias at NAME/VERSION")
    p.add_argument("spec", help="NAME/VERSION")
    p.add_argument("--alias", default="production")
    p = sub.add_parser("rollback", parents=[common], help="move an alias back to its previous version")
    p.add_argument("name")
    p.add_argument("--alias", default="production")
    return parser.parse_args(argv)
