"""Per-client session limits shared by servers on one Redis (``app/services/redis_sessions.py``).

Two real servers on one real ``redis-server``; each phase is a client of its own (a loopback
source address of its own): the cap on attached sessions counts the client's sessions on both
servers, the new-session rate is one bucket for both, a resume counts like a new session
(without a token), and the sessions of a server killed with SIGKILL stop counting once its
lease lapses. In-process against the same Redis: a process's older count never overwrites a
newer one, and a client's hash expires once it holds nothing and its bucket is full again.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from app.services.redis_sessions import Admission, RedisSessions
from tests.live_server import LiveServer, start_server, wait_until
from tests.redis_server import RedisServer
from tests.test_api_echo import resume_query, send_bits

LIMITS = {
    "ECHO_MAX_SESSIONS_PER_CLIENT": "4",
    "ECHO_NEW_SESSIONS_PER_S": "0.5",
    "ECHO_NEW_SESSIONS_BURST": "6",
    "ECHO_LEASE_S": "1.5",
}


def _connect(server: LiveServer, source: str, query: str = "") -> ClientConnection:
    return connect(
        f"{server.ws_url}/echo{query}",
        proxy=None,
        compression=None,
        source_address=(source, 0),
    )


def _open(server: LiveServer, source: str, query: str = "") -> tuple[ClientConnection, dict]:
    ws = _connect(server, source, query)
    frame = json.loads(ws.recv(timeout=10))
    assert frame["type"] == "session", frame
    send_bits(ws, [1, 0, 1])
    return ws, frame


def _refused(server: LiveServer, source: str, query: str = "") -> str:
    """Connect from ``source``, expect a 1013 close at once: its reason."""
    with _connect(server, source, query) as ws, pytest.raises(ConnectionClosed):
        ws.recv(timeout=10)
    assert ws.close_code == 1013, (ws.close_code, ws.close_reason)
    return ws.close_reason or ""


@pytest.fixture
def two_servers(tmp_path: Path, redis: RedisServer) -> Iterator[tuple[LiveServer, LiveServer]]:
    env = {"ECHO_STORE_URL": redis.url, **LIMITS}
    with start_server(tmp_path / "a", env) as a, start_server(tmp_path / "b", env) as b:
        yield a, b


@pytest.mark.slow
def test_the_limits_hold_across_servers(two_servers: tuple[LiveServer, LiveServer]) -> None:
    a, b = two_servers
    with ExitStack() as held:
        # the cap: 2 + 2 sessions on two servers are the client's 4
        source = "127.0.0.2"
        on_a = [held.enter_context(_open(a, source)[0]) for _ in range(2)]
        for _ in range(2):
            held.enter_context(_open(b, source)[0])
        assert _refused(a, source).startswith("too_many_sessions_from_client")
        assert _refused(b, source).startswith("too_many_sessions_from_client")
        on_a[0].close()  # one fewer on a: room for one on b
        wait_until(lambda: _try_open(b, source, held), 5, "a session on b once a has one fewer")

        # the rate: one bucket of 6 for both servers (each would allow 6 on its own)
        source = "127.0.0.3"
        for server in (a, b, a, b, a, b):
            _open(server, source)[0].close()
        reason = _refused(a, source)
        assert reason.startswith("session_rate_limited"), reason
        assert _refused(b, source).startswith("session_rate_limited")
        time.sleep(2.1)  # 0.5 tokens a second
        _open(b, source)[0].close()

        # a resume counts against the cap (it takes no token)
        source = "127.0.0.5"
        kept = [held.enter_context(_open(a, source)[0]) for _ in range(3)]
        detached, frame = _open(a, source)
        detached.close()
        held.enter_context(_open(b, source)[0])  # 4 again: 3 on a, 1 on b
        assert _refused(b, source, resume_query(frame)).startswith("too_many_sessions_from_client")
        kept[0].close()
        wait_until(
            lambda: _try_open(b, source, held, resume_query(frame)),
            5,
            "the resume on b once a has one fewer",
        )


@pytest.mark.slow
def test_a_killed_servers_sessions_stop_counting(
    two_servers: tuple[LiveServer, LiveServer],
) -> None:
    a, b = two_servers
    source = "127.0.0.4"
    with ExitStack() as held:
        for _ in range(4):
            held.enter_context(_open(a, source)[0])
        assert _refused(b, source).startswith("too_many_sessions_from_client")
        os.kill(a.pid, signal.SIGKILL)  # no release: its owner key lapses after ECHO_LEASE_S
        t0 = time.monotonic()
        wait_until(lambda: _try_open(b, source, held), 10, "b admits once a's lease lapsed")
        assert time.monotonic() - t0 >= 0.5  # not at once: the lease was still alive


def _try_open(server: LiveServer, source: str, held: ExitStack, query: str = "") -> bool:
    try:
        ws, _ = _open(server, source, query)
    except ConnectionClosed:
        return False
    held.enter_context(ws)
    return True


@pytest.mark.slow
def test_an_older_count_never_overwrites_a_newer_one(redis: RedisServer) -> None:
    async def scenario() -> None:
        store = RedisSessions(
            redis.url, ttl_s=60, lease_s=5, replies=4, connect_timeout_s=1, timeout_s=1,
            client_rate=1000.0, client_burst=10, client_max_attached=10,
        )  # fmt: skip
        key = f"{store.prefix}c:192.0.2.9"
        try:
            await store.keep_owner()
            state = np.zeros(4, np.float32)
            await store.create("old-1", "t", state, 1, Admission("192.0.2.9", True, 1, 1))
            await store.create("old-2", "t", state, 1, Admission("192.0.2.9", True, 2, 3))
            await store.record_clients([("192.0.2.9", 2, 7)])  # late: seq 2 < 3
            assert await store.client.hget(key, store.owner) == b"3:2"
            assert await store.client.pttl(key) > 3_600_000  # held: kept for CLIENT_HOLD_S
            await store.release([("old-1", 1), ("old-2", 1)], ("192.0.2.9", 4, 0))
            assert await store.client.hget(key, store.owner) == b"4:0"
            assert 0 < await store.client.pttl(key) <= 60_000  # nothing held: CLIENT_KEEP_S
        finally:
            await store.client.delete(key)
            await store.close()

    asyncio.run(scenario())
