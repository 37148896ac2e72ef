"""Hostile ``/echo`` clients, for the hostile-client tests and ``bench/soak.py``.

Each attacker connects from its own loopback source address (``127.0.0.x``) so that the server's
per-address limits tell it apart from the well-behaved client. Everything is bounded in count
and time. The never-reading client speaks raw WebSocket over a plain socket, so no client library
drains its receive buffer behind its back.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus


@dataclass
class Refused(Exception):
    code: int
    reason: str

    @property
    def error(self) -> str:
        return self.reason.partition(":")[0]


async def open_session(
    url: str, source: str, timeout: float = 10.0, **kwargs: Any
) -> tuple[ClientConnection, dict[str, Any]]:
    """An open connection from ``source`` and its session frame; raises ``Refused`` (a close
    code and reason, or an HTTP status refusing the upgrade as ``http_<status>``)."""
    try:
        ws = await connect(
            url,
            proxy=None,
            compression=None,
            open_timeout=timeout,
            local_addr=(source, 0),
            max_size=None,
            **kwargs,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        raise Refused(status, f"http_{status}: {exc.response.body[:100]!r}") from None
    try:
        frame = orjson.loads(await asyncio.wait_for(ws.recv(), timeout))
    except ConnectionClosed as exc:
        await ws.close()
        rcvd = exc.rcvd
        raise Refused(rcvd.code if rcvd else 1006, rcvd.reason if rcvd else "") from None
    except BaseException:
        await ws.close()
        raise
    return ws, frame


def resume_url(url: str, frame: dict[str, Any]) -> str:
    return f"{url}?session_id={frame['session_id']}&token={frame['token']}"


@dataclass
class ChurnResult:
    opened: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    frames: list[dict[str, Any]] = field(default_factory=list)  # session frames, in order


async def churn(
    url: str, source: str, count: int, concurrency: int = 16, deadline_s: float = 300.0
) -> ChurnResult:
    """Open ``count`` sessions from ``source`` and drop each at once (close right after the
    session frame); refusals are counted by reason code."""
    result = ChurnResult()
    todo = iter(range(count))
    stop_at = time.monotonic() + deadline_s

    async def worker() -> None:
        for _ in todo:
            if time.monotonic() > stop_at:
                return
            try:
                ws, frame = await open_session(url, source)
            except Refused as exc:
                result.refused[exc.error] += 1
                continue
            except (OSError, InvalidHandshake, TimeoutError):
                result.errors += 1
                continue
            result.opened += 1
            result.frames.append(frame)
            await ws.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return result


async def hoard(
    url: str, source: str, count: int, concurrency: int = 8, **kwargs: Any
) -> tuple[list[Any], Counter[str]]:
    """Open up to ``count`` sessions from ``source`` and keep them open, sending nothing.

    Returns the (connection, session frame) pairs that were admitted and the refusals by code.
    """
    held: list[Any] = []
    refused: Counter[str] = Counter()
    todo = iter(range(count))

    async def worker() -> None:
        for _ in todo:
            try:
                held.append(await open_session(url, source, ping_interval=None, **kwargs))
            except Refused as exc:
                refused[exc.error] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return held, refused


async def closed_reason(ws: ClientConnection, timeout: float) -> tuple[int, str]:
    """Wait until the server closes ``ws``; its close code and reason."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as exc:
        rcvd = exc.rcvd
        return (rcvd.code, rcvd.reason) if rcvd else (1006, "")


def ws_text_frame(payload: bytes) -> bytes:
    """A masked client text frame (mask key 0, so the payload is sent as is)."""
    n = len(payload)
    if n < 126:
        header = bytes([0x81, 0x80 | n])
    elif n < 65_536:
        header = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        header = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    return header + b"\0\0\0\0" + payload


class NeverReader:
    """A raw WebSocket client that sends echo messages and never reads the replies."""

    def __init__(self, host: str, port: int, source: str, path: str = "/echo") -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # fill up sooner
        self.sock.settimeout(10)
        self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.local_port = self.sock.getsockname()[1]
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        self.session = self._read_first_frame()

    def _read_first_frame(self) -> dict[str, Any]:
        data = b""
        while b"\r\n\r\n" not in data:
            data += self._recv()
        head, _, rest = data.partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(head.decode(errors="replace"))
        while len(rest) < 4:
            rest += self._recv()
        n, start = rest[1] & 0x7F, 2
        if n == 126:
            n, start = int.from_bytes(rest[2:4], "big"), 4
        while len(rest) < start + n:
            rest += self._recv()
        return orjson.loads(rest[start : start + n])

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65_536)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        return chunk

    def flood(self, bits: int = 4096, most: int = 2000, stall_s: float = 1.0) -> int:
        """Send up to ``most`` messages of ``bits`` bits until a send stalls for ``stall_s``;
        returns how many were sent whole."""
        frame = ws_text_frame(orjson.dumps({"bits": [1, 0] * (bits // 2)}))
        self.sock.settimeout(stall_s)
        sent = 0
        try:
            for _ in range(most):
                self.sock.sendall(frame)
                sent += 1
        except (TimeoutError, OSError):
            pass
        return sent

    def close(self) -> None:
        self.sock.close()


def server_has_connection_from(port: int, source: str, source_port: int) -> bool:
    """Whether the server side of a TCP connection 127.0.0.1:port <- source:source_port is
    still in /proc/net/tcp (in any state other than TIME_WAIT/CLOSE)."""
    local = f"0100007F:{port:04X}"
    remote = f"{socket.inet_aton(source)[::-1].hex().upper()}:{source_port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[1] == local and parts[2] == remote and parts[3] not in ("06", "07"):
                return True
    return False
