"""Echo sessions in Redis behind Sentinel (``redis+sentinel://``) with replicas (issue 24).

A real primary, two replicas and three Sentinels (``tests/redis_cluster.py``). The store finds
the primary through the Sentinels and follows a failover without a restart; with
``ECHO_STORE_MIN_REPLICAS=1`` nothing is answered that a replica does not hold: with both
replicas gone a step is refused (``store_unavailable``), and after the primary is SIGKILLed mid
stream every session resumes on the promoted replica, every reply arrives exactly once, and the
state read back from the new primary is what the clients were told.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from app.core.errors import StoreUnavailable
from app.services.redis_sessions import RedisSessions, Step
from tests.redis_cluster import RedisCluster, running_cluster

pytestmark = pytest.mark.slow

PASSWORD = "s3ntinel-redis-pass"
FAST = {"ECHO_LEASE_S": "1.5", "ECHO_STORE_TIMEOUT_S": "0.5", "ECHO_STORE_CONNECT_TIMEOUT_S": "0.5"}
RETRIED = ("session_in_use", "store_unavailable", "lease_lost")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    with running_cluster(tmp_path / "cluster", password=PASSWORD) as c:
        yield c


def store(cluster: RedisCluster, min_replicas: int = 1) -> RedisSessions:
    return RedisSessions(
        cluster.url,
        ttl_s=60,
        lease_s=5,
        replies=4,
        connect_timeout_s=0.5,
        timeout_s=0.5,
        min_replicas=min_replicas,
    )


def test_writes_wait_for_replicas_and_follow_a_failover(cluster: RedisCluster) -> None:
    """In process: with both replicas stopped no write is acknowledged; SIGKILL the primary and
    the same store writes to the promoted replica, which holds every acknowledged write."""

    async def scenario() -> None:
        s = store(cluster)
        try:
            await s.keep_owner()
            await s.create("a", "tok", np.zeros(4, np.float32), 1)
            ok = Step("a", 1, np.ones(4, np.float32).tobytes(), 1, b"r1")
            assert await s.commit([ok]) == [True]
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
            await s.release([("a", 1)])
            with pytest.raises(StoreUnavailable):
                await s.acquire("a", "tok")  # attached, not replicated: given back at once
            with closing(cluster.client(primary)) as r:
                row = r.hgetall("rnn:echo:s:a")
            assert b"own" not in row and row[b"fence"] == b"2"
            for node in replicas:
                node.start()
            cluster.wait_synced()
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
