"""The batching core: a Triton-style dynamic batcher that both models use through an adapter.

Items (a digit request's images, an echo message) join one FIFO queue; one dispatch task forms
model calls of up to ``max_rows`` rows and runs them one at a time on a dedicated worker thread.
The :class:`Adapter` says what a call is: ``prepare`` gathers the items' inputs (event loop),
``compute`` runs the model (worker thread), ``finish`` hands each item its result (event loop) or
:data:`AGAIN` for an item that needs another call (it then goes first into the next one). An
adapter may also ``settle`` a call's results (a coroutine, e.g. storing them) before any item is
answered, and may say a call's ``shape`` (what its cost depends on, for the inline policy).

When to dispatch. A model call costs a fixed part plus a small per-row part, so throughput comes
from rows per call and latency suffers from any wait. The batcher therefore

* dispatches at once whenever a call has just finished and items are waiting: they arrived while
  the model was busy (continuous batching: under load, batches grow by themselves);
* when the pipeline was idle, holds the first item up to ``max_delay_s`` (from its arrival) so
  that concurrent clients can join, unless ``max_rows`` rows are queued first; when recent idle
  batches all went out alone it stops waiting (:class:`IdleWaitPolicy`).

Where a call runs. A call whose shape has been taking at most ``inline_budget_s`` runs on the
event loop, saving the thread hand-off and the GIL contention that comes with it; others run on
the dedicated model thread (:class:`InlinePolicy`).

Every item has a deadline (``timeout_s`` after it was submitted): one watchdog task fails the
queued and running items past it with :class:`DeadlineExceeded`, at most a tick late (one timer
for all items instead of one each). A call that raises fails only its own items
(:class:`ModelFailed`); the batcher goes on. ``stop()`` refuses new items
(:class:`GoingAway`), lets the queued and running ones finish (up to their deadline), then
stops. With batching off, every item is its own call on a small thread pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from app.core.errors import DeadlineExceeded, GoingAway, ModelFailed
from app.core.metrics import BATCH_SIZE, COMPUTE_TIME, INFERENCE_CALLS, QUEUE_WAIT
from app.services.batching.policy import IdleWaitPolicy, InlinePolicy

log = logging.getLogger(__name__)

T = TypeVar("T")  # an item as the service submits it
R = TypeVar("R")  # what the item's future resolves to
AGAIN: Any = object()  # ``finish`` result: the item needs another model call


class Adapter(Protocol[T, R]):
    """What one model call over a list of items means, for one model."""

    def rows(self, item: T) -> int:
        """How many of a call's ``max_rows`` the item takes."""
        ...

    def prepare(self, items: list[T]) -> Any:
        """The call's input (event loop: may read shared state such as the session store)."""
        ...

    def compute(self, payload: Any) -> Any:
        """The model call (worker thread)."""
        ...

    def finish(self, items: list[T], output: Any, done: list[bool]) -> Sequence[R]:
        """Each item's result, an exception that fails it, or :data:`AGAIN` (event loop);
        ``done[i]``: item i has already been answered (deadline) and must not change state."""
        ...

    # Optional: ``async def settle(items, results) -> results``, awaited after ``finish`` and
    # before any item is answered (the echo adapter stores the new states there);
    # ``shape(payload) -> Hashable``: calls of one shape cost about the same (default: the
    # call's rows rounded up to a power of two).


@dataclass(frozen=True)
class BatchMetrics:
    """The model's labelled metric children, observed on the worker thread."""

    calls: Any
    rows: Any
    waits: Any
    compute: Any

    @classmethod
    def for_model(cls, name: str) -> BatchMetrics:
        return cls(
            INFERENCE_CALLS.labels(name),
            BATCH_SIZE.labels(name),
            QUEUE_WAIT.labels(name),
            COMPUTE_TIME.labels(name),
        )


class _Job(Generic[T, R]):
    __slots__ = ("deadline", "enqueued", "future", "item", "rows", "started")

    def __init__(self, item: T, rows: int, future: asyncio.Future[R], timeout: float) -> None:
        self.item, self.rows, self.future = item, rows, future
        self.enqueued = time.monotonic()
        self.deadline, self.started = self.enqueued + timeout, False


class Batcher(Generic[T, R]):
    """Queue items and run them through ``adapter`` in batches; ``start()``, then ``stop()``."""

    def __init__(
        self,
        name: str,
        adapter: Adapter[T, R],
        *,
        enabled: bool,
        max_rows: int,
        max_delay_s: float,
        timeout_s: float,
        metrics: BatchMetrics | None = None,
        unbatched_workers: int | None = None,
        inline_budget_s: float = 0.0,
    ) -> None:
        self.name, self.adapter, self.enabled = name, adapter, enabled  # name: "digit", "echo"
        self.max_rows, self.max_delay_s, self.timeout_s = max_rows, max_delay_s, timeout_s
        self.metrics = metrics or BatchMetrics.for_model(name)
        workers = unbatched_workers or min(8, 2 * (os.cpu_count() or 1))
        self.executor = ThreadPoolExecutor(1 if enabled else workers, f"{name}-model")
        self._state = "new"  # new → running → stopping → stopped
        self._queue: deque[_Job[T, R]] = deque()
        self._queued_rows = 0
        self._running: list[_Job[T, R]] = []
        self._unbatched = 0  # items in flight with batching off
        self._wakeup = asyncio.Event()  # something was queued
        self._full = asyncio.Event()  # max_rows are queued
        self._idle = asyncio.Event()  # nothing queued or running (for the drain)
        self._idle_wait = IdleWaitPolicy()
        self._tasks: list[asyncio.Task[None]] = []
        self._settle = getattr(adapter, "settle", None)
        self._shape = getattr(adapter, "shape", None)
        self._inline = InlinePolicy(inline_budget_s)

    @property
    def running(self) -> bool:
        return self._state == "running"

    async def start(self) -> None:
        if self.enabled:
            self._tasks = [
                asyncio.create_task(self._dispatch_loop(), name=f"{self.name}-batcher"),
                asyncio.create_task(self._watchdog(), name=f"{self.name}-watchdog"),
            ]
        self._state = "running"

    async def stop(self) -> None:
        """Refuse new items, let those in flight finish (until their deadline), then stop."""
        if self._state == "running":
            self._state = "stopping"
            if self._busy():
                self._idle.clear()
                with suppress(TimeoutError):
                    async with asyncio.timeout(self.timeout_s + 1.0):
                        await self._idle.wait()
        self._state = "stopped"
        for task in self._tasks:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        for job in [*self._running, *self._queue]:
            _fail(job, GoingAway(f"the {self.name} model is shutting down", "shutting_down"))
        self._queue.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, item: T) -> Awaitable[R]:
        """Queue ``item``; the awaitable gives its result or raises a ``ServiceError``."""
        loop = asyncio.get_running_loop()
        if self._state != "running":
            future: asyncio.Future[R] = loop.create_future()
            error = GoingAway(f"the {self.name} model is not running", "shutting_down")
            future.set_exception(error)
            return future
        job = _Job(item, self.adapter.rows(item), loop.create_future(), self.timeout_s)
        if not self.enabled:
            return self._unbatched_call(job)
        self._queue.append(job)
        self._queued_rows += job.rows
        self._wakeup.set()
        if self._queued_rows >= self.max_rows:
            self._full.set()
        return job.future

    # --- batched ---------------------------------------------------------------------------

    def _busy(self) -> bool:
        return bool(self._queue or self._running or self._unbatched)

    async def _dispatch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        busy = False  # a call just finished: what is queued arrived meanwhile
        while True:
            if not self._queue:
                busy = False
                if self._state == "stopping":
                    self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
            if not busy and self.max_delay_s > 0:
                await self._wait_for_company(loop)
            jobs = self._take()
            busy = bool(jobs)
            if jobs:
                await self._call(loop, jobs)

    async def _wait_for_company(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._idle_wait.should_wait() and self._queued_rows < self.max_rows:
            self._full.clear()
            waited = time.monotonic() - self._queue[0].enqueued
            with suppress(TimeoutError):
                async with asyncio.timeout_at(loop.time() + self.max_delay_s - waited):
                    await self._full.wait()
        self._idle_wait.record(len(self._queue) > 1)

    def _take(self) -> list[_Job[T, R]]:
        """Whole items from the queue's head, up to ``max_rows`` rows; answered ones dropped."""
        jobs: list[_Job[T, R]] = []
        rows, queue = 0, self._queue
        while queue:
            job = queue[0]
            live = not job.future.done()
            if live and jobs and rows + job.rows > self.max_rows:
                break
            queue.popleft()
            self._queued_rows -= job.rows
            if live:
                jobs.append(job)
                rows += job.rows
        if self._queued_rows < self.max_rows:
            self._full.clear()
        return jobs

    async def _call(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job[T, R]]) -> None:
        """One model call over ``jobs``; items answered AGAIN go back to the queue's head."""
        self._running = jobs
        items = [job.item for job in jobs]
        try:
            payload = self.adapter.prepare(items)
            shape = self._call_shape(payload, jobs)
            if self._inline.inline(shape):
                output = self._compute(payload, jobs, shape)
            else:
                output = await loop.run_in_executor(
                    self.executor, self._compute, payload, jobs, shape
                )
            done = [job.future.done() for job in jobs]
            results = self.adapter.finish(items, output, done)
            if self._settle is not None:
                results = await self._settle(items, results)
        except Exception as exc:  # fail this call's items, not the batcher
            self._fail_call(jobs, exc)
            return
        finally:
            self._running = []
        again = [job for job, result in zip(jobs, results, strict=True) if result is AGAIN]
        for job, result in zip(jobs, results, strict=True):
            if result is AGAIN or job.future.done():
                continue
            if isinstance(result, Exception):  # this item failed, the others did not
                _fail(job, result)
            else:
                job.future.set_result(result)
        for job in reversed(again):
            if not job.future.done():
                self._queue.appendleft(job)
                self._queued_rows += job.rows
        if again:
            self._wakeup.set()

    def _call_shape(self, payload: Any, jobs: list[_Job[T, R]]) -> Any:
        if self._shape is not None:
            return self._shape(payload)
        return 1 << max(0, sum(job.rows for job in jobs) - 1).bit_length()

    def _compute(self, payload: Any, jobs: list[_Job[T, R]], shape: Any = None) -> Any:
        """The adapter's model call plus the call's metrics (model thread or event loop)."""
        started = time.monotonic()
        output = self.adapter.compute(payload)
        seconds = time.monotonic() - started
        if shape is not None:  # batched
            self._inline.record(shape, seconds)
        m = self.metrics
        m.compute.observe(seconds)
        m.calls.inc()
        m.rows.observe(sum(job.rows for job in jobs))
        first = [job.enqueued for job in jobs if not job.started]
        for job in jobs:
            job.started = True
        if first:
            m.waits.observe_many(started - np.array(first))
        return output

    def _fail_call(self, jobs: list[_Job[T, R]], exc: Exception) -> None:
        log.error(
            f"{self.name} model call failed",
            exc_info=(type(exc), exc, exc.__traceback__),
            extra={"items": len(jobs), "rows": sum(job.rows for job in jobs)},
        )
        failed = ModelFailed(f"the {self.name} model call failed")
        failed.__cause__ = exc
        for job in jobs:
            _fail(job, failed)

    async def _watchdog(self) -> None:
        """Fail items past their deadline with DeadlineExceeded, at most a tick late."""
        tick = min(0.1, self.timeout_s / 10)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for job in self._running:
                if job.deadline <= now:
                    _fail(job, self._deadline_error())
            for job in self._queue:  # oldest first
                if job.deadline > now:
                    break
                _fail(job, self._deadline_error())

    def _deadline_error(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"inference did not finish within {self.timeout_s:g} s")

    # --- unbatched -------------------------------------------------------------------------

    async def _unbatched_call(self, job: _Job[T, R]) -> R:
        """Batching off: the item alone, as many calls as it needs, on the thread pool."""
        loop = asyncio.get_running_loop()
        self._unbatched += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    payload = self.adapter.prepare([job.item])
                    try:
                        future = loop.run_in_executor(self.executor, self._compute, payload, [job])
                        output = await future
                        (result,) = self.adapter.finish([job.item], output, [False])
                        if self._settle is not None:
                            (result,) = await self._settle([job.item], [result])
                    except Exception as exc:
                        self._fail_call([job], exc)
                        return await job.future
                    if isinstance(result, Exception):
                        raise result
                    if result is not AGAIN:
                        return result
        except TimeoutError:
            raise self._deadline_error() from None
        finally:
            self._unbatched -= 1
            if not self._busy() and self._state == "stopping":
                self._idle.set()


def _fail(job: _Job[Any, Any], exc: Exception) -> None:
    if not job.future.done():
        job.future.set_exception(exc)
        job.future.exception()  # retrieved: no "never retrieved" warning if nobody awaits it
