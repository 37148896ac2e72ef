"""Process-wide runtime settings for serving latency: the garbage collector and the GIL.

Called once everything is loaded (``app.main``):

* TensorFlow leaves ~350k objects behind at start-up; every full GC pass walked them all
  (0.25 s idle, 0.3-0.9 s pauses under load), so they are frozen out of the collector.
* Short, frequent pauses instead of long ones. The youngest generation is collected every 2,000
  net new objects (CPython: 700; before: 20,000), the middle one every 10 of those (before: 20):
  with 1,000 WebSocket sessions and 2,000-8,000 messages/s, 20,000 gave 4-6 ms young pauses and,
  every minute or so, a 40-80 ms middle one (the objects of newly opened connections); 2,000
  gives ~0.2 ms and ~5 ms (at most 10 ms) for about the same total GC time. A full collection
  walks every long-lived object (every kept session's and connection's: 144 ms with ~10,000
  sessions kept), so it waits for many middle ones (CPython: 10; with 50 it came every ~70 s
  under that load; see the pacer below for today's 24,000). Measured with this module's pause
  histogram.
* A shorter switch interval hands the GIL to the model thread within 1 ms instead of 5 ms while
  the event loop is busy (calls over ``INLINE_CALL_BUDGET_MS`` run there).
* Collections on a clock too (:func:`start_pacer`): the thresholds count *net* new objects, and
  a session's pending receive is re-created with each of its messages (a coroutine, a future, a
  frame: ~7 objects) while the one it replaces dies, so under steady traffic the count barely
  moves and the young generation filled with every waiting session's objects: 25,000-100,000
  of them with 9,000 senders, 16-100 ms per young collection and up to 250 ms per middle one
  (found with a ``gc.callbacks`` hook listing the generation's types; pacing took the open-loop
  p99 over 9,000 senders from 51.9 to 8.4 ms, ``3397d71``). Every 50 ms the pacer
  collects the young and middle generations together, so each object that survives is traversed
  once on its way to the old generation. Young collections every 50 ms and middle ones every
  100 ms traversed it twice, and left the middle generation 100 ms of survivors to walk at once
  (~6,000 objects at 4,500 msg/s, 1.5-3.5 ms, and under CPU contention up to 10-25 ms). The
  young and middle collections found nothing to free under that load (``collected=0``: no
  cycles per message), so promoting survivors sooner keeps no garbage.
  Measured with ``bench.sessions`` (Redis store, 4,500 msg/s, 2026-12-06, side by side against
  the previous commit, three pairs): longest young pause ≤ 5 → ≤ 0.5-1 ms, longest middle
  ≤ 10-25 → ≤ 5 ms, p99 over 9,000 senders 11.1 / 12.4 / 30.8 → 8.9 / 7.9 / 9.6 ms. Each middle
  collection counts towards a full one, so the third threshold is 24,000 (20 a second: a full
  collection at most every ~20 min, as before the pacer).

Every collection's pause is observed in ``python_gc_pause_seconds{generation}``.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from typing import Any

from app.core.metrics import GC_PAUSE

GC_THRESHOLDS = (2_000, 10, 24_000)
SWITCH_INTERVAL_S = 0.001
PACE_S = 0.05  # the young and middle generations are collected this often


def tune_runtime() -> None:
    """Freeze what start-up left, set the GC thresholds and the GIL switch interval."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    if _observe_pause not in gc.callbacks:
        gc.callbacks.append(_observe_pause)


_started = [0.0]
_pauses = [GC_PAUSE.labels(str(generation)) for generation in range(3)]


def _observe_pause(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        _pauses[info["generation"]].observe(time.perf_counter() - _started[0])


_pacer: list[asyncio.Task[None]] = []


def start_pacer() -> None:
    """Start the young and middle collections on a clock in the running loop (once per
    process)."""
    if not _pacer or _pacer[0].done():
        _pacer[:] = [asyncio.get_running_loop().create_task(_pace(), name="gc-pacer")]


async def _pace() -> None:
    while True:
        await asyncio.sleep(PACE_S)
        gc.collect(1)
