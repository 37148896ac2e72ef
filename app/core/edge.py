"""The HTTP edge: uvicorn's httptools protocol with bounds on what one connection may cost.

``python -m app`` serves HTTP/1.1 with :class:`EdgeHttpProtocol`. Every limit, and what the
client gets (refusals are ``{"error": ..., "detail": ...}`` with ``Connection: close``):

- request line over ``MAX_URL_BYTES`` → 414 (also on a WebSocket upgrade, which uvicorn's
  WebSocket layer would otherwise answer with nothing and never close);
- request line + headers over ``MAX_HEADER_BYTES``, a header line over ``MAX_HEADER_LINE_BYTES``
  or more than ``MAX_HEADERS`` headers → 431, counted as the bytes arrive, never buffered past it;
- request head not complete ``TIMEOUT_HEADER_S`` after the connection opened or the head's first
  byte → 408 (slow senders); a connection that sent nothing is closed without an answer;
- no body bytes for ``TIMEOUT_BODY_S`` while the app waits for them → 408 (the app sees a
  disconnect); after the response has started, the connection is closed;
- ``MAX_CONNECTIONS`` connections open (HTTP and WebSocket), ``MAX_CONNECTIONS_PER_CLIENT`` from
  one peer address or IPv6 /64, or ``MAX_CONNECTIONS_PER_NETWORK`` from one IPv4 /24 or IPv6 /48
  (``TRUSTED_PROXIES`` exempt) → 503 with ``Retry-After``, answered once the request head
  arrives (at most ``REFUSED_WAIT_S``), not counted as open; with ``MAX_WAITING_REFUSALS``
  already waiting (a flood), closed at once without an answer, so that refusals never hold more
  than that many file descriptors. Admission is O(1): open connections are counted per client
  and per network on connect and close (:class:`ConnectionCounts`), never by a scan;
- more than ``MAX_PIPELINED`` requests queued behind the one being answered (HTTP pipelining)
  → the edge stops reading: the queued ones are answered, the last with ``Connection: close``,
  and the rest is dropped (a pipelining client must retry unanswered requests, RFC 9112 9.3.2);
- responses left unread (writing paused) for ``TIMEOUT_BODY_S`` → the connection is aborted
  with a reset (``SO_LINGER`` 0), so neither the process nor the kernel keeps its unsent bytes;
  every connection's kernel send buffer is capped at ``SEND_BUFFER_BYTES`` (``SO_SNDBUF``);
- idle keep-alive: uvicorn closes after ``TIMEOUT_KEEP_ALIVE_S``.

After a refusal the server half-closes, drops what still arrives and closes ``LINGER_S`` later,
so that the client reads the answer instead of a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from websockets import http11

from app.core.addresses import client_key, network_key
from app.core.metrics import HTTP_EDGE_REFUSALS

MAX_URL_BYTES = 8000  # under the WebSocket layer's own line limit (websockets: 8,192)
MAX_HEADER_LINE_BYTES = 8000
MAX_HEADERS = 100  # websockets: 128
REFUSED_WAIT_S = 1.0
MAX_WAITING_REFUSALS = 64  # refused connections waiting for their head; beyond, closed at once
LINGER_S = 1.0
MAX_PIPELINED = 8  # requests queued behind the one being answered; beyond, reading stops
SEND_BUFFER_BYTES = 262_144  # SO_SNDBUF of every connection: the kernel memory an unread one pins
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, drops the buffer
EDGE_STATUS = "edge_status"  # scope key: the status the edge answered while the app was reading
assert MAX_URL_BYTES + 32 < http11.MAX_LINE_LENGTH and MAX_HEADERS < http11.MAX_NUM_HEADERS

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_waiting_refusals = [0]  # in this process (one server)


@dataclass(frozen=True)
class EdgeLimits:
    """The limits of :class:`EdgeHttpProtocol` (the defaults are the settings' defaults)."""

    max_header_bytes: int = 16_384
    timeout_header_s: float = 10.0
    timeout_body_s: float = 10.0
    max_connections: int = 12_000
    max_connections_per_client: int = 64
    max_connections_per_network: int = 256
    trusted_proxies: tuple[Network, ...] = ()

    def trusted(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in net for net in self.trusted_proxies)


class ConnectionCounts:
    """Open connections per client key and per network key, kept on connect and close."""

    def __init__(self) -> None:
        self.clients: dict[str, int] = {}
        self.networks: dict[str, int] = {}

    def add(self, client: str, network: str) -> None:
        self.clients[client] = self.clients.get(client, 0) + 1
        self.networks[network] = self.networks.get(network, 0) + 1

    def remove(self, client: str, network: str) -> None:
        for table, key in ((self.clients, client), (self.networks, network)):
            left = table[key] - 1
            if left:
                table[key] = left
            else:
                del table[key]  # the tables hold only addresses with open connections


_counts = ConnectionCounts()  # in this process (one server)


class _PipelineFull(Exception):
    """Raised in a parser callback: too many requests queued on one connection."""


def _socket_option(transport: asyncio.BaseTransport, option: int, value: int | bytes) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, option, value)


def abort_with_reset(transport: asyncio.BaseTransport) -> None:
    """Drop a connection and everything unsent, in the process and in the kernel (RST)."""
    _socket_option(transport, socket.SO_LINGER, _RESET_ON_CLOSE)
    transport.abort()  # type: ignore[attr-defined]


class Refusal(Exception):
    """An answer the edge gives instead of the app (raised inside parser callbacks)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class EdgeHttpProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` plus the limits above (a subclass sets ``limits``; ``python -m app``
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
        _socket_option(transport, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        wait = self.limits.timeout_header_s
        if reason := self._admit():
            self.connections.discard(self)  # a refused connection does not hold a place
            if _waiting_refusals[0] >= MAX_WAITING_REFUSALS:  # a flood: no file descriptor
                HTTP_EDGE_REFUSALS.labels("too_many_connections_dropped").inc()  # waits
                self._refused = True
                transport.close()
                return
            _waiting_refusals[0] += 1
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
        if _counts.clients.get(client, 0) >= limits.max_connections_per_client:
            per_client = limits.max_connections_per_client
            return f"this address has its maximum of {per_client} connections open"
        if _counts.networks.get(network, 0) >= limits.max_connections_per_network:
            per_network = limits.max_connections_per_network
            return f"this network ({network}) has its maximum of {per_network} connections open"
        _counts.add(client, network)
        self._counted = (client, network)
        return None

    def _release(self) -> None:
        if self._counted is not None:
            _counts.remove(*self._counted)
            self._counted = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self._release()
        if self._pending is not None:
            _waiting_refusals[0] -= 1
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        self._cancel_timers()  # the WebSocket protocol owns the connection from here on
        super().handle_websocket_upgrade()
        # It stays counted until the WebSocket protocol's connection is lost.
        on_close: Callable[[Callable[[], None]], None] | None = getattr(
            self.transport.get_protocol(), "call_on_close", None
        )
        if on_close is not None and self._counted is not None:
            on_close(self._release)
        else:
            self._release()

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
            if isinstance(exc.__context__, _PipelineFull):
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
            raise _PipelineFull
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
        abort_with_reset(self.transport)

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
