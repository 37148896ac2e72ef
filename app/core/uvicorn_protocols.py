"""Every use of uvicorn's internals, in one place: the protocol classes ``python -m app`` serves.

Written for uvicorn 0.54.0 (``protocols/http/httptools_impl.py``,
``protocols/websockets/websockets_sansio_impl.py``) with httptools 0.9.0 and websockets 17.4;
``make test-upgrade`` runs the edge and hostile tests against the newest releases of uvicorn,
Starlette, FastAPI, websockets and httptools, so that an upgrade is one command.

- :class:`EdgeHttpProtocol` subclasses ``HttpToolsProtocol`` to apply the limits of
  ``app.core.edge`` (what they are and why is there). uvicorn has no hook for any of them. It
  overrides ``connection_made``, ``connection_lost``, ``data_received``, ``send_400_response``,
  ``handle_websocket_upgrade``, the parser callbacks ``on_url``, ``on_header``,
  ``on_headers_complete``, ``on_message_complete`` and ``pause_writing``/``resume_writing``; it
  calls uvicorn's ``_unset_keepalive_if_required``, ``_should_upgrade`` and
  ``_unsupported_upgrade_warning`` (as uvicorn's own ``data_received`` does) and reads
  ``connections``, ``pipeline``, ``cycle``, ``flow``, ``parser``, ``headers``, ``server_state``,
  ``transport``, ``loop`` and ``STATUS_LINE``.
- :class:`GuardedWebSocketProtocol` subclasses ``WebSocketsSansIOProtocol`` to cut off a client
  that leaves its replies unread (``pause_writing``/``resume_writing``/``connection_lost``), and
  to keep the edge's open-connection count until the WebSocket connection is lost. It reads
  ``conn`` (websockets' ``ServerProtocol``) and closes its ``parser`` generator once the
  connection is lost.
- Both drop a reference cycle when their connection ends (the HTTP protocol's ``parser`` after
  an upgrade, websockets' ``parser``), so that ended connections are freed without waiting for
  a full garbage collection (``tests/test_edge_lifetimes.py``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Callable
from typing import Any, ClassVar

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from app.core import edge
from app.core.addresses import client_key, network_key
from app.core.config import get_settings
from app.core.edge import (
    EDGE_STATUS,
    LINGER_S,
    MAX_HEADER_LINE_BYTES,
    MAX_HEADERS,
    MAX_PIPELINED,
    MAX_URL_BYTES,
    MAX_WAITING_REFUSALS,
    REFUSED_WAIT_S,
    SEND_BUFFER_BYTES,
    EdgeLimits,
    Refusal,
)
from app.core.metrics import ECHO_CUT_OFF, HTTP_EDGE_REFUSALS

log = logging.getLogger(__name__)


class EdgeHttpProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` plus the edge's limits (a subclass sets ``limits``; ``python -m app``
    uses the settings' ones)."""

    limits: ClassVar[EdgeLimits] = EdgeLimits()

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.url = b""
        self._reading_head = True  # until the current request's headers are complete
        self._head_bytes = 0  # bytes received while reading the current head
        self._header_bytes = 0  # its header lines, as parsed
        self._last_data = 0.0
        self._pending: Refusal | None = None  # the answer once the head is in (connection cap)
        self._refused = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._counted: tuple[str, str] | None = None  # (client, network) while counted as open

    # Connections

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        edge.socket_option(transport, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        wait = self.limits.timeout_header_s
        if reason := self._admit():
            self.connections.discard(self)  # a refused connection does not hold a place
            if edge.waiting_refusals[0] >= MAX_WAITING_REFUSALS:  # a flood: no file descriptor
                HTTP_EDGE_REFUSALS.labels("too_many_connections_dropped").inc()  # waits
                self._refused = True
                transport.close()
                return
            edge.waiting_refusals[0] += 1
            self._pending = Refusal(503, "too_many_connections", reason)
            wait = min(wait, REFUSED_WAIT_S)
        self._arm_head_timer(wait)

    def _admit(self) -> str | None:
        """Count this connection as open, or say why not. O(1): counters, no scan."""
        limits = self.limits
        if len(self.connections) > limits.max_connections:  # this one included
            return f"the server has its maximum of {limits.max_connections} connections open"
        host = self.client[0] if self.client else None
        if host is None or limits.trusted(host):
            return None
        client, network = client_key(host), network_key(host)
        if edge.counts.clients.get(client, 0) >= limits.max_connections_per_client:
            per_client = limits.max_connections_per_client
            return f"this address has its maximum of {per_client} connections open"
        if edge.counts.networks.get(network, 0) >= limits.max_connections_per_network:
            per_network = limits.max_connections_per_network
            return f"this network ({network}) has its maximum of {per_network} connections open"
        edge.counts.add(client, network)
        self._counted = (client, network)
        return None

    def _release(self) -> None:
        if self._counted is not None:
            edge.counts.remove(*self._counted)
            self._counted = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self._release()
        if self._pending is not None:
            edge.waiting_refusals[0] -= 1
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        self._cancel_timers()  # the WebSocket protocol owns the connection from here on
        super().handle_websocket_upgrade()
        # It stays counted until the WebSocket protocol's connection is lost.
        on_close: Callable[[Callable[[], None]], None] | None = getattr(
            self.transport.get_protocol(), "call_on_close", None
        )
        if on_close is not None and self._counted is not None:
            # The count's keys alone, not this protocol: a bound method would keep this object
            # (its parser, headers and buffers: ~6 KB) alive as long as the WebSocket.
            on_close(functools.partial(edge.counts.remove, *self._counted))
            self._counted = None
        else:
            self._release()
        # This protocol is done: the transport now calls the WebSocket protocol, and this one's
        # connection_lost (where uvicorn drops the parser) never comes. The parser holds bound
        # methods of this protocol, a reference cycle only the collector frees: one per upgraded
        # connection, and those that had reached the oldest generation (those alive across two
        # young collections) waited for a full collection, which GC_THRESHOLDS makes rare
        # (tests/test_edge_lifetimes.py).
        self.parser = None  # type: ignore[assignment]

    # Reading

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after a refusal: drop the rest
        self._unset_keepalive_if_required()
        self._last_data = self.loop.time()
        if self._reading_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, edge.PipelineFull):
                self._stop_pipeline()
                return
            refusal = exc.__context__ if isinstance(exc.__context__, Refusal) else None
            self._refuse(self._pending or refusal or Refusal(400, "invalid_http", str(exc)))
            return
        if self._refused or self.transport.is_closing():
            return
        if self._reading_head:
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(self._head_too_large())
            elif self._head_bytes and self._head_timer is None:
                self._arm_head_timer(self.limits.timeout_header_s)
        elif self._body_timer is None and self.cycle is not None and self.cycle.more_body:
            self._body_timer = self.loop.call_later(self.limits.timeout_body_s, self._body_timeout)

    def send_400_response(self, msg: str) -> None:
        self._refuse(self._pending or Refusal(400, "invalid_http", msg))

    # Parser callbacks

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_URL_BYTES:
            limit = f"the request line is limited to {MAX_URL_BYTES} bytes"
            raise Refusal(414, "url_too_long", limit)

    def on_header(self, name: bytes, value: bytes) -> None:
        line = len(name) + len(value) + 4
        self._header_bytes += line
        if line > MAX_HEADER_LINE_BYTES or len(self.headers) >= MAX_HEADERS:
            raise self._head_too_large()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._cancel_head_timer()
        if self._pending is not None:
            raise self._pending
        if len(self.url) + self._header_bytes > self.limits.max_header_bytes:
            raise self._head_too_large()
        if len(self.pipeline) >= MAX_PIPELINED:
            raise edge.PipelineFull
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head, self._head_bytes, self._header_bytes = True, 0, 0
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _head_too_large(self) -> Refusal:
        return Refusal(
            431,
            "headers_too_large",
            f"request line and headers are limited to {self.limits.max_header_bytes} bytes, "
            f"{MAX_HEADERS} headers and {MAX_HEADER_LINE_BYTES} bytes per header",
        )

    # Timers

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:  # pipelining: our turn
            self._arm_head_timer(self.limits.timeout_header_s)
        elif self._head_bytes == 0:
            HTTP_EDGE_REFUSALS.labels("idle_connection").inc()
            self.transport.close()
        else:
            timeout = self.limits.timeout_header_s
            late = Refusal(408, "header_timeout", f"send the request head within {timeout} s")
            self._refuse(self._pending or late)

    def _body_timeout(self) -> None:
        self._body_timer = None
        cycle, timeout = self.cycle, self.limits.timeout_body_s
        if cycle is None or not cycle.more_body:
            return
        idle = self.loop.time() - self._last_data
        if idle < timeout or self.flow.read_paused:  # data came, or the app is not reading
            self._body_timer = self.loop.call_later(max(timeout - idle, 0.05), self._body_timeout)
        elif cycle.response_started:
            HTTP_EDGE_REFUSALS.labels("body_timeout").inc()
            self.transport.close()
        else:
            self._refuse(Refusal(408, "body_timeout", f"no body bytes for {timeout} s"))

    def _arm_head_timer(self, wait: float) -> None:
        self._head_timer = self.loop.call_later(wait, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def pause_writing(self) -> None:  # the client stopped reading; a timer starts
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.timeout_body_s, self._cut_off)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _cut_off(self) -> None:
        """Responses stayed unread for the whole timeout: drop the connection and its buffer."""
        self._write_timer = None
        HTTP_EDGE_REFUSALS.labels("send_timeout").inc()
        edge.abort_with_reset(self.transport)

    def _stop_pipeline(self) -> None:
        """Too many pipelined requests: answer the queued ones, close after the last, drop the
        rest (no refusal is written: it would arrive before the queued answers)."""
        HTTP_EDGE_REFUSALS.labels("pipeline_limit").inc()
        self._refused = True  # data_received drops whatever still arrives
        self._cancel_timers()
        if self.pipeline:
            self.pipeline[0][0].keep_alive = False  # the newest queued: closes after its answer
        elif self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        else:
            self.transport.close()

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    # Answering

    def _refuse(self, refusal: Refusal) -> None:
        """Answer ``refusal`` and close: half-close now, drop what still arrives, close later."""
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self._cancel_timers()
        self._unset_keepalive_if_required()
        HTTP_EDGE_REFUSALS.labels(refusal.code).inc()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:  # the app sees a disconnect
            cycle.scope[EDGE_STATUS] = refusal.status  # logged and counted as what was sent
            cycle.disconnected = True
            cycle.message_event.set()
        body = orjson.dumps({"error": refusal.code, "detail": refusal.detail})
        head = [STATUS_LINE[refusal.status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)]
        if refusal.status == 503:
            head.append(b"retry-after: 1\r\n")
        head += [b"connection: close\r\n\r\n", body]
        self.transport.write(b"".join(head))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(LINGER_S, self.transport.close)


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """Aborts a connection whose writes stay paused (replies unread) past the send timeout.

    A client that sends messages and never reads its replies fills the socket buffers until the
    transport pauses writing; uvicorn then waits (even its graceful close waits for the buffer
    to drain), so the connection and its echo session stay held for as long as the client
    likes. This protocol resets the connection (buffers dropped) once writing has stayed paused
    for ``ECHO_SEND_TIMEOUT_S``; the application then sees the client gone and detaches the
    session, which stays resumable. The kernel send buffer is capped too
    (``ECHO_SEND_BUFFER_BYTES``), so an unread connection pins a bounded amount of memory.
    """

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
        edge.socket_option(transport, socket.SO_SNDBUF, self.send_buffer_bytes)
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
        # websockets' ServerProtocol keeps its frame parser as a suspended generator whose frame
        # holds the protocol: a reference cycle that even EOF leaves (the parser ends on a bare
        # ``yield``). Sessions outlive two young collections, so every ended connection's
        # protocol, reader, frames and parser (~1.2 KB) waited in the oldest generation for a
        # full collection, which GC_THRESHOLDS makes rare: RSS grew ~1.2 MB per 1,000 sessions
        # served (tests/test_edge_lifetimes.py). Closing the generator breaks the cycle; nothing
        # parses after the connection is lost.
        self.conn.parser.close()

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
        edge.abort_with_reset(self.transport)
