"""The echo service: sessions on one lane per served model version, their sweeper, leases.

``EchoService(settings)`` is built first; :meth:`add_lane` starts serving an echo model version
(``app.services.echo_lanes``: its session store and batcher) and makes it the default for new
sessions if it is the newest; :meth:`retire_lane` drains one (no new sessions, the live ones go
on) and stops it once it has no sessions left. :meth:`start` starts the sweeper (and the lease
keeper); :meth:`stop` closes the remaining connections with 1001 (going away) and lets what is
queued finish. :meth:`advance`
raises domain errors (``GoingAway``, ``DeadlineExceeded``, ``ModelFailed``); a failed message
leaves its session at its last answered message. The sweeper also ends connections idle for
``ECHO_IDLE_TIMEOUT_S`` (their sessions stay resumable), and :class:`ClientLimits` bounds each
client address's sessions.

With ``ECHO_STORE_URL=redis://...`` (:class:`RedisSessions`) sessions live in Redis: :meth:`open`
creates or attaches them there (naming this process as their holder), the batcher stores every
model call's steps before answering them (``EchoSteps.settle``: one round trip per call), a
keeper task renews this process's one lease, its owner key (one command every third of
``ECHO_LEASE_S``, however many sessions are attached), and :meth:`close` / :meth:`stop` give
sessions back so they resume elsewhere at once (a failed give-back is retried by the keeper). Only
when a renewal finds that the owner key had lapsed (the process stalled, or Redis was away, for
longer than ``ECHO_LEASE_S``) does the keeper look at each attached session, once: the
connections whose session another process took meanwhile are ended (``LeaseLost``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from typing import Protocol

from app.core.config import Settings
from app.core.errors import (
    Conflict,
    GoingAway,
    IdleTimeout,
    LeaseLost,
    NotFound,
    NotReady,
    SequenceBusy,
    ServiceError,
)
from app.core.metrics import ECHO_CUT_OFF
from app.services.client_limits import ClientLimits, client_key
from app.services.echo_batching import Echoed
from app.services.echo_lanes import EchoLane
from app.services.echo_sessions import Session
from app.services.models import EchoModel
from app.services.redis_sessions import Admission, NotReplicated, RedisSessions, Step

log = logging.getLogger(__name__)
SWEEP_BATCH = 1000  # idle connections ended per lane in one sweeper pass
# A v2 sequence step finding its session attached on another replica (a request of the same
# sequence being answered there) tries again after these pauses, then answers sequence_busy.
SEQUENCE_IN_USE_RETRIES_S = (0.01, 0.02, 0.04, 0.08, 0.16)


class Closable(Protocol):
    """A client connection as the service sees it: something it can end with a domain error."""

    async def end(self, error: ServiceError) -> None: ...


class EchoService:
    """Everything the ``/echo`` route needs: open/resume, advance, reset, detach."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.lanes: dict[int, EchoLane] = {}  # by model version
        self.default: EchoLane | None = None  # where new sessions go: the newest serving lane
        self._started = False
        self._sweeper: asyncio.Task[None] | None = None
        self._connections: dict[str, Closable] = {}
        self._clients: dict[str, str] = {}  # session id -> its client's limits key
        self._ending: set[asyncio.Task[None]] = set()
        self.durable = RedisSessions.from_settings(settings)
        self._keeper: asyncio.Task[None] | None = None
        self._releasing: dict[str, asyncio.Future[None]] = {}  # leases being given back
        self._unreleased: dict[str, int] = {}  # id -> fence: releases that failed, retried
        self._renewing = asyncio.Lock()  # the keeper's and a lapse-finding attach's renewals
        self._lapsed = True  # the owner key may have lapsed: check the attached sessions
        if self.durable is not None:
            self.durable.on_lapse = self._renew
        self.limits = ClientLimits(
            settings.echo_new_sessions_per_s,
            settings.echo_new_sessions_burst,
            settings.echo_max_sessions_per_client,
        )
        # With Redis the limits also hold across processes: this process's count per client is
        # written there with each create, attach and release, ordered by these numbers; the
        # clients whose count may be wrong there (a failed write, a lapse) are written again.
        self._count_seq = itertools.count(1)
        self._unsynced: set[str] = set()

    @property
    def running(self) -> bool:
        return self._started and self.default is not None

    def lane(self, session: Session) -> EchoLane:
        return self.lanes[session.version]

    async def add_lane(self, model: EchoModel) -> None:
        """Serve ``model``'s version; the newest serving version takes the new sessions."""
        lane = EchoLane(model, self.settings, self.durable)
        await lane.start()
        self.lanes[lane.version] = lane
        self._pick_default()

    async def retire_lane(self, version: int, poll_s: float = 0.5) -> None:
        """Drain ``version``: no new sessions; stop it once its last session is gone."""
        lane = self.lanes.get(version)
        if lane is None:
            return
        lane.draining = True
        self._pick_default()
        while lane.sessions:
            await asyncio.sleep(poll_s)
        del self.lanes[version]
        await lane.stop()

    def _pick_default(self) -> None:
        serving = [lane for lane in self.lanes.values() if not lane.draining]
        self.default = max(serving, key=lambda lane: lane.version, default=None)

    async def start(self) -> None:
        """Start the sweeper (and, with Redis, the lease keeper); lanes come with add_lane."""
        s = self.settings
        self._started = True
        self._sweeper = asyncio.create_task(self._sweep(), name="echo-sweeper")
        if self.durable is not None:
            with contextlib.suppress(ServiceError):  # Redis down now only refuses echo sessions
                await self._renew()  # the owner key, before any session names it
            self._keeper = asyncio.create_task(self._keep_leases(), name="echo-lease-keeper")
        log.info(
            "echo service started",
            extra={
                "store": "redis" if self.durable else "memory",
                "batching": s.batching_enabled,
                "max_batch_sessions": s.echo_max_batch_sessions,
            },
        )

    async def stop(self) -> None:
        """Close open connections (1001), stop the sweeper and the lanes, forget sessions."""
        self._started = False
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
        leases = self._leases()
        for lane in list(self.lanes.values()):
            await lane.stop()
        self.lanes.clear()
        self.default = None
        if self.durable is not None:
            with contextlib.suppress(ServiceError):  # leases lapse by themselves otherwise
                for i in range(0, len(leases), 1000):
                    await self.durable.release(leases[i : i + 1000])
            with contextlib.suppress(ServiceError):
                await self.durable.retire()  # the rest: free at once
            await self.durable.close()

    async def open(
        self, session_id: str | None, token: str | None, conn: Closable, client: str | None = None
    ) -> Session:
        """A new session, or the resumed one, for a connection from address ``client``.

        Raises a ``ServiceError`` (full, unknown or busy session, wrong token, per-client limits,
        session store unavailable).
        """
        default = self.default
        if default is None or not self._started:
            raise NotReady("no echo model version is serving")
        key = client_key(client)
        new = session_id is None
        self.limits.admit(key, new=new)  # this process's limits first: no Redis work to refuse
        admission = None
        if self.durable is not None:  # and the same limits across every process
            admission = Admission(key, new, self.limits.attached(key), next(self._count_seq))
        try:
            if session_id is None:
                session = default.create()
                if self.durable is not None:
                    await self._create_durable(default, session, admission)
            elif self.durable is not None:
                session = await self._attach_durable(session_id, token or "", admission)
            else:
                lane = next((x for x in self.lanes.values() if x.store_knows(session_id)), default)
                assert lane.store is not None
                session = lane.store.resume(session_id, token or "")
        except BaseException:
            self.limits.release(key)
            if admission is not None and admission.counted:
                self._unsynced.add(key)  # Redis may count it: the keeper writes the count again
            raise
        self._connections[session.id] = conn
        self._clients[session.id] = key
        return session

    async def open_sequence(
        self, session_id: str, token: str, client: str | None, start: EchoLane | None
    ) -> tuple[Session, int]:
        """Attach a v2 sequence's session for one request (``app.services.echo_sequences``):
        the one with ``session_id``, or, with ``start`` (a ``sequence_start``), a new one on
        that lane when there is none. No connection holds it: :meth:`close` detaches it after.

        Returns the session and the model version its stored state belongs to. They differ only
        with Redis, when that version is not served here any more and ``start`` is given: the
        session is then on ``start``'s lane in its initial state, and :meth:`move` writes the
        new version before it is advanced. Raises ``NotFound`` (unknown, expired or evicted
        without ``start``; its version gone), ``SequenceBusy`` (another replica held it for
        too long), the per-client limits' ``Overloaded`` (a ``start`` counts as a new session)
        and the store's errors.
        """
        if not self.running:
            raise NotReady("no echo model version is serving")
        key = client_key(client)
        self.limits.admit(key, new=start is not None)
        admission = None
        if self.durable is not None:  # and the same limits across every process
            admission = Admission(
                key, start is not None, self.limits.attached(key), next(self._count_seq)
            )
        try:
            if self.durable is None:
                session = self._open_sequence_here(session_id, token, start)
                version = session.version
            else:
                session, version = await self._open_sequence_durable(
                    session_id, token, start, admission
                )
        except BaseException:
            self.limits.release(key)
            if admission is not None and admission.counted:
                self._unsynced.add(key)  # Redis may count it: the keeper writes the count again
            raise
        self._clients[session.id] = key
        return session, version

    def _open_sequence_here(self, session_id: str, token: str, start: EchoLane | None) -> Session:
        lanes = list(self.lanes.values())
        lane = next((x for x in lanes if x.holds(session_id)), None)
        if lane is None:  # for the error: unknown, or evicted lately
            lane = next((x for x in lanes if x.store_knows(session_id)), None)
        if lane is not None and lane.store is not None:
            try:
                return lane.store.resume(session_id, token)
            except NotFound:
                if start is None:
                    raise
        if start is None:
            raise NotFound("unknown or expired session_id", "session_not_found")
        return start.create(session_id, token)

    async def _open_sequence_durable(
        self, session_id: str, token: str, start: EchoLane | None, admission: Admission | None
    ) -> tuple[Session, int]:
        assert self.durable is not None
        await self._settle_release(session_id)
        for delay in (*SEQUENCE_IN_USE_RETRIES_S, None):
            try:
                stored = await self.durable.acquire(session_id, token, admission)
                break
            except NotReplicated as exc:
                if exc.fence is not None:
                    await self._release(session_id, exc.fence)
                raise
            except NotFound:
                if start is None:
                    raise
                session = start.create(session_id, token)
                try:
                    await self._create_durable(start, session, admission)
                except Conflict as exc:
                    if exc.code != "session_exists":
                        raise
                    continue  # another replica started it meanwhile: attach that one
                return session, session.version
            except Conflict as exc:  # a request on another replica holds it (for a few ms)
                if exc.code != "session_in_use" or delay is None:
                    if exc.code == "session_in_use":
                        raise SequenceBusy(
                            f"another request of this sequence holds it; {exc.detail}"
                        ) from None
                    raise
                await asyncio.sleep(delay)
        else:  # created and taken by others every time
            raise SequenceBusy("the sequence is being started elsewhere; retry")
        lane = self.lanes.get(stored.version)
        state = stored.state
        if lane is None or lane.store is None:
            if start is None or start.store is None:
                await self._release(session_id, stored.fence)
                raise NotFound(
                    f"the sequence runs on echo_rnn version {stored.version}, which this server "
                    f"does not serve (it serves {sorted(self.lanes)})",
                    "session_version_unavailable",
                )
            lane, state = start, start.store.initial  # restarted there (move writes it)
        try:
            assert lane.store is not None
            session = lane.store.adopt(session_id, token, state, stored.seq, stored.replies)
            session.version = lane.version
        except BaseException:
            await self._release(session_id, stored.fence)
            raise
        session.fence = stored.fence
        return session, stored.version

    async def move(self, session: Session, lane: EchoLane, stored_version: int) -> Session:
        """Restart an attached sequence session in the initial state of ``lane`` (a
        ``sequence_start`` after a newer version took the new sequences), keeping its seq and
        its last replies; with Redis the new version is written at once (``LeaseLost`` if the
        session was taken meanwhile). Returns the session as it is now (a new object when it
        changed lanes)."""
        assert lane.store is not None
        if session.version != lane.version:
            old = self.lanes[session.version].store
            assert old is not None
            seq, replies, fence = session.seq, list(session.replies), session.fence
            old.discard(session)
            try:
                session = lane.store.adopt(
                    session.id, session.token, lane.store.initial, seq, replies
                )
            except BaseException:  # e.g. the new lane's store is full: give the session up
                if self.durable is not None:
                    await self._release(session.id, fence)
                raise
            session.version, session.fence = lane.version, fence
        else:
            lane.store.reset(session)
        if self.durable is not None and stored_version != lane.version:
            initial = lane.store.initial
            if not await self.durable.restart(session.id, session.fence, initial, lane.version):
                raise LeaseLost()
        return session

    async def close(self, session: Session, **log_extra: object) -> None:
        """The connection of ``session`` ended; the session stays resumable until its TTL."""
        self._connections.pop(session.id, None)
        key = self._clients.pop(session.id, None)
        if key is not None:
            self.limits.release(key)
        lane = self.lanes.get(session.version)
        if lane is None or lane.store is None or not session.attached:
            if self.durable is not None and key is not None:
                self._unsynced.add(key)
            return
        lane.store.detach(session, **log_extra)
        if self.durable is not None:
            # A client that reconnects here at once waits for this instead of session_in_use.
            released = self._releasing[session.id] = asyncio.get_running_loop().create_future()
            try:
                await self._release(session.id, session.fence, key)
            finally:
                released.set_result(None)
                if self._releasing.get(session.id) is released:
                    del self._releasing[session.id]

    async def _create_durable(
        self, lane: EchoLane, session: Session, admission: Admission | None
    ) -> None:
        assert lane.store is not None and self.durable is not None
        try:
            await self.durable.create(
                session.id, session.token, lane.store.initial, lane.version, admission
            )
        except BaseException:
            lane.store.discard(session)
            raise
        session.fence = 1

    async def _settle_release(self, session_id: str) -> None:
        """Before attaching: wait for this process's release of the session, if one runs, and
        retry one that failed."""
        releasing = self._releasing.get(session_id)
        if releasing is not None:
            await releasing
        unreleased = self._unreleased.pop(session_id, None)
        if unreleased is not None:  # detached here while Redis failed: give it up first
            await self._release(session_id, unreleased)

    async def _attach_durable(
        self, session_id: str, token: str, admission: Admission | None
    ) -> Session:
        assert self.durable is not None
        await self._settle_release(session_id)
        try:
            stored = await self.durable.acquire(session_id, token, admission)
        except NotReplicated as exc:  # attached, but not on enough replicas: not ours to use
            if exc.fence is not None:
                await self._release(session_id, exc.fence)
            raise
        try:
            lane = self.lanes.get(stored.version)
            if lane is None or lane.store is None:
                raise NotFound(
                    f"the session runs on echo_rnn version {stored.version}, which this server "
                    f"does not serve (it serves {sorted(self.lanes)})",
                    "session_version_unavailable",
                )
            session = lane.store.adopt(session_id, token, stored.state, stored.seq, stored.replies)
            session.version = lane.version
        except BaseException:
            await self._release(session_id, stored.fence)
            raise
        session.fence = stored.fence
        return session

    async def _release(self, session_id: str, fence: int, client: str | None = None) -> None:
        """Give a session up (and record this process's new count of ``client``'s sessions);
        if Redis cannot be told now, the keeper retries every tick (this process's live owner
        key would keep the session in use otherwise)."""
        assert self.durable is not None
        count = None
        if client is not None:
            count = (client, next(self._count_seq), self.limits.attached(client))
        try:
            await self.durable.release([(session_id, fence)], count)
        except ServiceError:  # the latest fence covers earlier ones (release takes fence or less)
            self._unreleased[session_id] = max(fence, self._unreleased.get(session_id, 0))
            if client is not None:
                self._unsynced.add(client)

    def _sessions(self) -> list[Session]:
        return [
            s for lane in self.lanes.values() if lane.store for s in lane.store.sessions.values()
        ]

    def _leases(self) -> list[tuple[str, int]]:
        return [(s.id, s.fence) for s in self._sessions() if s.attached]

    async def _keep_leases(self) -> None:
        """Renew this process's owner key every third of ``ECHO_LEASE_S``: one command a tick,
        however many sessions are attached (their hashes name this process as their holder)."""
        while self._started:  # stop() cancels it, but a cancellation that lands inside a Redis
            # call can come out of redis-py as a timeout (a ServiceError here): stop anyway
            await asyncio.sleep(self.settings.echo_lease_s / 3)
            with contextlib.suppress(ServiceError):  # recorded by the store; writes are fenced
                await self._renew()

    async def _renew(self) -> None:
        """Renew the owner key; if it had lapsed (this process stalled, or Redis was away for
        longer than ``ECHO_LEASE_S``), end the connections whose session was taken over meanwhile.

        Only then is there work per attached session (one pass, 1,000 sessions a round trip);
        until that pass succeeds, every renewal repeats it.
        """
        assert self.durable is not None
        async with self._renewing:
            if not await self.durable.keep_owner():
                self._lapsed = True
            while self._unreleased:  # only after Redis failed a release
                chunk = list(self._unreleased.items())[:1000]
                await self.durable.release(chunk)
                for session_id, fence in chunk:
                    if self._unreleased.get(session_id) == fence:
                        del self._unreleased[session_id]
            if self._lapsed:
                await self._reclaim()
            while self._unsynced:  # only after a failed write, or a lapse
                clients = list(itertools.islice(self._unsynced, 1000))
                counts = [(c, next(self._count_seq), self.limits.attached(c)) for c in clients]
                await self.durable.record_clients(counts)
                self._unsynced.difference_update(clients)

    async def _reclaim(self) -> None:
        """After the owner key lapsed: take back the sessions nobody took meanwhile, end the
        connections of the others, and write every client's count again (the other processes
        dropped this one's counts while its owner key was gone)."""
        assert self.durable is not None
        leases = self._leases()
        if leases:
            log.warning("echo lease lapsed; checking sessions", extra={"count": len(leases)})
        lost: list[tuple[str, int]] = []
        for i in range(0, len(leases), 1000):
            chunk = leases[i : i + 1000]
            held = await self.durable.reclaim(chunk)
            lost += [lease for lease, ok in zip(chunk, held, strict=True) if not ok]
        self._lapsed = False
        self._unsynced.update(self._clients.values())
        attached = {s.id: s for s in self._sessions() if s.attached} if lost else {}
        for session_id, fence in lost:
            session = attached.get(session_id)
            if session is not None and session.fence == fence:
                self._end(session, LeaseLost("another connection took the session"))

    async def advance(self, session: Session, chunk: bytes, tag: bytes = b"") -> Echoed:
        """Advance ``session`` by one message's bits → probabilities, bits, the reply's seq.

        All or nothing: if it fails (or the caller is cancelled), the session's state stays as
        it was after its last answered message. ``tag`` is packed after the reply (a v2
        sequence step's ``SequenceTag``).
        """
        lane = self.lanes.get(session.version)
        if lane is None:
            raise GoingAway("the echo service is not running", "shutting_down")
        return await lane.advance(session, chunk, tag)

    async def reset(self, session: Session) -> None:
        """Back to the initial state of the session's own version (stored first, with Redis)."""
        store = self.lanes[session.version].store
        assert store is not None
        store.reset(session)
        if self.durable is not None:
            state = store.initial.tobytes()
            step = Step(session.id, session.fence, state, session.seq, None)
            if not (await self.durable.commit([step]))[0]:
                raise LeaseLost()

    def echo_step(self, session: Session) -> int:
        """How many steps late the model of ``session`` echoes its input."""
        return self.lanes[session.version].model.echo_step

    def toucher(self, session: Session) -> Callable[[Session], None]:
        """What the connection calls on each of ``session``'s messages (O(1): the idle clock)."""
        store = self.lanes[session.version].store
        assert store is not None
        return store.touch

    async def _sweep(self) -> None:
        """Expire detached sessions, end idle connections, forget idle clients.

        Each pass costs O(what it finds), never O(sessions): every structure it reads is kept in
        deadline order. A pass ends at most ``SWEEP_BATCH`` connections per lane; if it found
        that many, the next pass comes at once (after yielding), so one tick stays short.
        """
        s = self.settings
        interval = min(max(min(s.echo_session_ttl_s, s.echo_idle_timeout_s) / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            busy = True
            while busy:
                busy = False
                self.limits.prune()
                for lane in list(self.lanes.values()):
                    if lane.store is None:
                        continue
                    lane.store.evict_expired()
                    idle = lane.store.idle_attached(s.echo_idle_timeout_s, SWEEP_BATCH)
                    for session in idle:
                        self._end_idle(session)
                    busy |= len(idle) == SWEEP_BATCH
                if busy:
                    await asyncio.sleep(0)

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


async def _end_quietly(conn: Closable, error: ServiceError) -> None:
    with contextlib.suppress(Exception):  # the client may be gone already
        await conn.end(error)
