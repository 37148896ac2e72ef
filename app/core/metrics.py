"""Prometheus metrics of the service (exposed on ``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

HTTP_REQUESTS = Counter(
    "http_requests_total",
    "HTTP requests by route, method and status.",
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
QUEUE_WAIT = Histogram(
    "model_queue_wait_seconds",
    "Time a request or message waited before its model call started.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
COMPUTE_TIME = Histogram(
    "model_compute_seconds", "Duration of one model call.", ["model"], buckets=LATENCY_BUCKETS
)
ECHO_ACTIVE_SESSIONS = Gauge("echo_active_sessions", "Echo sessions with an open WebSocket.")
ECHO_STORED_SESSIONS = Gauge("echo_stored_sessions", "Echo sessions kept (open or resumable).")
ECHO_MESSAGES = Counter("echo_messages_total", "Echo messages answered.")
ECHO_ERRORS = Counter("echo_errors_total", "Echo error frames sent, by code.", ["code"])
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
