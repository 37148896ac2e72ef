"""Per-client limits on echo sessions: a creation-rate token bucket and a cap on attached ones.

A *client* is the connection's address (``scope["client"]``; uvicorn replaces it with the
``X-Forwarded-For`` address only for the proxies it trusts). IPv6 addresses are grouped by their
/64 network, the block one host usually gets. The table forgets a client once it holds no
session and its bucket has refilled (it would start the same), and never keeps more than
``max_clients`` entries, so a flood of addresses cannot grow it without bound.

These are one process's limits, checked first (a refusal costs no Redis work). With the Redis
store the same limits are also checked across every worker and replica, by the script that
creates or attaches the session (``app.services.redis_sessions``); both refuse with the errors
built here.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from app.core.addresses import client_key
from app.core.errors import Overloaded

__all__ = ["ClientLimits", "client_key", "rate_limited", "too_many_sessions"]


def too_many_sessions(max_attached: int) -> Overloaded:
    return Overloaded(
        f"this address already holds {max_attached} open sessions; close one first",
        "too_many_sessions_from_client",
    )


def rate_limited(rate: float, wait_s: float) -> Overloaded:
    return Overloaded(
        f"this address opens sessions faster than {rate:g}/s; retry later",
        "session_rate_limited",
        retry_after_s=wait_s,
    )


@dataclass(slots=True)
class _Client:
    tokens: float
    refilled_at: float
    attached: int = 0


class ClientLimits:
    """Admit or refuse a client's new or resumed session; count its attached sessions.

    Every operation is O(1) in the number of clients (``prune`` is O(pruned)): the clients that
    hold no session are kept in the order they let go of their last one, so the ones to forget
    are always at the front.
    """

    def __init__(
        self,
        new_per_s: float,
        burst: int,
        max_attached: int,
        max_clients: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst, self.max_attached = new_per_s, float(burst), max_attached
        self.max_clients, self.clock = max_clients, clock
        self._clients: dict[str, _Client] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()  # attached == 0, oldest first

    def __len__(self) -> int:
        return len(self._clients)

    def admit(self, key: str, new: bool) -> None:
        """Count one more attached session for ``key``, or raise ``Overloaded`` (nothing counted).

        ``new`` sessions also take a token from the client's creation bucket; resumes do not.
        """
        client = self._get(key)
        if client.attached >= self.max_attached:
            raise too_many_sessions(self.max_attached)
        if new:
            self._refill(client)
            if client.tokens < 1.0:
                if client.attached == 0:
                    self._idle.move_to_end(key)  # its bucket is emptier than the others'
                raise rate_limited(self.rate, (1.0 - client.tokens) / self.rate)
            client.tokens -= 1.0
        if client.attached == 0:
            del self._idle[key]
        client.attached += 1

    def release(self, key: str) -> None:
        """One of ``key``'s attached sessions ended."""
        client = self._clients.get(key)
        if client is not None and client.attached > 0:
            client.attached -= 1
            if client.attached == 0:
                self._idle[key] = None

    def attached(self, key: str) -> int:
        client = self._clients.get(key)
        return client.attached if client is not None else 0

    def prune(self) -> int:
        """Forget clients that hold nothing and whose bucket is full again; returns how many.

        Looks at the clients in the order they became idle and stops at the first whose bucket
        is not full yet: O(pruned), not O(clients).
        """
        pruned = 0
        while self._idle:
            key = next(iter(self._idle))
            if not self._full(self._clients[key]):
                break
            self._forget(key)
            pruned += 1
        return pruned

    def _get(self, key: str) -> _Client:
        client = self._clients.get(key)
        if client is not None:
            return client
        if len(self._clients) >= self.max_clients:
            self.prune()
            # Still full: forget the longest idle clients (their bucket restarts full: a small
            # gift, bounded by the table size). Clients that hold sessions are never forgotten.
            while len(self._clients) >= self.max_clients and self._idle:
                self._forget(next(iter(self._idle)))
        client = self._clients[key] = _Client(self.burst, self.clock())
        self._idle[key] = None
        return client

    def _forget(self, key: str) -> None:
        del self._idle[key]
        del self._clients[key]

    def _refill(self, client: _Client) -> None:
        now = self.clock()
        client.tokens = min(self.burst, client.tokens + (now - client.refilled_at) * self.rate)
        client.refilled_at = now

    def _full(self, client: _Client) -> bool:
        return client.tokens + (self.clock() - client.refilled_at) * self.rate >= self.burst
