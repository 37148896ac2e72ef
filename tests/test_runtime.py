"""The process runtime settings (app/core/runtime.py): GC thresholds, and every collection's pause
observed by generation. Run in a subprocess: they change the whole interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT as REPO

SCRIPT = """
import gc, json, sys
from prometheus_client import REGISTRY
import asyncio
from app.core.runtime import GC_THRESHOLDS, PACE_S, start_pacer, tune_runtime

def pauses(generation):
    return REGISTRY.get_sample_value(
        "python_gc_pause_seconds_count", {"generation": str(generation)}) or 0.0

tune_runtime()
tune_runtime()  # idempotent: one callback
before = [pauses(g) for g in range(3)]
gc.collect(0)
gc.collect(2)
added = [pauses(g) - b for g, b in enumerate(before)]

async def paced():
    start_pacer()
    start_pacer()  # idempotent: one pacer
    before = [pauses(g) for g in range(3)]
    await asyncio.sleep(20 * PACE_S)
    return [pauses(g) - b for g, b in enumerate(before)]

print(json.dumps({
    "thresholds": gc.get_threshold(), "expected": GC_THRESHOLDS,
    "switch": sys.getswitchinterval(), "frozen": gc.get_freeze_count(),
    "added": added, "paced": asyncio.run(paced()),
}))
"""


@pytest.mark.slow  # a fresh Python process
def test_runtime_freezes_start_up_sets_thresholds_and_observes_each_collection() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert tuple(out["thresholds"]) == tuple(out["expected"])
    assert out["switch"] == 0.001
    assert out["frozen"] > 1000  # what start-up (here: the imports) left is out of the collector
    assert out["added"] == [1, 0, 1]  # one pause each, under its own generation
    young, middle, full = out["paced"]  # 20 periods of the pacer: each collects the middle
    assert young <= 3 and 14 <= middle <= 21 and full == 0, out["paced"]  # (and young) ones
