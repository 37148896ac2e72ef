"""Per-client session limits and the session store's eviction, in process (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from app.api.errors import close_code
from app.services.client_limits import ClientLimits, client_key
from app.services.echo_sessions import SessionStore
from app.services.errors import NotFound, Overloaded


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
