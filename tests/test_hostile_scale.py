"""The hostile view of scale: a client holding thousands of connections from many addresses and
networks makes nobody else's connect or message slower (issue #22).

Before the edge counted connections per client as they opened and closed, every new connection
scanned all open ones: with 5,000 idle WebSockets held, another client's ``/livez`` went from
1.2 to 11.5 ms at the median. Medians over 200 tries, before and while the connections are held,
on one server with the service's default limits.
"""

from __future__ import annotations

import json
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live_server import LiveServer, start_server

pytestmark = pytest.mark.slow

HELD = 4000  # 80 addresses x 50 connections, 4 addresses per /24 (200 per network)
UPGRADE = (
    b"GET /echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with start_server(tmp_path_factory.mktemp("scale"), env={"ECHO_IDLE_TIMEOUT_S": "600"}) as s:
        yield s


def _port(server: LiveServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def _hold(server: LiveServer, source: str) -> socket.socket:
    """An attached echo session on a raw socket from ``source`` (handshake and session frame)."""
    sock = socket.create_connection(("127.0.0.1", _port(server)), 10, (source, 0))
    sock.sendall(UPGRADE)
    data = b""
    while b"\r\n\r\n" not in data or b'"session"' not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    assert data.startswith(b"HTTP/1.1 101"), data[:200]
    return sock


def _livez_ms(server: LiveServer, source: str = "127.0.0.2") -> float:
    """Connect, ask /livez, read the whole answer: one client's view of the server, in ms."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", _port(server)), 10, (source, 0)) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    return (time.perf_counter() - t0) * 1000


def _echo_ms(ws: socket.socket) -> float:
    """One 1-bit echo message and its reply on an open session (masked client frame)."""
    payload = json.dumps({"bits": [1]}).encode()
    mask = b"\x01\x02\x03\x04"
    frame = bytes([0x81, 0x80 | len(payload)]) + mask
    frame += bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    t0 = time.perf_counter()
    ws.sendall(frame)
    data = b""
    while b'"echo"' not in data:
        chunk = ws.recv(65536)
        assert chunk
        data += chunk
    return (time.perf_counter() - t0) * 1000


def _medians(server: LiveServer, ws: socket.socket) -> tuple[float, float]:
    connects = [_livez_ms(server) for _ in range(200)]
    messages = [_echo_ms(ws) for _ in range(200)]
    return statistics.median(connects), statistics.median(messages)


def test_thousands_of_held_connections_slow_no_one_elses_connect_or_message(
    server: LiveServer, tmp_path: Path
) -> None:
    own = _hold(server, "127.0.0.2")
    held: list[socket.socket] = []
    try:
        connect_before, message_before = _medians(server, own)
        for i in range(HELD):
            address = i // 50  # 50 per address (the cap is 64), 4 addresses per /24
            held.append(_hold(server, f"127.1.{address // 4}.{1 + address % 4}"))
        connect_during, message_during = _medians(server, own)
    finally:
        for sock in held:
            sock.close()
        own.close()
    report = (
        f"/livez connect+answer median {connect_before:.2f} -> {connect_during:.2f} ms, "
        f"echo message median {message_before:.2f} -> {message_during:.2f} ms "
        f"with {HELD} connections held"
    )
    (tmp_path / "report.txt").write_text(report)
    print(report)
    # O(open connections) admission made this ~8x slower at 4,000; noise on a shared 2-core
    # machine stays well within 2x of medians over 200.
    assert connect_during <= max(2 * connect_before, connect_before + 1.0), report
    assert message_during <= max(2 * message_before, message_before + 1.0), report
