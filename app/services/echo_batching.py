"""The echo adapter of the batching core: one model call advances many sessions (like Triton's
sequence batcher).

An item is one session's message (:class:`Message`: its slot in the :class:`SessionStore` and its
bits as ``bytes`` of 0/1). A call pads the messages' next slices into one ``[n, t]`` matrix with
their ``lengths``, gathers the sessions' states from the store's matrix with one fancy index
(event loop), runs the model's ``step`` (worker thread) and scatters the new states back (event
loop). A call advances every row by at most ``max_steps`` bits (its cost grows with its longest
row), so a session streaming long messages delays the others by one slice at most; the rest of a
long message goes first into the next call (the core's ``AGAIN``).

All or nothing per message: a message that fails (its model call raised, its deadline passed,
its connection went away) leaves the session at its last fully answered message. A one-slice
message changes the state only when it is answered; a long message keeps its starting state and
:meth:`Message.undo` puts it back. A connection submits its next message only after the previous
one is answered, so a session is in at most one call at a time and its messages run in order.

An answered message gets its reply's ``seq`` and packed form (:class:`Echoed`). With the Redis
store, :meth:`EchoSteps.settle` then stores the new states of all the call's answered messages in
one round trip before any of them is answered (durable before acknowledged); a message whose step
could not be stored fails with ``StoreUnavailable`` or ``LeaseLost`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from app.core.errors import LeaseLost, StoreUnavailable
from app.core.metrics import ECHO_MESSAGES, ECHO_STORE_WRITES
from app.services.batching import AGAIN
from app.services.echo_replies import pack_reply
from app.services.echo_sessions import Session, SessionStore
from app.services.models import EchoModel
from app.services.redis_sessions import RedisSessions, Step


class Echoed(NamedTuple):
    """What an answered message gets."""

    probs: np.ndarray  # P(bit = 1), float32 [n]
    bits: np.ndarray  # predicted bits, uint8 [n]
    seq: int  # the reply's seq: the session's previous one + 1
    packed: bytes  # the reply packed (app.services.echo_replies), kept for last_seq resumes


class Message:
    """One session's message in flight: the bits still to run and the answers so far."""

    __slots__ = ("bits", "chunk", "done", "probs", "saved", "session", "slot", "store", "tag")

    def __init__(
        self, store: SessionStore, session: Session, chunk: bytes, tag: bytes = b""
    ) -> None:
        self.store, self.session, self.slot, self.chunk = store, session, session.slot, chunk
        self.tag = tag  # packed after the reply (a v2 sequence step's SequenceTag), else b""
        self.done = 0  # bits answered so far
        self.saved: np.ndarray | None = None  # the state before a long message's first slice
        self.probs: list[np.ndarray] = []
        self.bits: list[np.ndarray] = []

    def undo(self) -> None:
        """The message failed: put the session back to where it was before it (long ones)."""
        if self.saved is not None and self.done:
            self.store.restore(self.slot, self.saved)


class EchoSteps:
    """Gather, step, scatter; slices of at most ``max_steps`` bits per call; store (Redis)."""

    def __init__(
        self,
        model: EchoModel,
        store: SessionStore,
        max_steps: int,
        durable: RedisSessions | None = None,
    ) -> None:
        self.model, self.store, self.max_steps, self.durable = model, store, max_steps, durable

    def rows(self, message: Message) -> int:
        return 1

    def shape(self, payload: tuple[list[bytes], np.ndarray, np.ndarray]) -> tuple[int, int]:
        """The call's rows and time steps as the model pads them (the inline policy's key)."""
        slices = payload[0]
        return self.model.padded_shape(len(slices), max(map(len, slices)))

    def prepare(self, messages: list[Message]) -> tuple[list[bytes], np.ndarray, np.ndarray]:
        """The messages' next slices and the sessions' states (a copy: safe on the thread)."""
        step = self.max_steps
        slices = []
        for m in messages:
            if m.done == 0 and len(m.chunk) > step:
                m.saved = self.store.state_of(m.slot)
            slices.append(m.chunk[m.done : m.done + step])
        index = np.fromiter((m.slot for m in messages), np.intp, len(messages))
        return slices, index, self.store.gather(index)

    def compute(
        self, payload: tuple[list[bytes], np.ndarray, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pad, run ``model.step``, threshold (worker thread)."""
        slices, _, state = payload
        lengths = np.fromiter(map(len, slices), np.int32, len(slices))
        width = int(lengths.max())
        if (lengths != width).any():
            slices = [s.ljust(width, b"\0") for s in slices]
        bits = np.frombuffer(b"".join(slices), np.uint8).reshape(len(slices), width)
        probs, new_state = self.model.infer(bits.astype(np.float32), state, lengths)
        return probs, (probs > 0.5).view(np.uint8), new_state

    def finish(
        self,
        messages: list[Message],
        output: tuple[np.ndarray, np.ndarray, np.ndarray],
        done: list[bool],
    ) -> Sequence[Any]:
        """Scatter the states of the messages still waiting; answer or continue each (None for
        those answered meanwhile: their step is neither kept nor stored)."""
        probs, bits, new_state = output
        index = np.fromiter((m.slot for m in messages), np.intp, len(messages))
        if any(done):  # answered meanwhile (deadline, gone): their sessions stay as they were
            live = ~np.array(done)
            self.store.scatter(index[live], new_state[live])
        else:
            self.store.scatter(index, new_state)
        results: list[Any] = []
        answered = 0
        step = probs.shape[1]
        for i, m in enumerate(messages):
            if done[i]:  # not scattered above, so not stored by ``settle`` either
                results.append(None)
                continue
            n = min(len(m.chunk) - m.done, self.max_steps)
            if m.done == 0 and n == len(m.chunk):  # the usual case: the whole message at once
                results.append(_echoed(m.session, probs[i, :n], bits[i, :n], m.tag))
                answered += 1
                continue
            m.probs.append(probs[i, :n].copy())
            m.bits.append(bits[i, :n].copy())
            m.done += min(n, step)
            if m.done < len(m.chunk):
                results.append(AGAIN)
            else:
                probs_i, bits_i = np.concatenate(m.probs), np.concatenate(m.bits)
                results.append(_echoed(m.session, probs_i, bits_i, m.tag))
                answered += 1
        ECHO_MESSAGES.inc(answered)
        return results

    async def settle(self, messages: list[Message], results: list[Any]) -> list[Any]:
        """With Redis: store the answered messages' steps in one round trip, or fail them."""
        if self.durable is None:
            return results
        index = [i for i, r in enumerate(results) if type(r) is Echoed]
        if not index:
            return results
        state_bytes = self.store.state_bytes
        steps = []
        for i in index:
            session, echoed = messages[i].session, results[i]
            state = state_bytes(session.slot)
            steps.append(Step(session.id, session.fence, state, echoed.seq, echoed.packed))
        ECHO_STORE_WRITES.observe(len(steps))
        try:
            stored = await self.durable.commit(steps)
        except StoreUnavailable as exc:
            stored = [exc] * len(steps)
        for i, ok in zip(index, stored, strict=True):
            if ok is not True:
                results[i] = ok if isinstance(ok, Exception) else LeaseLost()
        return results


def _echoed(session: Session, probs: np.ndarray, bits: np.ndarray, tag: bytes) -> Echoed:
    seq = session.seq + 1
    return Echoed(probs, bits, seq, pack_reply(seq, probs, bits, tag))
