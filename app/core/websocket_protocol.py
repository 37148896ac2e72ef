"""uvicorn's WebSocket protocol, plus a cut-off for clients that stop reading.

A client that sends messages and never reads its replies fills the socket buffers until the
transport pauses writing; uvicorn then waits (even its graceful close waits for the buffer to
drain), so the connection and its echo session stay held for as long as the client likes. This
protocol aborts the transport (RST, buffer dropped) once writing has stayed paused for
``ECHO_SEND_TIMEOUT_S``; the application then sees the client gone and detaches the session,
which stays resumable. The connection's kernel send buffer is also capped
(``ECHO_SEND_BUFFER_BYTES``, ``SO_SNDBUF``), so an unread connection holds a bounded amount of
kernel memory and the cut-off comes within seconds. Select it with
``uvicorn --ws app.core.websocket_protocol:GuardedWebSocketProtocol``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from app.core.config import get_settings
from app.core.edge import abort_with_reset
from app.core.metrics import ECHO_CUT_OFF

log = logging.getLogger(__name__)


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """Aborts a connection whose writes stay paused (replies unread) past the send timeout."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.send_timeout_s = settings.echo_send_timeout_s
        self.send_buffer_bytes = settings.echo_send_buffer_bytes
        self._cut_off_timer: asyncio.TimerHandle | None = None
        self._on_close: list[Callable[[], None]] = []

    def call_on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the connection is lost (the edge's open-connection count)."""
        self._on_close.append(callback)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)
        super().connection_made(transport)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._cut_off_timer is None:
            self._cut_off_timer = self.loop.call_later(self.send_timeout_s, self._cut_off)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_cut_off()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_cut_off()
        for callback in self._on_close:
            callback()
        self._on_close.clear()
        super().connection_lost(exc)

    def _cancel_cut_off(self) -> None:
        if self._cut_off_timer is not None:
            self._cut_off_timer.cancel()
            self._cut_off_timer = None

    def _cut_off(self) -> None:
        """Writing stayed paused for the whole timeout: drop the connection without waiting."""
        self._cut_off_timer = None
        ECHO_CUT_OFF.labels("send_timeout").inc()
        buffered = self.transport.get_write_buffer_size()
        log.warning(
            "websocket cut off: replies unread",
            extra={
                "client": self.client[0] if self.client else None,
                "unsent_bytes": buffered,
                "send_timeout_s": self.send_timeout_s,
            },
        )
        abort_with_reset(self.transport)
