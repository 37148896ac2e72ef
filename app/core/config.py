"""Service configuration, read from environment variables (and an optional ``.env`` file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service; the environment variable is the field name in upper case."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    # Models
    model_dir: Path = Field(Path("models"), description="Folder holding <name>/<version>/ models.")
    digit_model_versions: str = Field(
        "latest",
        description="Which mnist_lstm versions to serve: `latest`, `latest:N` or `specific:1,3`.",
    )
    echo_model_versions: str = Field(
        "specific:1",
        description="Which echo_rnn versions to serve (same forms). Shipped: version 1 only; "
        "version 2 (3-layer LSTM) is as exact and costs more (docs/models.md).",
    )
    digit_model_version: int | None = Field(
        None, description="Old pin: the same as DIGIT_MODEL_VERSIONS=specific:N."
    )
    echo_model_version: int | None = Field(
        None, description="Old pin: the same as ECHO_MODEL_VERSIONS=specific:N."
    )
    model_poll_s: float = Field(
        30.0, ge=0, description="Rescan MODEL_DIR for new versions this often (0: only on SIGHUP)."
    )

    # HTTP limits
    max_request_bytes: int = Field(4 * 1024 * 1024, gt=0, description="Largest request body.")
    max_batch_images: int = Field(256, gt=0, description="Most images in one request.")
    max_image_pixels: int = Field(
        16_000_000, gt=0, description="Most pixels (width×height) in an uploaded picture."
    )
    max_image_side: int = Field(8192, gt=0, description="Longest side of an uploaded picture.")
    max_concurrent_uploads: int = Field(
        2, gt=0, description="Uploads decoded at once; more get 503 `too_many_uploads`."
    )
    request_timeout_s: float = Field(10.0, gt=0, description="Inference deadline per request.")

    # Batching (Triton-style dynamic batcher for digits, sequence batcher for echo)
    batching_enabled: bool = Field(True, description="False: one model call per request/message.")
    digit_max_batch_size: int = Field(256, gt=0, description="Most rows in one digit model call.")
    digit_max_queue_delay_ms: float = Field(
        0.5,
        ge=0,
        description="Longest a digit request waits for others to join its batch. uvloop keeps "
        "time in whole milliseconds: 0.5 or less waits one loop iteration, more is rounded.",
    )
    digit_xla: bool = Field(
        True, description="Run the digit model XLA-compiled for fixed batch sizes (warmed up)."
    )
    inline_call_budget_ms: float = Field(
        5.0,
        ge=0,
        description="Batched model calls of a shape that has been taking at most this long run "
        "on the event loop instead of the model thread (no thread hand-off); 0: always the thread.",
    )
    echo_max_batch_sessions: int = Field(
        4096, gt=0, description="Most sessions advanced in one echo model call."
    )
    echo_xla: bool = Field(
        True,
        description="Run the echo step XLA-compiled, padded to power-of-two shapes (each new "
        "shape compiles once).",
    )
    echo_numpy_step: bool = Field(
        True,
        description="Run the echo model calls that a NumPy copy of its step does with less CPU "
        "than TensorFlow (checked against the SavedModel and timed at load) in NumPy.",
    )
    echo_max_queue_delay_ms: float = Field(
        0.3,
        ge=0,
        description="Longest an echo message waits for others to join its batch. uvloop keeps "
        "time in whole milliseconds: 0.5 or less waits one loop iteration, more is rounded.",
    )

    # Echo sessions
    echo_session_ttl_s: float = Field(
        300.0, gt=0, description="How long a detached session stays resumable."
    )
    echo_max_sessions: int = Field(
        10_000, gt=0, description="Cap on kept sessions; at it the LRU detached one goes."
    )
    echo_max_frame_bytes: int = Field(
        65_536, gt=0, description="Largest client message; larger ones close the connection (1009)."
    )
    echo_max_bits_per_message: int = Field(4096, gt=0, description="Most bits in one frame.")
    echo_idle_timeout_s: float = Field(
        120.0, gt=0, description="A connection that sends nothing this long is closed (1001)."
    )
    echo_send_timeout_s: float = Field(
        10.0, gt=0, description="A connection whose replies stay unread this long is cut off."
    )
    echo_send_buffer_bytes: int = Field(
        262_144, gt=0, description="Kernel send buffer (SO_SNDBUF) of each /echo connection."
    )
    echo_max_sessions_per_client: int = Field(
        500, gt=0, description="Most open sessions per client address (IPv6: per /64)."
    )
    echo_new_sessions_per_s: float = Field(
        50.0, gt=0, description="New sessions per second per client address, sustained."
    )
    echo_new_sessions_burst: int = Field(
        500, gt=0, description="New sessions per client address in a burst."
    )
    echo_replay_replies: int = Field(
        4, ge=1, le=64, description="Recent echo replies kept per session for ?last_seq= resumes."
    )

    # Echo session store (app/services/redis_sessions.py, docs/echo-protocol.md)
    echo_store_url: SecretStr = Field(
        SecretStr("memory://"),
        description="`memory://` (this process only) or `redis://[user:password@]host:port/db` "
        "(`rediss://` for TLS, with redis-py's options such as `?ssl_ca_certs=/path/ca.pem`): "
        "sessions that outlive the process and resume on any replica; "
        "`redis+sentinel://[user:password@]host1:port1,host2:port2/<master-name>[/<db>]` "
        "(`rediss+sentinel://` for TLS to Sentinels and Redis): the primary the Sentinels name, "
        "followed across failovers; the credentials are Redis's, Sentinels with a password of "
        "their own take `?sentinel_password=` (and `sentinel_username=`); TLS options "
        "(`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, ...) go to both. Options that cannot "
        "work (unknown, a CA file that does not load) stop the start.",
    )
    echo_store_connect_timeout_s: float = Field(1.0, gt=0, description="Redis connect timeout.")
    echo_store_timeout_s: float = Field(
        1.0, gt=0, description="Redis command timeout; a step not stored in time is not answered."
    )
    echo_store_min_replicas: int = Field(
        0,
        ge=0,
        le=16,
        description="Redis replicas that must hold an echo step (and a session's creation or "
        "attach) before it is answered (`WAIT`); fewer in time: `store_unavailable`. Set it to "
        "the number of replicas: a failover may promote any of them. 0: the primary's word is "
        "enough (a failover may lose its last writes).",
    )
    echo_lease_s: float = Field(
        10.0,
        gt=0,
        le=60,
        description="Attach lease (Redis store): a session whose server died can be resumed "
        "elsewhere after at most this long.",
    )

    # Server (``python -m app``)
    web_concurrency: int = Field(
        1, ge=1, le=64, description="Worker processes (`WEB_CONCURRENCY`); over 1 needs Redis."
    )
    host: str = Field("127.0.0.1", description="Address to listen on (the image sets 0.0.0.0).")
    port: int = Field(8000, gt=0, lt=65536, description="TCP port to listen on.")
    trusted_proxies: str = Field(
        "",
        description="Comma-separated proxy IPs/CIDRs whose X-Forwarded-For is believed; "
        "empty: none, the TCP peer is the client.",
    )
    timeout_keep_alive_s: float = Field(
        5.0, gt=0, description="An idle keep-alive connection is closed after this."
    )
    edge_limits: bool = Field(
        True, description="False: plain uvicorn HTTP, none of the limits below (a proxy's job)."
    )
    timeout_header_s: float = Field(
        10.0, gt=0, description="A request head not complete this long after it began: 408."
    )
    timeout_body_s: float = Field(
        10.0,
        gt=0,
        description="A request body stalled this long: 408; responses unread this long: cut off.",
    )
    max_header_bytes: int = Field(
        16_384, ge=1024, description="Largest request line + headers (431); URL at most 8,000."
    )
    max_connections: int = Field(
        12_000,
        gt=0,
        description="Open connections (HTTP + WebSocket): ECHO_MAX_SESSIONS plus room for HTTP; "
        "more get 503. Lowered to fit the file-descriptor limit, which starts raised to its hard "
        "limit.",
    )
    max_connections_per_client: int = Field(
        64,
        gt=0,
        description="Open connections from one peer address or IPv6 /64 (trusted proxies exempt).",
    )
    max_connections_per_network: int = Field(
        256,
        gt=0,
        description="Open connections from one IPv4 /24 or IPv6 /48 (trusted proxies exempt): "
        "filling the server takes MAX_CONNECTIONS / this many networks.",
    )
    timeout_graceful_shutdown_s: float = Field(
        15.0, gt=0, description="On SIGTERM, how long in-flight requests may finish."
    )
    echo_ws_compression: bool = Field(
        False, description="Offer permessage-deflate on /echo (frames are a few hundred bytes)."
    )

    # gRPC (app/grpc/, docs/grpc.md)
    grpc_port: int = Field(
        8001,
        ge=0,
        lt=65536,
        description="TCP port of the KServe v2 / Triton gRPC service (`inference."
        "GRPCInferenceService`), on HOST, in the same process as HTTP; 0: off.",
    )
    grpc_max_connections: int = Field(
        1_000,
        gt=0,
        description="Open gRPC connections (HTTP/2); more are closed before their handshake. "
        "Calls in progress are capped per client and network as HTTP connections are "
        "(MAX_CONNECTIONS_PER_CLIENT, MAX_CONNECTIONS_PER_NETWORK) and per connection.",
    )
    grpc_max_connection_idle_s: float = Field(
        300.0,
        gt=0,
        description="A gRPC connection with no call in progress this long is closed (GOAWAY; "
        "clients reconnect by themselves).",
    )

    # Access control (off by default; app/api/access.py, docs/security.md)
    api_keys: SecretStr = Field(
        SecretStr(""),
        description="Comma-separated API keys; set, every route but the public ones needs one.",
    )
    cors_allow_origins: str = Field(
        "",
        description="Comma-separated browser origins (`*`: any) allowed the API and /echo.",
    )

    # Logging
    log_level: str = Field("INFO", description="Python logging level.")


@lru_cache
def get_settings() -> Settings:
    return Settings()
