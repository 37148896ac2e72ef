"""The echo service: sessions, their eviction sweeper and the batcher, started together.

``EchoService(model, settings)`` is built before the model is loaded; :meth:`start` (after
loading) creates the session store from the model's initial state and starts the batching core
with the echo adapter (``app.services.echo_batching``) and the sweeper; :meth:`stop` closes the
remaining connections with 1001 (going away) and lets what is queued finish. :meth:`advance`
raises domain errors (``GoingAway``, ``DeadlineExceeded``, ``ModelFailed``); a failed message
leaves its session at its last answered message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Protocol

from app.core.config import Settings
from app.services.batching import Batcher, BatchMetrics
from app.services.echo_batching import EchoResult, EchoSteps, Message
from app.services.echo_sessions import Session, SessionStore
from app.services.errors import GoingAway
from app.services.models import EchoModel

log = logging.getLogger(__name__)

GOING_AWAY = 1001


class Closable(Protocol):
    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


class EchoService:
    """Everything the ``/echo`` route needs: open/resume, advance, reset, detach."""

    def __init__(self, model: EchoModel, settings: Settings) -> None:
        self.model, self.settings = model, settings
        self.store: SessionStore | None = None
        self.batcher: Batcher[Message, EchoResult] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._connections: dict[str, Closable] = {}

    @property
    def running(self) -> bool:
        return self.batcher is not None

    @property
    def echo_step(self) -> int:
        return self.model.echo_step

    async def start(self) -> None:
        """Create the state matrix from the model's initial state; start batcher and sweeper."""
        s = self.settings
        initial = await asyncio.to_thread(self.model.initial_state, 1)
        self.store = SessionStore(initial[0], s.echo_max_sessions, s.echo_session_ttl_s)
        # Unbatched, a message is one call however long; batched, long ones go in slices.
        max_steps = 32 if s.batching_enabled else s.echo_max_bits_per_message
        batcher: Batcher[Message, EchoResult] = Batcher(
            "echo",
            EchoSteps(self.model, self.store, max_steps),
            enabled=s.batching_enabled,
            max_rows=s.echo_max_batch_sessions,
            max_delay_s=s.echo_max_queue_delay_ms / 1000,
            timeout_s=s.request_timeout_s,
            metrics=BatchMetrics.for_model(self.model.name),
            unbatched_workers=min(4, os.cpu_count() or 1),
        )
        await batcher.start()
        self.batcher = batcher
        self._sweeper = asyncio.create_task(self._sweep(), name="echo-sweeper")
        log.info(
            "echo service started",
            extra={
                "batching": s.batching_enabled,
                "max_batch_sessions": s.echo_max_batch_sessions,
                "state_dim": self.model.state_dim,
            },
        )

    async def stop(self) -> None:
        """Close open connections (1001), stop the sweeper and the batcher, forget sessions."""
        batcher, self.batcher = self.batcher, None
        for ws in list(self._connections.values()):
            with contextlib.suppress(Exception):  # most are gone already (uvicorn sends 1012)
                await ws.close(GOING_AWAY, "shutting_down: the server is going away")
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if batcher is not None:
            await batcher.stop()
        if self.store is not None:
            self.store.clear()

    def open(self, session_id: str | None, token: str | None, conn: Closable) -> Session:
        """A new session, or the resumed one; raises ``SessionRefused`` with the close reason."""
        assert self.store is not None, "EchoService.start() was not awaited"
        session = (
            self.store.create()
            if session_id is None
            else self.store.resume(session_id, token or "")
        )
        self._connections[session.id] = conn
        return session

    def close(self, session: Session, **log_extra: object) -> None:
        """The connection of ``session`` ended; the session stays resumable until its TTL."""
        self._connections.pop(session.id, None)
        if self.store is not None:
            self.store.detach(session, **log_extra)

    async def advance(self, session: Session, chunk: bytes) -> EchoResult:
        """Advance ``session`` by one message's bits → (probabilities, predicted bits).

        All or nothing: if it fails (or the caller is cancelled), the session's state stays as
        it was after its last answered message.
        """
        if self.batcher is None or self.store is None:
            raise GoingAway("the echo service is not running", "shutting_down")
        message = Message(self.store, session.slot, chunk)
        try:
            return await self.batcher.submit(message)
        except BaseException:
            message.undo()
            raise

    def reset(self, session: Session) -> None:
        assert self.store is not None
        self.store.reset(session)

    async def _sweep(self) -> None:
        assert self.store is not None
        interval = min(max(self.settings.echo_session_ttl_s / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            self.store.evict_expired()
