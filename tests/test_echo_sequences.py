"""``EchoSequences`` in-process with the shipped echo model (memory store): Triton's sequence
extension as the transports see it, without a server.

A sequence answers as an ``/echo`` session fed the same bits; ids are checked and typed and
scoped; start, end, unknown and ended sequences; a retried request id answered once (also after
its caller was cancelled mid-step); steps of one sequence one at a time; the per-client limits;
a start after a newer model version took over moves the sequence there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from app.core.errors import (
    InvalidInput,
    NotFound,
    Overloaded,
    SequenceBusy,
    SequenceError,
    TooLarge,
)
from app.services.echo_replies import HAS_ID, SequenceTag, pack_reply
from app.services.echo_sequences import (
    _FLAGS_AT,
    _ID_DIGEST,
    _REQUEST_DIGEST,
    MAX_WAITING,
    EchoSequences,
    SequenceReply,
    _chunk,
    _session_id,
    scope_of,
    sequence_bits,
    sequence_key,
)
from app.services.echo_service import EchoService
from app.services.models import EchoModel
from tests.test_echo_core import Flaky, echo_model, service, stream

__all__ = ["echo_model"]  # the module-scoped fixture, shared with tests/test_echo_core.py


def bits_of(chunk: bytes) -> np.ndarray:
    return np.frombuffer(chunk, np.uint8)


def run(
    model: Any,
    scenario: Callable[[EchoService, EchoSequences], Awaitable[None]],
    **settings: Any,
) -> None:
    async def main() -> None:
        svc = await service(model, **settings)
        try:
            await scenario(svc, EchoSequences(svc))
        finally:
            await svc.stop()

    asyncio.run(main())


async def step(
    seqs: EchoSequences,
    sequence_id: int | str,
    chunk: bytes,
    *,
    start: bool = False,
    end: bool = False,
    request_id: str | None = None,
    scope: str = "",
    version: int | None = None,
    client: str | None = "127.0.0.1",
) -> SequenceReply:
    return await seqs.step(
        scope=scope,
        sequence_id=sequence_id,
        start=start,
        end=end,
        request_id=request_id,
        bits=bits_of(chunk),
        version=version,
        client=client,
    )


async def echo_reference(svc: EchoService, chunks: list[bytes]) -> list[np.ndarray]:
    """What an ``/echo`` session answers to the same messages."""
    session = await svc.open(None, None, object())  # type: ignore[arg-type]
    try:
        return [(await svc.advance(session, c)).probs.copy() for c in chunks]
    finally:
        await svc.close(session)


def test_interleaved_sequences_answer_as_echo_sessions_do(echo_model: EchoModel) -> None:
    ids: list[int | str] = [1, "1", 2**64 - 1, "séquence ☃", "x" * 256]
    chunks = {
        k: [stream(10 * i + j, 1 + (7 * i + 13 * j) % 60) for j in range(5)]
        for i, k in enumerate(ids)
    }

    async def scenario(svc: EchoService, seqs: EchoSequences) -> None:
        got: dict[int | str, list[SequenceReply]] = {k: [] for k in ids}
        for j in range(5):  # one step of every sequence, then the next: interleaved
            replies = await asyncio.gather(
                *(step(seqs, k, chunks[k][j], start=j == 0, end=j == 4) for k in ids)
            )
            for k, reply in zip(ids, replies, strict=True):
                got[k].append(reply)
        for k in ids:
            want = await echo_reference(svc, chunks[k])
            for reply, probs, chunk in zip(got[k], want, chunks[k], strict=True):
                assert reply.probabilities.dtype == np.float32 and reply.bits.dtype == np.uint8
                assert reply.version == 1 and not reply.replayed
                assert np.allclose(reply.probabilities, probs, atol=1e-5)
                assert np.array_equal(reply.bits, (probs > 0.5).astype(np.uint8))
                assert len(reply.bits) == len(chunk)
            sent = b"".join(chunks[k])
            echoed = np.concatenate([r.bits for r in got[k]])
            assert np.array_equal(echoed[3:], bits_of(sent)[:-3])  # the model echoes 3 late

    run(echo_model, scenario)


@pytest.mark.parametrize(
    ("sequence_id", "code"),
    [
        (None, "missing_sequence_id"),
        (0, "missing_sequence_id"),
        ("", "missing_sequence_id"),
        (-1, "invalid_sequence_id"),
        (2**64, "invalid_sequence_id"),
        (1.0, "invalid_sequence_id"),
        (True, "invalid_sequence_id"),
        ([1], "invalid_sequence_id"),
        ("y" * 257, "invalid_sequence_id"),
        ("é" * 129, "invalid_sequence_id"),  # 258 UTF-8 bytes
    ],
)
def test_bad_sequence_ids_are_refused(echo_model: EchoModel, sequence_id: Any, code: str) -> None:
    async def scenario(svc: EchoService, seqs: EchoSequences) -> None:
        with pytest.raises(SequenceError) as info:
            await step(seqs, sequence_id, b"\1", start=True)
        assert info.value.code == code and isinstance(info.value, InvalidInput)
        assert len(info.value.detail) < 300  # a long id is not echoed whole

    run(echo_model, scenario)


def test_session_ids_are_typed_scoped_and_bounded() -> None:
    a = _session_id("", b"u" + (5).to_bytes(8, "big"))
    assert a != _session_id("", b"s5") != _session_id(scope_of("key-1"), b"s5")
    assert a == _session_id("", b"u" + (5).to_bytes(8, "big"))
    long = _session_id("", b"s" + b"z" * 256)
    assert len(a) == len(long) == 34 and a.startswith("q.")
    assert scope_of(None) == scope_of("") == "" and "key-1" not in scope_of("key-1")


@pytest.mark.parametrize(
    ("bits", "error", "code"),
    [
        (np.zeros((1, 3), np.uint8), InvalidInput, "invalid_shape"),
        (np.zeros(0, np.uint8), InvalidInput, "invalid_shape"),
        (np.array([0, 2], np.int32), InvalidInput, "invalid_bits"),
        (np.array([0.5], np.float32), InvalidInput, "invalid_bits"),
        (np.array([np.nan], np.float32), InvalidInput, "invalid_bits"),
        (np.array(["1"]), InvalidInput, "invalid_bits"),
        (np.ones(4097, np.uint8), TooLarge, "too_many_bits"),
    ],
)
def test_bad_bits_are_refused(
    echo_model: EchoModel, bits: np.ndarray, error: type, code: str
) -> None:
    async def scenario(svc: EchoService, seqs: EchoSequences) -> None:
        with pytest.raises(error) as info:
            await seqs.step(
                scope="",
                sequence_id=1,
                start=True,
                end=False,
                request_id=None,
                bits=bits,
                version=None,
            )
        assert info.value.code == code

    run(echo_model, scenario)


def test_other_dtypes_of_0_and_1_are_bits(echo_model: EchoModel) -> None:
    async def scenario(svc: EchoService, seqs: EchoSequences) -> None:
        chunk = stream(1, 9)
        want = (await echo_reference(svc, [chunk]))[0]
        for k, dtype in enumerate((np.float32, np.int64, np.bool_, np.uint8)):
            got = await seqs.step(
                scope="",
                sequence_id=100 + k,
                start=True,
                end=True,
                request_id=None,
                bits=bits_of(chunk).astype(dtype),
                version=None,
            )
            assert np.allclose(got.probabilities, want, atol=1e-5)

    run(echo_model, scenario)


def _general_chunk(bits: np.ndarray) -> bytes | str:
    """What ``_chunk`` answers through its general NumPy check (a two-byte integer array of the
    same values), or the code it refuses with."""
    try:
        return _chunk(bits.astype(np.int16), 4096)
    except InvalidInput as exc:
        return exc.code


def test_the_one_byte_fast_path_of_chunk_accepts_and_refuses_as_the_general_check() -> None:
    every_byte = np.arange(256, dtype=np.uint8)
    for dtype in (np.uint8, np.int8):
        for value in every_byte.view(dtype):
            bits = np.array([1, value, 0], dtype)
            try:
                fast: bytes | str = _chunk(bits, 4096)
            except InvalidInput as exc:
                fast = exc.code
            assert fast == _general_chunk(bits), (dtype, value)
        mixed = np.array([0, 1, 1, 0, 1], dtype)
        assert _chunk(mixed, 4096) == _general_chunk(mixed) == b"\0\1\1\0\1"
        assert _chunk(mixed[::2], 4096) == b"\0\1\1"  # a strided view, as NumPy reads it


def test_the_tag_fields_are_read_where_sequence_tag_packs_them() -> None:
    tag = SequenceTag(HAS_ID, 7, bytes(range(16)), bytes(range(100, 108)))
    packed = pack_reply(3, np.full(2, 0.5, np.float32), np.ones(2, np.uint8), tag.pack())
    assert packed[_FLAGS_AT] == HAS_ID
    assert packed[_ID_DIGEST] == tag.id_digest and packed[_REQUEST_DIGEST] == tag.request_digest


def test_sequence_bits_takes_one_row() -> None:
    assert sequence_bits("bits", np.zeros((1, 5), np.uint8)).shape == (5,)
    for shape in ((5,), (2, 5), (1, 5, 1)):
        with pytest.raises(InvalidInput) as info:
            sequence_bits("bits", np.zeros(shape, np.uint8))
        assert info.value.code == "invalid_shape"


def test_unknown_and_ended_sequences_need_a_start(echo_model: EchoModel) -> None:
    a, b = stream(1, 10), stream(2, 10)

    async def scenario(svc: EchoService, seqs: EchoSequences) -> None:
        with pytest.raises(SequenceError) as info:
            await step(seqs, 7, a)
        assert info.value.code == "sequence_not_found"
        await step(seqs, 7, a, start=True)
        await step(seqs, 7, b, end=True)
        with pytest.raises(SequenceError) as info:
            await step(seqs, 7, a)
        assert info.value.code == "sequence_ended"
        again = await step(seqs, 7, a, start=True)  # a new sequence, from the initial state
        fresh = (await echo_reference(svc, [a]))[0]
        assert np.allclose(again.probabilities, fresh, atol=1e-5)
        # A start in the middle of a sequence restarts it too.
        await step(seqs, 7, b)
        restarted = await step(seqs, 7, a, start=True)
        assert np.allclose(restarted.probabilities, fresh, atol=1e-5)

    run(echo_model, scenario)


def test_an_idle_sequence_expires_like_a_session(echo_model: EchoModel) -> None:
    async def scenario(svc: EchoService, seqs: EchoSequences) -> None:
        await step(seqs, "idle", stream(1, 5), start=True)
        await asyncio.sleep(0.5)  # the sweeper runs every ttl / 4
        with pytest.raises(SequenceError) as info:
            await step(seqs, "idle", stream(2, 5))
        assert info.value.code == "sequence_not_found"
        assert len(svc.lanes[1].store or []) == 0  # nothing kept

    run(echo_model, scenario, echo_session_ttl_s=0.2)


def test_a_retried_request_id_is_answered_once(echo_model: EchoModel) -> None:
    chunks = [stream(k, 8 + k) for k in range(8)]

    async def scenario(svc: EchoService, seqs: EchoSequences) -> None:
        want = await echo_reference(svc, chunks)
        first = await step(seqs, "r", chunks[0], start=True, request_id="0")
        again = await step(seqs, "r", chunks[0], start=True, request_id="0")  # a blind retry
        assert again.replayed and not first.replayed
        assert np.array_equal(again.probabilities, first.probabilities)
        assert np.array_equal(again.bits, first.bits) and again.version == first.version
        for k in range(1, 6):
            got = await step(seqs, "r", chunks[k], request_id=str(k))
            assert np.allclose(got.probabilities, want[k], atol=1e-5)  # not advanced twice
            retried = await step(seqs, "r", chunks[k], request_id=str(k))
            assert retried.replayed and np.array_equal(retried.probabilities, got.probabilities)
        # The last ECHO_REPLAY_REPLIES (4) answers are kept: "2" is, "1" is not any more.
        assert (await step(seqs, "r", chunks[2], request_id="2")).replayed
        with pytest.raises(SequenceError) as info:
            await step(seqs, "r", chunks[0], request_id="5")  # the id of other bits
        assert info.value.code == "request_id_reused"
        with pytest.raises(SequenceError) as info:
            await step(seqs, "r", chunks[5], request_id="5", end=True)  # other flags
        assert info.value.code == "request_id_reused"
        got = await step(seqs, "r", chunks[6], request_id="1")  # forgotten: a new request
        assert not got.replayed and np.allclose(got.probabilities, want[6], atol=1e-5)
        # Without an id every request advances; an ended sequence still replays its end.
        ended = await step(seqs, "r", chunks[7], request_id="end", end=True)
        assert (await step(seqs, "r", chunks[7], request_id="end", end=True)).replayed
        assert np.allclose(ended.probabilities, want[7], atol=1e-5)

    run(echo_model, scenario)


def test_a_step_whose_caller_is_cancelled_completes_and_its_retry_is_replayed(
    echo_model: EchoModel,
) -> None:
    a, b = stream(1, 12), stream(2, 12)

    async def scenario(svc: EchoService, seqs: EchoSequences) -> None:
        await step(seqs, 9, a, start=True, request_id="a")
        flaky.gate.clear()
        caller = asyncio.create_task(step(seqs, 9, b, request_id="b"))
        await asyncio.sleep(0.1)
        caller.cancel()  # the client went away while the model ran its step
        with pytest.raises(asyncio.CancelledError):
            await caller
        flaky.gate.set()
        retried = await step(seqs, 9, b, request_id="b")  # waits for the step, then replays
        assert retried.replayed
        want = await echo_reference(svc, [a, b])
        assert np.allclose(retried.probabilities, want[1], atol=1e-5)

    flaky = Flaky(echo_model)
    run(flaky, scenario, inline_call_budget_ms=0)


def test_steps_of_one_sequence_run_one_at_a_time(echo_model: EchoModel) -> None:
    chunks = [stream(k, 5) for k in range(12)]

    async def scenario(svc: EchoService, seqs: EchoSequences) -> None:
        await step(seqs, 3, chunks[0], start=True)
        flaky.gate.clear()
        held = asyncio.create_task(step(seqs, 3, chunks[1]))
        await asyncio.sleep(0.05)
        waiting = [asyncio.create_task(step(seqs, 3, c)) for c in chunks[2:]]  # in order
        await asyncio.sleep(0.05)
        flaky.gate.set()
        replies = await asyncio.gather(held, *waiting)
        want = await echo_reference(svc, chunks)
        for reply, probs in zip(replies, want[1:], strict=True):
            assert np.allclose(reply.probabilities, probs, atol=1e-5)  # in arrival order

        flaky.gate.clear()
        tasks = [asyncio.create_task(step(seqs, 3, c)) for c in [chunks[0]] * (MAX_WAITING + 2)]
        await asyncio.sleep(0.1)
        done = [t for t in tasks if t.done()]
        assert len(done) == 1 and isinstance(done[0].exception(), SequenceBusy)
        flaky.gate.set()
        await asyncio.gather(*(t for t in tasks if t not in done))

    flaky = Flaky(echo_model)
    run(flaky, scenario, inline_call_budget_ms=0)


def test_a_step_that_waited_too_long_for_its_turn_leaves_the_queue(echo_model: EchoModel) -> None:
    async def scenario(svc: EchoService, seqs: EchoSequences) -> None:
        await step(seqs, 4, stream(0, 3), start=True)
        session_id = _session_id("", sequence_key(4))
        assert seqs._enter(session_id) is None  # as a step of the sequence running for long
        waiting = [asyncio.create_task(step(seqs, 4, stream(k, 3))) for k in (1, 2)]
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert [type(r) for r in results] == [SequenceBusy, SequenceBusy]
        turn = seqs._turns[session_id]
        assert turn.users == 1 and not turn.waiters  # they left the queue
        seqs._leave(session_id)
        assert seqs._turns == {}
        await step(seqs, 4, stream(1, 3))  # the sequence still takes steps

    run(echo_model, scenario, request_timeout_s=0.2)


def test_a_turn_handed_to_a_step_that_is_cancelled_passes_to_the_next(
    echo_model: EchoModel,
) -> None:
    async def scenario(svc: EchoService, seqs: EchoSequences) -> None:
        assert seqs._enter("s") is None  # the turn, at once
        first, second = seqs._enter("s"), seqs._enter("s")
        assert first is not None and second is not None
        waiting = [asyncio.create_task(seqs._wait_turn("s", w)) for w in (first, second)]
        await asyncio.sleep(0)
        seqs._leave("s")  # hands the turn to the first waiting ...
        waiting[0].cancel()  # ... which is cancelled before it runs: it must pass it on
        with pytest.raises(asyncio.CancelledError):
            await waiting[0]
        await asyncio.wait_for(waiting[1], 1)  # the second has the turn
        seqs._leave("s")
        assert seqs._turns == {}

    run(echo_model, scenario)


def test_starts_count_against_the_client_limits(echo_model: EchoModel) -> None:
    async def scenario(svc: EchoService, seqs: EchoSequences) -> None:
        for k in range(3):
            await step(seqs, k + 1, b"\1", start=True, client="10.0.0.1")
        with pytest.raises(Overloaded) as info:
            await step(seqs, 4, b"\1", start=True, client="10.0.0.1")
        assert info.value.code == "session_rate_limited"
        await step(seqs, 1, b"\1", client="10.0.0.1")  # a step of a started one is not new
        await step(seqs, 4, b"\1", start=True, client="10.0.0.2")  # another client
        assert svc.limits.attached("10.0.0.1") == 0  # attached only during a step

    run(echo_model, scenario, echo_new_sessions_burst=3, echo_new_sessions_per_s=0.01)


class Renamed:
    """The shipped model served as another version (a second lane)."""

    def __init__(self, model: EchoModel, version: int) -> None:
        self.model, self.version = model, version

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def test_a_start_after_a_newer_version_took_over_moves_the_sequence(
    echo_model: EchoModel,
) -> None:
    a, b = stream(1, 10), stream(2, 10)

    async def scenario(svc: EchoService, seqs: EchoSequences) -> None:
        first = await step(seqs, 5, a, start=True, request_id="a")
        assert first.version == 1
        await svc.add_lane(Renamed(echo_model, 2))  # type: ignore[arg-type]
        on1 = await step(seqs, 5, b, request_id="b")  # a sequence stays on its version
        assert on1.version == 1
        with pytest.raises(SequenceError) as info:
            await step(seqs, 5, b, version=2)
        assert info.value.code == "sequence_version_mismatch"
        retried = await step(seqs, 5, a, start=True, request_id="a")  # replayed, not moved
        assert (
            retried.replayed
            and retried.version == 1
            and svc.lanes[1].holds(_session_id("", b"u" + (5).to_bytes(8, "big")))
        )
        moved = await step(seqs, 5, a, start=True, request_id="a2")
        assert moved.version == 2 and np.allclose(moved.probabilities, first.probabilities)
        assert (await step(seqs, 5, b, request_id="b")).version == 1  # replies kept: replayed
        assert (await step(seqs, 5, b, request_id="b2", version=2)).version == 2
        pinned = await step(seqs, 6, a, start=True, version=1)
        assert pinned.version == 1
        with pytest.raises(NotFound) as nf:
            await step(seqs, 6, a, start=True, version=3)
        assert nf.value.code == "version_not_found"

    run(echo_model, scenario)


class Recording(Flaky):
    """The real model behind a gate, recording how many rows each call had."""

    def __init__(self, model: EchoModel) -> None:
        super().__init__(model)
        self.rows: list[int] = []

    def infer(self, bits: np.ndarray, state: np.ndarray, lengths: np.ndarray) -> Any:
        self.rows.append(len(bits))
        return super().infer(bits, state, lengths)


def test_sequence_steps_share_model_calls_with_echo_sessions(echo_model: EchoModel) -> None:
    async def scenario(svc: EchoService, seqs: EchoSequences) -> None:
        await step(seqs, 1, stream(1, 4), start=True)
        sessions = [await svc.open(None, None, object()) for _ in range(2)]  # type: ignore[arg-type]
        recording.gate.clear()
        busy = asyncio.create_task(svc.advance(sessions[0], stream(2, 4)))  # holds the model
        await asyncio.sleep(0.1)
        queued = [
            asyncio.create_task(svc.advance(sessions[1], stream(3, 4))),
            asyncio.create_task(step(seqs, 1, stream(4, 4))),
            asyncio.create_task(step(seqs, "two", stream(5, 4), start=True)),
        ]
        await asyncio.sleep(0.1)  # all three wait while the model is busy
        recording.gate.set()
        await asyncio.gather(busy, *queued)
        assert recording.rows[-2:] == [1, 3]  # the three went out in one call
        for session in sessions:
            await svc.close(session)

    recording = Recording(echo_model)
    run(recording, scenario, inline_call_budget_ms=0)
