"""Echo sessions in Redis (``ECHO_STORE_URL=redis://...``): state that outlives the process.

Per session, one hash ``<prefix>s:<id>`` holds the state row (float32 bytes), ``seq`` (the last
stored step), the model version, a SHA-256 of the token (never the token: a dump of Redis must
not let anyone resume a session), a ``fence``, ``own`` (the holding process, while attached) and
the last ``ECHO_REPLAY_REPLIES`` packed replies (``r<seq mod n>``, ``app.services.echo_replies``).
It expires ``ECHO_SESSION_TTL_S`` after its detach; while attached, each attach and stored step
sets its expiry to ``attached_ttl_s`` (``ECHO_IDLE_TIMEOUT_S`` + 60 s if that is longer), so an
idle attached session outlives its connection, whose idle timeout closes it first.

Leases, one per process, not per session: each :class:`RedisSessions` (one per server process)
has a random ``owner`` id and an owner key ``<prefix>o:<owner>`` that expires after
``ECHO_LEASE_S`` unless renewed (:meth:`RedisSessions.keep_owner`: one ``SET ... PX ... GET`` a
tick, whatever the number of sessions). A session is in use while its ``own`` names a live owner
key: one connection per session across every worker and replica. A detach removes ``own`` (the
session resumes elsewhere at once); a process that dies leaves its owner key to lapse, which frees
all its sessions at once; a clean shutdown deletes it (:meth:`RedisSessions.retire`).

Every attach increments ``fence``, and every write (a Lua script, atomic) first checks that
the session's fence is still the writer's: a process that lost its lease (it stalled, another
replica took the session over) can never overwrite newer state. ``keep_owner`` tells the process
when its owner key had lapsed; then (only then) :meth:`RedisSessions.reclaim` checks its attached
sessions' fences: those unchanged are its own again, the others were taken over. A script that
needs the owner key (create, attach) and finds it lapsed calls ``on_lapse`` first (the same
renewal and check) and runs once more. The steps of one batched model call are stored by one
script call (:meth:`RedisSessions.commit`), before any of them is answered.

Redis behind Sentinel (``redis+sentinel://``, ``app.services.redis_urls``): the pool asks the
Sentinels for the primary on every new connection, so a failover is followed without a restart.
With ``ECHO_STORE_MIN_REPLICAS=N`` the writes whose loss a failover must not cause (create,
attach, commit, release) are pipelined with ``WAIT N``; fewer acknowledgements raise
:class:`NotReplicated` (a ``StoreUnavailable``) and nothing is answered on their strength. An
attach's fence increment in particular: a promoted replica lacking it could give the same fence
to another process. Owner-key renewals are not waited for: one missing on a promoted replica is
a lapse, which the next renewal reports (then :meth:`RedisSessions.reclaim`, as above).

Per-client limits (``ECHO_MAX_SESSIONS_PER_CLIENT``, ``ECHO_NEW_SESSIONS_PER_S`` / ``_BURST``)
hold across every worker and replica: a hash ``<prefix>c:<client>`` per client address holds its
token bucket (``tk``, ``ts``: Redis's clock, ms) and, per process (owner id), ``seq:count`` of its
attached sessions from that client. The create and attach scripts check them and take a token or
count the session in the same script call (no extra round trip; O(processes) per open, nothing
per message); a release records the process's new count. Counts of processes whose owner key
is gone are dropped when read. Each process writes its own count (:class:`Admission`: the
count its in-memory ``ClientLimits`` holds, ordered by ``seq``), so a write that failed is made
good by the next one (``EchoService`` re-sends them each tick). The hash expires
``CLIENT_HOLD_S`` after its last write while anyone holds a session, else once its bucket is
full again.

The scripts read the holder's owner key by a name built from the hash, so the store needs one
Redis (not Redis Cluster), as before. Earlier versions' per-session lease keys ``<prefix>l:<id>``
are still honoured by attach, for rolling upgrades.

Errors: ``NotFound``, ``Forbidden``, ``Conflict`` (``session_in_use``, with when to retry) and
:class:`StoreUnavailable` (Redis down or slow) for everything the store could not do.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import redis.asyncio as redis
from redis.asyncio.connection import BlockingConnectionPool, ConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError

from app.core.config import Settings
from app.core.errors import Conflict, Forbidden, NotFound, StoreUnavailable
from app.core.metrics import ECHO_STORE_ERRORS, ECHO_STORE_SECONDS
from app.services.client_limits import rate_limited, too_many_sessions
from app.services.echo_replies import reply_seq
from app.services.redis_urls import SentinelUrl, is_sentinel_url, parse_sentinel_url

log = logging.getLogger(__name__)

# An attached session's hash outlives ECHO_IDLE_TIMEOUT_S by this much: time for the sweeper to
# notice the idle connection (every 30 s at most) and for its close to release the session.
IDLE_CLOSE_SLACK_S = 60.0
# A client's limits hash outlives its last write by this much while it holds sessions (a count
# of a process that died is dropped when read, or with the hash), and by at least
# CLIENT_KEEP_S once it holds none (its bucket refilling).
CLIENT_HOLD_S = 86_400.0
CLIENT_KEEP_S = 60.0

# Per-client limits shared by every process (see "Per-client limits" above), spliced into the
# scripts that create, attach and release. ARGV from ``c``: owner, owner key prefix, new (1/0),
# rate (tokens per ms), burst, most attached, this process's count (this session included),
# seq, hold ms, keep ms.
_CLIENT_LIB = """
local function client_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function client_tokens(ck, rate, burst, now)
  local v = redis.call('HMGET', ck, 'tk', 'ts')
  if not v[1] then return burst end
  return math.min(burst, tonumber(v[1]) + math.max(0, now - tonumber(v[2])) * rate)
end
-- the client's attached sessions on the other live processes; dead processes' counts dropped
local function client_others(ck, owner, oprefix)
  local n, f = 0, redis.call('HGETALL', ck)
  for i = 1, #f, 2 do
    local name = f[i]
    if name ~= 'tk' and name ~= 'ts' and name ~= owner then
      if redis.call('EXISTS', oprefix .. name) == 1 then
        n = n + tonumber(string.match(f[i + 1], ':(%d+)$'))
      else
        redis.call('HDEL', ck, name)
      end
    end
  end
  return n
end
-- this process's count (unless a later write of its own is there), then the key's expiry: while
-- anyone holds a session, hold ms; else until its bucket is full again, keep ms at least
local function client_put(ck, owner, oprefix, seq, count, rate, burst, hold, keep, now)
  local cur = redis.call('HGET', ck, owner)
  if cur and tonumber(string.match(cur, '^(%d+)')) >= seq then
    count = tonumber(string.match(cur, ':(%d+)$'))
  else
    redis.call('HSET', ck, owner, seq .. ':' .. count)
  end
  if count + client_others(ck, owner, oprefix) > 0 then
    redis.call('PEXPIRE', ck, hold)
  else
    local refill = (burst - client_tokens(ck, rate, burst, now)) / rate
    redis.call('PEXPIRE', ck, math.max(keep, math.ceil(refill)))
  end
end
-- before a create or attach (c: the index of the first client argument): nil, or a refusal
local function client_refusal(ck, c, now)
  local n = client_others(ck, ARGV[c], ARGV[c + 1])
  if n + tonumber(ARGV[c + 6]) > tonumber(ARGV[c + 5]) then return {'too_many'} end
  if ARGV[c + 2] == '1' then
    local rate = tonumber(ARGV[c + 3])
    local tk = client_tokens(ck, rate, tonumber(ARGV[c + 4]), now)
    if tk < 1 then return {'rate_limited', math.ceil((1 - tk) / rate)} end
  end
  return nil
end
-- after it: a new session takes a token; this process's count is recorded
local function client_take(ck, c, now)
  local rate, burst = tonumber(ARGV[c + 3]), tonumber(ARGV[c + 4])
  if ARGV[c + 2] == '1' then
    redis.call('HSET', ck, 'tk', client_tokens(ck, rate, burst, now) - 1, 'ts', now)
  end
  client_put(ck, ARGV[c], ARGV[c + 1], tonumber(ARGV[c + 7]), tonumber(ARGV[c + 6]), rate,
    burst, tonumber(ARGV[c + 8]), tonumber(ARGV[c + 9]), now)
end
"""

# KEYS: hash, this process's owner key[, client key]; ARGV: token hash, state, version, ttl ms,
# owner[, client arguments from 6]. -> {'ok'} created | {'exists'} | {'lapsed'} (this process's
# owner key lapsed, see RedisSessions.lapsed) | {'too_many'} | {'rate_limited', ms to wait}
_CREATE = (
    _CLIENT_LIB
    + """
if redis.call('EXISTS', KEYS[2]) == 0 then return {'lapsed'} end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
local now = client_now()
if KEYS[3] then
  local refusal = client_refusal(KEYS[3], 6, now)
  if refusal then return refusal end
end
redis.call('HSET', KEYS[1], 'th', ARGV[1], 'st', ARGV[2], 'seq', 0, 'ver', ARGV[3], 'fence', 1,
  'own', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if KEYS[3] then client_take(KEYS[3], 6, now) end
return {'ok'}
"""
)

# KEYS: hash, legacy lease key, this process's owner key[, client key]; ARGV: token hash, ttl
# ms, owner, owner key prefix[, client arguments from 5]. The session is in use while its
# holder's owner key lives (the holder's name is in the hash, so that key cannot be passed in
# KEYS: standalone Redis only, as before).
# -> {'ok', fence, HGETALL...} | {'not_found'} | {'invalid_token'} | {'in_use', ms left}
#    | {'lapsed'} (this process's owner key is gone) | {'too_many'}
_ACQUIRE = (
    _CLIENT_LIB
    + """
local th = redis.call('HGET', KEYS[1], 'th')
if not th then return {'not_found'} end
if th ~= ARGV[1] then return {'invalid_token'} end
local holder = redis.call('HGET', KEYS[1], 'own')
if holder then
  local left = redis.call('PTTL', ARGV[4] .. holder)
  if left ~= -2 then return {'in_use', left} end
end
local legacy = redis.call('PTTL', KEYS[2])
if legacy ~= -2 then return {'in_use', legacy} end
if redis.call('EXISTS', KEYS[3]) == 0 then return {'lapsed'} end
local now = client_now()
if KEYS[4] then
  local refusal = client_refusal(KEYS[4], 5, now)
  if refusal then return refusal end
end
local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
redis.call('HSET', KEYS[1], 'own', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if KEYS[4] then client_take(KEYS[4], 5, now) end
return {'ok', fence, redis.call('HGETALL', KEYS[1])}
"""
)

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

# After this process's owner key lapsed. KEYS: session hashes; ARGV: owner, then fences. Where
# nobody attached since (the fence is still ours) the session is this owner's again.
# -> 1 held / 0 lost, per session.
_RECLAIM = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'fence') == ARGV[i + 1] then
    redis.call('HSET', key, 'own', ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# KEYS: session hashes[, client key]; ARGV: ttl ms (detached), the owner, the number of sessions
# n, their fences, then for the client: owner, owner key prefix, rate, burst, seq, count, hold ms,
# keep ms. Gives up each session only where this owner holds it with that fence or an earlier
# one: a failover can forget an attach (its fence) that the primary it reached had taken but not
# replicated; the attach before it, the one the promoted replica holds, is this owner's too, and
# no longer in use. Records this process's new count of the client's sessions.
_RELEASE = (
    _CLIENT_LIB
    + """
local n = tonumber(ARGV[3])
for i = 1, n do
  local fence = tonumber(redis.call('HGET', KEYS[i], 'fence'))
  if fence and fence <= tonumber(ARGV[i + 3]) and redis.call('HGET', KEYS[i], 'own') == ARGV[2] then
    redis.call('HDEL', KEYS[i], 'own')
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
  end
end
local ck = KEYS[n + 1]
if ck then
  local c = n + 4
  client_put(ck, ARGV[c], ARGV[c + 1], tonumber(ARGV[c + 4]), tonumber(ARGV[c + 5]),
    tonumber(ARGV[c + 2]), tonumber(ARGV[c + 3]), tonumber(ARGV[c + 6]), tonumber(ARGV[c + 7]),
    client_now())
end
return 1
"""
)

# KEYS: client keys; ARGV: owner, owner key prefix, rate, burst, hold ms, keep ms, then per
# client seq and count: this process's counts, recorded again (after a failure, or a lapse).
_CLIENTS = (
    _CLIENT_LIB
    + """
local now = client_now()
for i, ck in ipairs(KEYS) do
  client_put(ck, ARGV[1], ARGV[2], tonumber(ARGV[5 + 2 * i]), tonumber(ARGV[6 + 2 * i]),
    tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), now)
end
return 1
"""
)


# A v2 sequence restarted on another model version. KEYS: hash; ARGV: fence, state, version,
# ttl ms. -> 1 written / 0 fenced off.
_RESTART = """
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'st', ARGV[2], 'ver', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
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


@dataclass
class Admission:
    """A client's session to admit under the shared per-client limits, with the create or
    attach script: ``attached`` is this process's count of the client's sessions, this one
    included; ``seq`` orders this process's writes of it."""

    client: str  # client_key()
    new: bool  # a new session takes a token
    attached: int
    seq: int
    counted: bool = False  # Redis may count this session now (re-send the count if it fails)


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
        attached_ttl_s: float | None = None,
        prefix: str = "rnn:echo:",
        min_replicas: int = 0,
        client_rate: float = 50.0,
        client_burst: int = 500,
        client_max_attached: int = 500,
    ) -> None:
        self.ttl_ms, self.lease_ms = int(ttl_s * 1000), int(lease_s * 1000)
        self.attached_ttl_ms = int(max(ttl_s, attached_ttl_s or 0) * 1000)
        self.replies, self.prefix = replies, prefix
        # Writes that must survive a failover are answered only once this many replicas hold
        # them (WAIT, pipelined with the script); WAIT gives up after half the command timeout.
        self.min_replicas = min_replicas
        self.wait_ms = max(int(timeout_s * 500), 1)
        self.short: str | None = None  # why the last replicated write fell short, if it did
        self.owner = secrets.token_urlsafe(12)  # this process, this start
        self.owner_key = f"{prefix}o:{self.owner}"
        self.client_rate, self.client_max_attached = client_rate, client_max_attached
        # per-client script arguments: rate per ms, burst, most attached, hold ms, keep ms
        self._client_rate_ms, self._client_burst = repr(client_rate / 1000), client_burst
        self._client_times = (int(CLIENT_HOLD_S * 1000), int(CLIENT_KEEP_S * 1000))
        # Called when a script finds the owner key lapsed, before it is retried once: by default
        # it renews the key; EchoService first finds out which sessions were taken meanwhile.
        self.on_lapse: Callable[[], Awaitable[object]] = self.keep_owner
        # At most 64 connections; a command finding them all busy (a burst of handshakes) waits
        # for one up to the command timeout instead of failing at once ("Too many connections").
        options = dict(
            max_connections=64,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=connect_timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),  # a connection reset
            health_check_interval=5,
        )
        self.sentinel: Sentinel | None = None
        if is_sentinel_url(url):
            pool = self._sentinel_pool(parse_sentinel_url(url), options)
        else:
            pool = redis.BlockingConnectionPool.from_url(url, **options)
        _check_connection_options(pool)
        for sentinel in self.sentinel.sentinels if self.sentinel else []:
            _check_connection_options(sentinel.connection_pool)
        self.client = redis.Redis.from_pool(pool)  # closing the client closes the pool
        self.error: str | None = None  # why the last command failed; None once one succeeded
        self._scripts = {
            name: self.client.register_script(source)
            for name, source in {
                "create": _CREATE,
                "acquire": _ACQUIRE,
                "commit": _COMMIT,
                "reclaim": _RECLAIM,
                "release": _RELEASE,
                "restart": _RESTART,
                "clients": _CLIENTS,
            }.items()
        }

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisSessions | None:
        """The store ``ECHO_STORE_URL`` names, or None for ``memory://``."""
        url = settings.echo_store_url.get_secret_value()
        if url.startswith("memory://"):
            return None
        if not url.startswith(("redis://", "rediss://", "unix://")) and not is_sentinel_url(url):
            raise ValueError(
                "ECHO_STORE_URL must be memory://, redis://, rediss://, unix://, "
                "redis+sentinel:// or rediss+sentinel://"
            )
        return cls(
            url,
            ttl_s=settings.echo_session_ttl_s,
            lease_s=settings.echo_lease_s,
            replies=settings.echo_replay_replies,
            connect_timeout_s=settings.echo_store_connect_timeout_s,
            timeout_s=settings.echo_store_timeout_s,
            attached_ttl_s=settings.echo_idle_timeout_s + IDLE_CLOSE_SLACK_S,
            min_replicas=settings.echo_store_min_replicas,
            client_rate=settings.echo_new_sessions_per_s,
            client_burst=settings.echo_new_sessions_burst,
            client_max_attached=settings.echo_max_sessions_per_client,
        )

    def _sentinel_pool(self, url: SentinelUrl, options: dict) -> SentinelConnectionPool:
        """A pool whose connections go to the primary the Sentinels name, asking them again
        whenever a connection fails or the server it reached answers READONLY (demoted). The
        Sentinels get the URL's ``sentinel_*`` credentials (none by default), the Redis servers
        the URL's own; with TLS, both get the same ``ssl_*`` options (CA, client certificate)."""
        tls = {"ssl": True, **url.ssl} if url.tls else {}
        sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
        # redis-py's default retries a Sentinel that is down or refuses the password 10 times,
        # backing off up to 1 s (8 s per Sentinel, each discovery): once, at once, as servers.
        sentinel_options["retry"] = Retry(ExponentialBackoff(cap=0.05, base=0.01), 1)
        if url.sentinel_password is not None:
            sentinel_options["username"] = url.sentinel_username
            sentinel_options["password"] = url.sentinel_password
        self.sentinel = Sentinel(list(url.sentinels), sentinel_kwargs={**sentinel_options, **tls})
        return _BlockingSentinelPool(
            url.master,
            self.sentinel,
            db=url.db,
            username=url.username,
            password=url.password,
            **tls,
            **options,
        )

    def status(self) -> str:
        error = self.error or self.short
        return "ok" if error is None else f"unavailable: {error}"

    async def ping(self) -> bool:
        try:
            await self._run("ping", self.client.ping())
        except StoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        await self.client.aclose()
        if self.sentinel is not None:
            await self.sentinel.aclose()

    async def keep_owner(self) -> bool:
        """Renew this process's owner key (one command); False if it had lapsed meanwhile.

        While it lives, every session this process attached is in use; once it lapsed, any of
        them may have been taken over (:meth:`reclaim` tells which were not).
        """
        if self.short is None:
            previous = await self._run(
                "renew", self.client.set(self.owner_key, 1, px=self.lease_ms, get=True)
            )
            return previous is not None
        # Writes were not replicated lately: this renewal WAITs too, to find out when they are
        # again (an idle server would stay "unavailable" until its next session otherwise).
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.owner_key, 1, px=self.lease_ms, get=True)
        pipe.execute_command("WAIT", self.min_replicas, self.wait_ms)
        previous, acked = await self._run("renew", pipe.execute())
        if acked >= self.min_replicas:
            log.info("echo session store replicas are back", extra={"op": "renew"})
            self.short = None
        return previous is not None

    async def retire(self) -> None:
        """Drop the owner key (shutdown): whatever this process still held is free at once."""
        await self._run("release", self.client.delete(self.owner_key))

    async def create(
        self,
        session_id: str,
        token: str,
        state: np.ndarray,
        version: int,
        admission: Admission | None = None,
    ) -> None:
        """Store a new session in its initial state, held by this process; with ``admission``,
        under the client's shared limits (``Overloaded`` if they refuse)."""
        keys = [self._key(session_id), self.owner_key]
        args = [
            token_hash(token),
            _state_bytes(state),
            version,
            self.attached_ttl_ms,
            self.owner,
        ]
        self._admit(admission, keys, args)
        answer = await self._scripted("create", keys, args, admission)
        if answer[0] == b"exists":
            raise Conflict("a session with this id exists already", "session_exists")

    async def acquire(
        self, session_id: str, token: str, admission: Admission | None = None
    ) -> Stored:
        """Attach: check the token (and with ``admission`` the client's shared limits), take the
        session (a new fence), read it back."""
        keys = [self._key(session_id), self._legacy_lease(session_id), self.owner_key]
        args = [token_hash(token), self.attached_ttl_ms, self.owner, f"{self.prefix}o:"]
        self._admit(admission, keys, args)
        try:
            answer = await self._scripted("acquire", keys, args, admission)
        except NotReplicated as exc:  # attached on the primary, but a failover could forget
            # this fence and hand it out again: the caller must give it back (exc.fence)
            if isinstance(exc.answer, list) and exc.answer[0] == b"ok":
                exc.fence = int(exc.answer[1])
            raise
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

    def _admit(self, admission: Admission | None, keys: list, args: list) -> None:
        """The client key and arguments of the shared limits, for create and acquire."""
        if admission is None:
            return
        keys.append(self._client_key(admission.client))
        args += [
            self.owner,
            f"{self.prefix}o:",
            int(admission.new),
            self._client_rate_ms,
            self._client_burst,
            self.client_max_attached,
            admission.attached,
            admission.seq,
            *self._client_times,
        ]

    def _refused(self, answer: object) -> None:
        """Raise the client limits' refusal, if ``answer`` is one."""
        if not isinstance(answer, list):
            return
        if answer[0] == b"too_many":
            raise too_many_sessions(self.client_max_attached)
        if answer[0] == b"rate_limited":
            raise rate_limited(self.client_rate, int(answer[1]) / 1000)

    async def commit(self, steps: list[Step]) -> list[bool]:
        """Store every step in one round trip; False where the session's fence moved on."""
        keys, args = [], [self.attached_ttl_ms]
        for s in steps:
            keys.append(self._key(s.session_id))
            field = b"" if s.reply is None else b"r%d" % (s.seq % self.replies)
            args += [s.fence, s.state, s.seq, field, s.reply or b""]
        stored = await self._write("commit", keys, args)
        return [bool(x) for x in stored]

    async def restart(self, session_id: str, fence: int, state: np.ndarray, version: int) -> bool:
        """Put an attached session in ``state`` on model ``version`` (a v2 sequence started
        again after a new version took over); False if its fence moved on."""
        keys = [self._key(session_id)]
        args = [fence, _state_bytes(state), version, self.attached_ttl_ms]
        return bool(await self._write("restart", keys, args))

    async def reclaim(self, leases: list[tuple[str, int]]) -> list[bool]:
        """After the owner key lapsed: which of these sessions are still this process's (their
        fence unchanged: held again from now on) and which were taken over (False)."""
        keys = [self._key(session_id) for session_id, _ in leases]
        args = [self.owner, *(fence for _, fence in leases)]
        held = await self._run("reclaim", self._scripts["reclaim"](keys, args))
        return [bool(x) for x in held]

    async def release(
        self, leases: list[tuple[str, int]], client: tuple[str, int, int] | None = None
    ) -> None:
        """Give sessions up (detach, shutdown): they resume elsewhere at once, and stay
        resumable ``ttl_s`` from now. Replicated like a step (a promoted replica that lacked it
        would keep the session in use by this live process, which no longer has it). A session
        is released where this process holds it with the fence given or an earlier one (an
        attach that a failover forgot leaves the one before it in place). ``client``: (client
        key, seq, count) to record this process's new count of that client's sessions in the
        same call."""
        if not leases and client is None:
            return
        keys = [self._key(session_id) for session_id, _ in leases]
        args: list = [self.ttl_ms, self.owner, len(leases), *(fence for _, fence in leases)]
        if client is not None:
            key, seq, count = client
            keys.append(self._client_key(key))
            args += [self.owner, f"{self.prefix}o:", self._client_rate_ms, self._client_burst]
            args += [seq, count, *self._client_times]
        await self._write("release", keys, args)

    async def record_clients(self, counts: list[tuple[str, int, int]]) -> None:
        """Record this process's counts again: (client key, seq, count) each, one round trip.
        Not replicated on purpose (a count a failover loses is made good by the next one)."""
        if not counts:
            return
        keys = [self._client_key(key) for key, _, _ in counts]
        args: list = [self.owner, f"{self.prefix}o:", self._client_rate_ms, self._client_burst]
        args += self._client_times
        for _, seq, count in counts:
            args += [seq, count]
        await self._run("clients", self._scripts["clients"](keys, args))

    async def _scripted(self, op: str, keys: list, args: list, admission: Admission | None = None):
        """Run a script that needs this process's owner key alive; if it lapsed, renew it first
        (``on_lapse``) and run the script once more. Raises the shared client limits' refusal;
        ``admission.counted`` says whether Redis may count the session (not after a refusal)."""
        for attempt in range(2):
            if admission is not None:
                admission.counted = True  # until an answer says otherwise
            answer = await self._write(op, keys, args)
            if admission is not None:
                admission.counted = not isinstance(answer, list) or answer[0] == b"ok"
            if not _lapsed(answer):
                self._refused(answer)
                return answer
            if attempt == 0:
                await self.on_lapse()
        raise StoreUnavailable(
            "the echo session store is catching up; retry shortly", retry_after_s=1.0
        )

    async def _write(self, op: str, keys: list, args: list):
        """Run script ``op``. With ``min_replicas``, WAIT for that many replicas in the same
        round trip (a pipeline: WAIT cannot run inside a script); a write they did not all
        acknowledge raises :class:`NotReplicated` (a ``StoreUnavailable``): it is on the primary,
        but a failover now could lose it, so nothing may be answered on its strength."""
        script = self._scripts[op]
        if not self.min_replicas:
            return await self._run(op, script(keys, args))
        answer, acked = await self._run(op, self._waited(script, keys, args))
        if acked >= self.min_replicas or not _wrote(op, answer):
            if acked >= self.min_replicas and self.short is not None:
                log.info("echo session store replicas are back", extra={"op": op})
                self.short = None
            return answer
        ECHO_STORE_ERRORS.labels(op).inc()
        if self.short is None:
            log.warning(
                "echo session store: write not replicated",
                extra={"op": op, "replicas": acked, "wanted": self.min_replicas},
            )
        self.short = f"{acked} of {self.min_replicas} replicas acknowledged a write"
        raise NotReplicated(answer)

    async def _waited(self, script, keys: list, args: list) -> tuple[object, int]:
        """EVALSHA and WAIT pipelined on one connection (WAIT counts the replicas holding
        everything that connection wrote); loads the script if the server lacks it (a promoted
        replica's script cache starts empty)."""
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", self.min_replicas, self.wait_ms)
            answer, acked = await pipe.execute(raise_on_error=False)
            if isinstance(answer, NoScriptError) and attempt == 0:
                await self.client.script_load(script.script)
                continue
            for result in (answer, acked):
                if isinstance(result, Exception):
                    raise result
            return answer, int(acked)
        raise AssertionError("unreachable")

    async def _run(self, op: str, call):
        started = time.perf_counter()
        try:
            result = await call
        except (redis.RedisError, OSError) as exc:
            ECHO_STORE_ERRORS.labels(op).inc()
            first = self.error is None
            self.error = await self._sentinel_trouble(exc) or f"{type(exc).__name__}: {exc}"[:200]
            if first:
                log.warning("echo session store unavailable", extra={"op": op, "error": self.error})
            if _demoted(exc):  # demoted or cut off: reconnect, asking the Sentinels
                await self._drop_idle_connections()
            raise StoreUnavailable(
                "the echo session store is unavailable; retry shortly", retry_after_s=1.0
            ) from exc
        ECHO_STORE_SECONDS.labels(op).observe(time.perf_counter() - started)
        if self.error is not None:
            log.info("echo session store is back", extra={"op": op})
            self.error = None
        return result

    async def _sentinel_trouble(self, exc: BaseException) -> str | None:
        """What each Sentinel answers, when none named a primary: redis-py's message has only
        each error's class (``AuthenticationError``, ``ConnectionError``: a refused password
        and a refused certificate look alike). Asks once per new failure, not on every command
        while it lasts."""
        if self.sentinel is None or not isinstance(exc, MasterNotFoundError):
            return None
        if self.error is not None and self.error.startswith("MasterNotFoundError"):
            return self.error
        service = self.client.connection_pool.service_name
        found = []
        for sentinel in self.sentinel.sentinels:
            kwargs = sentinel.connection_pool.connection_kwargs
            where = f"{kwargs.get('host')}:{kwargs.get('port')}"
            try:
                state = (await sentinel.sentinel_masters()).get(service)
            except (redis.RedisError, OSError) as error:
                text = str(error)
                said = text if where in text else f"{where}: {text}"  # ConnectionError names it
                found.append(f"{type(error).__name__}: {said}"[:160])
                continue
            known = "a primary that is down" if state else "no such master"
            found.append(f"{where} knows {known}")
        listed = "; ".join(found)
        return f"MasterNotFoundError: no Sentinel named a primary for {service!r}: {listed}"[:600]

    async def _drop_idle_connections(self) -> None:
        """A script that writes, run on a demoted primary, fails with an error that only
        mentions READONLY (redis-py's Sentinel connections reconnect on a plain READONLY reply,
        not on this one), and on a deposed primary not demoted yet with NOREPLICAS; a pooled
        connection would go on reaching that server: drop the idle ones (the failed one is back
        among them), so that the next connect asks the Sentinels again."""
        with contextlib.suppress(Exception):
            await self.client.connection_pool.disconnect(inuse_connections=False)

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}s:{session_id}"

    def _client_key(self, client: str) -> str:
        return f"{self.prefix}c:{client}"

    def _legacy_lease(self, session_id: str) -> str:
        """The per-session lease key of earlier versions, honoured while they still run."""
        return f"{self.prefix}l:{session_id}"


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (connections to whichever server is the primary now) with the blocking
    pool's bound: at most ``max_connections``, a command waits ``timeout`` for a free one."""


class NotReplicated(StoreUnavailable):
    """A write fewer than ``ECHO_STORE_MIN_REPLICAS`` replicas acknowledged in time."""

    def __init__(self, answer: object) -> None:
        super().__init__(
            "the echo session store could not replicate a write; retry shortly", retry_after_s=1.0
        )
        self.answer = answer
        self.fence: int | None = None  # an attach's fence, to give back


def _check_connection_options(pool: ConnectionPool) -> None:
    """Refuse at startup what would otherwise fail every connection: a query option that
    redis-py does not take (``rediss://...?ssl_ca_cert=``), or TLS files that do not load (a
    CA file that is missing or not PEM). Builds one connection object, connects nothing; the
    errors name the problem, never the URL."""
    try:
        connection = pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:  # "... got an unexpected keyword argument 'x'": names only
        raise ValueError(f"ECHO_STORE_URL has an option redis-py does not take: {exc}") from None
    context = getattr(connection, "ssl_context", None)
    if context is not None:
        try:
            context.get()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ValueError(
                f"ECHO_STORE_URL's TLS options do not load ({type(exc).__name__}: {exc})"
            ) from None


def _wrote(op: str, answer: object) -> bool:
    """Whether a script's answer says it wrote something that must be replicated."""
    if op in ("create", "acquire"):
        return isinstance(answer, list) and answer[0] == b"ok"
    if op == "commit":
        return isinstance(answer, list) and 1 in answer
    if op == "restart":
        return answer == 1
    return True  # release


def _demoted(exc: BaseException) -> bool:
    """Whether ``exc`` says the server reached is a replica (it was demoted by a failover) or a
    primary cut off from its replicas (``min-replicas-to-write``: one that stalled and woke up
    after a failover elsewhere answers so until the Sentinels demote it, seconds later)."""
    text = str(exc)
    return isinstance(exc, ReadOnlyError) or (
        isinstance(exc, ResponseError)
        and any(s in text for s in ("READONLY", "WAIT cannot be used with replica", "NOREPLICAS"))
    )


def _lapsed(answer: object) -> bool:
    return isinstance(answer, list) and answer[0] == b"lapsed"


def _state_bytes(state: np.ndarray) -> bytes:
    return np.asarray(state, np.float32).tobytes()
