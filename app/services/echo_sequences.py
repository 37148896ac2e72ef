"""Echo sequences: Triton's sequence extension on ``echo_rnn``, for every transport (v2 HTTP and
gRPC), on the sessions of ``/echo``.

A sequence is a client's ``sequence_id`` (an unsigned 64-bit integer from 1, or a non-empty
string of at most :data:`MAX_SEQUENCE_ID_BYTES` UTF-8 bytes; 0 and ``""`` mean "no sequence" in
the protocol). Its state is an echo *session* (``app.services.echo_service``) whose id is derived
from the id and its *scope* (:func:`scope_of`: the client's API key when keys are on), hashed, so
ids of any length give bounded ids and clients with other keys never meet. The session shares
everything with ``/echo`` sessions: the session store (memory or Redis: with Redis a sequence
continues on any replica), the batcher of its model version (its steps join the same model
calls), ``ECHO_SESSION_TTL_S`` (an idle sequence expires like a detached session),
``ECHO_MAX_SESSIONS`` and the per-client limits. A request is not a connection: each step
attaches the session, advances it and detaches it (with Redis: attach, store the step, give it
back; three round trips, four for a new sequence). ``/echo`` cannot resume a sequence's
session (its id has a ``.``).

Better than Triton, retries apply once: a step whose request ``id`` the sequence answered within
its last ``ECHO_REPLAY_REPLIES`` steps gets that answer again instead of advancing the state
(:attr:`SequenceReply.replayed`), so a client may retry blindly after a dropped connection. An
``id`` sent again with other bits or flags is refused (``request_id_reused``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections import deque
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from app.core.errors import (
    InvalidInput,
    NotFound,
    NotReady,
    SequenceBusy,
    SequenceError,
    TooLarge,
    clip,
)
from app.core.metrics import ECHO_SEQUENCE_STEPS
from app.services.echo_replies import (
    ENDED,
    HAS_ID,
    SEQUENCE_TAG_BYTES,
    STARTED,
    SequenceTag,
    reply_seq,
    unpack_sequence_reply,
)

if TYPE_CHECKING:
    from app.services.echo_lanes import EchoLane
    from app.services.echo_service import EchoService
    from app.services.echo_sessions import Session

MAX_SEQUENCE_ID = 2**64 - 1
MAX_SEQUENCE_ID_BYTES = 256  # a string sequence_id, UTF-8
MAX_WAITING = 16  # requests of one sequence waiting for their turn in this process
SESSION_PREFIX = "q."  # sequence sessions' ids; "." is never in /echo's session ids
_ADVANCED = ECHO_SEQUENCE_STEPS.labels("advanced")
_REPLAYED = ECHO_SEQUENCE_STEPS.labels("replayed")


class SequenceReply(NamedTuple):
    """The answer to one step of a sequence."""

    probabilities: np.ndarray  # float32 [T]: P(the echoed bit is 1), one per bit sent
    bits: np.ndarray  # uint8 [T], 0/1: the predicted bits (probabilities > 0.5)
    version: int  # the echo_rnn version that answered (the sequence's)
    replayed: bool  # True: the request id was answered before; this is that answer again


def scope_of(api_key: str | None) -> str:
    """The scope of a client's sequence ids: a digest of the API key it presented when keys are
    on (pass ``None`` when they are off: every client shares one scope, as in Triton)."""
    if not api_key:
        return ""
    return "key:" + hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


def sequence_bits(name: str, array: np.ndarray) -> np.ndarray:
    """A decoded v2 input tensor of shape ``[1, T]`` → its ``[T]`` bits (the transports' shape
    check; values are checked by :meth:`EchoSequences.begin`). ``InvalidInput`` otherwise."""
    if array.ndim != 2 or array.shape[0] != 1:
        raise InvalidInput(
            f"input {clip(name)!r}: shape must be [1, T], one sequence's next T bits; got "
            f"{list(array.shape)}",
            "invalid_shape",
        )
    return array[0]


class EchoSequences:
    """The steps of v2 sequences on the echo service; one per process, beside ``EchoService``."""

    def __init__(self, echo: EchoService) -> None:
        self.echo = echo
        self._turns: dict[str, _Turn] = {}  # session id -> this process's requests on it
        self._steps: set[asyncio.Task[SequenceReply]] = set()

    async def step(self, **request: Any) -> SequenceReply:
        """:meth:`begin` a step (same keywords) and await it, shielded: once begun it completes
        even if the caller is cancelled (a retry then finds its answer)."""
        return await asyncio.shield(self.begin(**request))

    def begin(
        self,
        *,
        scope: str,
        sequence_id: int | str | None,
        start: bool,
        end: bool,
        request_id: str | None,
        bits: np.ndarray,
        version: int | None,
        client: str | None = None,
    ) -> asyncio.Task[SequenceReply]:
        """Advance sequence ``sequence_id`` of ``scope`` by ``bits``; the contract:

        - ``scope``: :func:`scope_of` the client's API key (``""`` with keys off).
        - ``sequence_id``: an ``int`` 1 to 2**64 - 1 or a ``str`` of 1 to 256 UTF-8 bytes; the
          int 5 and the string ``"5"`` are different sequences. ``None``, 0 or ``""``:
          ``SequenceError`` ``missing_sequence_id``; another type, a bool, out of range or too
          long: ``SequenceError`` ``invalid_sequence_id``.
        - ``start`` (``sequence_start``): begin the sequence in the model's initial state, on
          ``version`` or the newest serving one (a sequence in progress with this id is
          restarted). Without it the sequence must exist and not have ended, else
          ``SequenceError`` ``sequence_not_found`` (never started, expired after
          ``ECHO_SESSION_TTL_S`` idle, or evicted) or ``sequence_ended``.
        - ``end`` (``sequence_end``): this is the sequence's last step; later steps without
          ``start`` are refused (``sequence_ended``) until it expires. ``start`` and ``end``
          must be bools (``SequenceError`` ``invalid_sequence_flag``).
        - ``request_id``: the request's ``id`` (``None`` or ``""``: none). If the sequence
          answered this id within its last ``ECHO_REPLAY_REPLIES`` steps, that answer comes
          back (``replayed=True``, with the version that answered, whatever ``version`` names;
          an ended sequence too) and nothing advances; sent again with other bits or other
          ``start``/``end``: ``SequenceError`` ``request_id_reused``.
        - ``bits``: a NumPy array of shape ``[T]``, 1 ≤ T ≤ ``ECHO_MAX_BITS_PER_MESSAGE``, of
          any integer, float or bool dtype holding only 0 and 1 (``InvalidInput``
          ``invalid_shape`` / ``invalid_bits``; ``TooLarge`` ``too_many_bits``).
          :func:`sequence_bits` turns a ``[1, T]`` tensor into it.
        - ``version``: the echo_rnn version the request names, or ``None``. A start on a
          version that is not serving new sequences: ``NotFound`` ``version_not_found``; a
          step naming another version than the sequence's: ``SequenceError``
          ``sequence_version_mismatch``; with Redis, a step (no ``start``) of a sequence on a
          version this process does not serve: ``NotFound`` ``session_version_unavailable``.
        - ``client``: the client's address, for the per-client session limits.

        The task's result is a :class:`SequenceReply` (probabilities and bits ``[T]``, the version,
        replayed). Steps of one sequence run one at a time in arrival order (at most 16 waiting in a
        process, each at most ``REQUEST_TIMEOUT_S``: ``SequenceBusy``); across replicas a step
        finding the sequence held elsewhere retries for ~0.3 s, then ``SequenceBusy``. Other errors
        are the echo service's: ``NotReady``, ``Overloaded`` (server or client session limits),
        ``StoreUnavailable``, ``LeaseLost``, ``DeadlineExceeded``, ``ModelFailed``, ``GoingAway``. A
        failed step leaves the sequence at its last answered step.

        The request is checked at once (a refused one raises here); the step runs in the task
        returned, which nothing else cancels (:meth:`step` awaits it shielded, as should any
        caller that may be cancelled; a gRPC stream answers from its callbacks).
        """
        settings = self.echo.settings
        key = sequence_key(sequence_id)
        if type(start) is not bool or type(end) is not bool:
            raise SequenceError(
                "sequence_start and sequence_end must be true or false", "invalid_sequence_flag"
            )
        chunk = _chunk(bits, settings.echo_max_bits_per_message)
        flags = (STARTED if start else 0) | (ENDED if end else 0)
        if request_id:
            flags |= HAS_ID
            id_digest = hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).digest()[:16]
        else:
            id_digest = bytes(16)
        request_digest = hashlib.sha256(bytes([flags]) + chunk).digest()[:8]
        lane = self._start_lane(version) if start else None
        session_id = _session_id(scope, key)
        task = asyncio.create_task(
            self._step(
                session_id,
                _Step(sequence_id, flags, id_digest, request_digest, chunk, version),
                lane,
                client,
            )
        )
        self._steps.add(task)  # a strong reference while it runs (shielded)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[SequenceReply]) -> None:
        self._steps.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a step whose caller left fails quietly

    def _start_lane(self, version: int | None) -> EchoLane:
        echo = self.echo
        if not echo.running or echo.default is None:
            raise NotReady("no echo model version is serving")
        if version is None:
            return echo.default
        lane = echo.lanes.get(version)
        if lane is None or lane.draining:
            serving = sorted(v for v, x in echo.lanes.items() if not x.draining)
            raise NotFound(
                f"echo_rnn version {version} does not take new sequences (serving {serving})",
                "version_not_found",
            )
        return lane

    async def _step(
        self, session_id: str, step: _Step, start: EchoLane | None, client: str | None
    ) -> SequenceReply:
        waiter = self._enter(session_id)
        if waiter is not None:  # another step of this sequence runs: wait for it (FIFO)
            await self._wait_turn(session_id, waiter)
        try:
            return await self._attached_step(session_id, step, start, client)
        finally:
            self._leave(session_id)

    async def _attached_step(
        self, session_id: str, step: _Step, start: EchoLane | None, client: str | None
    ) -> SequenceReply:
        echo = self.echo
        try:
            opened = await echo.open_sequence(session_id, session_id, client, start)
        except NotFound as exc:
            if exc.code == "session_version_unavailable":
                raise
            raise SequenceError(
                f"sequence {_describe(step.sequence_id)} is unknown (never started, idle for "
                "longer than ECHO_SESSION_TTL_S, or evicted); send sequence_start to begin it",
                "sequence_not_found",
            ) from None
        session, stored_version = opened
        attached = [session]  # the session as it is now (a move makes a new one)
        try:
            return await self._advance(attached, stored_version, step, start)
        finally:
            await echo.close(attached[0])

    async def _advance(
        self, attached: list[Session], stored_version: int, step: _Step, start: EchoLane | None
    ) -> SequenceReply:
        """The step on the attached session ``attached[0]``, or the replay of its request id."""
        echo, session = self.echo, attached[0]
        if step.flags & HAS_ID:
            replay = _replay(session, step)
            if replay is not None:
                _REPLAYED.inc()
                return replay
        saved = None
        if start is None:
            if _ended(session):
                raise SequenceError(
                    f"sequence {_describe(step.sequence_id)} has ended (sequence_end); send "
                    "sequence_start to begin it again",
                    "sequence_ended",
                )
            if step.version is not None and step.version != session.version:
                raise SequenceError(
                    f"sequence {_describe(step.sequence_id)} runs on echo_rnn version "
                    f"{session.version}, not {step.version}; continue it without a version or on "
                    "its own",
                    "sequence_version_mismatch",
                )
        elif session.version != start.version or stored_version != start.version:
            session = attached[0] = await echo.move(session, start, stored_version)
        else:
            store = echo.lane(session).store
            assert store is not None
            saved = store.state_of(session.slot)
            store.reset(session)
        tag = SequenceTag(step.flags, session.version, step.id_digest, step.request_digest)
        try:
            echoed = await echo.advance(session, step.chunk, tag.pack())
        except BaseException:
            if saved is not None:  # the state before this start, as the step never happened
                store = echo.lane(session).store
                assert store is not None
                store.restore(session.slot, saved)
            raise
        session.record(echoed.seq, echoed.packed)
        _ADVANCED.inc()
        return SequenceReply(echoed.probs, echoed.bits, session.version, False)

    # One step of a sequence at a time in this process, in arrival order. The turn of a
    # sequence nobody else steps is a dict entry (no lock, no timer); a step finding one waits
    # on a future of its own, queued in order, for at most REQUEST_TIMEOUT_S.

    def _enter(self, session_id: str) -> asyncio.Future[None] | None:
        """Take the sequence's turn (``None``), or join its queue (the future to wait for with
        :meth:`_wait_turn`); ``SequenceBusy`` when ``MAX_WAITING`` wait already."""
        turn = self._turns.get(session_id)
        if turn is None:
            self._turns[session_id] = _Turn()
            return None
        if turn.users > MAX_WAITING:
            raise SequenceBusy(
                f"{MAX_WAITING} requests of this sequence are waiting already; send a "
                "sequence's steps one at a time"
            )
        turn.users += 1
        waiter = asyncio.get_running_loop().create_future()
        turn.waiters.append(waiter)
        return waiter

    async def _wait_turn(self, session_id: str, waiter: asyncio.Future[None]) -> None:
        """Wait for the turn: the step before this one resolves ``waiter`` when it leaves."""
        timeout_s = self.echo.settings.request_timeout_s
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    await waiter
            except TimeoutError:
                raise SequenceBusy(
                    f"another request of this sequence held it for {timeout_s:g} s"
                ) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._leave(session_id)  # handed the turn, but leaving: pass it on
            else:
                waiter.cancel()
                turn = self._turns[session_id]  # the step holding it keeps it there
                turn.waiters.remove(waiter)
                turn.users -= 1
            raise

    def _leave(self, session_id: str) -> None:
        """The step holding the turn is done: hand it to the next one waiting, if any."""
        turn = self._turns[session_id]
        turn.users -= 1
        waiters = turn.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        if turn.users == 0:
            del self._turns[session_id]


class _Turn:
    __slots__ = ("users", "waiters")

    def __init__(self) -> None:
        self.users = 1  # the step holding the turn and those waiting for it
        self.waiters: deque[asyncio.Future[None]] = deque()  # those waiting, in order


class _Step(NamedTuple):
    sequence_id: int | str  # for error details (_describe)
    flags: int
    id_digest: bytes
    request_digest: bytes
    chunk: bytes  # the bits, one byte 0/1 each
    version: int | None


def sequence_key(sequence_id: object) -> bytes:
    """The typed bytes of a sequence id (an int and its digits as a string differ), or the
    ``SequenceError`` of :meth:`EchoSequences.begin` (a transport may check it first)."""
    if sequence_id is None or (type(sequence_id) in (int, str) and not sequence_id):
        raise SequenceError(
            "echo_rnn is stateful: every request needs parameters.sequence_id (an integer "
            "from 1 to 2**64 - 1 or a non-empty string) and sequence_start on a sequence's "
            "first request",
            "missing_sequence_id",
        )
    if type(sequence_id) is int and 1 <= sequence_id <= MAX_SEQUENCE_ID:
        return b"u" + sequence_id.to_bytes(8, "big")
    if type(sequence_id) is str:
        encoded = sequence_id.encode("utf-8", "surrogatepass")
        if len(encoded) <= MAX_SEQUENCE_ID_BYTES:
            return b"s" + encoded
    raise SequenceError(
        f"sequence_id must be an integer from 1 to 2**64 - 1 or a string of 1 to "
        f"{MAX_SEQUENCE_ID_BYTES} UTF-8 bytes; got {_describe(sequence_id)}",
        "invalid_sequence_id",
    )


def _describe(sequence_id: object) -> str:
    if type(sequence_id) is str:
        return repr(clip(sequence_id))
    return clip(repr(sequence_id))


@lru_cache(maxsize=4096)  # the ids of the sequences stepped lately: one SHA-256 per new one
def _session_id(scope: str, key: bytes) -> str:
    """The session id of a sequence: ``q.`` + 32 URL-safe characters of a SHA-256 (192 bits)."""
    scoped = scope.encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(b"echo-sequence\0%d\0" % len(scoped) + scoped + key).digest()
    return SESSION_PREFIX + base64.urlsafe_b64encode(digest).decode()[:32]


_BYTE_BITS = (np.dtype(np.uint8), np.dtype(np.int8))  # one byte an element: checked as bytes


def _chunk(bits: np.ndarray, max_bits: int) -> bytes:
    """``bits`` as bytes of 0/1, or the error saying what is wrong with them."""
    if not isinstance(bits, np.ndarray) or bits.ndim != 1:
        shape = list(bits.shape) if isinstance(bits, np.ndarray) else type(bits).__name__
        raise InvalidInput(f"bits must have shape [T]; got {shape}", "invalid_shape")
    if not 1 <= bits.size <= max_bits:
        if bits.size:
            raise TooLarge(
                f"{bits.size} bits in one step; at most {max_bits} (ECHO_MAX_BITS_PER_MESSAGE)",
                "too_many_bits",
            )
        raise InvalidInput("a step needs at least one bit (shape [1, T], T ≥ 1)", "invalid_shape")
    if bits.dtype in _BYTE_BITS:  # what the transports decode UINT8 to: no NumPy ufuncs
        chunk = bits.tobytes()
        if chunk.translate(None, b"\0\1"):
            raise InvalidInput("bits must be 0 or 1", "invalid_bits")
        return chunk
    if bits.dtype.kind not in "biuf" or not ((bits == 0) | (bits == 1)).all():
        raise InvalidInput("bits must be 0 or 1", "invalid_bits")
    return bits.astype(np.uint8, copy=False).tobytes()


# Where a packed sequence step reply keeps its tag's fields, from its end (SequenceTag's layout).
_FLAGS_AT = -SEQUENCE_TAG_BYTES
_ID_DIGEST = slice(-SEQUENCE_TAG_BYTES + 5, -SEQUENCE_TAG_BYTES + 21)
_REQUEST_DIGEST = slice(-SEQUENCE_TAG_BYTES + 21, None)


def _replay(session: Session, step: _Step) -> SequenceReply | None:
    """The kept answer to this step's request id, if the sequence has one (newest first)."""
    id_digest = step.id_digest
    for packed in reversed(session.replies):
        if (
            len(packed) < 8 + SEQUENCE_TAG_BYTES
            or packed[_ID_DIGEST] != id_digest
            or not packed[_FLAGS_AT] & HAS_ID
        ):
            continue
        if packed[_REQUEST_DIGEST] != step.request_digest:
            raise SequenceError(
                "this request id was answered already in this sequence, for other bits or "
                "flags; give each request of a sequence its own id",
                "request_id_reused",
            )
        _, probs, bits, tag = unpack_sequence_reply(packed)
        return SequenceReply(probs.copy(), bits.copy(), tag.version, True)
    return None


def _ended(session: Session) -> bool:
    """The sequence's last step had ``sequence_end``."""
    if not session.replies:
        return False
    last = session.replies[-1]
    return bool(last[_FLAGS_AT] & ENDED) and reply_seq(last) == session.seq
