"""The echo sequence batcher: many concurrent sessions get exactly the unbatched predictions.

The same random streams, cut into random-size messages, go through the default (batching) server
and through one started with ``BATCHING_ENABLED=false``; half the sessions wait for every reply,
the other half pipeline all their messages before reading. The sessions come from several loopback
addresses, as separate clients would: one address may hold only ``MAX_CONNECTIONS_PER_CLIENT`` (64).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from tests.live_server import LiveServer, start_server

pytestmark = pytest.mark.slow

SESSIONS = 150
CLIENT_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 5)]  # 50 sessions each
Plan = list[list[int]]  # one session's messages


@pytest.fixture(scope="module")
def unbatched_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = {"BATCHING_ENABLED": "false"}
    with start_server(tmp_path_factory.mktemp("unbatched"), env=env) as server:
        yield server


def make_plans(seed: int) -> list[Plan]:
    """Random messages of 1-48 bits, and now and then a long one (a call advances <= 32 bits)."""
    rng = random.Random(seed)

    def size() -> int:
        return rng.randint(1, 48) if rng.random() < 0.95 else rng.randint(49, 300)

    return [
        [[rng.randint(0, 1) for _ in range(size())] for _ in range(rng.randint(3, 10))]
        for _ in range(SESSIONS)
    ]


async def run_session(
    url: str, plan: Plan, start: asyncio.Barrier, pipelined: bool, address: str
) -> list[float]:
    async with connect(
        f"{url}/echo", compression=None, proxy=None, max_queue=None, local_addr=(address, 0)
    ) as ws:
        assert json.loads(await ws.recv())["type"] == "session"
        await start.wait()  # every session is connected: they all start together
        if pipelined:
            for chunk in plan:
                await ws.send(json.dumps({"bits": chunk}))
        replies = []
        for chunk in plan:
            if not pipelined:
                await ws.send(json.dumps({"bits": chunk}))
            replies.append(json.loads(await ws.recv()))
    assert [r["seq"] for r in replies] == list(range(1, len(plan) + 1))
    assert [len(r["bits"]) for r in replies] == [len(chunk) for chunk in plan]
    return [p for r in replies for p in r["probabilities"]]


async def run_all(url: str, plans: list[Plan]) -> list[list[float]]:
    start = asyncio.Barrier(len(plans))
    return await asyncio.gather(
        *(
            run_session(url, plan, start, i % 2 == 1, CLIENT_ADDRESSES[i % len(CLIENT_ADDRESSES)])
            for i, plan in enumerate(plans)
        )
    )


def echo_samples(server: LiveServer) -> dict[str, float]:
    """The echo_rnn samples of the model metrics, plus echo_messages_total."""
    text = httpx.get(f"{server.base_url}/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") == "echo_rnn" or s.name == "echo_messages_total":
                key = s.name + (f"[le={s.labels['le']}]" if "le" in s.labels else "")
                out[key] = s.value
    return out


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_batched_predictions_equal_unbatched(
    live_server: LiveServer, unbatched_server: LiveServer
) -> None:
    plans = make_plans(seed=11)
    messages = sum(len(plan) for plan in plans)
    before = echo_samples(live_server), echo_samples(unbatched_server)
    batched = asyncio.run(run_all(live_server.ws_url, plans))
    unbatched = asyncio.run(run_all(unbatched_server.ws_url, plans))
    after = echo_samples(live_server), echo_samples(unbatched_server)

    for plan, got, want in zip(plans, batched, unbatched, strict=True):
        bits = [b for chunk in plan for b in chunk]
        assert len(got) == len(want) == len(bits)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-6
        assert [int(p > 0.5) for p in got] == [0, 0, 0, *bits[:-3]]

    # Batching on: far fewer calls than messages, and some calls advanced several sessions.
    on_before, on_after = before[0], after[0]
    assert delta(on_after, on_before, "echo_messages_total") == messages
    calls = delta(on_after, on_before, "model_inference_calls_total")
    multi = delta(on_after, on_before, "model_batch_size_count") - delta(
        on_after, on_before, "model_batch_size_bucket[le=1.0]"
    )
    assert 0 < calls < messages / 2 and multi > 0
    # Batching off: one model call per message, every call of batch size 1.
    off_before, off_after = before[1], after[1]
    assert delta(off_after, off_before, "echo_messages_total") == messages
    assert delta(off_after, off_before, "model_inference_calls_total") == messages
    assert delta(off_after, off_before, "model_batch_size_bucket[le=1.0]") == messages
    assert delta(off_after, off_before, "model_queue_wait_seconds_count") == messages
