"""The echo sequence batcher: one model call advances many sessions (like Triton's).

Each pending message is one session's chunk of bits (as ``bytes`` of 0/1). A dispatch takes up to
``max_sessions`` messages, pads their chunks into one ``[n, t]`` matrix with their ``lengths``,
gathers the sessions' states from the :class:`SessionStore` matrix with one fancy index, runs the
model's ``step`` on a dedicated single-thread executor and scatters the new states back. When the
pipeline is idle the first message waits at most ``max_delay_s`` for company (unless recent idle
batches all went alone: ``IdleWaitPolicy``); when a call has just finished, whatever queued
meanwhile goes at once. A connection submits its next message only
after the previous one is answered, so a session is in at most one call at a time and its messages
run strictly in order.

With batching disabled every message is its own model call on a small thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from app.core.metrics import BATCH_SIZE, COMPUTE_TIME, ECHO_MESSAGES, INFERENCE_CALLS, QUEUE_WAIT
from app.services.batching import IdleWaitPolicy
from app.services.echo_sessions import SessionStore
from app.services.models import EchoModel

# What a submitted message resolves to: (probabilities [n, t], predicted bits [n, t] uint8, row).
StepResult = tuple[np.ndarray, np.ndarray, int]


class BatcherStopped(RuntimeError):
    """The service is shutting down; the message was not processed."""


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Long:
    """A message longer than ``max_steps``: advanced ``max_steps`` bits per call until done."""

    __slots__ = ("bits", "future", "probs", "rest", "slot")

    def __init__(self, slot: int, future: asyncio.Future[StepResult]) -> None:
        self.slot, self.future, self.rest = slot, future, b""
        self.probs: list[np.ndarray] = []
        self.bits: list[np.ndarray] = []


class SequenceBatcher:
    """Queues session messages and advances them through ``model.step`` in batches.

    A call advances every row by at most ``max_steps`` bits (the call's cost grows with its
    longest row), so one session streaming huge messages delays the others by one slice at most;
    the rest of a long message goes first into the next call.
    """

    def __init__(
        self,
        model: EchoModel,
        store: SessionStore,
        *,
        enabled: bool,
        max_sessions: int,
        max_delay_s: float,
        max_steps: int = 32,
    ) -> None:
        self.model, self.store, self.enabled = model, store, enabled
        self.max_sessions, self.max_delay_s, self.max_steps = max_sessions, max_delay_s, max_steps
        self._slots: list[int] = []
        self._chunks: list[bytes] = []
        self._futures: list[asyncio.Future[StepResult]] = []
        self._queued_at: list[float] = []
        self._longs: list[_Long] = []  # unfinished long messages, first in the next call
        self._waiter: asyncio.Future[None] | None = None
        self._idle = True  # waiting for a first message (not for a batch to fill up)
        self._idle_wait = IdleWaitPolicy()
        self._task: asyncio.Task[None] | None = None
        workers = 1 if enabled else min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="echo-step")
        self._stopped = False
        name = model.name
        self._calls, self._sizes = INFERENCE_CALLS.labels(name), BATCH_SIZE.labels(name)
        self._waits, self._compute = QUEUE_WAIT.labels(name), COMPUTE_TIME.labels(name)

    async def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._run(), name="echo-batcher")

    async def stop(self) -> None:
        """Stop dispatching; queued messages fail with :class:`BatcherStopped`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._stopped = True
        for future in [*self._futures, *(long.future for long in self._longs)]:
            if not future.done():
                future.set_exception(BatcherStopped("the server is shutting down"))
        self._slots, self._chunks, self._futures, self._queued_at, self._longs = [], [], [], [], []
        self._pool.shutdown(wait=True)

    def submit(self, slot: int, chunk: bytes) -> Awaitable[StepResult]:
        """Queue ``chunk`` (bytes of 0/1) for the session in ``slot``; await the result."""
        if not self.enabled:
            return self._single(slot, chunk)
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        if self._task is None or self._task.done():
            future.set_exception(BatcherStopped("the echo batcher is not running"))
            return future
        self._slots.append(slot)
        self._chunks.append(chunk)
        self._futures.append(future)
        self._queued_at.append(time.perf_counter())
        waiter = self._waiter
        if (
            waiter is not None
            and not waiter.done()
            and (self._idle or len(self._futures) >= self.max_sessions)
        ):
            waiter.set_result(None)
        return future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        just_ran = False
        while True:
            if not self._futures and not self._longs:
                just_ran = False
                self._idle, self._waiter = True, loop.create_future()
                await self._waiter
            if not just_ran and self.max_delay_s > 0:
                if self._idle_wait.should_wait() and len(self._futures) < self.max_sessions:
                    self._idle, self._waiter = False, loop.create_future()
                    timer = loop.call_later(self.max_delay_s, _release, self._waiter)
                    await self._waiter
                    timer.cancel()
                self._idle_wait.record(len(self._futures) + len(self._longs) > 1)
            self._waiter = None
            await self._dispatch(loop)
            just_ran = True

    async def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        longs, self._longs = self._longs, []
        n = min(len(self._futures), self.max_sessions - len(longs))
        slots, chunks = self._slots[:n], self._chunks[:n]
        futures, queued_at = self._futures[:n], self._queued_at[:n]
        del self._slots[:n], self._chunks[:n], self._futures[:n], self._queued_at[:n]
        if longs:
            slots = [long.slot for long in longs] + slots
            chunks = [long.rest for long in longs] + chunks
            futures = [long.future for long in longs] + futures
        index = np.array(slots, np.intp)
        state = self.store.states[index]  # fancy indexing: a copy, safe to hand to the thread
        try:
            probs, bits, new_state, started = await loop.run_in_executor(
                self._pool, self._step, chunks, state
            )
        except Exception as exc:  # a failed call fails its messages, not the batcher
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        self.store.states[index] = new_state
        k, steps = len(longs), probs.shape[1]
        for i, future in enumerate(futures):
            if future.done():  # a connection gone meanwhile may have cancelled its future
                continue
            if i >= k and len(chunks[i]) <= steps:
                future.set_result((probs, bits, i))  # the usual case: done in one call
                continue
            long = longs[i] if i < k else _Long(slots[i], future)
            chunk = chunks[i]
            long.probs.append(probs[i, : len(chunk)].copy())
            long.bits.append(bits[i, : len(chunk)].copy())
            if len(chunk) > steps:
                long.rest = chunk[steps:]
                self._longs.append(long)
            else:
                done = np.concatenate(long.probs)[None], np.concatenate(long.bits)[None]
                future.set_result((*done, 0))
        if queued_at:
            self._waits.observe_many(started - np.array(queued_at))
        ECHO_MESSAGES.inc(len(futures) - len(self._longs))

    async def _single(self, slot: int, chunk: bytes) -> StepResult:
        if self._stopped:
            raise BatcherStopped("the server is shutting down")
        queued = time.perf_counter()
        state = self.store.states[slot : slot + 1].copy()
        probs, bits, new_state, started = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._step, [chunk], state, len(chunk)
        )
        self.store.states[slot] = new_state[0]
        self._waits.observe(started - queued)
        ECHO_MESSAGES.inc()
        return probs, bits, 0

    def _step(
        self, chunks: list[bytes], state: np.ndarray, max_steps: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Pad (and cut to ``max_steps``), run ``model.step``, threshold; in the worker thread."""
        started = time.perf_counter()
        sizes = np.fromiter(map(len, chunks), np.int32, len(chunks))
        lengths = np.minimum(sizes, max_steps or self.max_steps)
        width = int(lengths.max())
        if (sizes != width).any():
            chunks = [c[:width].ljust(width, b"\0") for c in chunks]
        bits = np.frombuffer(b"".join(chunks), np.uint8).reshape(len(chunks), width)
        probs, new_state = self.model.step(bits.astype(np.float32), state, lengths)
        elapsed = time.perf_counter() - started
        self._calls.inc()
        self._sizes.observe(len(chunks))
        self._compute.observe(elapsed)
        return probs, (probs > 0.5).view(np.uint8), new_state, started
