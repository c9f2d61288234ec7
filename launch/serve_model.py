"""The served model: resolving a URI, loading a version beside the live one, following a registry alias.

A registered model (models:/NAME@ALIAS, models:/NAME/VERSION, NAME@ALIAS) comes from launch.registry (MLflow);
an export or run folder is served as it is, version "local". The live version is one reference (`slot.current`)
replaced in a single assignment once the new version is loaded and has answered a warm-up batch; work already
decoded for the old version still runs on it (each job holds its model), so every answer names the version that
computed it.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eval.infer import has_dropout, infer
from eval.source import ModelSource, load_model, open_source, resolve_export
from launch.serve_decode import DecodeSettings, decode_settings
from models.head import MorphologyModel
from sharding.registry import SurveyConfig, list_surveys, load_survey

_ALIAS = re.compile(r"^(?:models:/)?(?P<name>[^/@\s]+)@(?P<alias>[^/@\s]+)$")


@dataclass(frozen=True)
class LocalRef:
    """A folder served without a registry: launch.registry.ModelRef's fields."""
    name: str | None
    version: str
    uri: str
    export_dir: Path
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    reference: Path | None = None


@dataclass
class ServedModel:
    """One loaded version: the model, how its inputs are made, and its drift monitor (or None)."""
    ref: Any  # launch.registry.ModelRef or LocalRef
    source: ModelSource
    model: MorphologyModel
    device: torch.device
    weights_sha256: str
    decode: DecodeSettings
    dropout: bool
    drift: Any = None  # eval.drift.DriftMonitor
    drift_reference: str | None = None

    @property
    def version(self) -> str:
        return str(self.ref.version)

    def header(self) -> dict:
        """What every answer says about the model that computed it."""
        return {"name": self.ref.name, "version": self.version, "uri": self.ref.uri,
                "weights_sha256": self.weights_sha256}

    def describe(self) -> dict:
        spec = self.decode.input
        record = self.source.record()
        return {**self.header(), "aliases": list(self.ref.aliases), "tags": dict(self.ref.tags),
                "schema": {**record["schema"], "names": self.source.names},
                "input": {"image_size": spec.image_size, "mean": list(spec.mean), "std": list(spec.std)},
                "fits_render": {"sizes": self.decode.render_sizes, "formats": self.decode.render_formats},
                "mc_dropout": self.dropout, "device": self.device.type,
                "drift": {"enabled": self.drift is not None, "reference": self.drift_reference},
                "provenance": record}


def alias_of(uri: str) -> tuple[str, str] | None:
    """(name, alias) of models:/NAME@ALIAS or NAME@ALIAS; None for a version, a folder or anything else."""
    if Path(uri).exists():
        return None
    match = _ALIAS.match(uri.strip())
    return (match["name"], match["alias"]) if match else None


def registry_module():
    try:
        import launch.registry as registry
    except ImportError as err:
        raise ValueError(f"serving a registered model needs launch.registry and mlflow ({err}); install the "
                         "'serve' extra (pip install 'galaxy-sommelier[serve]') or serve an export folder") from err
    return registry


def resolve_ref(uri: str, tracking_uri: str | None, cache_dir: Path | None):
    """A folder as it is (no registry, no mlflow import); anything else through the registry."""
    path = Path(uri)
    if path.is_dir():
        return LocalRef(None, "local", str(path), resolve_export(path))
    if path.exists() or uri.startswith(("/", "./", "../")):
        raise ValueError(f"--model {uri}: not a model export folder or training run folder")
    return registry_module().resolve(uri, tracking_uri=tracking_uri, cache_dir=cache_dir)


def known_surveys() -> dict[str, SurveyConfig]:
    return {name: load_survey(name) for name in list_surveys()}


def load_served(ref, device: torch.device, surveys: dict[str, SurveyConfig], render_size: int | None = None,
                drift_reference: str | None = None, drift_options: dict | None = None) -> ServedModel:
    """Load, check and warm up one version (a broken export fails here, before it could replace a working one)."""
    source = open_source(ref.export_dir)
    model = load_model(source, device)
    decode = decode_settings(source, surveys, render_size)
    size = decode.input.image_size
    infer(model, torch.zeros(2, 3, size, size))  # warm-up: the first forward allocates; a bad export raises here
    reference = drift_reference or (str(ref.reference) if getattr(ref, "reference", None) else None)
    monitor = None
    if reference:
        from eval.drift import DriftMonitor, load_reference  # the drift monitor only where there is a reference

        monitor = DriftMonitor(load_reference(reference), **(drift_options or {}))
    return ServedModel(ref, source, model, device, source.record()["weights_sha256"], decode, has_dropout(model),
                       monitor, reference)


class ModelSlot:
    """The live version and, for an alias, how to move to the version it points at (poll or forced check)."""

    def __init__(self, uri: str, first: ServedModel, load: Callable[[Any], ServedModel],
                 resolve: Callable[[str], Any], alias_version: Callable[[str, str], str] | None,
                 on_swap: Callable[[ServedModel, ServedModel], None] = lambda old, new: None,
                 on_failure: Callable[[BaseException], None] = lambda err: None) -> None:
        self.uri, self.current = uri, first
        self.alias = alias_of(uri)
        self._load, self._resolve, self._alias_version = load, resolve, alias_version
        self._on_swap, self._on_failure = on_swap, on_failure
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """Load the version the alias points at beside the live one and switch to it; True when it switched."""
        if self.alias is None or self._alias_version is None:
            return False
        name, alias = self.alias
        with self._lock:  # one check at a time: a poll and a SIGHUP must not load the same version twice
            version = str(self._alias_version(name, alias))
            old = self.current
            if version == old.version:
                return False
            new = self._load(self._resolve(f"models:/{name}/{version}"))
            self.current = new  # the switch: one reference; jobs already decoded keep their own model
        self._on_swap(old, new)
        return True

    def follow(self, every_s: float) -> None:
        """Poll the alias every `every_s` seconds in a daemon thread (and whenever wake() is called)."""
        if self.alias is None or every_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._follow, args=(every_s,), name="alias-follower", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def checked(self) -> bool:
        """check(), with a failure reported and the live version kept (a registry outage must not stop serving)."""
        try:
            return self.check()
        except Exception as err:  # noqa: BLE001 - any failure leaves the old version answering
            self._on_failure(err)
            print(f"serve: alias check of {self.uri} failed, version {self.current.version} keeps answering: "
                  f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
            return False

    def _follow(self, every_s: float) -> None:
        while not self._stop.is_set():
            self._wake.wait(every_s)
            self._wake.clear()
            if not self._stop.is_set():
                self.checked()
