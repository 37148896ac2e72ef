"""The open-loop load generator keeps its schedule and counts latency from it (against the floor:
a bare uvicorn app, so the figures are the tool's, not the service's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import servers as server
from tests.live_server import REPO

pytestmark = pytest.mark.slow


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
