"""The HTTP edge: the bounds on what one connection may cost, and their bookkeeping.

``python -m app`` serves HTTP/1.1 with ``app.core.uvicorn_protocols.EdgeHttpProtocol``, which
applies these limits inside uvicorn (that module holds every use of uvicorn's internals). Every
limit, and what the client gets (refusals are ``{"error": ..., "detail": ...}`` with
``Connection: close``):

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
from dataclasses import dataclass

from websockets import http11

MAX_URL_BYTES = 8000  # under the WebSocket layer's own line limit (websockets: 8,192)
MAX_HEADER_LINE_BYTES = 8000
MAX_HEADERS = 100  # websockets: 128
REFUSED_WAIT_S = 1.0
MAX_WAITING_REFUSALS = 64  # refused connections waiting for their head; beyond, closed at once
LINGER_S = 1.0
MAX_PIPELINED = 2  # requests queued behind the one being answered; beyond, reading stops
SEND_BUFFER_BYTES = 262_144  # SO_SNDBUF of every connection: the kernel memory an unread one pins
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, drops the buffer
EDGE_STATUS = "edge_status"  # scope key: the status the edge answered while the app was reading
assert MAX_URL_BYTES + 32 < http11.MAX_LINE_LENGTH and MAX_HEADERS < http11.MAX_NUM_HEADERS

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
waiting_refusals = [0]  # refused connections waiting for their head, in this process


@dataclass(frozen=True)
class EdgeLimits:
    """The limits of the edge protocol (the defaults are the settings' defaults)."""

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


counts = ConnectionCounts()  # in this process (one server)


class PipelineFull(Exception):
    """Raised in a parser callback: too many requests queued on one connection."""


def socket_option(transport: asyncio.BaseTransport, option: int, value: int | bytes) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, option, value)


def abort_with_reset(transport: asyncio.BaseTransport) -> None:
    """Drop a connection and everything unsent, in the process and in the kernel (RST)."""
    socket_option(transport, socket.SO_LINGER, _RESET_ON_CLOSE)
    transport.abort()  # type: ignore[attr-defined]


class Refusal(Exception):
    """An answer the edge gives instead of the app (raised inside parser callbacks)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
