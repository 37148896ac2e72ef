"""Minimal HTTP/1.1 and RFC 6455 client protocols for closed-loop load, built to be cheap.

Each connection is an ``asyncio.Protocol`` that runs its own closed loop inside
``data_received``: when a whole response (or WebSocket frame) is in, it records the latency and
writes the next pre-encoded request at once: no futures, tasks or per-message JSON. Responses
are parsed only as far as the status line and ``Content-Length`` (HTTP) or the frame header
(WebSocket); a sample of bodies is kept for :mod:`bench.loadgen` to verify after the run.
"""

from __future__ import annotations

import asyncio
import base64
import os
from time import perf_counter_ns

MASK_KEY = b"\x5a\xc3\x17\xe8"  # fixed client mask (RFC 6455 allows any key; it is not secret)


class Run:
    """State shared by all connections of one measurement."""

    __slots__ = ("done", "errors", "inflight", "lat", "n", "recording", "sample_every", "samples",
                 "stopped")  # fmt: skip

    def __init__(self, sample_every: int = 97) -> None:
        self.lat: list[int] = []  # ns, completions inside the window only
        self.errors = 0  # non-200 / non-echo replies inside the window
        self.n = 0  # all completions (warm-up included)
        self.recording = False
        self.stopped = False
        self.inflight = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sample_every = sample_every
        self.samples: list[tuple[int, bytes]] = []  # (request index, body)

    def finish_one(self) -> None:
        self.inflight -= 1
        if self.inflight == 0 and not self.done.done():
            self.done.set_result(None)


class HttpConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection sending ``reqs`` round-robin, one at a time."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = -1  # end offset of the current response in buf, -1 while reading headers
        self.body_at = 0
        self.ok = False
        self.transport: asyncio.Transport | None = None
        self.run: Run | None = None
        self.reqs: list[bytes] = []
        self.i = 0
        self.t_send = 0
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self.run is not None and not self.run.stopped:
            self.run.errors += 1
            self.run.finish_one()
            self.run = None

    def begin(self, run: Run, reqs: list[bytes], offset: int) -> None:
        self.run, self.reqs, self.i = run, reqs, offset
        run.inflight += 1
        self.t_send = perf_counter_ns()
        self.transport.write(reqs[offset % len(reqs)])  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            if self.need < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                # At a line start: v2's Inference-Header-Content-Length also ends in it.
                at = buf.find(b"\ncontent-length:", 0, end)
                if at < 0:  # header case differs: fall back to a lower-cased copy
                    at = bytes(buf[:end]).lower().find(b"\ncontent-length:")
                stop = buf.find(b"\r\n", at, end + 2)
                self.body_at = end + 4
                self.need = self.body_at + int(buf[at + 16 : stop])
                self.ok = buf[9:12] == b"200"
            if len(buf) < self.need:
                return
            run = self.run
            if run is not None:
                now = perf_counter_ns()
                if run.recording:
                    run.lat.append(now - self.t_send)
                    if not self.ok:
                        run.errors += 1
                run.n += 1
                if run.n % run.sample_every == 0 and len(run.samples) < 64:
                    run.samples.append((self.i, bytes(buf[self.body_at : self.need])))
                if run.stopped:
                    self.run = None
                    run.finish_one()
                else:
                    self.i += 1
                    self.t_send = now
                    self.transport.write(self.reqs[self.i % len(self.reqs)])  # type: ignore[union-attr]
            del buf[: self.need]
            self.need = -1


def http_request(path: str, body: bytes, method: str = "POST") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


def ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A masked client frame (FIN set)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    masked = bytes(b ^ MASK_KEY[i & 3] for i, b in enumerate(payload))
    return head + MASK_KEY + masked


class WsConn(asyncio.Protocol):
    """One WebSocket session: handshake, the server's first frame, then a closed loop."""

    def __init__(self, path: str, history: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.path = path
        self.buf = bytearray()
        self.open = False
        self.ready: asyncio.Future[bytes] = loop.create_future()  # the session frame's payload
        self.transport: asyncio.Transport | None = None
        self.run: Run | None = None
        self.frames: list[bytes] = []
        self.tag = 0  # which frame set (phase) is being sent, for the history
        self.i = 0
        self.t_send = 0
        # Sampled sessions keep every message index they sent (per phase) and every 10th reply.
        self.history: list[tuple[int, int]] | None = [] if history else None
        self.replies: list[tuple[int, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(  # type: ignore[attr-defined]
            f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed during handshake: {exc}"))
        if self.run is not None and not self.run.stopped:
            self.run.errors += 1
            self.run.finish_one()
            self.run = None

    def begin(self, run: Run, frames: list[bytes], offset: int, tag: int = 0) -> None:
        self.run, self.frames, self.i, self.tag = run, frames, offset, tag
        run.inflight += 1
        self._send(perf_counter_ns())

    def _send(self, now: int) -> None:
        self.t_send = now
        k = self.i % len(self.frames)
        if self.history is not None:
            self.history.append((self.tag, k))
        self.transport.write(self.frames[k])  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if buf[9:12] != b"101":
                self.ready.set_exception(ConnectionError(bytes(buf[:end]).decode(errors="replace")))
                self.transport.close()  # type: ignore[union-attr]
                return
            del buf[: end + 4]
            self.open = True
        while len(buf) >= 2:
            n = buf[1] & 0x7F
            hdr = 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, hdr = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, hdr = int.from_bytes(buf[2:10], "big"), 10
            end = hdr + n
            if len(buf) < end:
                return
            op = buf[0] & 0x0F
            if op == 1:
                self._on_text(buf, hdr, end)
            elif op == 9:  # ping: answer with a pong carrying the same payload
                self.transport.write(ws_frame(bytes(buf[hdr:end]), 0xA))  # type: ignore[union-attr]
            elif op == 8:
                self.transport.close()  # type: ignore[union-attr]
            del buf[:end]

    def _on_text(self, buf: bytearray, hdr: int, end: int) -> None:
        if not self.ready.done():
            self.ready.set_result(bytes(buf[hdr:end]))
            return
        run = self.run
        if run is None:
            return
        now = perf_counter_ns()
        if run.recording:
            run.lat.append(now - self.t_send)
            if buf.find(b'"echo"', hdr, hdr + 40) < 0:
                run.errors += 1
        run.n += 1
        if self.history is not None and len(self.history) % 10 == 1:  # message 0, 10, ...
            self.replies.append((len(self.history) - 1, bytes(buf[hdr:end])))
        if run.stopped:
            self.run = None
            run.finish_one()
        else:
            self.i += 1
            self._send(now)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(ws_frame(b"\x03\xe8", 0x8))
            self.transport.close()
