"""Prometheus metrics of one app, in a registry of its own (several apps can live in one process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SAMPLE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    """Request counts, latencies, queue time and depth, batch sizes and MC sample counts."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        # labelled children looked up once per label set: `labels()` takes a lock and builds a tuple per call
        # (the label values are bounded: models, route templates, modes, statuses)
        self._answers: dict[tuple[str, str, str, str], Any] = {}
        self._latencies: dict[tuple[str, str], Any] = {}
        self.requests = Counter(
            "dropwise_requests",
            "Every answered HTTP request by model (_unknown: not served; _none: route names no model), "
            "route template, inference mode (_none: not an inference) and HTTP status.",
            ["model", "route", "mode", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "dropwise_request_latency_seconds",
            "Time from validation to answer of an inference request.",
            ["model", "mode"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "dropwise_queue_time_seconds",
            "Time a request waited in its model's queue before its batch ran.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "dropwise_queue_depth", "Requests waiting in a model's queue.", ["model"], registry=self.registry
        )
        self.batch_size = Histogram(
            "dropwise_batch_size",
            "Rows per batched forward pass.",
            ["model", "mode"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.abandoned = Counter(
            "dropwise_abandoned_batches",
            "MC computations stopped midway because every request of the batch was past its deadline.",
            ["model"],
            registry=self.registry,
        )
        self.mc_samples = Histogram(
            "dropwise_mc_samples",
            "MC-dropout sample count T per request.",
            ["model"],
            buckets=SAMPLE_BUCKETS,
            registry=self.registry,
        )

    def count_answer(self, *, model: str, route: str, mode: str, status: str) -> None:
        """Count one answered HTTP request (called by the request-context middleware for every answer)."""
        key = (model, route, mode, status)
        child = self._answers.get(key)
        if child is None:
            child = self._answers[key] = self.requests.labels(model=model, route=route, mode=mode, status=status)
        child.inc()

    def observe_latency(self, model: str, mode: str, seconds: float) -> None:
        """Time from validation to answer of one inference request."""
        key = (model, mode)
        child = self._latencies.get(key)
        if child is None:
            child = self._latencies[key] = self.latency.labels(model=model, mode=mode)
        child.observe(seconds)

    def render(self) -> bytes:
        """The text exposition format of this registry."""
        return generate_latest(self.registry)
