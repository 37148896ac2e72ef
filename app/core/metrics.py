"""Prometheus metrics of the service (exposed on ``GET /metrics``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class _BulkChild:
    """One label set of a :class:`BulkHistogram`: bucket counts and a sum, under a lock."""

    def __init__(self, bounds: np.ndarray) -> None:
        self._bounds = bounds
        self._counts = np.zeros(len(bounds) + 1, np.int64)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        self.observe_many(np.array([value], np.float64))

    def observe_many(self, values: np.ndarray) -> None:
        """Observe every value of ``values`` with one bucket count per call, not per value."""
        counts = np.bincount(
            np.searchsorted(self._bounds, values, side="left"), minlength=len(self._counts)
        )
        total = float(values.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def snapshot(self) -> tuple[np.ndarray, float]:
        with self._lock:
            return self._counts.copy(), self._sum


class BulkHistogram(Collector):
    """A labelled histogram that observes many values at once, through the public collector API.

    Exposes the same ``_bucket``/``_count``/``_sum`` samples as ``prometheus_client.Histogram``
    (a value lands in the first bucket whose bound is >= it).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._bounds = np.array(buckets, np.float64)
        self._children: dict[tuple[str, ...], _BulkChild] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> _BulkChild:
        key = tuple(str(v) for v in values)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = _BulkChild(self._bounds)
            return child

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            children = list(self._children.items())
        bounds = [*map(floatToGoString, self._bounds.tolist()), "+Inf"]
        for key, child in children:
            counts, total = child.snapshot()
            cumulative = np.cumsum(counts).tolist()
            family.add_metric(list(key), list(zip(bounds, cumulative, strict=True)), total)
        yield family


HTTP_REQUESTS = Counter(
    "http_requests_total",
    "HTTP requests by route, method and status (499: the client went away first).",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "http_request_duration_seconds",
    "HTTP request latency by route.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
INFERENCE_CALLS = Counter("model_inference_calls_total", "Model calls.", ["model"])
BATCH_SIZE = Histogram(
    "model_batch_size",
    "Rows (images or sessions) per model call.",
    ["model"],
    buckets=BATCH_BUCKETS,
)
QUEUE_WAIT = BulkHistogram(
    "model_queue_wait_seconds",
    "Time a request or message waited before its model call started.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
COMPUTE_TIME = Histogram(
    "model_compute_seconds", "Duration of one model call.", ["model"], buckets=LATENCY_BUCKETS
)
GC_PAUSE = Histogram(
    "python_gc_pause_seconds",
    "Garbage-collector pauses (the whole process stops), by generation.",
    ["generation"],
    buckets=LATENCY_BUCKETS,
)
ECHO_ACTIVE_SESSIONS = Gauge("echo_active_sessions", "Echo sessions with an open WebSocket.")
ECHO_STORED_SESSIONS = Gauge("echo_stored_sessions", "Echo sessions kept (open or resumable).")
ECHO_MESSAGES = Counter("echo_messages_total", "Echo messages answered.")
ECHO_ERRORS = Counter("echo_errors_total", "Echo error frames sent, by code.", ["code"])
ECHO_SEQUENCE_STEPS = Counter(
    "echo_sequence_steps_total",
    "v2 sequence steps answered: advanced, or replayed for a retried request id.",
    ["outcome"],
)
ECHO_SESSIONS_REFUSED = Counter(
    "echo_sessions_refused_total", "Echo connections refused a session, by reason.", ["reason"]
)
ECHO_SESSIONS_EVICTED = Counter(
    "echo_sessions_evicted_total",
    "Detached echo sessions dropped: ttl (unused too long) or lru (room for a new one).",
    ["why"],
)
ECHO_CUT_OFF = Counter(
    "echo_connections_cut_off_total",
    "Echo connections the server ended: idle_timeout (sent nothing), send_timeout (never read).",
    ["why"],
)
ECHO_STORE_SECONDS = Histogram(
    "echo_store_seconds",
    "Duration of one session-store command (Redis), by operation.",
    ["op"],
    buckets=LATENCY_BUCKETS,
)
ECHO_STORE_ERRORS = Counter(
    "echo_store_errors_total", "Session-store commands that failed (Redis), by operation.", ["op"]
)
ECHO_STORE_WRITES = Histogram(
    "echo_store_steps_per_write",
    "Echo steps stored by one Redis round trip (group commit).",
    buckets=BATCH_BUCKETS,
)
MODEL_VERSION_EVENTS = Counter(
    "model_version_events_total",
    "Model versions loaded, failed (to load or warm up) and unloaded, by model.",
    ["model", "event"],
)
HTTP_EDGE_REFUSALS = Counter(
    "http_edge_refusals_total",
    "Connections answered and closed by the HTTP edge (app/core/edge.py), by reason.",
    ["reason"],
)
