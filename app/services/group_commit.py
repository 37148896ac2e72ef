"""Group commit: the echo steps answered in one event-loop turn go to Redis in one round trip.

One batched model call answers many sessions at once: their handlers wake up in the same turn
of the event loop, and each hands its step to :meth:`GroupCommit.store` before replying. The
first one schedules a flush for the end of that turn, so the whole call's steps are stored by
one script call (``RedisSessions.commit``), and every reply waits for it: durable before
acknowledged, at one Redis round trip per model call instead of one per message.
"""

from __future__ import annotations

import asyncio

from app.core.metrics import ECHO_STORE_WRITES
from app.services.errors import Conflict
from app.services.redis_sessions import RedisSessions, Step, StoreUnavailable


class LeaseLost(Conflict):
    """Another connection attached the session meanwhile (this one's fence is stale)."""

    code = "lease_lost"


class GroupCommit:
    """Collect :class:`Step` s for one event-loop turn, store them together."""

    def __init__(self, sessions: RedisSessions) -> None:
        self.sessions = sessions
        self._pending: list[tuple[Step, asyncio.Future[bool]]] = []
        self._writes: set[asyncio.Task[None]] = set()

    async def store(self, step: Step) -> None:
        """Return once ``step`` is stored; ``StoreUnavailable`` or :class:`LeaseLost` if not."""
        loop = asyncio.get_running_loop()
        if not self._pending:
            loop.call_soon(self._flush)
        future: asyncio.Future[bool] = loop.create_future()
        self._pending.append((step, future))
        if not await future:
            raise LeaseLost(
                "the session was attached by another connection; this one is closed", "lease_lost"
            )

    async def drain(self) -> None:
        """Wait for the writes in flight (at shutdown)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.create_task(self._write(batch), name="echo-group-commit")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, batch: list[tuple[Step, asyncio.Future[bool]]]) -> None:
        ECHO_STORE_WRITES.observe(len(batch))
        try:
            stored = await self.sessions.commit([step for step, _ in batch])
        except StoreUnavailable as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # retrieved even if its handler is gone
            return
        for (_, future), ok in zip(batch, stored, strict=True):
            if not future.done():
                future.set_result(ok)
