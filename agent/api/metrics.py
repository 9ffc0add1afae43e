"""Prometheus metrics of the agent's local API, served as text at ``GET /metrics``.

:class:`ApiMetrics` owns its own registry, so several servers (or tests) in one process never clash. The
API records requests, latency and failures; the model repository holds the same object and records what
only it knows::

    metrics = ApiMetrics()
    repository = Repository(..., metrics=metrics)     # calls metrics.swaps.inc(), metrics.set_active(...)
    serve(repository, metrics=metrics)

Built on ``prometheus_client``: the exposition format (escaping, histogram buckets, ``_created``
samples) is easy to get subtly wrong by hand, and the library is small and pure Python.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["UNKNOWN_MODEL", "ApiMetrics"]

# label used for requests whose model name is unknown, so a client cannot grow the label set at will
UNKNOWN_MODEL = "_unknown"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    """The agent's metrics. Thread-safe: every method and metric may be used from any thread.

    ``requests`` (labels ``model``, ``outcome``: ok, bad_request, not_found, not_ready, overloaded, error),
    ``latency`` (label ``model``, seconds from body read to response ready), ``failures`` (labels
    ``model``, ``error``: requests that ended in a server error), ``active_model`` (labels ``model``,
    ``version``; 1 for the version serving now), ``swaps`` and ``rollbacks`` (no labels); the load bound:
    ``overloaded`` (label ``limit``: ``concurrency`` or ``queued_bytes``; requests answered 503), and the
    gauges ``in_flight`` (inference requests admitted and not yet answered) and ``queued_bytes`` (their
    request bodies).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "edgepack_inference_requests",
            "Inference requests by model and outcome.",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "edgepack_inference_request_duration_seconds",
            "Time to answer an inference request, body read to response ready.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.failures = Counter(
            "edgepack_inference_failures",
            "Inference requests that ended in a server error, by model and error class.",
            ["model", "error"],
            registry=self.registry,
        )
        self.active_model = Gauge(
            "edgepack_active_model",
            "1 for the model version serving now.",
            ["model", "version"],
            registry=self.registry,
        )
        self.swaps = Counter("edgepack_model_swaps", "Hot swaps to a new model version.", registry=self.registry)
        self.rollbacks = Counter(
            "edgepack_model_rollbacks", "Rollbacks to the previous model version.", registry=self.registry
        )
        self.overloaded = Counter(
            "edgepack_inference_overloaded",
            "Inference requests answered 503 (with Retry-After) because a load bound was reached, by bound.",
            ["limit"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "edgepack_inference_in_flight", "Inference requests admitted and not yet answered.", registry=self.registry
        )
        self.queued_bytes = Gauge(
            "edgepack_inference_queued_bytes",
            "Request body bytes held by inference requests admitted and not yet answered.",
            registry=self.registry,
        )
        self._active: dict[str, str] = {}
        self._lock = threading.Lock()

    def set_active(self, model: str, version: str) -> None:
        """Mark ``version`` as the one serving ``model``, clearing the version it replaces."""
        with self._lock:
            previous = self._active.get(model)
            if previous is not None and previous != version:
                self.active_model.remove(model, previous)
            self._active[model] = version
            self.active_model.labels(model, version).set(1)

    def clear_active(self, model: str) -> None:
        """Forget ``model`` (unloaded): it no longer has an active version."""
        with self._lock:
            previous = self._active.pop(model, None)
            if previous is not None:
                self.active_model.remove(model, previous)

    def add_collector(self, collector: Any) -> None:
        """Register a ``prometheus_client`` collector (e.g. the drift gauges of ``agent/field_metrics.py``)."""
        self.registry.register(collector)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
