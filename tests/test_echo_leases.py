"""Echo session leases in Redis: one owner key per process, not one lease per session.

In-process (a real redis-server, the shipped echo model): at rest the lease keeper sends one
command a tick whether 10 or 500 sessions are attached (counted by Redis itself, ``INFO
commandstats``, which counts the commands scripts run too); a lapsed owner key costs one pass
over the attached sessions, which ends the connections whose session was taken over; attached
sessions' hashes outlive the idle timeout, detached ones expire ``ECHO_SESSION_TTL_S`` later.
With real servers: a server stopped (SIGSTOP) for longer than ``ECHO_LEASE_S`` loses its
session to another, whose state its writes cannot touch when it wakes; a cleanly detached
session resumes on another server at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from app.core.errors import Conflict, LeaseLost, ServiceError
from app.services.echo_service import EchoService
from app.services.models import EchoModel
from app.services.redis_sessions import RedisSessions
from tests.live_server import LiveServer, start_server
from tests.redis_server import RedisServer, running_redis
from tests.test_api_echo import resume_query, send_bits
from tests.test_echo_core import echo_model, service, stream
from tests.test_echo_redis import FAST_FAILOVER, messages, resume, same, unbroken

__all__ = ["echo_model"]  # a fixture

pytestmark = pytest.mark.slow

LEASE_S = 0.6  # a keeper tick every 0.2 s


class Conn:
    """A client connection as the service sees it; records how it was ended."""

    def __init__(self) -> None:
        self.ended: list[str] = []

    async def end(self, error: ServiceError) -> None:
        self.ended.append(error.code)


@pytest.fixture(scope="module")
def bare_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of this module's own: nothing else sends it commands."""
    with running_redis(tmp_path_factory.mktemp("lease_redis")) as server:
        yield server


async def leased_service(model: EchoModel, url: str, **settings: object) -> EchoService:
    limits = {"echo_new_sessions_burst": 1000, "echo_max_sessions_per_client": 1000}
    return await service(model, echo_store_url=url, echo_lease_s=LEASE_S, **{**limits, **settings})


async def commands(client: aioredis.Redis, seconds: float) -> dict[str, int]:
    """The commands Redis ran in the next ``seconds`` (those run by scripts included)."""
    await client.config_resetstat()
    await asyncio.sleep(seconds)
    return await counted(client)


async def counted(client: aioredis.Redis) -> dict[str, int]:
    """The commands Redis ran since its counters were reset, but for these requests."""
    stats = await client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): s["calls"] for name, s in stats.items()}
    return {k: v for k, v in calls.items() if not k.startswith(("config", "info"))}


async def stop(svc: EchoService, sessions: list) -> None:
    for session in sessions:
        await svc.close(session)
    await svc.stop()


def test_the_keeper_sends_one_command_a_tick_however_many_sessions(
    echo_model: EchoModel, bare_redis: RedisServer
) -> None:
    """Before: three commands per attached session a tick (GET, SET, PEXPIRE of its lease and
    hash); now one SET of the owner key, with 10 sessions attached or 500."""

    async def at_rest(n: int) -> dict[str, int]:
        svc = await leased_service(echo_model, bare_redis.url)
        client = aioredis.Redis.from_url(bare_redis.url)
        sessions = [await svc.open(None, None, Conn()) for _ in range(n)]  # type: ignore[arg-type]
        try:
            await asyncio.sleep(LEASE_S)
            return await commands(client, 10 * LEASE_S / 3)  # about 10 ticks
        finally:
            await client.aclose()
            await stop(svc, sessions)

    for n in (10, 500):
        calls = asyncio.run(at_rest(n))
        calls.pop("ping", None)  # the client's connection health check, if it came
        assert set(calls) == {"set"}, (n, calls)  # the owner key's renewal alone
        assert 5 <= calls["set"] <= 12, (n, calls)  # one per tick, about 10 ticks


def test_a_lapsed_owner_key_ends_the_sessions_taken_over(
    echo_model: EchoModel, bare_redis: RedisServer
) -> None:
    """The owner key lapses (as when the process stalls); another process takes one of its three
    sessions meanwhile. The next renewal checks the three once: that connection is ended with
    ``lease_lost`` and its writes are refused; the other two are held again, and the client's
    count of sessions here is written again."""

    async def scenario() -> None:
        svc = await leased_service(echo_model, bare_redis.url)
        other = RedisSessions(
            bare_redis.url, ttl_s=60, lease_s=LEASE_S, replies=4, connect_timeout_s=1, timeout_s=1
        )
        client = aioredis.Redis.from_url(bare_redis.url)
        conns = [Conn() for _ in range(3)]
        sessions = [await svc.open(None, None, c) for c in conns]  # type: ignore[arg-type]
        try:
            await svc.advance(sessions[0], stream(1, 5))
            assert svc.durable is not None
            async with svc._renewing:  # the process stalls: no renewal until the key lapsed
                await client.delete(svc.durable.owner_key)
                taken = await other.acquire(sessions[0].id, sessions[0].token)
                assert taken.fence == sessions[0].fence + 1 and taken.seq == 1
                with pytest.raises(LeaseLost):
                    await svc.advance(sessions[0], stream(2, 3))  # fenced off
                await client.config_resetstat()
            await asyncio.sleep(2 * LEASE_S / 3 + 0.1)  # the next renewal and one more
            calls = await counted(client)
            # one pass (a fence read each, two held again), then the client's count written
            # again (one read of its field and one write: the other process dropped it)
            assert calls["hget"] == 3 + 1 and calls["hset"] == 2 + 1, calls
            assert calls["hgetall"] == 1, calls
            await asyncio.sleep(0.05)
            assert [c.ended for c in conns] == [["lease_lost"], [], []]
            for s in sessions[1:]:
                with pytest.raises(Conflict, match="attached to another connection"):
                    await other.acquire(s.id, s.token)  # held again
                await svc.advance(s, stream(3, 4))
        finally:
            await other.close()
            await client.aclose()
            await stop(svc, sessions)

    asyncio.run(scenario())


def test_attached_sessions_outlive_the_idle_timeout_detached_ones_the_ttl(
    echo_model: EchoModel, bare_redis: RedisServer
) -> None:
    """ECHO_SESSION_TTL_S=2 with ECHO_IDLE_TIMEOUT_S=120: no renewal refreshes an attached
    session's hash, so its expiry covers the idle timeout; once detached, the TTL applies."""

    async def scenario() -> None:
        svc = await leased_service(
            echo_model, bare_redis.url, echo_session_ttl_s=2, echo_idle_timeout_s=120
        )
        client = aioredis.Redis.from_url(bare_redis.url)
        session = await svc.open(None, None, Conn())  # type: ignore[arg-type]
        key = f"rnn:echo:s:{session.id}"
        try:
            assert await client.pttl(key) > 120_000
            await svc.advance(session, stream(4, 3))
            assert await client.pttl(key) > 120_000
            await svc.close(session)
            assert 0 < await client.pttl(key) <= 2000
            assert await client.hget(key, "own") is None
        finally:
            await client.aclose()
            await svc.stop()

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, redis: RedisServer
) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two servers on one Redis, leases of 1.5 s."""
    env = {"ECHO_STORE_URL": redis.url, **FAST_FAILOVER}
    with (
        start_server(tmp_path_factory.mktemp("lease_a"), env) as a,
        start_server(tmp_path_factory.mktemp("lease_b"), env) as b,
    ):
        yield a, b


def test_a_cleanly_detached_session_resumes_on_another_server_at_once(
    pair: tuple[LiveServer, LiveServer],
) -> None:
    a, b = pair
    for _ in range(5):
        with connect(f"{a.ws_url}/echo", proxy=None) as ws:
            frame = json.loads(ws.recv(timeout=10))
            send_bits(ws, [1, 0, 1])
        with connect(f"{b.ws_url}/echo{resume_query(frame)}", proxy=None) as ws:  # no retry
            again = json.loads(ws.recv(timeout=10))
            assert again["resumed"] and again["seq"] == 1


def test_a_stalled_server_loses_its_session_and_cannot_overwrite_it(
    pair: tuple[LiveServer, LiveServer],
) -> None:
    """A stops (SIGSTOP) for longer than ECHO_LEASE_S; the client resumes on B and goes on there.
    A wakes with a message of the old connection waiting: it is not answered, the connection is
    ended with ``lease_lost``, and the session on B is as if A had never woken."""
    a, b = pair
    msgs = messages(11, 12)
    want = unbroken(b, msgs)
    old = connect(f"{a.ws_url}/echo", proxy=None)
    frame = json.loads(old.recv(timeout=10))
    got = [send_bits(old, m) for m in msgs[:4]]
    os.kill(a.pid, signal.SIGSTOP)
    try:
        time.sleep(float(FAST_FAILOVER["ECHO_LEASE_S"]))
        ws, again = resume(b, frame, last_seq=4)
        with ws:
            assert again["resumed"] and again["seq"] == 4
            got += [send_bits(ws, m) for m in msgs[4:8]]
            old.send(json.dumps({"bits": [1, 1, 1, 1]}))  # waits for A to wake
            os.kill(a.pid, signal.SIGCONT)
            with pytest.raises(ConnectionClosed):
                while True:  # an error frame may come first
                    answer = json.loads(old.recv(timeout=10))
                    assert answer["type"] == "error" and answer["code"] == "lease_lost", answer
            assert old.close_code == 1013
            assert (old.close_reason or "").startswith("lease_lost"), old.close_reason
            got += [send_bits(ws, m) for m in msgs[8:]]  # B's session is untouched
    finally:
        os.kill(a.pid, signal.SIGCONT)
        old.close()
    same(got, want)
    assert "Traceback" not in a.log_text()
