"""Echo sessions in Redis behind Sentinel (``redis+sentinel://``) with replicas (issue 24).

A real primary, two replicas and three Sentinels (``tests/redis_cluster.py``). The store finds
the primary through the Sentinels and follows a failover without a restart; with
``ECHO_STORE_MIN_REPLICAS=1`` nothing is answered that a replica does not hold: with both
replicas gone a step is refused (``store_unavailable``), and after the primary is SIGKILLed mid
stream every session resumes on the promoted replica, every reply arrives exactly once, and the
state read back from the new primary is what the clients were told. Owner keys and fences across
a failover: a promoted replica that lacks a process's last renewal never lets two processes write
one session. ``SENTINEL_STREAMS`` sets the number of streams of the SIGKILL test (40).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from app.core.errors import Conflict, StoreUnavailable
from app.services.echo_replies import unpack_reply
from app.services.redis_sessions import NotReplicated, Step
from tests.live_server import LiveServer, start_server, wait_until
from tests.redis_cluster import RedisCluster, running_cluster
from tests.redis_server import RedisServer, running_redis, session_store
from tests.test_api_echo import refusal, resume_query, send_bits, session
from tests.test_echo_redis import messages, same, unbroken

pytestmark = pytest.mark.slow

PASSWORD = "s3ntinel-redis-pass"
FAST = {"ECHO_LEASE_S": "1.5", "ECHO_STORE_TIMEOUT_S": "0.5", "ECHO_STORE_CONNECT_TIMEOUT_S": "0.5"}
RETRIED = ("session_in_use", "store_unavailable", "lease_lost")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    with running_cluster(tmp_path / "cluster", password=PASSWORD) as c:
        yield c


def test_writes_wait_for_replicas_and_follow_a_failover(cluster: RedisCluster) -> None:
    """In process: with both replicas stopped no write is acknowledged; SIGKILL the primary and
    the same store writes to the promoted replica, which holds every acknowledged write."""

    async def scenario() -> None:
        s = session_store(cluster.url, min_replicas=1)
        try:
            await s.keep_owner()
            await s.create("a", "tok", np.zeros(4, np.float32), 1)
            ok = Step("a", 1, np.ones(4, np.float32).tobytes(), 1, b"r1")
            assert await s.commit([ok]) == [True]
            await s.release([("a", 1)])
            assert s.status() == "ok"

            primary = cluster.primary_port()
            replicas = [n for n in cluster.data if n.port != primary]
            for node in replicas:
                node.stop()
            late = Step("a", 1, np.full(4, 2, np.float32).tobytes(), 2, b"r2")
            with pytest.raises(StoreUnavailable, match="replicate"):
                await s.commit([late])  # on the primary, but not acknowledged
            assert s.status().startswith("unavailable: 0 of 1 replicas")
            with pytest.raises(StoreUnavailable):
                await s.create("b", "tok", np.zeros(4, np.float32), 1)
            with pytest.raises(NotReplicated) as caught:
                await s.acquire("a", "tok")  # attached on the primary only: to give back
            assert caught.value.fence == 2
            with pytest.raises(StoreUnavailable):
                await s.release([("a", 2)])  # not replicated either (the service retries)
            for node in replicas:
                node.start()
            cluster.wait_synced()
            cluster.wait_acknowledged()
            await s.release([("a", 2)])
            taken = await s.acquire("a", "tok")
            assert (taken.fence, taken.seq) == (3, 2)  # the unacknowledged step was kept

            cluster.node(primary).stop(signal.SIGKILL)
            deadline = time.monotonic() + 30
            step = Step("a", 3, np.full(4, 3, np.float32).tobytes(), 3, b"r3")
            while True:  # StoreUnavailable until the Sentinels promote a replica
                try:
                    assert await s.commit([step]) == [True]
                    break
                except StoreUnavailable:
                    assert time.monotonic() < deadline, "no failover"
                    await asyncio.sleep(0.2)
            promoted = cluster.wait_failover(primary)
            with closing(cluster.client(promoted)) as r:
                row = r.hgetall("rnn:echo:s:a")
            assert row[b"seq"] == b"3" and row[b"fence"] == b"3"
            assert np.array_equal(np.frombuffer(row[b"st"], np.float32), np.full(4, 3))
            assert s.status() == "ok"
        finally:
            await s.close()

    asyncio.run(scenario())


def test_owner_keys_and_fences_across_a_failover(cluster: RedisCluster) -> None:
    """A promoted replica may lack this process's latest owner-key renewal (the key is gone
    there): its sessions look free, another process may take one (a new fence, replicated),
    and from then on only that process can write it. The first renewal on the new primary
    reports the lapse; the reclaim keeps the sessions nobody took and gives up the others."""

    async def scenario() -> None:
        a, b = session_store(cluster.url, 1), session_store(cluster.url, 1)
        zeros = np.zeros(4, np.float32)
        try:
            for s in (a, b):
                assert not await s.keep_owner()  # the first renewal finds no key: no sessions
            await a.create("s1", "tok", zeros, 1)
            await a.create("s2", "tok", zeros, 1)
            one = [Step(k, 1, np.ones(4, np.float32).tobytes(), 1, b"r1") for k in ("s1", "s2")]
            assert await a.commit(one) == [True, True]

            primary = cluster.primary_port()
            cluster.node(primary).stop(signal.SIGKILL)
            promoted = cluster.wait_failover(primary)
            with closing(cluster.client(promoted)) as r:
                assert int(r.hget("rnn:echo:s:s1", "seq")) == 1  # acknowledged: replicated
                r.delete(a.owner_key)  # a's last renewal never reached this replica
            taken = await retried(lambda: b.acquire("s2", "tok"))
            assert (taken.fence, taken.seq) == (2, 1)
            two = [Step(k, 1, np.full(4, 2, np.float32).tobytes(), 2, b"r2") for k in ("s1", "s2")]
            assert await a.commit(two) == [True, False]  # s2 is b's now: a is fenced off
            assert not await a.keep_owner()  # the lapse, seen on the first renewal
            assert await a.reclaim([("s1", 1), ("s2", 1)]) == [True, False]
            with pytest.raises(Conflict):
                await b.acquire("s1", "tok")  # a holds s1 again
            with closing(cluster.client(promoted)) as r:
                s1, s2 = r.hgetall("rnn:echo:s:s1"), r.hgetall("rnn:echo:s:s2")
            assert (s1[b"own"], s1[b"fence"], s1[b"seq"]) == (a.owner.encode(), b"1", b"2")
            assert (s2[b"own"], s2[b"fence"], s2[b"seq"]) == (b.owner.encode(), b"2", b"1")
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


async def retried(call, timeout: float = 30.0):
    """``call()`` again while the store is unavailable (a failover under way)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def test_a_connection_that_reaches_a_replica_is_replaced(cluster: RedisCluster) -> None:
    """A pooled connection to a server that is a replica now (a demoted primary) fails its
    scripts with an error that only mentions READONLY; the store then drops its idle
    connections, and the next command reaches the primary through the Sentinels."""

    async def scenario() -> None:
        s = session_store(cluster.url)
        try:
            await s.keep_owner()
            await s.create("a", "tok", np.zeros(4, np.float32), 1)
            pool = s.client.connection_pool
            replica = next(n for n in cluster.data if n.port != cluster.primary_port())
            for conn in list(pool._available_connections):  # as if the primary was demoted
                await conn.disconnect()
                await conn.connect_to(("127.0.0.1", replica.port))
            step = Step("a", 1, np.ones(4, np.float32).tobytes(), 1, None)
            with pytest.raises(StoreUnavailable):
                await s.commit([step])
            assert "READONLY" in s.status()
            assert await s.commit([step]) == [True]
            assert s.status() == "ok"
        finally:
            await s.close()

    asyncio.run(scenario())


def test_a_connection_to_a_primary_cut_off_from_its_replicas_is_replaced(
    cluster: RedisCluster, tmp_path: Path
) -> None:
    """A primary that stalled while the Sentinels promoted a replica wakes up still a primary
    for a few seconds, without replicas: with ``min-replicas-to-write`` it answers writes with
    NOREPLICAS. The store drops its idle connections then, like on READONLY, so that the next
    command reaches the primary the Sentinels name (found by the chaos test, bench/chaos.py)."""

    async def scenario(deposed: RedisServer) -> None:
        s = session_store(cluster.url)
        try:
            await s.keep_owner()
            pool = s.client.connection_pool
            for conn in list(pool._available_connections):  # as if it reached the deposed one
                await conn.disconnect()
                await conn.connect_to(("127.0.0.1", deposed.port))
            with pytest.raises(StoreUnavailable):
                await s.keep_owner()
            assert "NOREPLICAS" in s.status()
            await s.keep_owner()
            assert s.status() == "ok"
        finally:
            await s.close()

    with running_redis(tmp_path / "deposed", password=PASSWORD) as deposed:
        with closing(redis.Redis(port=deposed.port, password=PASSWORD)) as r:
            r.config_set("min-replicas-to-write", 1)
        asyncio.run(scenario(deposed))


def test_a_server_on_a_sentinel_url_serves_and_resumes(
    cluster: RedisCluster, tmp_path: Path
) -> None:
    msgs = messages(3, 20)
    with start_server(tmp_path, {"ECHO_STORE_URL": cluster.url, **FAST}) as server:
        want = unbroken(server, msgs)
        with session(server) as (ws, frame):
            got = [send_bits(ws, m) for m in msgs[:10]]
        ws, again = reattach(server, frame, last_seq=10)
        with ws:
            assert again["resumed"] and again["seq"] == 10
            got += [send_bits(ws, m) for m in msgs[10:]]
        same(got, want)
        with closing(cluster.client(cluster.primary_port())) as r:
            assert int(r.hget(f"rnn:echo:s:{frame['session_id']}", "seq")) == 20
    assert PASSWORD not in server.log_text() and "Traceback" not in server.log_text()


def test_no_replica_no_answer(cluster: RedisCluster, tmp_path: Path) -> None:
    """``ECHO_STORE_MIN_REPLICAS=1`` and both replicas stopped: a step is refused
    (``store_unavailable``, 1013), and so is a new session; once they are back the session
    resumes with ``last_seq`` and gets every reply exactly once."""
    msgs = messages(9, 12)
    env = {"ECHO_STORE_URL": cluster.url, "ECHO_STORE_MIN_REPLICAS": "1", **FAST}
    with start_server(tmp_path, env) as server:
        want = unbroken(server, msgs)
        primary = cluster.primary_port()
        replicas = [n for n in cluster.data if n.port != primary]
        with session(server) as (ws, frame):
            got = [send_bits(ws, m) for m in msgs[:5]]
            for node in replicas:
                node.stop()
            ws.send(json.dumps({"bits": msgs[5]}))
            error = json.loads(ws.recv(timeout=10))
            assert (error["type"], error["code"]) == ("error", "store_unavailable")
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
            assert ws.close_code == 1013
        code, reason = refusal(server)
        assert (code, reason.split(":")[0]) == (1013, "store_unavailable")
        ready = httpx.get(f"{server.base_url}/readyz").json()
        assert ready["status"] == "degraded" and "replicas acknowledged" in ready["detail"]
        store = httpx.get(f"{server.base_url}/v1/models").json()["echo_store"]
        assert store["status"].startswith("unavailable: 0 of 1 replicas")
        for node in replicas:
            node.start()
        cluster.wait_synced()
        wait_until(  # the lease keeper's renewals find the replicas back, with no session
            lambda: httpx.get(f"{server.base_url}/readyz").json()["status"] == "ready",
            15,
            "readyz: ready",
            server,
        )
        ws, again = reattach(server, frame, last_seq=5)
        with ws:
            # the refused step is on the primary (never answered): it is sent now, once
            assert again["seq"] in (5, 6)
            got += [json.loads(ws.recv(timeout=10)) for _ in range(again["seq"] - 5)]
            got += [send_bits(ws, m) for m in msgs[again["seq"] :]]
        same(got, want)
    assert PASSWORD not in server.log_text() and "Traceback" not in server.log_text()


def reattach(
    server: LiveServer, frame: dict, last_seq: int, patience: float = 30.0
) -> tuple[ClientConnection, dict]:
    """Resume ``frame``'s session with ``last_seq``, retrying while it is in use elsewhere or
    the store is unavailable (a failover under way), as a client should."""
    url = f"{server.ws_url}/echo{resume_query(frame)}&last_seq={last_seq}"
    deadline = time.monotonic() + patience
    while True:
        reason = ""
        try:
            ws = connect(url, proxy=None, compression=None, open_timeout=10)
        except (OSError, InvalidStatus) as exc:
            reason = f"store_unavailable ({exc})"
        else:
            try:
                return ws, json.loads(ws.recv(timeout=10))
            except ConnectionClosed:
                reason = ws.close_reason or ""
                ws.close()
        if not reason.startswith(RETRIED) or time.monotonic() > deadline:
            raise AssertionError(f"resume failed: {reason}")
        time.sleep(0.2)


N_STREAMS = int(os.environ.get("SENTINEL_STREAMS", "40"))  # the done-when: 40


def test_sigkill_the_primary_mid_stream_loses_no_answered_step(
    cluster: RedisCluster, tmp_path: Path
) -> None:
    """``N_STREAMS`` sessions stream to two servers (``ECHO_STORE_MIN_REPLICAS=1``) while the
    Redis primary is SIGKILLed. Each resumes (on the other server, ``last_seq``, retrying
    ``store_unavailable`` / ``session_in_use`` while the Sentinels promote a replica): every
    reply arrives exactly once and equals an unbroken stream's; the state read back from the
    promoted primary is what the clients were told."""
    n_msgs = 30
    plans = {k: messages(200 + k, n_msgs) for k in range(N_STREAMS)}
    env = {"ECHO_STORE_URL": cluster.url, "ECHO_STORE_MIN_REPLICAS": "1", **FAST}
    with (
        start_server(tmp_path / "a", env) as a,
        start_server(tmp_path / "b", env) as b,
    ):
        servers = [a, b]
        # Unbroken streams of the same messages, before the failover: right after it, a write
        # can be refused (store_unavailable) until the other replica follows the new primary.
        references = {}
        for k in plans:
            with session(a) as (ws, frame):
                references[k] = (frame, [send_bits(ws, m) for m in plans[k]])
        received: dict[int, list[dict]] = {k: [] for k in plans}
        breaks: dict[int, int] = dict.fromkeys(plans, 0)
        replayed: list[int] = []
        frames: dict[int, dict] = {}
        errors: list[BaseException] = []
        started = threading.Barrier(N_STREAMS + 1)
        killed = threading.Event()

        def client(k: int) -> None:
            try:
                server = servers[k % 2]
                ws = connect(f"{server.ws_url}/echo", proxy=None, compression=None)
                frames[k] = json.loads(ws.recv(timeout=10))
                started.wait(60)
                while True:
                    with contextlib.suppress(ConnectionClosed), ws:
                        for m in plans[k][len(received[k]) :]:
                            ws.send(json.dumps({"bits": m}))
                            reply = json.loads(ws.recv(timeout=10))
                            if reply["type"] != "echo":  # store_unavailable, then a close
                                assert reply["code"] in RETRIED, reply
                                break
                            received[k].append(reply)
                            if not killed.is_set():
                                time.sleep(0.02)
                    if len(received[k]) == n_msgs:
                        return
                    breaks[k] += 1
                    server = servers[(k + breaks[k]) % 2]  # resume on the other one
                    last = len(received[k])
                    ws, frame = reattach(server, frames[k], last_seq=last, patience=60)
                    assert frame["resumed"] and frame["seq"] >= last, (frame, last)  # none lost
                    replayed.append(frame["seq"] - last)
                    for _ in range(frame["seq"] - last):  # stored, never received: sent now
                        received[k].append(json.loads(ws.recv(timeout=10)))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(k,)) for k in plans]
        for t in threads:
            t.start()
        started.wait(60)
        wait_until(lambda: min(len(r) for r in received.values()) >= 5, 60, "5 replies each")
        primary = cluster.primary_port()
        cluster.node(primary).stop(signal.SIGKILL)
        killed.set()
        failed_over = time.monotonic()
        for t in threads:
            t.join(120)
        promoted = cluster.wait_failover(primary)
        assert not errors, errors[:3]
        assert all(len(r) == n_msgs for r in received.values())
        assert sum(breaks.values()) > 0, "no stream saw the failover"
        for k in plans:
            assert [r["seq"] for r in received[k]] == list(range(1, n_msgs + 1))  # exactly once
        print(
            f"{N_STREAMS} streams, {sum(breaks.values())} resumes, {sum(replayed)} replies "
            f"replayed, all done "
            f"{time.monotonic() - failed_over:.1f} s after the kill"
        )

        for k in plans:
            same(received[k], references[k][1])

        # Read back from the promoted primary: what the clients were told is what is stored.
        with closing(cluster.client(promoted)) as r:
            for k in plans:
                row = r.hgetall(f"rnn:echo:s:{frames[k]['session_id']}")
                ref = r.hgetall(f"rnn:echo:s:{references[k][0]['session_id']}")
                assert int(row[b"seq"]) == n_msgs and int(row[b"fence"]) >= 1 + breaks[k]
                state = np.frombuffer(row[b"st"], np.float32)
                assert np.allclose(state, np.frombuffer(ref[b"st"], np.float32), atol=1e-5)
                kept = [unpack_reply(v) for f, v in row.items() if f.startswith(b"r")]
                for seq, probs, bits in kept:  # the last replies, as the client got them
                    told = received[k][seq - 1]
                    assert seq > n_msgs - 4 and bits.tolist() == told["bits"]
                    assert np.allclose(probs, told["probabilities"], atol=1e-5)
        assert len(kept) == 4
    for server in servers:
        assert PASSWORD not in server.log_text() and "Traceback" not in server.log_text()
