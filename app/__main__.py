"""``python -m app``: the service under uvicorn, with the server's limits from app/core/config.py.

The one way to start the service (image, compose, ``make serve``, tests, benchmark), so that every
deployment gets the same bounds:

- WebSocket messages over ``ECHO_MAX_FRAME_BYTES`` close the connection with 1009 before they
  are buffered further; permessage-deflate is off unless ``ECHO_WS_COMPRESSION`` (no inflation).
- ``X-Forwarded-For`` / ``X-Forwarded-Proto`` are believed only from ``TRUSTED_PROXIES``
  (uvicorn's own default would trust 127.0.0.1).
- A WebSocket client that leaves its replies unread for ``ECHO_SEND_TIMEOUT_S`` is cut off
  (``app.core.uvicorn_protocols``).
- HTTP/1.1 is served by :class:`app.core.uvicorn_protocols.EdgeHttpProtocol` with the limits
  of ``app.core.edge``: header size, header and body
  read timeouts, connection caps (``MAX_CONNECTIONS``, at most the file-descriptor limit less
  ``FD_RESERVE``; the soft limit is first raised to the hard one), idle keep-alive close after
  ``TIMEOUT_KEEP_ALIVE_S``.
- SIGTERM lets in-flight requests finish for ``TIMEOUT_GRACEFUL_SHUTDOWN_S``.
- ``WEB_CONCURRENCY`` > 1 runs that many worker processes on one socket (uvicorn's supervisor);
  echo sessions must then live in Redis (``ECHO_STORE_URL``), so that any worker can resume any
  session. Each worker has its own connection caps; ``/metrics`` sums all of them: the workers
  write their metrics to ``PROMETHEUS_MULTIPROC_DIR`` (``app.core.metrics``), which the launcher
  empties at start, or, if it is not set, creates under the temporary directory and removes at
  exit. A single worker keeps its metrics in memory unless ``PROMETHEUS_MULTIPROC_DIR`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import resource
import shutil
import sys
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import uvicorn
from uvicorn.supervisors import Multiprocess

from app.core.config import Settings, get_settings
from app.core.edge import EdgeLimits
from app.core.metrics import MULTIPROC_ENV, clean_multiprocess_dir, multiprocess_dir
from app.core.uvicorn_protocols import EdgeHttpProtocol, GuardedWebSocketProtocol

STARTUP_FAILURE = 3  # uvicorn's exit status when the app did not start
FD_RESERVE = 100  # file descriptors kept for models, logs, the listener (~15 when idle)

log = logging.getLogger("app.server")


def trusted_proxies(settings: Settings) -> list[str]:
    return [item.strip() for item in settings.trusted_proxies.split(",") if item.strip()]


def raise_fd_limit() -> int:
    """Raise this process's soft file-descriptor limit to its hard limit; returns the soft one.

    Every open connection takes one; the default soft limit (often 1,024) would cap a server
    meant for ``ECHO_MAX_SESSIONS`` streams far below it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(settings: Settings) -> int:
    """``MAX_CONNECTIONS``, lowered so that accepting never runs out of file descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return settings.max_connections
    return max(1, min(settings.max_connections, soft - FD_RESERVE))


def edge_limits(settings: Settings) -> EdgeLimits:
    proxies = tuple(ipaddress.ip_network(p, strict=False) for p in trusted_proxies(settings))
    return EdgeLimits(
        max_header_bytes=settings.max_header_bytes,
        timeout_header_s=settings.timeout_header_s,
        timeout_body_s=settings.timeout_body_s,
        max_connections=connection_cap(settings),
        max_connections_per_client=settings.max_connections_per_client,
        max_connections_per_network=settings.max_connections_per_network,
        trusted_proxies=proxies,
    )


@cache
def _configured_limits() -> EdgeLimits:
    return edge_limits(get_settings())


class SettingsEdgeHttpProtocol(EdgeHttpProtocol):
    """The edge protocol with this process's settings; worker processes import it by name."""

    @property
    def limits(self) -> EdgeLimits:  # type: ignore[override]
        return _configured_limits()


def http_protocol(settings: Settings) -> str:
    """The edge protocol with the settings' limits; uvicorn's own if ``EDGE_LIMITS`` is off."""
    if not settings.edge_limits:
        return "httptools"
    return "app.__main__:SettingsEdgeHttpProtocol"  # an import string: workers load their own


def websocket_protocol() -> type[asyncio.Protocol] | str:
    """The WebSocket protocol class uvicorn upgrades connections to: websockets-sansio, plus a
    cut-off for clients that leave replies unread past ``ECHO_SEND_TIMEOUT_S``."""
    return GuardedWebSocketProtocol


def server_config(settings: Settings) -> uvicorn.Config:
    proxies = trusted_proxies(settings)
    return uvicorn.Config(
        "app.main:app",
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=http_protocol(settings),
        workers=settings.web_concurrency,
        ws=websocket_protocol(),
        ws_max_size=settings.echo_max_frame_bytes,
        ws_per_message_deflate=settings.echo_ws_compression,
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies,
        timeout_keep_alive=settings.timeout_keep_alive_s,  # type: ignore[arg-type]  # a float works
        timeout_graceful_shutdown=settings.timeout_graceful_shutdown_s,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=settings.max_header_bytes,  # (if h11 ever serves)
    )


@contextlib.contextmanager
def metrics_dir(workers: int) -> Iterator[Path | None]:
    """The directory the workers share their metrics through (``PROMETHEUS_MULTIPROC_DIR``).

    If it is set: emptied of earlier runs' files (this process's stay: it may have written some
    when it imported the metrics) and kept. Else, with several workers: a new one under the
    temporary directory, named in the environment the workers inherit, removed at exit. Else
    (one worker): None, metrics in memory.
    """
    path = multiprocess_dir()
    if path is not None:
        removed = clean_multiprocess_dir(path, keep_pid=os.getpid())
        log.info("metrics directory emptied", extra={"path": str(path), "removed": removed})
        yield path
        return
    if workers == 1:
        yield None
        return
    created = Path(tempfile.mkdtemp(prefix="rnn-serving-metrics-"))
    os.environ[MULTIPROC_ENV] = str(created)
    try:
        yield created
    finally:
        del os.environ[MULTIPROC_ENV]
        shutil.rmtree(created, ignore_errors=True)


def main() -> None:
    settings = get_settings()
    raise_fd_limit()  # before the workers start: they inherit it
    config = server_config(settings)
    cap = connection_cap(settings)
    if cap < settings.max_connections:
        log.warning(
            "MAX_CONNECTIONS lowered to fit the file-descriptor limit",
            extra={"max_connections": cap, "configured": settings.max_connections},
        )
    if config.workers > 1 and settings.echo_store_url.get_secret_value().startswith("memory://"):
        log.error("WEB_CONCURRENCY > 1 needs ECHO_STORE_URL=redis://... (shared sessions)")
        sys.exit(2)
    with metrics_dir(config.workers):
        if config.workers > 1:
            Multiprocess(config, sockets=[config.bind_socket()]).run()
            return
        server = uvicorn.Server(config)
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


if __name__ == "__main__":
    main()
