"""Prometheus metrics of the service (exposed on ``GET /metrics`` by :func:`exposition`).

One process: prometheus_client's default registry. Several (``WEB_CONCURRENCY`` > 1): every
worker writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's
multiprocess mode, which the launcher sets up, ``app/__main__.py``), and a scrape answered by any
worker sums the files of all of them: counters and histograms over every worker that ever ran
(a restarted worker's files stay, so nothing goes backwards), gauges over the live ones
(``livesum``; the files of dead workers are dropped at each scrape). The default registry's
process, platform and GC collectors describe one process only, so a multiprocess scrape leaves
them out.

:class:`BulkHistogram` observes a whole batch's values at once (one bucket count per call, not
per value: ``python -m bench.metrics_cost``); in multiprocess mode its counts live in a
per-process memory-mapped file of its own (``bulk_<pid>_<n>.bin``), updated by the same numpy
add, so aggregating costs the hot path nothing.
"""

from __future__ import annotations

import bisect
import glob
import itertools
import json
import mmap
import os
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when it is imported
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
BULK_FILES = "bulk_*.bin"


def multiprocess_dir() -> Path | None:
    """``PROMETHEUS_MULTIPROC_DIR``, or None in a single process."""
    path = os.environ.get(MULTIPROC_ENV)
    return Path(path) if path else None


def metrics_files(path: Path) -> list[Path]:
    """Every file the metrics of any process wrote to ``path``: prometheus_client's and ours."""
    return [*path.glob("*.db"), *path.glob(BULK_FILES)]


def file_pid(file: Path) -> int | None:
    """The process that wrote ``file`` (``<type>_[<mode>_]<pid>.db``, ``bulk_<pid>_<n>.bin``)."""
    parts = file.stem.split("_")
    candidates = [parts[1]] if parts[0] == "bulk" and len(parts) > 1 else parts[-1:]
    pid = candidates[0]
    return int(pid) if pid.isascii() and pid.isdigit() else None  # int("²") would raise


def clean_multiprocess_dir(path: Path, keep_pid: int | None = None) -> int:
    """Create ``path``, and remove the metrics files earlier runs left there (those of
    ``keep_pid``, this process, stay); returns how many were removed."""
    path.mkdir(parents=True, exist_ok=True)
    removed = 0
    for file in metrics_files(path):
        if keep_pid is not None and file_pid(file) == keep_pid:
            continue
        file.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def forget_dead_processes(path: Path) -> None:
    """Drop the live-gauge files of processes that are gone (a worker that was killed and
    replaced): ``livesum`` gauges then sum the live workers only."""
    pids = {file_pid(Path(f)) for f in glob.glob(str(path / "gauge_live*_*.db"))}
    for pid in pids:
        if pid is not None and pid != os.getpid() and not _alive(pid):
            mark_process_dead(pid, str(path))


class _BulkChild:
    """One label set of a :class:`BulkHistogram`: bucket counts and a sum, under a lock.

    The lock is re-entrant: ``python_gc_pause_seconds`` observes from a garbage-collector
    callback, which may run inside any allocation, also one made while the lock is held.
    """

    def __init__(self, bounds: np.ndarray, counts: np.ndarray, total: np.ndarray) -> None:
        self._bounds, self._bound_list = bounds, bounds.tolist()
        self._counts = counts  # len(bounds) + 1 int64, the last one +Inf
        self._sum = total  # one float64
        self._lock = threading.RLock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self._bound_list, value)
        with self._lock:
            self._counts[i] += 1
            self._sum[0] += value

    def observe_many(self, values: np.ndarray) -> None:
        """Observe every value of ``values`` with one bucket count per call, not per value."""
        counts = np.bincount(
            np.searchsorted(self._bounds, values, side="left"), minlength=len(self._counts)
        )
        total = float(values.sum())
        with self._lock:
            self._counts += counts
            self._sum[0] += total

    def snapshot(self) -> tuple[np.ndarray, float]:
        with self._lock:
            counts, total = self._counts.copy(), float(self._sum[0])
        return counts, total


class _BulkFile:
    """A child's counts and sum in a memory-mapped file: an 8-byte header length, a JSON header
    (metric, documentation, label names and values, bounds) padded to 8 bytes, then the
    ``int64`` counts and the ``float64`` sum. Written whole under a temporary name, then renamed,
    so a reader never sees half a header."""

    _numbers = itertools.count()

    @classmethod
    def create(cls, path: Path, header: dict) -> tuple[np.ndarray, np.ndarray]:
        meta = json.dumps(header, sort_keys=True).encode()
        meta += b" " * (-len(meta) % 8)
        slots = len(header["bounds"]) + 1
        data = len(meta).to_bytes(8, "little") + meta + bytes(8 * (slots + 1))
        name = path / f"bulk_{os.getpid()}_{next(cls._numbers)}.bin"
        temporary = name.with_suffix(".tmp")
        temporary.write_bytes(data)
        os.replace(temporary, name)
        with open(name, "r+b") as f:
            mapped = mmap.mmap(f.fileno(), len(data))
        offset = 8 + len(meta)
        counts = np.frombuffer(mapped, np.int64, slots, offset)
        total = np.frombuffer(mapped, np.float64, 1, offset + 8 * slots)
        return counts, total

    @staticmethod
    def read(file: Path) -> tuple[dict, np.ndarray, float] | None:
        try:
            data = file.read_bytes()
            size = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + size])
            slots = len(header["bounds"]) + 1
            counts = np.frombuffer(data, np.int64, slots, 8 + size)
            total = float(np.frombuffer(data, np.float64, 1, 8 + size + 8 * slots)[0])
        except (OSError, ValueError, KeyError):
            return None  # gone meanwhile, or not ours
        return header, counts, total


class BulkHistogram(Collector):
    """A labelled histogram that observes many values at once, through the public collector API.

    Exposes the same ``_bucket``/``_count``/``_sum`` samples as ``prometheus_client.Histogram``
    (a value lands in the first bucket whose bound is >= it). With ``PROMETHEUS_MULTIPROC_DIR``
    set, each child's numbers live in a file there (:class:`_BulkFile`) for
    :class:`BulkHistogramFiles` to sum over the processes.
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
                child = self._children[key] = self._child(key)
            return child

    def _child(self, key: tuple[str, ...]) -> _BulkChild:
        path = multiprocess_dir()
        if path is None:
            counts = np.zeros(len(self._bounds) + 1, np.int64)
            return _BulkChild(self._bounds, counts, np.zeros(1, np.float64))
        header = {
            "name": self.name,
            "documentation": self.documentation,
            "labelnames": list(self.labelnames),
            "labelvalues": list(key),
            "bounds": self._bounds.tolist(),
        }
        return _BulkChild(self._bounds, *_BulkFile.create(path, header))

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            children = list(self._children.items())
        for key, child in children:
            counts, total = child.snapshot()
            _add_histogram(family, list(key), self._bounds.tolist(), counts, total)
        yield family


class BulkHistogramFiles(Collector):
    """The :class:`BulkHistogram` children of every process, summed from their files."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def collect(self) -> Iterator[HistogramMetricFamily]:
        # (name, documentation, label names, bounds) -> label values -> [counts, sum]
        merged: defaultdict[tuple, defaultdict[tuple, list]] = defaultdict(
            lambda: defaultdict(lambda: [0, 0.0])
        )
        for file in sorted(self.path.glob(BULK_FILES)):
            found = _BulkFile.read(file)
            if found is None:
                continue
            h, counts, total = found
            metric = (h["name"], h["documentation"], tuple(h["labelnames"]), tuple(h["bounds"]))
            sums = merged[metric][tuple(h["labelvalues"])]
            sums[0] = counts + sums[0]
            sums[1] += total
        for (name, documentation, labelnames, bounds), by_labels in merged.items():
            family = HistogramMetricFamily(name, documentation, labels=labelnames)
            for labelvalues, (counts, total) in by_labels.items():
                _add_histogram(family, list(labelvalues), list(bounds), counts, total)
            yield family


def _add_histogram(
    family: HistogramMetricFamily,
    labelvalues: list[str],
    bounds: list[float],
    counts: np.ndarray,
    total: float,
) -> None:
    names = [*map(floatToGoString, bounds), "+Inf"]
    cumulative = np.cumsum(counts).tolist()
    family.add_metric(labelvalues, list(zip(names, cumulative, strict=True)), total)


def exposition() -> bytes:
    """The ``/metrics`` page: this process's metrics, or with ``PROMETHEUS_MULTIPROC_DIR``,
    those of every worker that shares the directory, summed."""
    path = multiprocess_dir()
    if path is None:
        return generate_latest(REGISTRY)
    forget_dead_processes(path)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(path))
    registry.register(BulkHistogramFiles(path))
    return generate_latest(registry)


if (_dir := multiprocess_dir()) is not None:
    _dir.mkdir(parents=True, exist_ok=True)  # prometheus_client writes there from now on


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
GC_PAUSE = BulkHistogram(  # observed in a GC callback: no prometheus_client lock (see _BulkChild)
    "python_gc_pause_seconds",
    "Garbage-collector pauses (the whole process stops), by generation.",
    ["generation"],
    buckets=LATENCY_BUCKETS,
)
ECHO_ACTIVE_SESSIONS = Gauge(
    "echo_active_sessions",
    "Echo sessions with an open WebSocket.",
    multiprocess_mode="livesum",
)
ECHO_STORED_SESSIONS = Gauge(
    "echo_stored_sessions",
    "Echo sessions kept (open or resumable).",
    multiprocess_mode="livesum",
)
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
GRPC_REQUESTS = Counter(
    "grpc_requests_total",
    "gRPC calls by method and status code (a stream: once, when it ends).",
    ["method", "code"],
)
GRPC_LATENCY = Histogram(
    "grpc_request_duration_seconds",
    "gRPC call duration by method (a stream: from open to end).",
    ["method"],
    buckets=LATENCY_BUCKETS,
)
GRPC_STREAM_MESSAGES = Counter(
    "grpc_stream_messages_total",
    "ModelStreamInfer requests answered, by outcome (OK, or the status code of the error).",
    ["code"],
)
