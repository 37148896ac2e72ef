"""The open-loop load generator keeps its schedule and counts latency from it (against the floor:
a bare uvicorn app, so the figures are the tool's, not the service's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import servers as server
from tests.live_server import REPO


@pytest.mark.slow
def test_open_loop_offers_its_rate_and_every_reply_is_counted(tmp_path: Path) -> None:
    floor = server.start({}, tmp_path / "floor.log", app="bench.floor:app")
    try:
        cmd = [sys.executable, "-m", "bench.openloop", "--port", str(floor.port)]
        cmd += ["--server-pid", str(floor.pid), "--echo", "200:10", "--digits", "200"]
        cmd += ["--warmup", "0.5", "--duration", "2"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        server.stop(floor)
    assert done.returncode == 0, done.stderr
    echo, digits = (json.loads(line) for line in done.stdout.splitlines())
    for row, offered in ((echo, 2000), (digits, 200)):
        assert row["offered_per_s"] == offered and row["errors"] == 0
        # Client and server share this machine's cores with whatever else runs: the schedule
        # may slip, but it never sends ahead of it, and what was sent was answered.
        assert 0.5 * offered <= row["sent_per_s"] <= 1.1 * offered
        assert 0.5 * offered <= row["achieved_per_s"] <= 1.1 * offered
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["p999_ms"] <= row["max_ms"]


def test_the_sender_wakes_at_most_once_a_tick_and_stamps_each_message_when_due(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvloop runs timers under 0.5 ms at once: waiting for each due time would spin the
    client's loop (CPU the server under test needs). Every message still carries its due time,
    so a send late by up to a tick is measured, not hidden."""
    import argparse
    import asyncio

    import uvloop

    from bench import openloop

    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        sleeps.append(delay)
        await real_sleep(delay)

    class Sender:
        def __init__(self) -> None:
            self.sent: list[tuple[int, int]] = []  # (due, when sent)

        def send(self, data: bytes, due: int) -> None:
            self.sent.append((due, time.perf_counter_ns()))

    monkeypatch.setattr(openloop.asyncio, "sleep", sleep)
    senders = [Sender() for _ in range(50)]
    args = argparse.Namespace(warmup=0.1, duration=0.4, server_pid=os.getpid())
    stats = openloop.Stats()
    uvloop.run(openloop.drive(senders, [b"x"], 100.0, args, stats))  # type: ignore[arg-type]
    assert min(sleeps[:-1]) >= openloop.TICK_S >= 0.001  # the last: drive's own wind-down
    sent = [s for sender in senders for s in sender.sent]
    assert len(sent) >= 50 * 100 * 0.5 * 0.8  # ~5,000 messages/s were offered for 0.55 s
    assert all(due <= when for due, when in sent)  # never ahead of the schedule
