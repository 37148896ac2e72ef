"""The echo service: sessions, their eviction sweeper and the batcher, started together.

``EchoService(model, settings)`` is built before the model is loaded; :meth:`start` (after
loading) creates the session store from the model's initial state and starts the batching core
with the echo adapter (``app.services.echo_batching``) and the sweeper; :meth:`stop` closes the
remaining connections with 1001 (going away) and lets what is queued finish. :meth:`advance`
raises domain errors (``GoingAway``, ``DeadlineExceeded``, ``ModelFailed``); a failed message
leaves its session at its last answered message. The sweeper also ends connections idle for
``ECHO_IDLE_TIMEOUT_S`` (their sessions stay resumable), and :class:`ClientLimits` bounds each
client address's sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Protocol

from app.core.config import Settings
from app.core.metrics import ECHO_CUT_OFF
from app.services.batching import Batcher, BatchMetrics
from app.services.client_limits import ClientLimits, client_key
from app.services.echo_batching import EchoResult, EchoSteps, Message
from app.services.echo_sessions import Session, SessionStore
from app.services.errors import GoingAway, IdleTimeout, ServiceError
from app.services.models import EchoModel

log = logging.getLogger(__name__)


class Closable(Protocol):
    """A client connection as the service sees it: something it can end with a domain error."""

    async def end(self, error: ServiceError) -> None: ...


class EchoService:
    """Everything the ``/echo`` route needs: open/resume, advance, reset, detach."""

    def __init__(self, model: EchoModel, settings: Settings) -> None:
        self.model, self.settings = model, settings
        self.store: SessionStore | None = None
        self.batcher: Batcher[Message, EchoResult] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._connections: dict[str, Closable] = {}
        self._clients: dict[str, str] = {}  # session id -> its client's limits key
        self._ending: set[asyncio.Task[None]] = set()
        self.limits = ClientLimits(
            settings.echo_new_sessions_per_s,
            settings.echo_new_sessions_burst,
            settings.echo_max_sessions_per_client,
        )

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
        for conn in list(self._connections.values()):
            with contextlib.suppress(Exception):  # most are gone already (uvicorn sends 1012)
                await conn.end(GoingAway("the server is going away", "shutting_down"))
        for task in list(self._ending):
            task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if batcher is not None:
            await batcher.stop()
        if self.store is not None:
            self.store.clear()

    def open(
        self, session_id: str | None, token: str | None, conn: Closable, client: str | None = None
    ) -> Session:
        """A new session, or the resumed one, for a connection from address ``client``.

        Raises a ``ServiceError`` (full, unknown or busy session, wrong token, per-client limits).
        """
        assert self.store is not None, "EchoService.start() was not awaited"
        key = client_key(client)
        self.limits.admit(key, new=session_id is None)
        try:
            session = (
                self.store.create()
                if session_id is None
                else self.store.resume(session_id, token or "")
            )
        except BaseException:
            self.limits.release(key)
            raise
        self._connections[session.id] = conn
        self._clients[session.id] = key
        return session

    def close(self, session: Session, **log_extra: object) -> None:
        """The connection of ``session`` ended; the session stays resumable until its TTL."""
        self._connections.pop(session.id, None)
        key = self._clients.pop(session.id, None)
        if key is not None:
            self.limits.release(key)
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
        s = self.settings
        interval = min(max(min(s.echo_session_ttl_s, s.echo_idle_timeout_s) / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            self.store.evict_expired()
            self.limits.prune()
            for session in self.store.idle_attached(s.echo_idle_timeout_s):
                self._end_idle(session)

    def _end_idle(self, session: Session) -> None:
        """End an idle session's connection (once); its handler then detaches the session."""
        conn = self._connections.pop(session.id, None)
        if conn is None:
            return
        ECHO_CUT_OFF.labels("idle_timeout").inc()
        error = IdleTimeout(f"no message for {self.settings.echo_idle_timeout_s:g} s")
        task = asyncio.create_task(_end_quietly(conn, error), name="echo-idle-close")
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)


async def _end_quietly(conn: Closable, error: ServiceError) -> None:
    with contextlib.suppress(Exception):  # the client may be gone already
        await conn.end(error)
