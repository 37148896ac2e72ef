"""Clients for the hostile-client tests of issue #21 round 2 (``tests/test_hostile_round2.py``).

A well-behaved client that keeps asking ``GET /livez`` in a thread (how long each answer took),
a sampler of the server's RSS, raw HTTP and raw WebSocket-upgrade sockets bound to a chosen
loopback source address, and an /echo session opener that reports a refusal's close code. The
tests keep no import from ``bench/``: these are the tests' own.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

UPGRADE = (
    b"GET /echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


class RssPeak(threading.Thread):
    """The server's RSS when started (``before``) and its highest since (``peak``)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.before = self.peak = rss_mb(pid)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except OSError:
                return
            self.done.wait(self.interval)

    def __enter__(self) -> RssPeak:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join(5)

    @property
    def growth(self) -> float:
        return self.peak - self.before


def dial(port: int, source: str, timeout: float = 30.0) -> socket.socket:
    return socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    )


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


def livez(port: int, source: str, timeout: float = 30.0) -> int:
    """Status of ``GET /livez`` on a new connection from ``source``; 0 if none came."""
    try:
        with dial(port, source, timeout) as sock:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            data = b""
            while b"\r\n" not in data and (chunk := sock.recv(4096)):
                data += chunk
        return status_of(data)
    except OSError:
        return 0


@dataclass
class Answer:
    status: int
    error: str
    sent_at: float  # monotonic: the request was sent whole
    answered_at: float  # monotonic: the response was complete (or the server closed)

    @property
    def seconds(self) -> float:
        return self.answered_at - self.sent_at


def read_response(sock: socket.socket) -> bytes:
    """One response's bytes: read until its body is complete, the server closes or resets, or
    the socket times out."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep and b"content-length:" in head.lower():
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(body) >= length:
                    break
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def exchange(port: int, source: str, request: bytes, timeout: float = 60.0) -> Answer:
    """Send ``request`` from ``source``; its one response (read until complete or closed)."""
    with dial(port, source, timeout) as sock:
        sock.sendall(request)
        sent = time.monotonic()
        data = read_response(sock)
        done = time.monotonic()
    body = data.partition(b"\r\n\r\n")[2]
    try:
        error = str(orjson.loads(body).get("error", ""))
    except (orjson.JSONDecodeError, AttributeError):
        error = body[:80].decode(errors="replace")
    return Answer(status_of(data), error, sent, done)


def post(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()


class Victim(threading.Thread):
    """A well-behaved client on ``source``: ``GET /livez`` on a new connection every
    ``interval``; each as (started, answered, status), monotonic."""

    def __init__(self, port: int, source: str = "127.0.0.2", interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.port, self.source, self.interval = port, source, interval
        self.calls: list[tuple[float, float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            t0 = time.monotonic()
            status = livez(self.port, self.source)
            t1 = time.monotonic()
            self.calls.append((t0, t1, status))
            self.done.wait(max(0.0, self.interval - (t1 - t0)))

    def __enter__(self) -> Victim:
        self.start()
        time.sleep(0.2)  # a few answers before the attack
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join(60)

    def longest_wait(self, since: float = 0.0) -> float:
        """The longest wait of a request that started after ``since`` or ended after it."""
        waits = [t1 - t0 for t0, t1, _ in self.calls if t1 >= since]
        return max(waits, default=float("inf"))

    def failures(self) -> list[int]:
        return [status for _, _, status in self.calls if status != 200]


@dataclass
class Refused(Exception):
    code: int  # a WebSocket close code (1006: closed without one), or the upgrade's HTTP status
    reason: str


async def open_session(
    url: str, source: str, timeout: float = 10.0
) -> tuple[ClientConnection, dict[str, Any]]:
    """An /echo connection from ``source`` and its session frame, else ``Refused``."""
    try:
        ws = await connect(
            url, proxy=None, compression=None, open_timeout=timeout, local_addr=(source, 0)
        )
    except InvalidStatus as exc:
        raise Refused(exc.response.status_code, exc.response.body[:100].decode()) from None
    try:
        frame = orjson.loads(await asyncio.wait_for(ws.recv(), timeout))
    except ConnectionClosed as exc:
        await ws.close()
        raise Refused(exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else Refused(1006, "") from None
    except BaseException:
        await ws.close()
        raise
    return ws, frame


def resume_query(frame: dict[str, Any]) -> str:
    return f"session_id={frame['session_id']}&token={frame['token']}"


def hold_websocket(port: int, source: str) -> tuple[socket.socket | None, bytes]:
    """A WebSocket upgrade from ``source`` kept open (the socket), or the refusal's status line
    (``None``, the first line)."""
    sock = dial(port, source, timeout=10)
    try:
        sock.sendall(UPGRADE)
        head = b""
        while b"\r\n\r\n" not in head and (chunk := sock.recv(4096)):
            head += chunk
    except OSError:
        sock.close()
        return None, b"(reset)"
    if head.startswith(b"HTTP/1.1 101"):
        return sock, head.split(b"\r\n", 1)[0]
    sock.close()
    return None, head.split(b"\r\n", 1)[0]
