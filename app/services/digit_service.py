"""Digit inference for the API: a Triton-style dynamic batcher in front of the digit model.

With batching on, every request (one image or many) joins a FIFO queue and one batcher task
forms model calls of up to ``digit_max_batch_size`` rows, run one at a time on a dedicated
worker thread; each request gets exactly its own rows back. A request's rows are never split
across calls unless the request alone is larger than a call may be.

When to dispatch. A model call costs a fixed ~0.3–1 ms plus a small per-row cost, so throughput
comes from rows per call, while latency suffers from any wait. The batcher therefore

* dispatches at once whenever a call has just finished and requests are waiting: they arrived
  while the model was busy, so they have already waited longer than the queue delay would make
  them, and the pipeline stays full (continuous batching; under load, batches grow by themselves
  to the number of requests that arrive during one call);
* when the pipeline was idle, holds the first request up to ``digit_max_queue_delay_ms`` (from
  its arrival) so that concurrent clients can join it — unless ``digit_max_batch_size`` rows are
  queued first, which dispatches immediately. When recent idle-time batches all went out alone,
  it stops waiting (``app.services.batching.IdleWaitPolicy``).

The batch is concatenated and the metrics are recorded on the worker thread, keeping the event
loop (which also parses requests) free; one watchdog task enforces ``request_timeout_s`` (504)
for all queued and running requests. With batching off, every request is its own model call on
a small thread pool (TensorFlow releases the GIL while it computes).

XLA (``digit_xla``, on by default): the SavedModel's signature wrapped in a ``jit_compile``
function runs 1.5–3× faster on CPU at every batch size and on one thread (leaving the other core
to the event loop). XLA compiles once per input shape, so calls are padded with zero images to the
next power of two (1, 2, 4 … then the largest call; coarser steps waste too much: under load
the batches settle at about half the clients and a 33-row batch would compute 64), each compiled
in ``start()`` before the service reports ready (~0.4–1 s each). The environment variable
``TF_XLA_FLAGS=--tf_xla_persistent_cache_directory=DIR`` lets later starts reuse them.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any

import numpy as np
import tensorflow as tf

from app.api.errors import ApiError
from app.core.config import Settings
from app.core.metrics import BATCH_SIZE, COMPUTE_TIME, INFERENCE_CALLS, QUEUE_WAIT
from app.services.batching import IdleWaitPolicy, observe_many
from app.services.models import DigitModel
from modelspec.contract import DIGIT_INPUT, DIGIT_OUTPUT, DIGIT_SIGNATURE, IMAGE_SIZE

log = logging.getLogger(__name__)

# (images [n, 28, 28], the future of its probabilities, enqueue time on time.monotonic())
_Pending = tuple[np.ndarray, "asyncio.Future[np.ndarray]", float]


class DigitService:
    """Queue, batch and run digit predictions; ``start()`` after the model loaded, ``stop()``."""

    def __init__(self, model: DigitModel, settings: Settings) -> None:
        self.model = model
        self.batching = settings.batching_enabled
        self.max_rows = settings.digit_max_batch_size
        self.max_delay = settings.digit_max_queue_delay_ms / 1000.0
        self.timeout = settings.request_timeout_s
        self.xla = settings.digit_xla
        largest = self.max_rows if self.batching else settings.max_batch_images
        self.buckets = [1 << i for i in range(largest.bit_length()) if 1 << i < largest] + [largest]
        self._compiled: Any = None  # the XLA function, once built
        self._state = "new"  # new → running → stopping → stopped
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()  # something was queued
        self._full = asyncio.Event()  # max_rows are queued
        self._drained = asyncio.Event()  # no request in predict() while stopping
        self._in_flight = 0
        self._running: list[_Pending] = []  # the batch in the model now
        self._idle_wait = IdleWaitPolicy()
        self._tasks: list[asyncio.Task[None]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._calls = INFERENCE_CALLS.labels(model.name)
        self._rows = BATCH_SIZE.labels(model.name)
        self._waits = QUEUE_WAIT.labels(model.name)
        self._compute = COMPUTE_TIME.labels(model.name)

    @property
    def model_ref(self) -> dict[str, Any]:
        return self.model.ref

    @property
    def ready(self) -> bool:
        return self._state == "running"

    async def start(self) -> None:
        """Start the worker thread(s), compile (XLA), then start the batcher and its watchdog."""
        workers = 1 if self.batching else min(8, 2 * (os.cpu_count() or 1))
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="digit-model")
        if self.xla:
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._compile)
            except Exception:  # e.g. a TensorFlow build without XLA: serve the plain SavedModel
                log.warning("XLA compilation failed; running without XLA", exc_info=True)
        if self.batching:
            self._tasks = [
                asyncio.create_task(self._batch_loop(), name="digit-batcher"),
                asyncio.create_task(self._watchdog(), name="digit-watchdog"),
            ]
        self._state = "running"
        log.info("digit service started", extra={"batching": self.batching, "workers": workers})

    async def stop(self) -> None:
        """Refuse new requests (503), let the ones in flight finish, then stop the workers."""
        if self._state == "running":
            self._state = "stopping"
            if self._in_flight:
                with suppress(TimeoutError):
                    async with asyncio.timeout(self.timeout + 1.0):
                        await self._drained.wait()
        self._state = "stopped"
        for task in self._tasks:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def predict(self, images: np.ndarray) -> np.ndarray:
        """float32 [n, 28, 28] in [0, 1] → probabilities float32 [n, 10] (rows in order).

        Raises ``ApiError`` 503 ``not_ready`` before ``start()`` or once stopping, and 504
        ``timeout`` past ``request_timeout_s``.
        """
        if self._state != "running":
            raise ApiError(503, "not_ready", "the digit model is not ready (loading or stopping)")
        self._in_flight += 1
        try:
            if not self.batching:
                async with asyncio.timeout(self.timeout):
                    return await asyncio.get_running_loop().run_in_executor(
                        self._executor, self._run, [images], [time.monotonic()]
                    )
            if len(images) <= self.max_rows:
                return await self._enqueue(images)  # the watchdog enforces the deadline
            step = self.max_rows  # larger than one call may be: split, in order
            parts = [self._enqueue(images[i : i + step]) for i in range(0, len(images), step)]
            results = await asyncio.gather(*parts, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            return np.concatenate(results)
        except TimeoutError:
            raise self._timeout_error() from None
        finally:
            self._in_flight -= 1
            if not self._in_flight and self._state == "stopping":
                self._drained.set()

    def _timeout_error(self) -> ApiError:
        return ApiError(504, "timeout", f"inference did not finish within {self.timeout:g} s")

    async def _watchdog(self) -> None:
        """Fail batched requests past ``request_timeout_s`` with 504, at most a tick late.

        One timer for all requests instead of one per request (~6 µs of event-loop CPU each).
        """
        tick = min(0.1, self.timeout / 10)
        while True:
            await asyncio.sleep(tick)
            expired = time.monotonic() - self.timeout
            for entries in (self._running, self._queue):
                for _, future, enqueued in entries:  # oldest first
                    if enqueued > expired:
                        break
                    if not future.done():
                        future.set_exception(self._timeout_error())

    def _enqueue(self, images: np.ndarray) -> asyncio.Future[np.ndarray]:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.append((images, future, time.monotonic()))
        self._queued_rows += len(images)
        self._wakeup.set()
        if self._queued_rows >= self.max_rows:
            self._full.set()
        return future

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        busy = False  # the previous iteration ran a model call: what is queued arrived meanwhile
        while True:
            if not self._queue:
                busy = False
                self._wakeup.clear()
                await self._wakeup.wait()
            if not busy and self.max_delay > 0:
                await self._wait_for_company(loop)
            pending = self._take()
            busy = bool(pending)
            if not pending:
                continue
            self._running = pending
            try:
                probs = await loop.run_in_executor(
                    self._executor, self._run, [p[0] for p in pending], [p[2] for p in pending]
                )
            except Exception as exc:  # hand the failure to every request of the batch
                log.exception("digit model call failed", extra={"rows": self._rows_of(pending)})
                for _, future, _ in pending:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                self._running = []
            offset = 0
            for images, future, _ in pending:
                n = len(images)
                if not future.done():  # not timed out meanwhile
                    future.set_result(probs[offset : offset + n])
                offset += n

    async def _wait_for_company(self, loop: asyncio.AbstractEventLoop) -> None:
        """Idle pipeline: hold the first request up to max_delay for others, unless the batch is
        full or recent idle waits show nobody comes (then only every 128th wait probes)."""
        if self._idle_wait.should_wait() and self._queued_rows < self.max_rows:
            self._full.clear()
            waited = time.monotonic() - self._queue[0][2]
            with suppress(TimeoutError):
                async with asyncio.timeout_at(loop.time() + self.max_delay - waited):
                    await self._full.wait()
        self._idle_wait.record(len(self._queue) > 1)

    def _take(self) -> list[_Pending]:
        """Whole requests from the queue's head, up to ``max_rows`` rows (FIFO)."""
        pending: list[_Pending] = []
        rows = 0
        queue = self._queue
        while queue:
            images, future, _ = item = queue[0]
            n = len(images)
            if not future.done() and pending and rows + n > self.max_rows:
                break
            queue.popleft()
            self._queued_rows -= n
            if not future.done():  # skip requests that timed out while queued
                pending.append(item)
                rows += n
        if self._queued_rows < self.max_rows:
            self._full.clear()
        return pending

    @staticmethod
    def _rows_of(pending: list[_Pending]) -> int:
        return sum(len(p[0]) for p in pending)

    def _compile(self) -> None:
        """Build the XLA function and compile it for every bucket size (on a worker thread)."""
        signature = self.model.signatures[DIGIT_SIGNATURE]
        spec = tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE], tf.float32)

        @tf.function(input_signature=[spec], jit_compile=True)
        def compiled(images: tf.Tensor) -> tf.Tensor:
            return signature(**{DIGIT_INPUT: images})[DIGIT_OUTPUT]

        concrete = compiled.get_concrete_function()  # calling it skips ~0.4 ms of dispatch
        start = time.monotonic()

        def warm(size: int) -> None:
            concrete(tf.zeros((size, IMAGE_SIZE, IMAGE_SIZE), tf.float32))

        # Compiling is single-threaded C++ that releases the GIL: use every core for it.
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(warm, reversed(self.buckets)))  # the slowest (largest) first
        self._compiled = concrete
        log.info(
            "digit model compiled with XLA",
            extra={"batch_sizes": self.buckets, "seconds": round(time.monotonic() - start, 2)},
        )

    def _infer(self, images: np.ndarray) -> np.ndarray:
        """The model on ``images``: XLA-compiled, padded to the next bucket size, if enabled."""
        n = len(images)
        i = bisect.bisect_left(self.buckets, n)
        if self._compiled is None or i == len(self.buckets):
            return self.model.predict(images)
        size = self.buckets[i]
        if size != n:
            images = np.concatenate([images, np.zeros((size - n, *images.shape[1:]), np.float32)])
        return self._compiled(tf.constant(images)).numpy()[:n]

    def _run(self, parts: list[np.ndarray], enqueued: list[float]) -> np.ndarray:
        """One model call over ``parts`` concatenated (runs on a worker thread)."""
        images = parts[0] if len(parts) == 1 else np.concatenate(parts)
        start = time.monotonic()
        probs = self._infer(images)
        self._compute.observe(time.monotonic() - start)
        self._calls.inc()
        self._rows.observe(len(images))
        observe_many(self._waits, start - np.array(enqueued))
        return probs
