"""The echo service: sessions, their eviction sweeper and the batcher, started together.

``EchoService(model, settings)`` is built before the model is loaded; :meth:`start` (after
loading) creates the session store from the model's initial state and starts the batching core
with the echo adapter (``app.services.echo_batching``) and the sweeper; :meth:`stop` closes the
remaining connections with 1001 (going away) and lets what is queued finish. :meth:`advance`
raises domain errors (``GoingAway``, ``DeadlineExceeded``, ``ModelFailed``); a failed message
leaves its session at its last answered message. The sweeper also ends connections idle for
``ECHO_IDLE_TIMEOUT_S`` (their sessions stay resumable), and :class:`ClientLimits` bounds each
client address's sessions.

With ``ECHO_STORE_URL=redis://...`` (:class:`RedisSessions`) sessions live in Redis: :meth:`open`
creates or attaches them there (taking the attach lease), the batcher stores every model call's
steps before answering them (``EchoSteps.settle``: one round trip per call), a keeper task renews
the leases of this process's attached sessions and ends the connections whose lease was taken
over, and :meth:`close` / :meth:`stop` give leases back so the sessions resume elsewhere at once.
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
from app.services.echo_batching import Echoed, EchoSteps, Message
from app.services.echo_sessions import Session, SessionStore
from app.services.errors import GoingAway, IdleTimeout, NotFound, ServiceError
from app.services.models import EchoModel
from app.services.redis_sessions import LeaseLost, RedisSessions, Step

log = logging.getLogger(__name__)


class Closable(Protocol):
    """A client connection as the service sees it: something it can end with a domain error."""

    async def end(self, error: ServiceError) -> None: ...


class EchoService:
    """Everything the ``/echo`` route needs: open/resume, advance, reset, detach."""

    def __init__(self, model: EchoModel, settings: Settings) -> None:
        self.model, self.settings = model, settings
        self.store: SessionStore | None = None
        self.batcher: Batcher[Message, Echoed] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._connections: dict[str, Closable] = {}
        self._clients: dict[str, str] = {}  # session id -> its client's limits key
        self._ending: set[asyncio.Task[None]] = set()
        self.durable = durable_store(settings)
        self._keeper: asyncio.Task[None] | None = None
        self._releasing: dict[str, asyncio.Future[None]] = {}  # leases being given back
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
        self.store = SessionStore(
            initial[0],
            s.echo_max_sessions,
            s.echo_session_ttl_s,
            replies=s.echo_replay_replies,
            keep_detached=self.durable is None,
        )
        # Unbatched, a message is one call however long; batched, long ones go in slices.
        max_steps = 32 if s.batching_enabled else s.echo_max_bits_per_message
        batcher: Batcher[Message, Echoed] = Batcher(
            "echo",
            EchoSteps(self.model, self.store, max_steps, self.durable),
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
        if self.durable is not None:
            await self.durable.ping()  # a Redis that is down now only refuses echo sessions
            self._keeper = asyncio.create_task(self._keep_leases(), name="echo-lease-keeper")
        log.info(
            "echo service started",
            extra={
                "store": "redis" if self.durable else "memory",
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
        for task in (self._sweeper, self._keeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if batcher is not None:
            await batcher.stop()
        if self.durable is not None:
            with contextlib.suppress(ServiceError):  # leases lapse by themselves otherwise
                await self.durable.release(self._leases())
            await self.durable.close()
        if self.store is not None:
            self.store.clear()

    async def open(
        self, session_id: str | None, token: str | None, conn: Closable, client: str | None = None
    ) -> Session:
        """A new session, or the resumed one, for a connection from address ``client``.

        Raises a ``ServiceError`` (full, unknown or busy session, wrong token, per-client limits,
        session store unavailable).
        """
        assert self.store is not None, "EchoService.start() was not awaited"
        key = client_key(client)
        self.limits.admit(key, new=session_id is None)
        try:
            if session_id is None:
                session = self.store.create()
                if self.durable is not None:
                    await self._create_durable(session)
            elif self.durable is not None:
                session = await self._attach_durable(session_id, token or "")
            else:
                session = self.store.resume(session_id, token or "")
        except BaseException:
            self.limits.release(key)
            raise
        self._connections[session.id] = conn
        self._clients[session.id] = key
        return session

    async def close(self, session: Session, **log_extra: object) -> None:
        """The connection of ``session`` ended; the session stays resumable until its TTL."""
        self._connections.pop(session.id, None)
        key = self._clients.pop(session.id, None)
        if key is not None:
            self.limits.release(key)
        if self.store is None or not session.attached:
            return
        self.store.detach(session, **log_extra)
        if self.durable is not None:
            # A client that reconnects here at once waits for this instead of session_in_use.
            released = self._releasing[session.id] = asyncio.get_running_loop().create_future()
            try:
                with contextlib.suppress(ServiceError):  # it lapses after ECHO_LEASE_S otherwise
                    await self.durable.release([(session.id, session.fence)])
            finally:
                released.set_result(None)
                if self._releasing.get(session.id) is released:
                    del self._releasing[session.id]

    async def _create_durable(self, session: Session) -> None:
        assert self.store is not None and self.durable is not None
        try:
            await self.durable.create(session.id, session.token, self.store.initial, self.version)
        except BaseException:
            self.store.discard(session)
            raise
        session.fence = 1

    async def _attach_durable(self, session_id: str, token: str) -> Session:
        assert self.store is not None and self.durable is not None
        releasing = self._releasing.get(session_id)
        if releasing is not None:
            await releasing
        stored = await self.durable.acquire(session_id, token)
        try:
            if stored.version != self.version:
                raise NotFound(
                    f"the session belongs to {self.model.name} version {stored.version}, "
                    f"which this server does not serve (it serves {self.version})",
                    "session_version_unavailable",
                )
            session = self.store.adopt(session_id, token, stored.state, stored.seq, stored.replies)
        except BaseException:
            with contextlib.suppress(ServiceError):
                await self.durable.release([(session_id, stored.fence)])
            raise
        session.fence = stored.fence
        return session

    @property
    def version(self) -> int:
        return self.model.version

    def _leases(self) -> list[tuple[str, int]]:
        assert self.store is not None
        return [(s.id, s.fence) for s in self.store.sessions.values() if s.attached]

    async def _keep_leases(self) -> None:
        """Renew this process's leases every third of ``ECHO_LEASE_S``; end the lost ones."""
        assert self.durable is not None and self.store is not None
        while True:
            await asyncio.sleep(self.settings.echo_lease_s / 3)
            leases = self._leases()
            try:
                if not leases:
                    await self.durable.ping()
                for i in range(0, len(leases), 1000):
                    chunk = leases[i : i + 1000]
                    held = await self.durable.renew(chunk)
                    for (session_id, fence), ok in zip(chunk, held, strict=True):
                        session = self.store.sessions.get(session_id)
                        if not ok and session is not None and session.fence == fence:
                            self._end(session, LeaseLost("another connection took the session"))
            except ServiceError:
                continue  # recorded by the store; the writes are fenced anyway

    async def advance(self, session: Session, chunk: bytes) -> Echoed:
        """Advance ``session`` by one message's bits → probabilities, bits, the reply's seq.

        All or nothing: if it fails (or the caller is cancelled), the session's state stays as
        it was after its last answered message.
        """
        if self.batcher is None or self.store is None:
            raise GoingAway("the echo service is not running", "shutting_down")
        message = Message(self.store, session, chunk)
        try:
            return await self.batcher.submit(message)
        except BaseException:
            message.undo()
            raise

    async def reset(self, session: Session) -> None:
        """Back to the initial state (stored first, with Redis)."""
        assert self.store is not None
        self.store.reset(session)
        if self.durable is not None:
            state = self.store.initial.tobytes()
            step = Step(session.id, session.fence, state, session.seq, None)
            if not (await self.durable.commit([step]))[0]:
                raise LeaseLost()

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
        if session.id in self._connections:
            ECHO_CUT_OFF.labels("idle_timeout").inc()
        self._end(session, IdleTimeout(f"no message for {self.settings.echo_idle_timeout_s:g} s"))

    def _end(self, session: Session, error: ServiceError) -> None:
        """End a session's connection (once); its handler then detaches the session."""
        conn = self._connections.pop(session.id, None)
        if conn is None:
            return
        task = asyncio.create_task(_end_quietly(conn, error), name="echo-idle-close")
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)


def durable_store(settings: Settings) -> RedisSessions | None:
    """The Redis store ``ECHO_STORE_URL`` names, or None for ``memory://``."""
    url = settings.echo_store_url.get_secret_value()
    if url.startswith("memory://"):
        return None
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("ECHO_STORE_URL must be memory://, redis://, rediss:// or unix://")
    return RedisSessions(
        url,
        ttl_s=settings.echo_session_ttl_s,
        lease_s=settings.echo_lease_s,
        replies=settings.echo_replay_replies,
        connect_timeout_s=settings.echo_store_connect_timeout_s,
        timeout_s=settings.echo_store_timeout_s,
    )


async def _end_quietly(conn: Closable, error: ServiceError) -> None:
    with contextlib.suppress(Exception):  # the client may be gone already
        await conn.end(error)
