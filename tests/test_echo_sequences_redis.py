"""``EchoSequences`` on the Redis store, in-process: two echo services sharing a real
redis-server are two replicas (each its own owner key), with the shipped echo model.

A sequence alternates between them and answers as one ``/echo`` session does, a retried id is
replayed by the other replica; a step finding the sequence held by the other replica waits for
it, then answers ``sequence_busy``; a sequence on a version the replica does not serve is refused
until a ``sequence_start`` moves it (the new version written to Redis); a sequence ended, or
idle past ``ECHO_SESSION_TTL_S``, is gone from Redis as from memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from app.core.errors import NotFound, SequenceBusy, SequenceError
from app.services.echo_sequences import EchoSequences, _session_id
from app.services.echo_service import EchoService
from app.services.models import EchoModel
from tests.redis_server import RedisServer
from tests.test_echo_core import Flaky, echo_model, service, stream
from tests.test_echo_sequences import Renamed, echo_reference, step

__all__ = ["echo_model"]  # a fixture

pytestmark = pytest.mark.slow


def replicas(
    redis: RedisServer,
    models: tuple[Any, Any],
    scenario: Callable[[EchoSequences, EchoSequences, EchoService], Awaitable[None]],
    **settings: Any,
) -> None:
    async def main() -> None:
        store = {"echo_store_url": redis.url, "inline_call_budget_ms": 0, **settings}
        a = await service(models[0], **store)
        b = await service(models[1], **store)
        try:
            await scenario(EchoSequences(a), EchoSequences(b), a)
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


def test_a_sequence_alternates_between_replicas(echo_model: EchoModel, redis: RedisServer) -> None:
    chunks = [stream(k, 5 + 3 * k) for k in range(6)]

    async def scenario(a: EchoSequences, b: EchoSequences, echo: EchoService) -> None:
        want = await echo_reference(echo, chunks)
        got = []
        for k, chunk in enumerate(chunks):
            seqs = (a, b)[k % 2]
            reply = await step(seqs, "alt", chunk, start=k == 0, request_id=str(k))
            got.append(reply)
            assert not reply.replayed
            assert np.allclose(reply.probabilities, want[k], atol=1e-5)
        replay = await step(a, "alt", chunks[5], request_id="5")  # answered by b
        assert replay.replayed and np.array_equal(replay.probabilities, got[5].probabilities)
        assert (await step(b, "alt", chunks[4], request_id="4")).replayed  # by a, on b

    replicas(redis, (echo_model, echo_model), scenario)


def test_a_step_held_on_the_other_replica_waits_then_is_refused(
    echo_model: EchoModel, redis: RedisServer
) -> None:
    a0, a1, b0 = stream(1, 6), stream(2, 6), stream(3, 6)

    async def scenario(a: EchoSequences, b: EchoSequences, echo: EchoService) -> None:
        await step(a, "held", a0, start=True)
        slow.gate.clear()  # a's next step holds the sequence (attached, in its model call)
        held = asyncio.create_task(step(a, "held", a1))
        await asyncio.sleep(0.2)
        with pytest.raises(SequenceBusy):  # b retried for ~0.3 s
            await step(b, "held", b0)
        slow.gate.set()
        await held
        got = await step(b, "held", b0)  # free again: b continues where a left it
        want = await echo_reference(echo, [a0, a1, b0])
        assert np.allclose(got.probabilities, want[2], atol=1e-5)

    slow = Flaky(echo_model)
    replicas(redis, (slow, echo_model), scenario)


def test_a_start_moves_a_sequence_to_the_version_a_replica_serves(
    echo_model: EchoModel, redis: RedisServer
) -> None:
    x, y = stream(1, 9), stream(2, 9)

    async def scenario(a: EchoSequences, b: EchoSequences, echo: EchoService) -> None:
        first = await step(a, "mv", x, start=True, request_id="x")  # on a's version 1
        with pytest.raises(NotFound) as info:
            await step(b, "mv", y)  # b serves version 2 only
        assert info.value.code == "session_version_unavailable"
        replay = await step(b, "mv", x, start=True, request_id="x")  # a retry: replayed there
        assert replay.replayed and replay.version == 1
        moved = await step(b, "mv", x, start=True, request_id="x2")
        assert moved.version == 2 and np.allclose(moved.probabilities, first.probabilities)
        with pytest.raises(NotFound) as info:
            await step(a, "mv", y)  # now it is version 2's: a cannot continue it
        assert info.value.code == "session_version_unavailable"
        cont = await step(b, "mv", y)
        want = await echo_reference(echo, [x, y])
        assert cont.version == 2 and np.allclose(cont.probabilities, want[1], atol=1e-5)

    replicas(redis, (echo_model, Renamed(echo_model, 2)), scenario)


def test_ended_and_idle_sequences_in_redis(echo_model: EchoModel, redis: RedisServer) -> None:
    async def scenario(a: EchoSequences, b: EchoSequences, echo: EchoService) -> None:
        await step(a, "end", stream(1, 4), start=True)
        await step(b, "end", stream(2, 4), end=True)
        with pytest.raises(SequenceError) as info:
            await step(a, "end", stream(3, 4))
        assert info.value.code == "sequence_ended"
        await step(a, "idle", stream(1, 4), start=True)
        client = aioredis.Redis.from_url(redis.url)
        try:
            assert await client.exists(f"rnn:echo:s:{_session_id('', b'sidle')}")
            await asyncio.sleep(1.3)  # ECHO_SESSION_TTL_S after the step: expired in Redis
            for sequence in ("end", "idle"):
                with pytest.raises(SequenceError) as info:
                    await step(b, sequence, stream(4, 4))
                assert info.value.code == "sequence_not_found"
            for sequence in (b"send", b"sidle"):  # their hashes are gone
                assert not await client.exists(f"rnn:echo:s:{_session_id('', sequence)}")
        finally:
            await client.aclose()

    replicas(redis, (echo_model, echo_model), scenario, echo_session_ttl_s=1.0)
