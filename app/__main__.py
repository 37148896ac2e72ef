"""``python -m app``: the service under uvicorn, with the server's limits from app/core/config.py.

The one way to start the service (image, compose, ``make serve``, tests, benchmark), so that every
deployment gets the same bounds:

- WebSocket messages over ``ECHO_MAX_FRAME_BYTES`` close the connection with 1009 before they
  are buffered further; permessage-deflate is off unless ``ECHO_WS_COMPRESSION`` (no inflation).
- ``X-Forwarded-For`` / ``X-Forwarded-Proto`` are believed only from ``TRUSTED_PROXIES``
  (uvicorn's own default would trust 127.0.0.1).
- A WebSocket client that leaves its replies unread for ``ECHO_SEND_TIMEOUT_S`` is cut off
  (``app.core.websocket_protocol``).
- Idle keep-alive connections close after ``TIMEOUT_KEEP_ALIVE_S``; SIGTERM lets in-flight
  requests finish for ``TIMEOUT_GRACEFUL_SHUTDOWN_S``.
"""

from __future__ import annotations

import asyncio
import sys

import uvicorn

from app.core.config import Settings, get_settings
from app.core.websocket_protocol import GuardedWebSocketProtocol

STARTUP_FAILURE = 3  # uvicorn's exit status when the app did not start


def trusted_proxies(settings: Settings) -> list[str]:
    return [item.strip() for item in settings.trusted_proxies.split(",") if item.strip()]


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
        http="httptools",
        ws=websocket_protocol(),
        ws_max_size=settings.echo_max_frame_bytes,
        ws_per_message_deflate=settings.echo_ws_compression,
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies,
        timeout_keep_alive=settings.timeout_keep_alive_s,  # type: ignore[arg-type]  # a float works
        timeout_graceful_shutdown=settings.timeout_graceful_shutdown_s,  # type: ignore[arg-type]
    )


def main() -> None:
    server = uvicorn.Server(server_config(get_settings()))
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


if __name__ == "__main__":
    main()
