"""Per-client session limits and the session store's eviction, in process (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from app.api.errors import close_code
from app.core.addresses import network_key
from app.core.errors import NotFound, Overloaded
from app.services.client_limits import ClientLimits, client_key
from app.services.echo_sessions import SessionStore


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refusal_code(limits: ClientLimits, key: str, new: bool = True) -> str:
    with pytest.raises(Overloaded) as info:
        limits.admit(key, new)
    return info.value.code


def test_creation_rate_is_a_token_bucket_per_address() -> None:
    clock = Clock()
    limits = ClientLimits(new_per_s=2, burst=3, max_attached=100, clock=clock)
    for _ in range(3):
        limits.admit("10.0.0.1", new=True)
        limits.release("10.0.0.1")
    assert refusal_code(limits, "10.0.0.1") == "session_rate_limited"
    limits.admit("10.0.0.2", new=True)  # another address has its own bucket
    limits.admit("10.0.0.1", new=False)  # a resume takes no token
    clock.now += 0.5  # one token back at 2/s
    limits.admit("10.0.0.1", new=True)
    assert refusal_code(limits, "10.0.0.1") == "session_rate_limited"
    with pytest.raises(Overloaded) as info:
        limits.admit("10.0.0.1", new=True)
    assert 0 < info.value.retry_after_s <= 0.5


def test_attached_sessions_are_capped_per_address_and_released() -> None:
    limits = ClientLimits(new_per_s=1000, burst=1000, max_attached=2, clock=Clock())
    limits.admit("a", new=True)
    limits.admit("a", new=False)
    assert refusal_code(limits, "a") == "too_many_sessions_from_client"
    assert refusal_code(limits, "a", new=False) == "too_many_sessions_from_client"
    assert limits.attached("a") == 2
    limits.release("a")
    limits.admit("a", new=True)
    assert limits.attached("a") == 2


def test_the_table_forgets_idle_clients_and_stays_bounded() -> None:
    clock = Clock()
    limits = ClientLimits(new_per_s=10, burst=10, max_attached=5, max_clients=100, clock=clock)
    limits.admit("holder", new=True)
    for i in range(1000):  # a flood of addresses, each opening and closing one session
        limits.admit(f"10.1.{i // 256}.{i % 256}", new=True)
        limits.release(f"10.1.{i // 256}.{i % 256}")
        assert len(limits) <= 101
    assert limits.attached("holder") == 1  # a client holding a session is never forgotten
    clock.now += 1.0  # every bucket is full again: nothing left worth remembering
    limits.prune()
    assert len(limits) == 1


def test_client_key_groups_ipv6_by_64_and_unwraps_mapped_ipv4() -> None:
    assert client_key("127.0.0.2") == "127.0.0.2"
    assert client_key("2001:db8::1") == client_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert client_key("::ffff:10.0.0.7") == "10.0.0.7"
    assert client_key(None) == "unknown"


def test_at_the_cap_the_least_recently_used_detached_session_is_evicted() -> None:
    store = SessionStore(np.zeros(4, np.float32), max_sessions=3, ttl_s=60, capacity=1)
    a, b, c = store.create(), store.create(), store.create()  # grows 1 -> 2 -> 3 slots
    assert len({a.slot, b.slot, c.slot}) == 3
    with pytest.raises(Overloaded) as info:
        store.create()  # all attached: the server is full
    assert info.value.code == "too_many_sessions" and close_code(info.value) == 1013
    store.detach(b)
    store.detach(a)
    store.resume(b.id, b.token)
    store.detach(b)  # a is now the least recently used detached session
    d = store.create()
    assert a.id not in store.sessions and d.slot == a.slot
    with pytest.raises(NotFound) as info:
        store.resume(a.id, a.token)
    assert info.value.code == "session_evicted" and close_code(info.value) == 1008
    assert store.resume(b.id, b.token) is b


def test_idle_attached_lists_only_attached_sessions_past_the_timeout() -> None:
    store = SessionStore(np.zeros(4, np.float32), max_sessions=10, ttl_s=60)
    quiet, busy, gone = store.create(), store.create(), store.create()
    quiet.last_seen -= 10
    gone.last_seen -= 10
    store.detach(gone)
    gone.last_seen -= 10
    assert store.idle_attached(5) == [quiet]
    assert busy not in store.idle_attached(5)


def test_ttl_eviction_drops_only_expired_detached_sessions_oldest_first() -> None:
    store = SessionStore(np.zeros(4, np.float32), max_sessions=10, ttl_s=60)
    old, new, attached = store.create(), store.create(), store.create()
    store.detach(old)
    store.detach(new)
    old.last_seen -= 61
    attached.last_seen -= 61
    assert store.evict_expired() == 1
    assert set(store.sessions) == {new.id, attached.id}


class _Tripwire:
    """A stand-in session that fails the test if anything reads it."""

    attached = True
    id = "tripwire"

    @property
    def last_seen(self) -> float:
        raise AssertionError("idle_attached looked past the first active session")


def test_idle_attached_reads_only_what_it_finds_plus_one() -> None:
    store = SessionStore(np.zeros(4, np.float32), max_sessions=20_000, ttl_s=60)
    sessions = [store.create() for _ in range(10_000)]
    for idle in sessions[:3]:
        idle.last_seen -= 10
    store._attached[_Tripwire.id] = _Tripwire()  # type: ignore[assignment]  # after the 10,000
    store.touch(sessions[3])  # active: moves behind the tripwire; sessions[4] is next, active
    assert store.idle_attached(5) == sessions[:3]
    assert store.idle_attached(5) == []  # each idle session is reported once


def test_touch_keeps_attached_sessions_in_activity_order() -> None:
    store = SessionStore(np.zeros(4, np.float32), max_sessions=10, ttl_s=60)
    a, b = store.create(), store.create()
    a.last_seen -= 10
    b.last_seen -= 10
    store.touch(a)
    assert store.idle_attached(5) == [b]
    a.last_seen -= 10
    assert store.idle_attached(5) == [a]
    store.touch(a)  # a message after it was reported: tracked again
    a.last_seen -= 10
    assert store.idle_attached(5) == [a]


class _CountingLimits(ClientLimits):
    checks = 0

    def _full(self, client):  # type: ignore[no-untyped-def]
        self.checks += 1
        return super()._full(client)


def test_prune_and_admission_do_not_scan_clients_that_hold_sessions() -> None:
    now = [0.0]
    limits = _CountingLimits(10.0, 5, 10, max_clients=20_000, clock=lambda: now[0])
    for i in range(10_000):
        limits.admit(f"10.0.{i // 256}.{i % 256}", new=True)  # each holds one session
    for i in range(3):
        limits.admit(f"10.9.0.{i}", new=True)
        limits.release(f"10.9.0.{i}")
    now[0] += 10.0  # every bucket is full again
    assert limits.prune() == 3
    assert limits.checks <= 4  # the three idle clients (and nothing else)
    assert len(limits) == 10_000


def test_a_full_client_table_forgets_the_longest_idle_client_first() -> None:
    limits = ClientLimits(10.0, 5, 10, max_clients=3, clock=lambda: 0.0)
    limits.admit("a", new=True)  # holds a session: never forgotten
    limits.admit("b", new=True)
    limits.release("b")
    limits.admit("c", new=True)
    limits.release("c")
    limits.admit("d", new=True)  # the table is full: b (idle longest, bucket not full) goes
    assert limits.attached("a") == 1 and len(limits) == 3
    limits.admit("b", new=True)  # b comes back fresh; c was idle longest now
    assert len(limits) == 3


def test_network_keys_are_ipv4_slash_24_and_ipv6_slash_48() -> None:
    assert network_key("127.0.3.9") == network_key("127.0.3.200") == "127.0.3.0/24"
    assert network_key("127.0.4.9") != network_key("127.0.3.9")
    assert network_key("2001:db8:1:2::1") == network_key("2001:db8:1:ffff::1") == "2001:db8:1::/48"
    assert network_key("::ffff:10.0.0.7") == "10.0.0.0/24"
    assert network_key(None) == "unknown"


def test_clear_forgets_attached_sessions_with_either_store() -> None:
    for keep_detached in (True, False):  # False: the Redis store's working copy
        store = SessionStore(np.zeros(4, np.float32), 10, 60, keep_detached=keep_detached)
        store.create(), store.create()
        store.clear()
        assert len(store) == 0 and store.idle_attached(-1) == []
