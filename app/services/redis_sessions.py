"""Echo sessions in Redis (``ECHO_STORE_URL=redis://...``): state that outlives the process.

Per session, one hash ``<prefix>s:<id>`` holds the state row (float32 bytes), ``seq`` (the last
stored step), the model version, a SHA-256 of the token (never the token: a dump of Redis must
not let anyone resume a session), a ``fence`` and the last ``ECHO_REPLAY_REPLIES`` packed
replies (``r<seq mod n>``, ``app.services.echo_replies``); it expires ``ECHO_SESSION_TTL_S``
after its last use. The attach lease is ``<prefix>l:<id>`` = the holder's fence, expiring after
``ECHO_LEASE_S`` unless renewed: one connection per session across every worker and replica.

Every attach increments ``fence``, and every write (a Lua script, atomic) first checks that
the session's fence is still the writer's: a process that lost its lease (it stalled, another
replica took the session over) can never overwrite newer state. The steps of one batched model
call are stored by one script call (:meth:`RedisSessions.commit`), before any of them is answered.

Errors: ``NotFound``, ``Forbidden``, ``Conflict`` (``session_in_use``, with when to retry) and
:class:`StoreUnavailable` (Redis down or slow) for everything the store could not do.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from app.core.config import Settings
from app.core.errors import Conflict, Forbidden, NotFound, StoreUnavailable
from app.core.metrics import ECHO_STORE_ERRORS, ECHO_STORE_SECONDS
from app.services.echo_replies import reply_seq

log = logging.getLogger(__name__)

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'th', ARGV[1], 'st', ARGV[2], 'seq', 0, 'ver', ARGV[3], 'fence', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[2], 1, 'PX', ARGV[5])
return 1
"""

# -> {'ok', fence, HGETALL...} | {'not_found'} | {'invalid_token'} | {'in_use', ms left}
_ACQUIRE = """
local th = redis.call('HGET', KEYS[1], 'th')
if not th then return {'not_found'} end
if th ~= ARGV[1] then return {'invalid_token'} end
local left = redis.call('PTTL', KEYS[2])
if left ~= -2 then return {'in_use', left} end
local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
redis.call('SET', KEYS[2], fence, 'PX', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'ok', fence, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: session hashes; ARGV: ttl, then per session fence, state, seq, reply field ('' = none),
# reply. -> 1 stored / 0 fenced off, per session.
_COMMIT = """
local out = {}
for i, key in ipairs(KEYS) do
  local a = 2 + (i - 1) * 5
  if redis.call('HGET', key, 'fence') == ARGV[a] then
    if ARGV[a + 3] == '' then
      redis.call('HSET', key, 'st', ARGV[a + 1], 'seq', ARGV[a + 2])
    else
      redis.call('HSET', key, 'st', ARGV[a + 1], 'seq', ARGV[a + 2], ARGV[a + 3], ARGV[a + 4])
    end
    redis.call('PEXPIRE', key, ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# KEYS: lease, hash pairs; ARGV: lease ms, ttl ms, fences. A lease that lapsed (Redis was away)
# is taken back if nobody attached since (the fence is still ours). -> 1 held / 0 lost.
_RENEW = """
local out = {}
for i = 1, #KEYS / 2 do
  local lease, key, fence = KEYS[2 * i - 1], KEYS[2 * i], ARGV[2 + i]
  local holder = redis.call('GET', lease)
  if holder == fence or (not holder and redis.call('HGET', key, 'fence') == fence) then
    redis.call('SET', lease, fence, 'PX', ARGV[1])
    redis.call('PEXPIRE', key, ARGV[2])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

_RELEASE = """
for i, lease in ipairs(KEYS) do
  if redis.call('GET', lease) == ARGV[i] then redis.call('DEL', lease) end
end
return 1
"""


@dataclass(frozen=True)
class Stored:
    """A session as read back from Redis when it is attached."""

    state: np.ndarray
    seq: int
    version: int
    fence: int
    replies: list[bytes]  # oldest first


class Step(NamedTuple):
    """One session's step to store: its new state and seq, and the reply (None: a reset)."""

    session_id: str
    fence: int
    state: bytes
    seq: int
    reply: bytes | None


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class RedisSessions:
    """The Redis side of echo sessions; every method raises ``StoreUnavailable`` on failure."""

    durable = True

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float,
        lease_s: float,
        replies: int,
        connect_timeout_s: float,
        timeout_s: float,
        prefix: str = "rnn:echo:",
    ) -> None:
        self.ttl_ms, self.lease_ms = int(ttl_s * 1000), int(lease_s * 1000)
        self.replies, self.prefix = replies, prefix
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=connect_timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),  # a connection reset
            health_check_interval=5,
            max_connections=64,
        )
        self.error: str | None = None  # why the last command failed; None once one succeeded
        self._scripts = {
            name: self.client.register_script(source)
            for name, source in {
                "create": _CREATE,
                "acquire": _ACQUIRE,
                "commit": _COMMIT,
                "renew": _RENEW,
                "release": _RELEASE,
            }.items()
        }

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisSessions | None:
        """The store ``ECHO_STORE_URL`` names, or None for ``memory://``."""
        url = settings.echo_store_url.get_secret_value()
        if url.startswith("memory://"):
            return None
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("ECHO_STORE_URL must be memory://, redis://, rediss:// or unix://")
        return cls(
            url,
            ttl_s=settings.echo_session_ttl_s,
            lease_s=settings.echo_lease_s,
            replies=settings.echo_replay_replies,
            connect_timeout_s=settings.echo_store_connect_timeout_s,
            timeout_s=settings.echo_store_timeout_s,
        )

    def status(self) -> str:
        return "ok" if self.error is None else f"unavailable: {self.error}"

    async def ping(self) -> bool:
        try:
            await self._run("ping", self.client.ping())
        except StoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        await self.client.aclose()

    async def create(self, session_id: str, token: str, state: np.ndarray, version: int) -> None:
        """Store a new session in its initial state, with this process holding its lease."""
        keys = [self._key(session_id), self._lease(session_id)]
        args = [token_hash(token), _state_bytes(state), version, self.ttl_ms, self.lease_ms]
        if not await self._run("create", self._scripts["create"](keys, args)):
            raise Conflict("a session with this id exists already", "session_exists")

    async def acquire(self, session_id: str, token: str) -> Stored:
        """Attach: check the token, take the lease (a new fence), read the session back."""
        keys = [self._key(session_id), self._lease(session_id)]
        args = [token_hash(token), self.lease_ms, self.ttl_ms]
        answer = await self._run("acquire", self._scripts["acquire"](keys, args))
        outcome = answer[0].decode()
        if outcome == "not_found":
            raise NotFound("unknown or expired session_id", "session_not_found")
        if outcome == "invalid_token":
            raise Forbidden("wrong token for this session", "invalid_token")
        if outcome == "in_use":
            left = max(int(answer[1]), 0) / 1000 if int(answer[1]) >= 0 else self.lease_ms / 1000
            raise Conflict(
                f"the session is attached to another connection; retry in {left:.1f} s",
                "session_in_use",
            )
        fields = dict(zip(answer[2][::2], answer[2][1::2], strict=True))
        replies = sorted((v for k, v in fields.items() if k.startswith(b"r")), key=reply_seq)
        return Stored(
            state=np.frombuffer(fields[b"st"], np.float32).copy(),
            seq=int(fields[b"seq"]),
            version=int(fields[b"ver"]),
            fence=int(answer[1]),
            replies=replies,
        )

    async def commit(self, steps: list[Step]) -> list[bool]:
        """Store every step in one round trip; False where the session's fence moved on."""
        keys, args = [], [self.ttl_ms]
        for s in steps:
            keys.append(self._key(s.session_id))
            field = b"" if s.reply is None else b"r%d" % (s.seq % self.replies)
            args += [s.fence, s.state, s.seq, field, s.reply or b""]
        stored = await self._run("commit", self._scripts["commit"](keys, args))
        return [bool(x) for x in stored]

    async def renew(self, leases: list[tuple[str, int]]) -> list[bool]:
        """Extend the leases this process holds; False for the ones it lost."""
        keys: list[str] = []
        for session_id, _ in leases:
            keys += [self._lease(session_id), self._key(session_id)]
        args = [self.lease_ms, self.ttl_ms, *(fence for _, fence in leases)]
        held = await self._run("renew", self._scripts["renew"](keys, args))
        return [bool(x) for x in held]

    async def release(self, leases: list[tuple[str, int]]) -> None:
        """Give up leases (detach, shutdown) so that the sessions resume elsewhere at once."""
        if leases:
            keys = [self._lease(session_id) for session_id, _ in leases]
            await self._run("release", self._scripts["release"](keys, [f for _, f in leases]))

    async def _run(self, op: str, call):
        started = time.perf_counter()
        try:
            result = await call
        except (redis.RedisError, OSError) as exc:
            ECHO_STORE_ERRORS.labels(op).inc()
            if self.error is None:
                log.warning("echo session store unavailable", extra={"op": op, "error": str(exc)})
            self.error = f"{type(exc).__name__}: {exc}"[:200]
            raise StoreUnavailable(
                "the echo session store is unavailable; retry shortly", retry_after_s=1.0
            ) from exc
        ECHO_STORE_SECONDS.labels(op).observe(time.perf_counter() - started)
        if self.error is not None:
            log.info("echo session store is back", extra={"op": op})
            self.error = None
        return result

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}s:{session_id}"

    def _lease(self, session_id: str) -> str:
        return f"{self.prefix}l:{session_id}"


def _state_bytes(state: np.ndarray) -> bytes:
    return np.asarray(state, np.float32).tobytes()
