"""Uploaded pictures → model input, at most ``limit`` at once (``MAX_CONCURRENT_UPLOADS``).

Decoding a picture costs up to ~80 MB and ~0.4 s of CPU (``tests/hostile_images.py``), so the
number decoded at once is bounded: the next upload is refused at once with ``Overloaded``
(``too_many_uploads``, HTTP 503 with ``Retry-After``) instead of queueing memory. Decoding runs in
the limiter's own threads, and a slot is freed only when the decoding has really finished, even
if the request that started it is gone; then the allocator gives the picture's memory back
(``malloc_trim``), so the process's RSS returns to where it was.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress

import numpy as np

from app.core.errors import InvalidInput, Overloaded, TooLarge, UnsupportedMedia
from modelspec.imaging import ImageError, preprocess_digit

log = logging.getLogger(__name__)

_DOMAIN_ERRORS = {413: TooLarge, 415: UnsupportedMedia}
_malloc_trim = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)


def _preprocess(data: bytes, max_pixels: int, max_side: int) -> np.ndarray:
    """``preprocess_digit`` in a worker thread, then the allocator hands the picture's pages back
    to the OS. A refusal is re-raised without its traceback, whose frames would otherwise keep
    the decoder's objects alive (past the trim) until the next garbage collection."""
    failure: ImageError | None = None
    try:
        return preprocess_digit(data, max_pixels, max_side)
    except ImageError as exc:
        failure = type(exc)(str(exc))
    finally:
        if _malloc_trim is not None:  # glibc
            _malloc_trim(0)
    assert failure is not None
    raise failure


class UploadLimiter:
    """Run ``preprocess_digit`` in at most ``limit`` threads; refuse uploads beyond that."""

    def __init__(self, limit: int, max_pixels: int, max_side: int) -> None:
        self.limit, self.max_pixels, self.max_side = limit, max_pixels, max_side
        self.active = 0
        self._pool = ThreadPoolExecutor(limit, thread_name_prefix="upload")

    async def preprocess(self, data: bytes) -> np.ndarray:
        """Image file bytes → float32 [28, 28]; a domain error for a bad picture or when full."""
        if self.active >= self.limit:
            raise Overloaded(
                f"{self.limit} uploaded pictures are being processed; retry in a second",
                code="too_many_uploads",
            )
        loop = asyncio.get_running_loop()

        def release(_: Future) -> None:
            with suppress(RuntimeError):  # the loop is closed: nobody is counting any more
                loop.call_soon_threadsafe(self._release)

        self.active += 1
        job = self._pool.submit(_preprocess, data, self.max_pixels, self.max_side)
        job.add_done_callback(release)
        try:
            return await asyncio.wrap_future(job)
        except ImageError as exc:
            raise _DOMAIN_ERRORS.get(exc.status, InvalidInput)(str(exc), code=exc.code) from None
        except Exception:  # never a 500 for a bad picture; the log keeps the cause
            log.exception("image preprocessing failed")
            raise InvalidInput("the picture could not be processed", code="invalid_image") from None

    def _release(self) -> None:
        self.active -= 1
