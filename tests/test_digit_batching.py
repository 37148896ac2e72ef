"""The digit dynamic batcher: in-process with a recording fake model, then on real servers.

The fake model answers row r with r's first 10 pixels, so every answer shows which request and
row it belongs to; the live tests compare a batching server with a batching-off one. Where a test
needs the model busy, a gate holds its call (no sleeps standing in for "long enough"); where it
needs to tell "at once" from "after the queue delay", the delay is 60 s and the bound 6 s.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY

from app.core.config import Settings
from app.core.errors import DeadlineExceeded, ModelFailed, NotReady
from app.services.digit_service import DigitService
from app.services.models import DigitModel
from modelspec import contract
from modelspec.digits import scale_pixels
from tests.live_server import LiveServer, start_server
from training.mnist_data import MnistData

MODEL = {"model": "mnist_lstm"}
LONG_DELAY_MS = 60_000  # a wait for company this long cannot pass for "at once"
AT_ONCE_S = 6.0  # an order of magnitude under it


class FakeModel:
    """Stands in for ``DigitModel``: row → its first 10 pixels; records every call's images.

    ``gate.clear()`` holds every call (the model is busy) until ``gate.set()``."""

    name, version = "mnist_lstm", 1
    ref: ClassVar[dict[str, Any]] = {"name": "mnist_lstm", "version": 1}

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds, self.fail = seconds, False
        self.calls: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()

    def predict(self, images: np.ndarray) -> np.ndarray:
        self.calls.append(images.copy())
        self.gate.wait(10)
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("model exploded")
        return images.reshape(len(images), -1)[:, :10].copy()

    infer = predict  # no XLA

    def tags(self) -> list[list[int]]:
        return [c[:, 0, 0].astype(int).tolist() for c in self.calls]


def rows(n: int, tag: int) -> np.ndarray:
    """``n`` images marked with the request ``tag`` (pixel 0) and their row index (pixel 1)."""
    a = np.zeros((n, 28, 28), np.float32)
    a[:, 0, 0], a[:, 0, 1] = tag, np.arange(n)
    return a


def service(model: FakeModel, **settings: Any) -> DigitService:
    defaults: dict[str, Any] = {
        "digit_max_batch_size": 8,
        "digit_max_queue_delay_ms": 2.0,
        "digit_xla": False,  # the fake model has no SavedModel signature to compile
    }
    return DigitService(model, Settings(**{**defaults, **settings}))  # type: ignore[arg-type]


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name, MODEL) or 0.0


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` while the event loop runs everything else."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def queued(svc: DigitService) -> int:
    """Requests waiting in the batcher's queue (not in a model call)."""
    return len(svc.batcher._queue)


def test_each_request_gets_exactly_its_rows_in_order() -> None:
    async def scenario() -> None:
        model = FakeModel(0.002)
        svc = service(model, digit_max_batch_size=16, digit_max_queue_delay_ms=5)
        await svc.start()
        sizes = np.random.default_rng(0).integers(1, 6, 60).tolist()
        before = [sample(n) for n in ("model_inference_calls_total", "model_batch_size_sum")]
        waits_before = sample("model_queue_wait_seconds_count")
        outs = await asyncio.gather(*(svc.predict(rows(n, k)) for k, n in enumerate(sizes)))
        await svc.stop()
        for k, (n, out) in enumerate(zip(sizes, outs, strict=True)):
            assert out.shape == (n, 10)
            assert (out[:, 0] == k).all() and (out[:, 1] == np.arange(n)).all()
        assert all(len(c) <= 16 for c in model.calls) and len(model.calls) < len(sizes)
        for k in range(len(sizes)):  # never split across calls
            assert sum(k in tags for tags in model.tags()) == 1
        assert sample("model_inference_calls_total") - before[0] == len(model.calls)
        assert sample("model_batch_size_sum") - before[1] == sum(sizes)
        assert sample("model_queue_wait_seconds_count") - waits_before == len(sizes)

    asyncio.run(scenario())


def test_a_request_larger_than_a_batch_is_split_in_order() -> None:
    async def scenario() -> None:
        model = FakeModel()
        svc = service(model, digit_max_batch_size=8)
        await svc.start()
        out = await svc.predict(rows(20, 3))
        await svc.stop()
        assert [len(c) for c in model.calls] == [8, 8, 4]
        assert (out[:, 1] == np.arange(20)).all() and (out[:, 0] == 3).all()

    asyncio.run(scenario())


def test_idle_pipeline_waits_the_delay_unless_the_batch_is_full() -> None:
    async def scenario() -> None:
        model = FakeModel()
        svc = service(model, digit_max_batch_size=4, digit_max_queue_delay_ms=600)
        await svc.start()
        start = time.monotonic()
        await svc.predict(rows(1, 0))
        assert time.monotonic() - start >= 0.55  # alone: it waited for company
        svc.batcher.max_delay_s = LONG_DELAY_MS / 1000
        async with asyncio.timeout(AT_ONCE_S):  # a full batch goes at once
            await asyncio.gather(*(svc.predict(rows(1, k)) for k in range(4)))
        await svc.stop()
        assert [len(c) for c in model.calls] == [1, 4]

    asyncio.run(scenario())


def test_a_lone_client_stops_paying_the_delay() -> None:
    async def scenario() -> None:
        model = FakeModel()
        svc = service(model, digit_max_queue_delay_ms=200)
        await svc.start()
        for k in range(9):
            start = time.monotonic()
            await svc.predict(rows(1, k))
            assert time.monotonic() - start >= 0.18, k  # it waits for company that never comes
        # Then it stops waiting (the policy's next probe is its 128th idle batch): with the delay
        # now 60 s, the next 7 lone requests (and 3 together) go at once.
        svc.batcher.max_delay_s = LONG_DELAY_MS / 1000
        async with asyncio.timeout(AT_ONCE_S):
            for k in range(9, 16):
                await svc.predict(rows(1, k))
            await asyncio.gather(*(svc.predict(rows(1, k)) for k in range(3)))  # company again
        svc.batcher.max_delay_s = 0.2
        start = time.monotonic()
        await svc.predict(rows(1, 0))
        assert time.monotonic() - start >= 0.18  # so it waits again
        await svc.stop()
        assert [len(c) for c in model.calls] == [1] * 16 + [3, 1]

    asyncio.run(scenario())


def test_requests_arriving_during_a_call_go_next_without_the_delay() -> None:
    async def scenario() -> None:
        model = FakeModel()
        svc = service(model, digit_max_batch_size=4, digit_max_queue_delay_ms=LONG_DELAY_MS)
        await svc.start()
        model.gate.clear()
        first = [asyncio.create_task(svc.predict(rows(1, k))) for k in range(4)]  # a full batch
        await until(lambda: len(model.calls) == 1)  # ... in the model, held there
        later = [asyncio.create_task(svc.predict(rows(1, k))) for k in range(4, 6)]
        await until(lambda: queued(svc) == 2)
        model.gate.set()
        async with asyncio.timeout(AT_ONCE_S):  # not the 60 s delay
            await asyncio.gather(*first, *later)
        await svc.stop()
        assert model.tags() == [[0, 1, 2, 3], [4, 5]]

    asyncio.run(scenario())


def test_past_the_deadline_a_request_fails_and_a_timed_out_queued_one_is_skipped() -> None:
    async def scenario() -> None:
        model = FakeModel()
        svc = service(model, request_timeout_s=0.5, digit_max_queue_delay_ms=0)
        await svc.start()
        model.gate.clear()  # the first call hangs past the deadlines
        running = asyncio.create_task(svc.predict(rows(1, 0)))
        await until(lambda: len(model.calls) == 1)
        waiting = asyncio.create_task(svc.predict(rows(1, 1)))
        await until(lambda: queued(svc) == 1)
        for task in (running, waiting):
            with pytest.raises(DeadlineExceeded) as info:
                await task
            assert info.value.code == "timeout"
        model.gate.set()  # the hung call returns; the next request goes after it
        assert (await svc.predict(rows(1, 2)))[0, 0] == 2
        await svc.stop()
        assert model.tags() == [[0], [2]]

    asyncio.run(scenario())


def test_not_ready_before_start_and_after_stop() -> None:
    async def scenario() -> None:
        svc = service(FakeModel())
        for step in ("before", "running", "after"):
            if step == "running":
                await svc.start()
                assert (await svc.predict(rows(1, 5)))[0, 0] == 5
                await svc.stop()
                continue
            with pytest.raises(NotReady) as info:
                await svc.predict(rows(1, 0))
            assert info.value.code == "not_ready"

    asyncio.run(scenario())


def test_stop_lets_requests_in_flight_finish() -> None:
    async def scenario() -> None:
        model = FakeModel()
        svc = service(model, digit_max_queue_delay_ms=0)
        await svc.start()
        model.gate.clear()
        tasks = [asyncio.create_task(svc.predict(rows(1, 0)))]
        await until(lambda: len(model.calls) == 1)  # the first is computing
        tasks.append(asyncio.create_task(svc.predict(rows(1, 1))))
        await until(lambda: queued(svc) == 1)  # the second queued
        stopping = asyncio.create_task(svc.stop())
        await until(lambda: not svc.batcher.running)  # stopping: both still in flight
        assert not any(t.done() for t in tasks)
        model.gate.set()
        await stopping
        assert [t.result()[0, 0] for t in tasks] == [0, 1]
        assert model.tags() == [[0], [1]]

    asyncio.run(scenario())


def test_batching_off_makes_one_call_per_request() -> None:
    async def scenario() -> None:
        model = FakeModel(0.01)
        svc = service(model, batching_enabled=False)
        await svc.start()
        outs = await asyncio.gather(*(svc.predict(rows(n, n)) for n in range(1, 11)))
        await svc.stop()
        assert sorted(len(c) for c in model.calls) == list(range(1, 11))
        assert all((out[:, 0] == len(out)).all() for out in outs)

    asyncio.run(scenario())


def test_a_failed_call_fails_its_requests_and_the_batcher_goes_on() -> None:
    async def scenario() -> None:
        model = FakeModel()
        svc = service(model)
        await svc.start()
        model.fail = True
        results = await asyncio.gather(
            *(svc.predict(rows(1, k)) for k in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, ModelFailed) for r in results), results
        assert all(isinstance(r.__cause__, RuntimeError) for r in results)
        model.fail = False
        assert (await svc.predict(rows(1, 9)))[0, 0] == 9
        await svc.stop()

    asyncio.run(scenario())


def test_non_finite_probabilities_are_a_model_failure_never_an_answer() -> None:
    async def scenario() -> None:
        model = FakeModel()
        svc = service(model)
        await svc.start()
        image = rows(1, 0)
        image[0, 0, 2] = np.nan  # the fake model echoes it back as a probability
        with pytest.raises(ModelFailed):
            await svc.predict(image)
        assert (await svc.predict(rows(1, 4)))[0, 0] == 4
        await svc.stop()

    asyncio.run(scenario())


def test_xla_padded_calls_match_the_saved_model(repo_root: Path, mnist: MnistData) -> None:
    """The real model through the batcher (XLA, padded to powers of two, a split request) gives
    the plain SavedModel's probabilities, row for row."""
    path = contract.resolve_version_dir(repo_root / "models", contract.DIGIT_MODEL)
    model = DigitModel(
        contract.DIGIT_MODEL, int(path.name), path, contract.ModelMetadata.read(path)
    )
    model.load({contract.DIGIT_SIGNATURE: {contract.DIGIT_INPUT}})
    images = scale_pixels(mnist.x_test[:60])
    sizes = [1, 3, 4, 5, 16, 20, 11]  # 60 rows; 20 > 16 is split

    async def scenario() -> list[np.ndarray]:
        svc = DigitService(model, Settings(digit_max_batch_size=16, digit_xla=True))
        await svc.start()
        assert model._compiled is not None and model.buckets == (1, 2, 4, 8, 16)
        starts = np.cumsum([0, *sizes])
        outs = await asyncio.gather(
            *(svc.predict(images[a:b]) for a, b in itertools.pairwise(starts))
        )
        await svc.stop()
        return outs

    got = np.concatenate(asyncio.run(scenario()))
    assert np.allclose(got, model.predict(images), atol=1e-5)


# --- live servers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unbatched_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with start_server(tmp_path_factory.mktemp("unbatched"), {"BATCHING_ENABLED": "false"}) as s:
        yield s


def metric(server: LiveServer, name: str, labels: str = 'model="mnist_lstm"') -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def burst(mnist: MnistData) -> list[tuple[bytes, list[int]]]:
    """200 requests: 150 single images (nested rows) and 50 batches of 2–9 (flat lists)."""
    rng = np.random.default_rng(1)
    reqs: list[tuple[bytes, list[int]]] = []
    for k in range(200):
        if k % 4 == 3:
            idx = rng.choice(len(mnist.x_test), int(rng.integers(2, 10)), replace=False).tolist()
            doc: dict[str, Any] = {"images": [mnist.x_test[i].ravel().tolist() for i in idx]}
        else:
            idx = [int(rng.integers(len(mnist.x_test)))]
            doc = {"image": mnist.x_test[idx[0]].tolist()}
        reqs.append((orjson.dumps(doc), idx))
    return reqs


async def fire(server: LiveServer, reqs: list[tuple[bytes, list[int]]]) -> list[list[dict]]:
    """All requests at once over up to 64 connections → each request's predictions."""
    limits = httpx.Limits(max_connections=64)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=60) as client:
        posts = [client.post("/predict/digit", content=b, headers=headers) for b, _ in reqs]
        replies = await asyncio.gather(*posts)
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies[:3]]
    docs = [r.json() for r in replies]
    return [d.get("predictions", [d]) for d in docs]


@pytest.mark.slow
def test_batched_answers_match_unbatched_ones_exactly(
    live_server: LiveServer, unbatched_server: LiveServer, mnist: MnistData
) -> None:
    reqs = burst(mnist)
    servers = (live_server, unbatched_server)
    le1 = 'le="1.0",model="mnist_lstm"'

    def counters(s: LiveServer) -> np.ndarray:
        names = ("model_inference_calls_total", "model_batch_size_count")
        return np.array([*(metric(s, n) for n in names), metric(s, "model_batch_size_bucket", le1)])

    before = [counters(s) for s in servers]
    batched = asyncio.run(fire(live_server, reqs))
    unbatched = asyncio.run(fire(unbatched_server, reqs))
    calls, batches, singles = counters(live_server) - before[0]
    calls_off = (counters(unbatched_server) - before[1])[0]
    correct = total = 0
    for (_, idx), got, want in zip(reqs, batched, unbatched, strict=True):
        assert len(got) == len(want) == len(idx)
        for g, w, i in zip(got, want, idx, strict=True):
            assert np.allclose(g["probabilities"], w["probabilities"], atol=1e-5)
            assert g["digit"] == w["digit"]
            correct += g["digit"] == mnist.y_test[i]
            total += 1
    assert correct / total >= 0.97
    assert calls_off == len(reqs)  # batching off: one model call per request
    assert calls < len(reqs)  # (how much fewer depends on how fast the client sends)
    assert batches - singles > 0  # model_batch_size observed batches of more than one row
