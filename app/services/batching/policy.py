"""The batching core's two timing policies: when an idle batcher waits for company
(:class:`IdleWaitPolicy`) and which model calls run on the event loop (:class:`InlinePolicy`).

Idle wait. Holding the first item of an idle pipeline for up to the queue delay lets concurrent
clients join its model call, but whether anyone will come is not knowable. The recent past is a
good guess: when the last ~9 idle-time batches all went out alone (one client in a closed loop,
sparse traffic), waiting only adds latency, so the batcher stops waiting and probes every 128th
time (a probe costs a lone client one queue delay, so probes stay below 1 % of its requests and
out of its p99); one batch that gathered company (several items queued together) turns the wait
back on.

Inline calls. Handing a call to the model thread and its result back costs ~0.1 ms of CPU (a
future, a thread wake-up, a loop wake-up) and, worse for the tail, the two threads then take
turns on the GIL while the loop is busy, so a 0.2 ms call takes 0.5-1 ms. A call that is cheap
runs better on the event loop itself; an expensive one must not, because the loop serves nobody
while it runs. So each call *shape* (its rows rounded up to a power of two, or what the adapter's
``shape`` says) keeps a moving average of how long its calls took, and a call runs inline when
that average is within the budget. A shape never seen runs on the thread first (that is also
where XLA compiles a new shape), and one slow inline call sends its shape back to the thread
until its average falls again.
"""

from __future__ import annotations

from collections.abc import Hashable


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


class InlinePolicy:
    """Per call shape, a moving average of call durations; inline when within ``budget_s``."""

    def __init__(self, budget_s: float, alpha: float = 0.25) -> None:
        self.budget_s, self.alpha = budget_s, alpha
        self._seconds: dict[Hashable, float] = {}

    def inline(self, shape: Hashable) -> bool:
        """Whether a call of ``shape`` should run on the event loop."""
        seconds = self._seconds.get(shape)
        return seconds is not None and seconds <= self.budget_s and self.budget_s > 0

    def record(self, shape: Hashable, seconds: float) -> None:
        """A call of ``shape`` took ``seconds`` (wall time, wherever it ran)."""
        old = self._seconds.get(shape)
        self._seconds[shape] = seconds if old is None else old + self.alpha * (seconds - old)
