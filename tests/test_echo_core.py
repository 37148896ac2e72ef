"""The echo service in-process with the shipped echo model: the batching core's echo adapter
(slicing, gather/scatter, all or nothing per message, deadline) and the session store's growth."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.core.config import Settings
from app.core.errors import DeadlineExceeded, ModelFailed
from app.services.echo_service import EchoService
from app.services.echo_sessions import SessionStore
from app.services.models import EchoModel
from modelspec import contract


@pytest.fixture(scope="module")
def echo_model(repo_root: Path) -> EchoModel:
    path = contract.resolve_version_dir(repo_root / "models", contract.ECHO_MODEL, 1)  # served
    model = EchoModel(contract.ECHO_MODEL, int(path.name), path, contract.ModelMetadata.read(path))
    model.load(
        {
            contract.ECHO_STEP_SIGNATURE: {contract.ECHO_BITS, contract.ECHO_STATE},
            contract.ECHO_INITIAL_STATE_SIGNATURE: {contract.ECHO_BATCH_SIZE},
        }
    )
    return model


class Flaky:
    """The real model, but its ``fail_on``-th step call (1-based) raises; or a gate holds it."""

    def __init__(self, model: EchoModel, fail_on: int = 0) -> None:
        self.model, self.fail_on, self.calls = model, fail_on, 0
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def infer(self, bits: np.ndarray, state: np.ndarray, lengths: np.ndarray) -> Any:
        return self.step(bits, state, lengths)  # the batcher calls infer

    def step(self, bits: np.ndarray, state: np.ndarray, lengths: np.ndarray) -> Any:
        self.calls += 1
        self.gate.wait(10)
        if self.calls == self.fail_on:
            raise RuntimeError("model exploded")
        return self.model.step(bits, state, lengths)


async def service(model: Any, **settings: Any) -> EchoService:
    """A started echo service serving ``model`` (one lane)."""
    svc = EchoService(Settings(**{"echo_max_queue_delay_ms": 0, "echo_xla": False, **settings}))
    await svc.start()
    await svc.add_lane(model)
    return svc


def stream(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 2, n).astype(np.uint8).tobytes()


def test_long_messages_in_slices_answer_as_one_call_does(echo_model: EchoModel) -> None:
    """Batched (32-bit slices, sessions sharing calls) equals unbatched (one call a message)."""
    messages = {
        k: [stream(10 * k + i, 1 + (37 * k + 11 * i) % 150) for i in range(4)] for k in range(5)
    }
    assert max(len(m) for ms in messages.values() for m in ms) > 64  # several slices

    async def run(batching: bool) -> dict[int, list[np.ndarray]]:
        svc = await service(echo_model, batching_enabled=batching)
        sessions = {k: await svc.open(None, None, object()) for k in messages}  # type: ignore[arg-type]

        async def client(k: int) -> list[np.ndarray]:
            return [(await svc.advance(sessions[k], m))[0].copy() for m in messages[k]]

        outs = await asyncio.gather(*(client(k) for k in messages))
        await svc.stop()
        return dict(zip(messages, outs, strict=True))

    batched, unbatched = asyncio.run(run(True)), asyncio.run(run(False))
    for k, msgs in messages.items():
        for got, want, m in zip(batched[k], unbatched[k], msgs, strict=True):
            assert got.shape == (len(m),)
            assert np.allclose(got, want, atol=1e-5)


def test_a_failing_call_mid_message_leaves_the_session_at_its_last_answer(
    echo_model: EchoModel,
) -> None:
    first, long = stream(1, 20), stream(2, 100)  # 100 bits: four 32-bit slices

    async def scenario() -> None:
        flaky = Flaky(echo_model, fail_on=3)  # call 1: first; calls 2-5: long, fails in its 2nd
        svc = await service(flaky)
        session = await svc.open(None, None, object())  # type: ignore[arg-type]
        await svc.advance(session, first)
        store = svc.lane(session).store
        assert store is not None
        before = store.states[session.slot].copy()
        with pytest.raises(ModelFailed):
            await svc.advance(session, long)
        assert np.array_equal(store.states[session.slot], before)  # not half advanced
        retried = (await svc.advance(session, long))[0]  # the batcher serves on
        reference = await service(echo_model)
        other = await reference.open(None, None, object())  # type: ignore[arg-type]
        await reference.advance(other, first)
        assert np.allclose(retried, (await reference.advance(other, long))[0], atol=1e-5)
        await reference.stop()
        await svc.stop()

    asyncio.run(scenario())


def test_an_echo_message_past_its_deadline_fails_and_leaves_no_trace(
    echo_model: EchoModel,
) -> None:
    probe = stream(4, 12)

    async def scenario() -> tuple[np.ndarray, np.ndarray]:
        flaky = Flaky(echo_model)
        svc = await service(flaky, request_timeout_s=1.0)  # the probe after it has 1 s too
        session = await svc.open(None, None, object())  # type: ignore[arg-type]
        flaky.gate.clear()
        with pytest.raises(DeadlineExceeded):
            await svc.advance(session, stream(3, 10))
        flaky.gate.set()
        got = (await svc.advance(session, probe))[0].copy()  # runs after the late call ended
        await svc.stop()
        fresh = await service(echo_model)
        other = await fresh.open(None, None, object())  # type: ignore[arg-type]
        want = (await fresh.advance(other, probe))[0].copy()
        await fresh.stop()
        return got, want

    got, want = asyncio.run(scenario())
    assert np.allclose(got, want, atol=1e-5)  # as if the timed-out message was never sent


@pytest.fixture
def store() -> Iterator[SessionStore]:
    s = SessionStore(np.arange(4, dtype=np.float32), max_sessions=3000, ttl_s=60, capacity=1024)
    yield s
    s.clear()


def test_the_store_grows_past_its_first_slots_and_keeps_every_state(store: SessionStore) -> None:
    sessions = [store.create() for _ in range(2500)]
    assert len(store.states) >= 2500 and len({s.slot for s in sessions}) == 2500
    for k, s in enumerate(sessions):
        store.states[s.slot] = k
    assert len(store.states) == 3000  # 1,024 → 2,048 → capped at max_sessions
    assert all((store.states[s.slot] == k).all() for k, s in enumerate(sessions))
    for s in sessions[:10]:
        store.detach(s)
    fresh = store.create()
    assert (store.states[fresh.slot] == np.arange(4)).all()  # a new session starts clean


def test_the_xla_step_answers_as_the_signature_does(echo_model: EchoModel) -> None:
    """``infer`` (XLA, padded to power-of-two shapes) equals the plain ``step`` signature for
    odd shapes, ragged lengths and arbitrary states; the model is compiled only for this test."""
    rng = np.random.default_rng(5)
    try:
        echo_model.compile_xla(8)
        for n, t in ((1, 1), (3, 5), (5, 1), (17, 32), (100, 7), (9, 64)):
            bits = rng.integers(0, 2, (n, t)).astype(np.float32)
            state = rng.normal(size=(n, echo_model.state_dim)).astype(np.float32)
            lengths = rng.integers(1, t + 1, n).astype(np.int32)
            fast, plain = (
                echo_model.infer(bits, state, lengths),
                echo_model.step(bits, state, lengths),
            )
            assert fast[0].shape == (n, t) and fast[1].shape == (n, echo_model.state_dim)
            assert np.allclose(fast[0], plain[0], atol=1e-5), (n, t)
            assert np.allclose(fast[1], plain[1], atol=1e-5), (n, t)
    finally:
        echo_model._compiled = None  # the other tests here call the plain signature
