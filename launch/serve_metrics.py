"""The service's Prometheus metrics (the one prometheus-client importer), on a registry of their own per app."""

from __future__ import annotations

import threading

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


class ServiceMetrics:
    """Request counts and latency by route and status, batch sizes, rejected inputs, the live model and drift."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sommelier_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("sommelier_request_seconds", "Request latency by route (upload to answer)",
                                 ["route"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_size = Histogram("sommelier_batch_size", "Galaxies per model forward (micro-batches)",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("sommelier_batch_seconds", "Model time per micro-batch",
                                       buckets=LATENCY_BUCKETS_S, registry=r)
        self.galaxies = Counter("sommelier_galaxies", "Galaxies predicted, by survey and model version",
                                ["survey", "version"], registry=r)
        self.rejected = Counter("sommelier_rejected_inputs", "Refused requests and uploads, by reason", ["reason"],
                                registry=r)
        self.model_info = Gauge("sommelier_model_info", "The model version answering (1) by name, version, weights",
                                ["name", "version", "uri", "weights_sha256"], registry=r)
        self.swaps = Counter("sommelier_model_swaps", "Switches to another model version", registry=r)
        self.reload_failures = Counter("sommelier_reload_failures", "Alias checks or loads that failed (the "
                                                                    "previous version kept answering)", registry=r)
        self.drift = Gauge("sommelier_drift_score", "Drift score of arriving images against the model's "
                                                    "reference, by survey and statistic", ["survey", "statistic"],
                           registry=r)
        self.drift_images = Counter("sommelier_drift_images", "Images fed to the drift monitor, by survey",
                                    ["survey"], registry=r)
        self.drift_dropped = Counter("sommelier_drift_dropped_batches", "Batches not fed to the drift monitor "
                                                                        "(its queue was full)", registry=r)
        self._lock = threading.Lock()

    def set_model(self, name: str | None, version: str, uri: str, weights_sha256: str) -> None:
        with self._lock:  # one series at 1: the version answering now
            self.model_info.clear()
            self.model_info.labels(name or "", version, uri, weights_sha256).set(1)

    def set_drift(self, scores: dict[tuple[str, str], float]) -> None:
        for (survey, statistic), value in scores.items():
            self.drift.labels(survey, statistic).set(float(value))

    def clear_drift(self) -> None:
        self.drift.clear()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
