"""Echo sessions: ids, tokens, and every session's hidden state as one row of a NumPy matrix.

A session owns a *slot*, a row of :attr:`SessionStore.states` (``[capacity, state_dim]``,
float32), so the batcher gathers and scatters the states of many sessions with one fancy-index
each instead of stacking small arrays. The matrix grows by doubling up to the session cap.

Only attached sessions can fill the store: at the cap, the least recently used detached session
is evicted to admit a new one (its later resume is told ``session_evicted``). Detached sessions
are kept in least-recently-used order, so eviction (by TTL or by LRU) costs O(evicted); attached
ones in the order of their last message (:meth:`SessionStore.touch`, O(1) per message), so the
idle check costs O(idle found). Nothing here scans every session except :meth:`clear`.

Each session also keeps its last ``replies`` packed echo replies (``app.services.echo_replies``)
for resumes with ``?last_seq=``. With the Redis store (``keep_detached=False``) this matrix only
holds attached sessions: a detached one lives in Redis alone and comes back with :meth:`adopt`.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any

import numpy as np

from app.core.errors import Conflict, Forbidden, InvalidInput, NotFound, Overloaded
from app.core.metrics import ECHO_ACTIVE_SESSIONS, ECHO_SESSIONS_EVICTED, ECHO_STORED_SESSIONS
from app.services.echo_replies import reply_seq

log = logging.getLogger(__name__)


class Session:
    """One client's stream: its slot in the state matrix, its echo reply counter and replies."""

    __slots__ = (
        "attached", "fence", "id", "last_seen", "replies", "seq", "slot", "token", "version"
    )  # fmt: skip

    def __init__(self, session_id: str, token: str, slot: int, replies: int) -> None:
        self.id, self.token, self.slot = session_id, token, slot
        self.version = 0  # the echo model version it runs on (set by its lane)
        self.seq = 0  # echo replies so far; the next one carries seq + 1
        self.replies: deque[bytes] = deque(maxlen=replies)  # the last ones, packed, oldest first
        self.fence = 0  # the Redis store's attach fence (0: memory store)
        self.attached = False
        self.last_seen = time.monotonic()  # attached: last client message; detached: detach time

    def record(self, seq: int, packed_reply: bytes) -> None:
        """Echo reply ``seq`` is answered (and, with Redis, stored)."""
        self.replies.append(packed_reply)
        self.seq = seq

    def missed(self, last_seq: int) -> list[bytes]:
        """The packed replies after ``last_seq`` (the client's last), for a resume to re-send.

        ``InvalidInput`` if ``last_seq`` is ahead of the session or behind the kept replies.
        """
        if not 0 <= last_seq <= self.seq:
            raise InvalidInput(
                f"last_seq {last_seq} is not between 0 and the session's seq {self.seq}",
                "invalid_last_seq",
            )
        missed = [r for r in self.replies if reply_seq(r) > last_seq]
        if len(missed) < self.seq - last_seq:
            raise InvalidInput(
                f"replies after {last_seq} are no longer kept (only the last {len(self.replies)}"
                f" up to seq {self.seq}); resume without last_seq to continue from seq {self.seq}",
                "replay_unavailable",
            )
        return missed


class SessionStore:
    """Live sessions (attached to a connection or resumable until ``ttl_s`` idle) and states."""

    def __init__(
        self,
        initial_state: np.ndarray,
        max_sessions: int,
        ttl_s: float,
        capacity: int = 1024,
        replies: int = 4,
        keep_detached: bool = True,
    ) -> None:
        self.initial = np.asarray(initial_state, np.float32).reshape(-1)
        self.max_sessions, self.ttl_s = max_sessions, ttl_s
        self.replies, self.keep_detached = replies, keep_detached
        capacity = max(1, min(capacity, max_sessions))
        self.states = np.tile(self.initial, (capacity, 1))
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out low slots first
        self.sessions: dict[str, Session] = {}
        self._detached: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._attached: OrderedDict[str, Session] = OrderedDict()  # least recently active first
        self._evicted: OrderedDict[str, None] = OrderedDict()  # recent LRU victims, bounded

    def __len__(self) -> int:
        return len(self.sessions)

    def knows(self, session_id: str) -> bool:
        """The session is here (attached or resumable), or was evicted from here lately."""
        return session_id in self.sessions or session_id in self._evicted

    def create(self, session_id: str | None = None, token: str | None = None) -> Session:
        """A new attached session in the initial state; evicts the LRU detached one at the cap.

        Random id and token unless given (a v2 sequence's session has an id derived from its
        ``sequence_id``; the caller made sure no session has it). Refused (``Overloaded``) only
        when all ``max_sessions`` sessions are attached.
        """
        session = self._new(
            session_id or secrets.token_urlsafe(16), token or secrets.token_urlsafe(32)
        )
        log.info("echo session opened", extra={"session": session.id, "resumed": False})
        return session

    def adopt(
        self, session_id: str, token: str, state: np.ndarray, seq: int, replies: Iterable[bytes]
    ) -> Session:
        """An attached session read back from the Redis store (``keep_detached=False``)."""
        if session_id in self.sessions:  # a connection here still has it (its lease lapsed)
            raise Conflict(
                "the session is attached to another connection; retry once that one closes",
                "session_in_use",
            )
        session = self._new(session_id, token)
        self.states[session.slot] = state
        session.seq = seq
        session.replies.extend(replies)
        log.info("echo session opened", extra={"session": session.id, "resumed": True})
        return session

    def discard(self, session: Session) -> None:
        """Forget a session at once (it could not be stored)."""
        if session.attached:
            session.attached = False
            self._attached.pop(session.id, None)
            ECHO_ACTIVE_SESSIONS.dec()
        if session.id in self.sessions:
            self._drop(session)

    def _new(self, session_id: str, token: str) -> Session:
        if len(self.sessions) >= self.max_sessions:
            if not self._detached:
                raise Overloaded(
                    f"the server holds its maximum of {self.max_sessions} open sessions",
                    "too_many_sessions",
                )
            _, victim = self._detached.popitem(last=False)
            self._drop(victim)
            self._evicted[victim.id] = None
            if len(self._evicted) > self.max_sessions:
                self._evicted.popitem(last=False)
            ECHO_SESSIONS_EVICTED.labels("lru").inc()
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self.states[slot] = self.initial
        self._evicted.pop(session_id, None)  # a sequence's id, reused: not "evicted" any more
        session = Session(session_id, token, slot, self.replies)
        self.sessions[session.id] = session
        self._attach(session)
        ECHO_STORED_SESSIONS.set(len(self.sessions))
        return session

    def resume(self, session_id: str, token: str) -> Session:
        """Re-attach a detached session; the token is compared in constant time."""
        session = self.sessions.get(session_id)
        if session is not None and not session.attached and self._expired(session):
            self._drop(session)
            session = None
        if session is None:
            if session_id in self._evicted:
                raise NotFound(
                    "the server was full and evicted this detached session for a new one",
                    "session_evicted",
                )
            raise NotFound("unknown or expired session_id", "session_not_found")
        if not secrets.compare_digest(session.token.encode(), token.encode()):
            raise Forbidden("wrong token for this session", "invalid_token")
        if session.attached:
            raise Conflict(
                "the session is attached to another connection; retry once that one closes",
                "session_in_use",
            )
        self._attach(session)
        log.info("echo session opened", extra={"session": session.id, "resumed": True})
        return session

    def detach(self, session: Session, **log_extra: Any) -> None:
        """The connection ended: keep the session resumable for ``ttl_s``."""
        if not session.attached:
            return
        session.attached = False
        session.last_seen = time.monotonic()
        self._attached.pop(session.id, None)
        ECHO_ACTIVE_SESSIONS.dec()
        if self.keep_detached:
            self._detached[session.id] = session
        else:  # the Redis store holds it; another process may advance it from now on
            self._drop(session)
        log.info(
            "echo session detached", extra={"session": session.id, "seq": session.seq, **log_extra}
        )

    def touch(self, session: Session) -> None:
        """The session's connection sent a message (the idle timeout starts again); O(1)."""
        session.last_seen = time.monotonic()
        try:
            self._attached.move_to_end(session.id)
        except KeyError:  # reported idle meanwhile, and its connection is being closed
            if session.attached:
                self._attached[session.id] = session

    def reset(self, session: Session) -> None:
        self.states[session.slot] = self.initial

    # The states, for the batcher: it asks for them and hands new ones back, and never holds or
    # writes the matrix itself (this class is their one owner).

    def gather(self, slots: np.ndarray) -> np.ndarray:
        """The states of ``slots``, as a new array (safe to read on another thread)."""
        return self.states[slots]

    def scatter(self, slots: np.ndarray, states: np.ndarray) -> None:
        """Set the states of ``slots`` (each slot at most once)."""
        self.states[slots] = states

    def state_of(self, slot: int) -> np.ndarray:
        """A copy of one slot's state (to put back with :meth:`restore`)."""
        return self.states[slot].copy()

    def restore(self, slot: int, state: np.ndarray) -> None:
        self.states[slot] = state

    def state_bytes(self, slot: int) -> bytes:
        """One slot's state as float32 bytes (what the Redis store keeps)."""
        return self.states[slot].tobytes()

    def evict_expired(self) -> int:
        """Drop detached sessions idle for longer than ``ttl_s``; returns how many."""
        expired = 0
        while self._detached and self._expired(next(iter(self._detached.values()))):
            self._drop(self._detached.popitem(last=False)[1])
            expired += 1
        if expired:
            ECHO_SESSIONS_EVICTED.labels("ttl").inc(expired)
            log.info("echo sessions evicted", extra={"count": expired})
        return expired

    def idle_attached(self, idle_s: float, limit: int = 1000) -> list[Session]:
        """Up to ``limit`` attached sessions whose connection sent nothing for longer than
        ``idle_s``, least recently active first; each is reported once (until its next message).

        O(found): the attached sessions are kept in the order of their last message.
        """
        since, found = time.monotonic() - idle_s, []
        attached = self._attached
        while attached and len(found) < limit:
            session = next(iter(attached.values()))
            if session.last_seen >= since:
                break
            del attached[session.id]
            found.append(session)
        return found

    def clear(self) -> None:
        for session in list(self.sessions.values()):
            self.detach(session)  # with the Redis store this drops it already
            if session.id in self.sessions:
                self._drop(session)

    def _expired(self, session: Session) -> bool:
        return time.monotonic() - session.last_seen > self.ttl_s

    def _attach(self, session: Session) -> None:
        self._detached.pop(session.id, None)
        session.attached = True
        session.last_seen = time.monotonic()
        self._attached[session.id] = session
        ECHO_ACTIVE_SESSIONS.inc()

    def _drop(self, session: Session) -> None:
        del self.sessions[session.id]
        self._detached.pop(session.id, None)
        self._attached.pop(session.id, None)
        self._free.append(session.slot)
        ECHO_STORED_SESSIONS.set(len(self.sessions))

    def _grow(self) -> None:
        old = len(self.states)
        new = min(2 * old, self.max_sessions)
        grown = np.empty((new, self.states.shape[1]), np.float32)
        grown[:old] = self.states
        grown[old:] = self.initial
        self.states = grown
        self._free.extend(range(new - 1, old - 1, -1))
