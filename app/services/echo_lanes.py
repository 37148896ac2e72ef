"""One echo model version as the echo service runs it: its sessions' states and its batcher.

A session's state belongs to the model that produced it, so every served echo version has its
own :class:`EchoLane`: a ``SessionStore`` (the state matrix, ``state_dim`` wide) and a batcher
(a call never mixes versions). New sessions go to the default lane; a session stays on its lane
until it ends or expires. A lane the version policy drops *drains*: it takes no new sessions,
serves the ones it has, and stops once it has none.
"""

from __future__ import annotations

import asyncio
import logging
import os

from app.core.config import Settings
from app.core.errors import GoingAway
from app.services.batching import Batcher, BatchMetrics
from app.services.echo_batching import Echoed, EchoSteps, Message
from app.services.echo_sessions import Session, SessionStore
from app.services.models import EchoModel
from app.services.redis_sessions import RedisSessions

log = logging.getLogger(__name__)


class EchoLane:
    """Sessions and batcher of one echo model version; ``start()``, then ``stop()``."""

    def __init__(self, model: EchoModel, settings: Settings, durable: RedisSessions | None) -> None:
        self.model, self.settings, self.durable = model, settings, durable
        self.store: SessionStore | None = None
        self.batcher: Batcher[Message, Echoed] | None = None
        self.draining = False

    @property
    def version(self) -> int:
        return self.model.version

    @property
    def sessions(self) -> int:
        """Sessions on this lane: attached, or (memory store) detached but resumable."""
        return 0 if self.store is None else len(self.store)

    async def start(self) -> None:
        s = self.settings
        initial = await asyncio.to_thread(self.model.initial_state, 1)
        if s.echo_xla:
            try:
                await asyncio.to_thread(self.model.compile_xla, s.echo_max_batch_sessions)
            except Exception:  # e.g. a TensorFlow build without XLA: serve the plain signature
                log.warning("echo XLA compilation failed; running without XLA", exc_info=True)
        if s.echo_numpy_step:
            await asyncio.to_thread(self.model.use_numpy_step, s.echo_max_batch_sessions)
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
            inline_budget_s=s.inline_call_budget_ms / 1000,
        )
        await batcher.start()
        self.batcher = batcher
        log.info(
            "echo model version serving",
            extra={"version": self.version, "state_dim": self.model.state_dim},
        )

    async def stop(self) -> None:
        batcher, self.batcher = self.batcher, None
        if batcher is not None:
            await batcher.stop()
        if self.store is not None:
            self.store.clear()

    def holds(self, session_id: str) -> bool:
        """The session is in this lane's store now (attached or, memory store, resumable)."""
        return self.store is not None and session_id in self.store.sessions

    def store_knows(self, session_id: str) -> bool:
        return self.store is not None and self.store.knows(session_id)

    def create(self, session_id: str | None = None, token: str | None = None) -> Session:
        assert self.store is not None
        session = self.store.create(session_id, token)
        session.version = self.version
        return session

    async def advance(self, session: Session, chunk: bytes, tag: bytes = b"") -> Echoed:
        """All or nothing: a failed (or cancelled) message leaves the state as it was."""
        if self.batcher is None or self.store is None:
            raise GoingAway("the echo service is not running", "shutting_down")
        message = Message(self.store, session, chunk, tag)
        try:
            return await self.batcher.submit(message)
        except BaseException:
            message.undo()
            raise
