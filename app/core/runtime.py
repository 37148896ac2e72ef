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
  sessions kept), so it waits for 1,000 middle ones (CPython: 10; with 50 it came every ~70 s
  under that load, now every ~20 min). Measured with this module's pause histogram.
* A shorter switch interval hands the GIL to the model thread within 1 ms instead of 5 ms while
  the event loop is busy (calls over ``INLINE_CALL_BUDGET_MS`` run there).

Every collection's pause is observed in ``python_gc_pause_seconds{generation}``.
"""

from __future__ import annotations

import gc
import sys
import time
from typing import Any

from app.core.metrics import GC_PAUSE

GC_THRESHOLDS = (2_000, 10, 1_000)
SWITCH_INTERVAL_S = 0.001


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
