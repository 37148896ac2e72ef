"""Echo sessions in Redis (``ECHO_STORE_URL``): real redis-server, real servers, real crashes.

A stream moves between servers; a server killed with SIGKILL loses no answered step (every
session resumes elsewhere with ``last_seq`` and gets each reply exactly once); Redis stopping and
coming back; expiry; racing resumes; fencing; several workers. The echo API suite in
``tests/test_api_echo.py`` also runs against a Redis-backed server.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from app.core.errors import Conflict, DeadlineExceeded
from app.services.models import EchoModel
from app.services.redis_sessions import RedisSessions, Step
from tests.live_server import LiveServer, start_server, wait_until
from tests.redis_server import RedisServer, running_redis
from tests.test_api_echo import refusal, resume_query, send_bits, session
from tests.test_echo_core import Flaky, echo_model, service, stream

__all__ = ["echo_model"]  # a fixture

pytestmark = pytest.mark.slow

REDIS_PASSWORD = "s3cret-redis-pass"
FAST_FAILOVER = {"ECHO_LEASE_S": "1.5", "ECHO_STORE_TIMEOUT_S": "0.5"}


def messages(seed: int, count: int, largest: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(0, 1) for _ in range(rng.randint(1, largest))] for _ in range(count)]


def unbroken(server: LiveServer, msgs: list[list[int]]) -> list[dict]:
    """The replies of one uninterrupted session fed ``msgs``."""
    with session(server) as (ws, _):
        return [send_bits(ws, m) for m in msgs]


def resume(
    server: LiveServer, frame: dict, last_seq: int, patience: float = 15.0
) -> tuple[ClientConnection, dict]:
    """Resume ``frame``'s session with ``last_seq``, retrying while it is ``session_in_use``
    (its old server's lease has not lapsed yet), as a client should."""
    url = f"{server.ws_url}/echo{resume_query(frame)}&last_seq={last_seq}"
    deadline = time.monotonic() + patience
    while True:
        ws = connect(url, proxy=None, compression=None)
        try:
            return ws, json.loads(ws.recv(timeout=10))
        except ConnectionClosed:
            reason = ws.close_reason or ""
            ws.close()
            if not reason.startswith("session_in_use") or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def same(got: list[dict], want: list[dict]) -> None:
    assert [r["seq"] for r in got] == [r["seq"] for r in want]
    assert [r["bits"] for r in got] == [r["bits"] for r in want]
    worst = max(abs(a - b) for g, w in zip(got, want, strict=True) for a, b in zip(
        g["probabilities"], w["probabilities"], strict=True
    ))  # fmt: skip
    assert worst <= 1e-5


def test_a_stream_started_on_one_server_resumes_on_another(
    live_redis_server: LiveServer, tmp_path: Path, redis: RedisServer
) -> None:
    msgs = messages(1, 30)
    want = unbroken(live_redis_server, msgs)
    with start_server(tmp_path, {"ECHO_STORE_URL": redis.url}) as other:
        got, frame, servers = [], None, [live_redis_server, other]
        for part in range(3):  # A, B, A: ten messages on each
            server = servers[part % 2]
            if frame is None:
                ctx = connect(f"{server.ws_url}/echo", proxy=None)
                ws, frame = ctx, json.loads(ctx.recv(timeout=10))
            else:
                ws, again = resume(server, frame, last_seq=len(got))
                assert again["resumed"] and again["seq"] == len(got)
            with ws:
                got += [send_bits(ws, m) for m in msgs[10 * part : 10 * part + 10]]
    same(got, want)
    assert [int(p > 0.5) for r in got for p in r["probabilities"]] == [
        0, 0, 0, *[b for m in msgs for b in m][:-3]
    ]  # fmt: skip


def test_sigkill_mid_stream_loses_no_answered_step(
    live_redis_server: LiveServer, tmp_path: Path, redis: RedisServer
) -> None:
    """24 sessions stream to a server that is SIGKILLed; each resumes on another with
    ``last_seq``, gets every reply exactly once, and ends equal to an unbroken stream."""
    n_sessions, n_msgs = 24, 40
    plans = {k: messages(100 + k, n_msgs) for k in range(n_sessions)}
    env = {"ECHO_STORE_URL": redis.url, **FAST_FAILOVER}
    with start_server(tmp_path, env) as victim:
        received: dict[int, list[dict]] = {k: [] for k in plans}
        frames: dict[int, dict] = {}
        errors: list[BaseException] = []
        started = threading.Barrier(n_sessions + 1)

        def client(k: int) -> None:
            try:
                with connect(f"{victim.ws_url}/echo", proxy=None) as ws:
                    frames[k] = json.loads(ws.recv(timeout=10))
                    started.wait(30)
                    for m in plans[k]:  # until the server dies
                        received[k].append(send_bits(ws, m))
                        time.sleep(0.005)
            except (ConnectionClosed, OSError):
                pass
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(k,)) for k in plans]
        for t in threads:
            t.start()
        started.wait(30)
        wait_until(lambda: min(len(r) for r in received.values()) >= 5, 30, "5 replies each")
        os.kill(victim.pid, signal.SIGKILL)
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert all(len(r) < n_msgs for r in received.values()), "the kill came too late"

    replayed = 0
    for k, msgs in plans.items():
        last = len(received[k])
        ws, frame = resume(live_redis_server, frames[k], last_seq=last)
        with ws:
            assert frame["resumed"] and frame["seq"] >= last
            for _ in range(frame["seq"] - last):  # stored but never received: sent again
                received[k].append(json.loads(ws.recv(timeout=10)))
                replayed += 1
            received[k] += [send_bits(ws, m) for m in msgs[frame["seq"] :]]
        assert [r["seq"] for r in received[k]] == list(range(1, n_msgs + 1))  # exactly once
    reference = {k: unbroken(live_redis_server, plans[k]) for k in plans}
    for k in plans:
        same(received[k], reference[k])
    print(f"replayed after the kill: {replayed} replies")


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of these tests' own, that they may stop and restart; it wants a password."""
    with running_redis(tmp_path_factory.mktemp("own_redis"), password=REDIS_PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def fragile(
    tmp_path_factory: pytest.TempPathFactory, own_redis: RedisServer
) -> Iterator[LiveServer]:
    env = {"ECHO_STORE_URL": own_redis.url, "ECHO_SESSION_TTL_S": "2", **FAST_FAILOVER}
    with start_server(tmp_path_factory.mktemp("fragile"), env) as server:
        yield server


def test_redis_stopping_and_coming_back(fragile: LiveServer, own_redis: RedisServer) -> None:
    msgs = messages(7, 20)
    want = unbroken(fragile, msgs)
    with session(fragile) as (ws, frame):
        got = [send_bits(ws, m) for m in msgs[:8]]
        own_redis.stop()
        ws.send(json.dumps({"bits": msgs[8]}))  # its step cannot be stored: not answered
        error = json.loads(ws.recv(timeout=10))
        assert (error["type"], error["code"]) == ("error", "store_unavailable")
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 1013
    code, reason = refusal(fragile)  # no new sessions without the store
    assert (code, reason.split(":")[0]) == (1013, "store_unavailable")
    digits = httpx.post(f"{fragile.base_url}/predict/digit", json={"image": [[0] * 28] * 28})
    assert digits.status_code == 200  # digits keep serving
    ready = httpx.get(f"{fragile.base_url}/readyz").json()
    assert ready["status"] == "degraded" and "store" in ready["detail"]
    store = httpx.get(f"{fragile.base_url}/v1/models").json()["echo_store"]
    assert store["kind"] == "redis" and store["status"].startswith("unavailable")

    own_redis.start()  # same port, same append-only file
    wait_until(
        lambda: httpx.get(f"{fragile.base_url}/readyz").json()["status"] == "ready",
        15,
        "the store to be back",
        fragile,
    )
    ws, again = resume(fragile, frame, last_seq=8)  # the lease lapses within ECHO_LEASE_S
    with ws:
        assert again["seq"] == 8  # the unstored step never happened
        got += [send_bits(ws, m) for m in msgs[8:]]
    same(got, want)
    assert "Traceback" not in fragile.log_text()
    assert REDIS_PASSWORD not in fragile.log_text()  # ECHO_STORE_URL is a secret


def test_expired_sessions_are_gone(fragile: LiveServer) -> None:
    with session(fragile) as (ws, frame):
        send_bits(ws, [1, 0, 1])
    time.sleep(2.5)  # ECHO_SESSION_TTL_S=2 after the last use; Redis expires the hash
    code, reason = refusal(fragile, resume_query(frame))
    assert (code, reason.split(":")[0]) == (1008, "session_not_found")


def test_racing_resumes_exactly_one_wins(fragile: LiveServer) -> None:
    with session(fragile) as (ws, frame):
        send_bits(ws, [1, 1, 0])
    outcomes: list[str] = []
    go = threading.Barrier(8)

    def racer(server: LiveServer) -> None:
        url = f"{server.ws_url}/echo{resume_query(frame)}"
        with connect(url, proxy=None) as ws:
            go.wait(10)
            try:
                first = json.loads(ws.recv(timeout=10))
                outcomes.append(first["type"])
                time.sleep(1.0)  # hold it while the others try
            except ConnectionClosed:
                outcomes.append((ws.close_reason or "").split(":")[0])

    threads = [threading.Thread(target=racer, args=(fragile,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["session", *["session_in_use"] * 7], outcomes


def test_a_stale_writer_is_fenced_off(own_redis: RedisServer) -> None:
    """After another process attached the session, the old holder's writes are refused."""

    async def scenario() -> None:
        def store() -> RedisSessions:
            return RedisSessions(
                own_redis.url, ttl_s=60, lease_s=0.2, replies=2, connect_timeout_s=1, timeout_s=1
            )

        a, b = store(), store()
        try:
            state = np.zeros(4, np.float32)
            await a.create("s1", "tok", state, 1)  # a's owner key comes with it
            with pytest.raises(Conflict, match="retry in 0"):
                await b.acquire("s1", "tok")  # a holds it
            await asyncio.sleep(0.3)  # a's owner key lapses (it stalled)
            taken = await b.acquire("s1", "tok")
            assert taken.fence == 2
            old = Step("s1", 1, np.ones(4, np.float32).tobytes(), 1, None)
            new = Step("s1", 2, np.full(4, 2, np.float32).tobytes(), 1, None)
            assert await a.commit([old]) == [False]
            assert await b.commit([new]) == [True]
            assert not await a.keep_owner()  # a finds out that it lapsed, and what it lost
            assert await a.reclaim([("s1", 1)]) == [False]
            await a.release([("s1", 1)])  # not a's any more: changes nothing
            with pytest.raises(Conflict):
                await a.acquire("s1", "tok")
            await b.release([("s1", 2)])
            again = await a.acquire("s1", "tok")
            assert again.fence == 3 and np.array_equal(again.state, np.full(4, 2, np.float32))
            raw = await a.client.hgetall("rnn:echo:s:s1")
            assert b"tok" not in b"".join([*raw.keys(), *raw.values()])  # only its hash
            assert raw[b"own"] == a.owner.encode()
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_release_covers_an_attach_that_a_failover_forgot(own_redis: RedisServer) -> None:
    """A process gives a session up with the fence of its latest attach, which a failover may
    have lost (the primary that took it was deposed before a replica held it): the attach
    before it, which the promoted replica holds, is released too. Another holder's session, or
    one this process holds with a later fence, is left alone (#24: the chaos test found
    sessions kept in use by a live process after a stalled primary woke up)."""

    async def scenario() -> None:
        def store() -> RedisSessions:
            return RedisSessions(
                own_redis.url, ttl_s=60, lease_s=5, replies=2, connect_timeout_s=1, timeout_s=1
            )

        a, b = store(), store()
        try:
            state = np.zeros(4, np.float32)
            await a.create("forgot", "tok", state, 1)  # fence 1, held by a
            await a.release([("forgot", 2)])  # a's attach 2 went to a primary that was deposed
            taken = await b.acquire("forgot", "tok")  # free: b takes it
            assert taken.fence == 2
            await a.release([("forgot", 3)])  # b's now: a's release changes nothing
            with pytest.raises(Conflict):
                await a.acquire("forgot", "tok")
            await b.release([("forgot", 1)])  # an older attach of b's: not this one
            with pytest.raises(Conflict):
                await a.acquire("forgot", "tok")
            await b.release([("forgot", 2)])
            assert (await a.acquire("forgot", "tok")).fence == 3
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_message_past_its_deadline_is_not_stored(
    echo_model: EchoModel, redis: RedisServer
) -> None:
    """A message whose deadline passed while its model call ran was answered with
    ``DeadlineExceeded`` and its new state was not kept: its step must not reach Redis either
    (it did: the old state with the next seq and a reply, which a ``last_seq`` resume would
    replay, and then the stream would go on without that message's bits)."""

    async def scenario() -> None:
        flaky = Flaky(echo_model)
        svc = await service(flaky, request_timeout_s=2.0, echo_store_url=redis.url)
        late = await svc.open(None, None, object())  # type: ignore[arg-type]
        other = await svc.open(None, None, object())  # type: ignore[arg-type]
        assert svc.durable is not None
        try:
            flaky.gate.clear()
            with pytest.raises(DeadlineExceeded):
                await svc.advance(late, stream(3, 10))
            queued = asyncio.ensure_future(svc.advance(other, stream(4, 5)))  # after the late
            flaky.gate.set()  # call: once it is answered, that call has been settled
            assert (await queued).seq == 1
            stored = await svc.durable.client.hgetall(f"{svc.durable.prefix}s:{late.id}")
            assert stored[b"seq"] == b"0" and not any(k.startswith(b"r") for k in stored)
            got = await svc.advance(late, stream(5, 7))  # and the session goes on from seq 0
            assert got.seq == 1
        finally:
            await svc.close(late)
            await svc.close(other)
            await svc.stop()

    asyncio.run(scenario())


def test_workers_share_sessions(tmp_path: Path, redis: RedisServer) -> None:
    """``WEB_CONCURRENCY=2``: a session opened by one worker resumes on the other."""
    env = {"ECHO_STORE_URL": redis.url, "WEB_CONCURRENCY": "2"}
    with start_server(tmp_path, env, timeout=150) as server:
        ready = 0  # /readyz answered 200 by whichever worker took each new connection

        def both_ready() -> bool:
            nonlocal ready
            ready = ready + 1 if httpx.get(f"{server.base_url}/readyz").status_code == 200 else 0
            return ready >= 20

        wait_until(both_ready, 120, "both workers ready", server)
        msgs = messages(5, 4)
        want = unbroken(server, msgs)
        for _ in range(40):
            with session(server) as (ws, frame):
                got = [send_bits(ws, m) for m in msgs[:2]]
            ws, _ = resume(server, frame, last_seq=2)
            with ws:
                got += [send_bits(ws, m) for m in msgs[2:]]
            same(got, want)
            lines = map(json.loads, _json_lines(server.log_text()))
            opened = [
                line["pid"]
                for line in lines
                if line.get("session") == frame["session_id"]
                and line["msg"] == "echo session opened"
            ]
            if len(set(opened)) == 2:
                return
        pytest.fail("40 resumes never landed on the other worker")


def _json_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("{")]  # not the supervisor's
