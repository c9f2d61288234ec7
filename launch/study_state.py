"""Whether a study node is done, from the files alone: provenance records, export markers and shard manifests.

A node's provenance is the sha256 of what its output depends on: its settings (the resolved training config, or the
evaluation's), the sha256 of every shard manifest it reads and the sha256 of the weights of every export it starts
from or evaluates. It is computed when the node starts (`stamp`, once its parents have exported) and kept in
<node dir>/study_provenance.json; the node is done when its output is finished and the record still matches. No
torch here: a SLURM job stamps its node before srun starts training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from launch.slurm import EXPORT_MARKERS

NODE_FILE = "study_node.json"  # the node's spec, written where it runs
CONFIG_FILE = "study_config.yaml"  # an arm's resolved training config
RECORD_FILE = "study_provenance.json"
RESULT_FILE = "result.json"  # an evaluation's, written last
KEEP = {NODE_FILE, CONFIG_FILE, "preds"}  # what starting a node over keeps (predictions are keyed by weights hash)


def sha256_of(path: Path) -> str:
    """sharding.writer's, without the webdataset import it brings (a SLURM job stamps before training starts)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def export_finished(export: Path) -> bool:
    return any((Path(export) / marker).is_file() for marker in EXPORT_MARKERS)


def weights_file(export: str | Path) -> Path | None:
    """The weights a child reads from a finished export: the model, or an ssl export's backbone (its teacher)."""
    export = Path(export)
    if not export_finished(export):
        return None
    for path in (export / "model.safetensors", export / "backbone" / "model.safetensors"):
        if path.is_file():
            return path
    return None


def inputs(spec: dict) -> dict | None:
    """What the node's output depends on, or None while something it reads is missing."""
    found = {"node": spec["hashed"], "manifests": {}, "parents": {}}
    for survey in spec["reads"]:
        manifest = Path(spec["shards"]) / survey / "manifest.json"
        if not manifest.is_file():
            return None
        found["manifests"][survey] = sha256_of(manifest)
    for parent, export in spec["parents"].items():
        weights = weights_file(export)
        if weights is None:
            return None
        found["parents"][parent] = sha256_of(weights)
    return found


def digest(found: dict) -> str:
    return hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest()


def read_record(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None


def finished(spec: dict) -> bool:
    folder = Path(spec["dir"])
    if spec["kind"] == "arm":
        return export_finished(folder / "export")
    if spec["kind"] == "eval":
        return (folder / RESULT_FILE).is_file()
    return all((Path(spec["shards"]) / s / "manifest.json").is_file() for s in spec["makes"])


def state(spec: dict, waiting: list[str]) -> tuple[bool, str]:
    """(done, why) for a node; `waiting`: the nodes it needs that are not done (then it is not done either)."""
    if spec["kind"] == "data":
        missing = [s for s in spec["makes"] if not (Path(spec["shards"]) / s / "manifest.json").is_file()]
        return (not missing, f"makes {missing}" if missing else f"all {len(spec['makes'])} surveys in {spec['shards']}")
    if waiting:
        return False, f"waits for {', '.join(waiting)}"
    found = inputs(spec)
    record = read_record(Path(spec["dir"]))
    if found is None:
        return False, "an input is missing"
    current = digest(found)
    if record is None:
        return False, "not run yet" if not finished(spec) else "no provenance record: runs again"
    if record.get("provenance") != current:
        return False, f"changed since it ran ({_what_changed(record.get('inputs') or {}, found)}): runs again"
    if not finished(spec):
        return False, "interrupted: continues from its last checkpoint" if spec["kind"] == "arm" else "interrupted"
    return True, f"up to date (provenance {current[:12]})"


def _what_changed(old: dict, new: dict) -> str:
    changed = ["settings"] if old.get("node") != new["node"] else []
    changed += [f"{s} shards" for s, h in new["manifests"].items() if old.get("manifests", {}).get(s) != h]
    changed += [f"{p}'s export" for p, h in new["parents"].items() if old.get("parents", {}).get(p) != h]
    return ", ".join(changed) or "inputs"


def write_spec(spec: dict) -> Path:
    """<dir>/study_node.json (and an arm's resolved config as <dir>/study_config.yaml, what `python -m train` reads)."""
    import yaml

    folder = Path(spec["dir"])
    folder.mkdir(parents=True, exist_ok=True)
    if spec["kind"] == "arm":
        write_atomically(folder / CONFIG_FILE, yaml.safe_dump(spec["config"], sort_keys=False))
    path = folder / NODE_FILE
    write_atomically(path, json.dumps(spec, indent=2) + "\n")
    return path


def read_spec(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / NODE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read a study node from {path}: {err}") from None


def spec_digest(spec: dict) -> str:
    """What a submitted job was asked to run: a re-submit with another spec replaces the job."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def stamp(spec: dict) -> str:
    """Before a node (re)starts, with its parents done: keep its folder when its record matches (an interrupted
    arm continues from its checkpoint), otherwise empty it; then write the record. Returns what it did."""
    found = inputs(spec)
    if found is None:
        raise ValueError(f"{spec['kind']} {spec['name']}: a shard manifest or a parent's export is missing "
                         f"(reads {spec['reads']} in {spec['shards']}, parents {list(spec['parents'])})")
    current = digest(found)
    folder = Path(spec["dir"])
    record = read_record(folder)
    if record is not None and record.get("provenance") == current:
        return "continues from its last checkpoint" if (folder / "checkpoints").is_dir() else "starts"
    cleared = [p for p in folder.iterdir() if p.name not in KEEP] if folder.is_dir() else []
    for path in cleared:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / RECORD_FILE, json.dumps({"provenance": current, "inputs": found}, indent=2) + "\n")
    return f"starts over ({_what_changed(record.get('inputs') or {}, found)} changed)" if record else \
        ("starts over (no provenance record)" if cleared else "starts")


def write_atomically(path: Path, content: str | bytes) -> None:
    """Readers (another job rebuilding the report, a status) see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    tmp.replace(path)
