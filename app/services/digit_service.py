"""Digit inference: the batching core in front of the digit model (``DigitService.predict``).

Every request (one image or many) is one item of the core's queue (``app.services.batching``);
a model call concatenates the rows of up to ``digit_max_batch_size`` of them, and each request
gets exactly its own rows back. A request's rows are never split across calls unless the request
alone is larger than a call may be (it is then cut into calls, in order). The model wrapper pads
each call to an XLA-compiled size (``DigitModel.infer``); concatenation and the call's metrics
run on the worker thread, keeping the event loop free.

The service speaks no HTTP: it raises ``NotReady`` (loading or stopping), ``DeadlineExceeded``
(past ``request_timeout_s``) and ``ModelFailed`` (the call raised, or returned non-finite
probabilities); ``app.api.errors`` maps them to statuses.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from app.core.config import Settings
from app.core.errors import ModelFailed, NotReady
from app.services.batching import Batcher, BatchMetrics
from app.services.models import DigitModel

log = logging.getLogger(__name__)


class DigitRows:
    """The digit adapter of the batching core: an item is a float32 [n, 28, 28] array."""

    def __init__(self, model: DigitModel) -> None:
        self.model = model

    def rows(self, images: np.ndarray) -> int:
        return len(images)

    def prepare(self, items: list[np.ndarray]) -> list[np.ndarray]:
        return items

    def compute(self, parts: list[np.ndarray]) -> tuple[np.ndarray, bool]:
        """The model call, and whether every probability is finite (checked once per call)."""
        probs = self.model.infer(parts[0] if len(parts) == 1 else np.concatenate(parts))
        return probs, bool(np.isfinite(probs).all())

    def finish(
        self, items: list[np.ndarray], output: tuple[np.ndarray, bool], done: list[bool]
    ) -> list[Any]:
        """Each request's own rows; ``ModelFailed`` for one with a non-finite probability."""
        probs, finite = output
        out: list[Any] = []
        offset = 0
        for images in items:
            n = len(images)
            rows = probs[offset : offset + n]
            out.append(rows if finite or np.isfinite(rows).all() else _non_finite(n))
            offset += n
        return out


def _non_finite(rows: int) -> ModelFailed:
    log.error("digit model returned non-finite probabilities", extra={"rows": rows})
    return ModelFailed("the digit model returned non-finite probabilities")


class DigitService:
    """Queue, batch and run digit predictions; ``start()`` after the model loaded, ``stop()``."""

    def __init__(self, model: DigitModel, settings: Settings) -> None:
        self.model = model
        self.max_rows = settings.digit_max_batch_size
        self.xla = settings.digit_xla
        self.batching = settings.batching_enabled
        self.largest_call = self.max_rows if self.batching else settings.max_batch_images
        self.batcher: Batcher[np.ndarray, np.ndarray] = Batcher(
            "digit",
            DigitRows(model),
            enabled=settings.batching_enabled,
            max_rows=self.max_rows,
            max_delay_s=settings.digit_max_queue_delay_ms / 1000.0,
            timeout_s=settings.request_timeout_s,
            metrics=BatchMetrics.for_model(model.name),
            inline_budget_s=settings.inline_call_budget_ms / 1000,
        )
        self._ready = False
        self.in_flight = 0  # requests between predict() and their answer

    @property
    def model_ref(self) -> dict[str, Any]:
        return self.model.ref

    @property
    def ready(self) -> bool:
        return self._ready and self.batcher.running

    async def start(self) -> None:
        """Compile the XLA batch sizes (if enabled) on the model thread, then start batching."""
        if self.xla:
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(
                    self.batcher.executor, self.model.compile_xla, self.largest_call
                )
            except Exception:  # e.g. a TensorFlow build without XLA: serve the plain SavedModel
                log.warning("XLA compilation failed; running without XLA", exc_info=True)
        await self.batcher.start()
        self._ready = True
        log.info("digit service started", extra={"batching": self.batching})

    async def stop(self) -> None:
        """Refuse new requests (503), let the ones in flight finish, then stop the worker."""
        self._ready = False
        await self.batcher.stop()

    async def predict(self, images: np.ndarray) -> np.ndarray:
        """float32 [n, 28, 28] in [0, 1] → probabilities float32 [n, 10] (rows in order).

        Raises ``NotReady`` before ``start()`` or once stopping, ``DeadlineExceeded`` past
        ``request_timeout_s`` and ``ModelFailed`` when the model call fails.
        """
        if not self._ready:
            raise NotReady("the digit model is not ready (loading or stopping)")
        self.in_flight += 1
        try:
            return await self._predict(images)
        finally:
            self.in_flight -= 1

    async def _predict(self, images: np.ndarray) -> np.ndarray:
        step = self.max_rows
        if len(images) <= step or not self.batching:
            probs = await self.batcher.submit(images)
        else:  # larger than one call may be: split, in order
            parts = [self.batcher.submit(images[i : i + step]) for i in range(0, len(images), step)]
            results = await asyncio.gather(*parts, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            probs = np.concatenate(results)
        return probs
