"""Benchmark runs kept under --out, and the shards they were trained on.

A benchmark re-run skips the runs it finds finished, which is only right when the shards they were trained on are
the ones it builds now: after a change to the mock sky or to the build, kept runs describe other galaxies, and
pairing their predictions with new ones would compare unlike things. Each run records a fingerprint of its shards
(every shard's sha256 and its labels table, per survey); a re-run reuses a run only when the fingerprint matches
(and ssl_bench.check_recipe, only when the run's resolved config is the one the re-run would train with).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

RECORD = "bench_shards.json"
"""Written beside a finished run's export: the fingerprint of the shards it was trained on."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def shard_fingerprint(*roots: Path) -> str:
    """One digest of every survey's shards under the shard roots: a shard's bytes or a label changing changes it."""
    digest = hashlib.sha256()
    for root in roots:
        manifests = sorted(Path(root).glob("*/manifest.json"))
        if not manifests:
            raise ValueError(f"{root} holds no built survey (no <survey>/manifest.json)")
        for manifest_path in manifests:
            manifest = json.loads(manifest_path.read_text())
            digest.update(manifest_path.parent.name.encode())
            for shard in manifest["shards"]:
                digest.update(shard["sha256"].encode())
            digest.update(_sha256(manifest_path.parent / manifest["labels"]).encode())
    return digest.hexdigest()[:16]


def kept(run_dir: Path, export_done: bool, fingerprint: str, data_built_at: float) -> bool:
    """True when `run_dir` holds a finished run on the shards of `fingerprint` (reuse it); False when it holds no
    finished run. Raises ValueError for a finished run on other shards, naming the fix.

    A run finished before runs recorded their shards is reused when it is newer than the shards (`data_built_at`,
    the newest manifest's mtime), and gets the record; an older one is refused like a mismatch.
    """
    if not export_done:
        return False
    record = Path(run_dir) / RECORD
    if record.is_file():
        made_on = json.loads(record.read_text())["shards"]
    else:
        made_on = fingerprint if (Path(run_dir) / "export").stat().st_mtime > data_built_at else "unknown (older)"
    if made_on != fingerprint:
        raise ValueError(
            f"{run_dir} was trained on other shards than the benchmark's now (shards {made_on}, now {fingerprint}): "
            "the mock sky or the build changed since. Its numbers would not compare with new runs; move the "
            "benchmark's runs/ folder aside (or pass another --out) and run again.")
    if not record.is_file():
        record_run(run_dir, fingerprint)
    return True


def record_run(run_dir: Path, fingerprint: str) -> None:
    (Path(run_dir) / RECORD).write_text(json.dumps({"shards": fingerprint}) + "\n")


def newest_manifest_time(*roots: Path) -> float:
    return max(p.stat().st_mtime for root in roots for p in Path(root).glob("*/manifest.json"))

