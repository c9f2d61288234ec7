"""The morphology service without the web layer: uploads -> jobs -> micro-batches -> answers, drift on the side.

serve_app.py puts HTTP in front of it; tests and the bench drive it through a real server.
"""

from __future__ import annotations

import hashlib
import queue
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.infer import infer, key_seeds, resolve_device
from launch.serve_batch import Job, MicroBatcher
from launch.serve_decode import InputError, Upload, decode_upload, pick_survey
from launch.serve_metrics import ServiceMetrics
from launch.serve_model import ModelSlot, ServedModel, alias_of, known_surveys, load_served, registry_module, \
    resolve_ref

DRIFT_QUEUE = 64  # batches waiting for the drift monitor; past this they are dropped (and counted), never waited on


@dataclass(frozen=True)
class ServiceSettings:
    model: str
    device: str = "auto"
    max_batch: int = 32
    max_wait_ms: float = 5.0
    mc_samples: int = 0
    max_mc_samples: int = 64
    follow_alias_seconds: float = 10.0
    drift_reference: str | None = None
    drift_window: int = 256
    drift_min_count: int = 32
    render_size: int | None = None
    tracking_uri: str | None = None
    cache_dir: str | None = None
    seed: int = 0


@dataclass
class Result:
    """One job's rows of a batch's outputs, with the model that computed them."""
    served: ServedModel
    fractions: np.ndarray
    embedding: np.ndarray
    std: np.ndarray | None


class Service:
    """The live model slot, the micro-batcher in front of it and the drift feed behind it."""

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.device = resolve_device(settings.device)
        self.surveys = known_surveys()
        cache = Path(settings.cache_dir) if settings.cache_dir else None
        first = self._load(resolve_ref(settings.model, settings.tracking_uri, cache))
        alias_version = None
        if alias_of(settings.model):
            registry = registry_module()

            def alias_version(name: str, alias: str) -> str:
                return registry.alias_version(name, alias, tracking_uri=settings.tracking_uri)
        self.slot = ModelSlot(settings.model, first, self._load,
                              lambda uri: resolve_ref(uri, settings.tracking_uri, cache), alias_version,
                              on_swap=self._swapped, on_failure=lambda err: self.metrics.reload_failures.inc())
        self.metrics.set_model(**first.header())
        self._arriving, self._arriving_lock = 0, threading.Lock()  # requests being decoded: batch company on its way
        self.batcher = MicroBatcher(self._run, settings.max_batch, settings.max_wait_ms / 1000.0,
                                    expecting=lambda: self._arriving)
        self._drift: queue.Queue = queue.Queue(DRIFT_QUEUE)
        self._drift_thread = threading.Thread(target=self._drift_loop, name="drift-feed", daemon=True)
        self._drift_thread.start()
        self.slot.follow(settings.follow_alias_seconds)

    @property
    def current(self) -> ServedModel:
        return self.slot.current

    def describe(self) -> dict:
        s = self.settings
        return {**self.current.describe(), "surveys": sorted(self.surveys),
                "batching": {"max_batch": s.max_batch, "max_wait_ms": s.max_wait_ms},
                "follows_alias": bool(self.slot.alias) and s.follow_alias_seconds > 0}

    def enqueue(self, uploads: list[Upload], survey_name: str | None, mc_samples: int | None) -> Job:
        """Decode a request's uploads for the live version (InputError on the first bad one) and queue them for the
        micro-batcher; the job's future resolves to its Result. Runs in a web thread."""
        with self._arriving_lock:
            self._arriving += 1
        try:
            job = self._decode(uploads, survey_name, mc_samples)
            self.batcher.submit(job)
            return job
        finally:
            with self._arriving_lock:
                self._arriving -= 1

    def _decode(self, uploads: list[Upload], survey_name: str | None, mc_samples: int | None) -> Job:
        survey = pick_survey(survey_name, self.surveys)
        served = self.current  # the job runs on the version it was decoded for, whatever happens meanwhile
        mc = self.settings.mc_samples if mc_samples is None else mc_samples
        if not 0 <= mc <= self.settings.max_mc_samples:
            raise InputError(400, "bad-mc-samples", f"mc_samples must be in 0..{self.settings.max_mc_samples}, "
                                                    f"got {mc}")
        if mc and not served.dropout:
            raise InputError(400, "no-dropout", f"mc_samples {mc}: model version {served.version} has no dropout, "
                                                "so MC dropout would give zero spread; send mc_samples=0")
        images = [decode_upload(upload, survey, served.decode).image for upload in uploads]
        # An image's MC passes are seeded by its content: its spread is the same whoever shares its batch.
        seeds = key_seeds(self.settings.seed, [hashlib.sha256(u.data).hexdigest() for u in uploads]) if mc else []
        return Job(torch.stack(images), survey.name, mc, model=served, seeds=seeds)

    def answer(self, job: Job, result: Result, filenames: list[str]) -> dict:
        names = result.served.source.names
        predictions = []
        for i, filename in enumerate(filenames):
            row = {"filename": filename, "survey": job.survey,
                   "features": dict(zip(names, map(float, result.fractions[i])))}
            if result.std is not None:
                row["std"] = dict(zip(names, map(float, result.std[i])))
            row["embedding_norm"] = float(np.linalg.norm(result.embedding[i]))
            predictions.append(row)
        return {"model": result.served.header(), "mc_samples": job.mc_samples, "predictions": predictions}

    def reload(self) -> bool:
        """Check the alias now (POST /v1/reload, SIGHUP); True when another version took over."""
        return self.slot.checked()

    def close(self) -> None:
        self.slot.stop()
        self.batcher.close()
        self._drift.put(None)
        self._drift_thread.join(5.0)

    def _load(self, ref) -> ServedModel:
        s = self.settings
        return load_served(ref, self.device, self.surveys, s.render_size, s.drift_reference,
                           {"window": s.drift_window, "min_count": s.drift_min_count})

    def _swapped(self, old: ServedModel, new: ServedModel) -> None:
        self.metrics.set_model(**new.header())
        self.metrics.swaps.inc()
        self.metrics.clear_drift()  # the new version's monitor starts its own windows
        print(f"serve: {self.settings.model} now answers with version {new.version} (was {old.version}; "
              f"weights {new.weights_sha256[:12]})", file=sys.stderr, flush=True)

    def _run(self, jobs: list[Job]) -> None:
        """One micro-batch: a forward per (model version, MC samples) group, each job's rows to its future."""
        groups: dict[tuple[int, int], list[Job]] = defaultdict(list)
        for job in jobs:
            groups[(id(job.model), job.mc_samples)].append(job)
        for group in groups.values():
            served, mc = group[0].model, group[0].mc_samples
            images = torch.cat([job.images for job in group])
            seeds = [seed for job in group for seed in job.seeds]
            step = self.settings.max_batch
            started = time.perf_counter()
            outs = [infer(served.model, images[i:i + step], mc, row_seeds=seeds[i:i + step] if mc else None)
                    for i in range(0, len(images), step)]
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
            for out in outs:
                self.metrics.batch_size.observe(len(out.fractions))
            fractions = np.concatenate([o.fractions for o in outs])
            embedding = np.concatenate([o.embedding for o in outs])
            std = np.concatenate([o.std for o in outs]) if mc else None
            first = 0
            for job in group:
                rows = slice(first, first + job.size)
                first += job.size
                self.metrics.galaxies.labels(job.survey, served.version).inc(job.size)
                job.future.set_result(Result(served, fractions[rows], embedding[rows],
                                             None if std is None else std[rows]))
            if served.drift is not None:
                self._feed_drift(served, group, embedding)

    def _feed_drift(self, served: ServedModel, group: list[Job], embedding: np.ndarray) -> None:
        by_survey: dict[str, list[int]] = defaultdict(list)
        first = 0
        for job in group:
            by_survey[job.survey] += range(first, first + job.size)
            first += job.size
        images = torch.cat([job.images for job in group])
        for survey, rows in by_survey.items():
            try:
                self._drift.put_nowait((served, survey, embedding[rows], images[rows]))
            except queue.Full:
                self.metrics.drift_dropped.inc()

    def _drift_loop(self) -> None:
        while (item := self._drift.get()) is not None:
            from eval.drift import image_stats, unnormalise  # only where a monitor exists (load_served imported it)

            served, survey, embedding, images = item
            spec = served.decode.input
            try:  # image_stats measures the 8-bit rendered pixels, before the model's normalisation
                served.drift.update(survey, embedding, image_stats(unnormalise(images.numpy(), spec.mean, spec.std)))
                self.metrics.drift_images.labels(survey).inc(len(embedding))
                if served is self.current:
                    self.metrics.set_drift(served.drift.scores())
            except Exception as err:  # noqa: BLE001 - drift is a side channel: it must not stop predictions
                print(f"serve: drift update failed ({type(err).__name__}: {err})", file=sys.stderr, flush=True)
