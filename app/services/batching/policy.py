"""When an idle batcher holds its first item back for company.

Holding the first item of an idle pipeline for up to the queue delay lets concurrent clients join
its model call, but whether anyone will come is not knowable. The recent past is a good guess:
when the last ~9 idle-time batches all went out alone (one client in a closed loop, sparse
traffic), waiting only adds latency, so the batcher stops waiting and probes every 128th time (a
probe costs a lone client one queue delay, so probes stay below 1 % of its requests and out of
its p99); one batch that gathered company (several items queued together) turns the wait back on.
"""

from __future__ import annotations


class IdleWaitPolicy:
    """An exponential moving average of how often idle-time batches gathered company."""

    def __init__(self, alpha: float = 0.25, threshold: float = 0.1, probe_every: int = 128) -> None:
        self.alpha, self.threshold, self.probe_every = alpha, threshold, probe_every
        self._company = 1.0
        self._idle_batches = 0

    def should_wait(self) -> bool:
        """Called once per idle-time batch, before it waits."""
        self._idle_batches += 1
        return self._company >= self.threshold or self._idle_batches % self.probe_every == 0

    def record(self, had_company: bool) -> None:
        """Whether that batch went out with more than one item."""
        self._company += self.alpha * (had_company - self._company)
