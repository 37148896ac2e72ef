"""``/metrics`` of a ``WEB_CONCURRENCY=2`` server covers both workers (prometheus_client's
multiprocess mode, ``app/core/metrics.py``), with a real server, real requests and a real Redis.

Requests go out on fresh connections until the access log shows that both workers answered some;
then every scrape, whichever worker answers it, shows the totals of both: the digit requests
(a counter), their queue waits (the service's own ``BulkHistogram``), the echo messages, and the
open echo sessions (a ``livesum`` gauge). A worker killed with SIGKILL leaves its counts in the
totals and its sessions out of the gauge. The unit tests at the end check the file handling
(the directory emptied at start, dead processes' gauges dropped) in this process.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.sync.client import ClientConnection, connect

from app.core import metrics
from tests.live_server import LiveServer, start_server, wait_until
from tests.metrics import sample_value
from tests.redis_server import RedisServer
from tests.test_api_echo import send_bits

DIGIT = {"image": [[0] * 28] * 28}


def _log_pids(server: LiveServer, **fields: object) -> Counter[int]:
    """How many JSON log lines of each worker match ``fields``."""
    found: Counter[int] = Counter()
    for line in server.log_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if all(record.get(k) == v for k, v in fields.items()):
                found[record["pid"]] += 1
    return found


def _scrape(server: LiveServer) -> str:
    """One ``/metrics`` page over a new connection (so either worker may answer)."""
    with httpx.Client(headers={"Connection": "close"}) as client:
        return client.get(f"{server.base_url}/metrics").text


def _both_ready(server: LiveServer) -> None:
    ready = 0  # /readyz answered 200 by whichever worker took each new connection

    def check() -> bool:
        nonlocal ready
        ready = ready + 1 if httpx.get(f"{server.base_url}/readyz").status_code == 200 else 0
        return ready >= 20

    wait_until(check, 120, "both workers ready", server)


def _open(server: LiveServer) -> tuple[ClientConnection, dict]:
    ws = connect(f"{server.ws_url}/echo", proxy=None, compression=None)
    return ws, json.loads(ws.recv(timeout=10))


@pytest.mark.slow
def test_one_scrape_sums_both_workers(tmp_path: Path, redis: RedisServer) -> None:
    env = {"ECHO_STORE_URL": redis.url, "WEB_CONCURRENCY": "2"}
    with start_server(tmp_path, env, timeout=150) as server, ExitStack() as open_sessions:
        _both_ready(server)
        sent = 0
        while len(_log_pids(server, path="/predict/digit", status=200)) < 2 or sent < 20:
            assert sent < 400, "400 requests on new connections all reached one worker"
            with httpx.Client(headers={"Connection": "close"}) as client:
                assert client.post(f"{server.base_url}/predict/digit", json=DIGIT).is_success
            sent += 1

        sessions: list[ClientConnection] = []
        while len(_log_pids(server, msg="echo session opened")) < 2 or len(sessions) < 6:
            assert len(sessions) < 60, "60 sessions all opened on one worker"
            ws, _ = _open(server)
            open_sessions.enter_context(ws)
            sessions.append(ws)
            send_bits(ws, [1, 0, 1])
        opened = _log_pids(server, msg="echo session opened")

        def totals(text: str) -> tuple[float | None, ...]:
            return (
                sample_value(text, "http_requests_total", route="/predict/digit", status="200"),
                sample_value(text, "model_queue_wait_seconds_count", model="mnist_lstm"),
                sample_value(text, "echo_messages_total"),
                sample_value(text, "echo_active_sessions"),
            )

        want = (sent, sent, len(sessions), len(sessions))
        for _ in range(30):  # every scrape, whichever worker answers it
            assert totals(_scrape(server)) == want
        scrapers = _log_pids(server, path="/metrics")
        assert len(scrapers) == 2, f"30 scrapes all answered by one worker: {scrapers}"

        # SIGKILL the worker with the most sessions: its counts stay, its sessions leave the gauge
        victim, lost = opened.most_common(1)[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: totals(_scrape(server))[3] == len(sessions) - lost,
            30,
            "the killed worker's sessions out of echo_active_sessions",
            server,
        )
        assert totals(_scrape(server))[:3] == want[:3]


def test_the_launcher_empties_the_directory_but_keeps_its_own_files(tmp_path: Path) -> None:
    mine, theirs = os.getpid(), os.getpid() + 1_000_000
    names = [f"counter_{mine}.db", f"counter_{theirs}.db", f"gauge_livesum_{theirs}.db"]
    names += [f"bulk_{mine}_0.bin", f"bulk_{theirs}_3.bin", "notes.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert metrics.clean_multiprocess_dir(tmp_path, keep_pid=mine) == 3
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f"counter_{mine}.db", f"bulk_{mine}_0.bin", "notes.txt"])
    assert metrics.clean_multiprocess_dir(tmp_path / "new") == 0  # created
    assert (tmp_path / "new").is_dir()


def test_bulk_histograms_of_several_processes_are_summed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two children of one label set (as two processes would write them) and one of another."""
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    buckets = (0.1, 1.0)
    first = metrics.BulkHistogram("t_wait", "Waits.", ["model"], buckets, registry=None)
    second = metrics.BulkHistogram("t_wait", "Waits.", ["model"], buckets, registry=None)
    first.labels("a").observe_many(np.array([0.05, 0.5, 5.0]))
    second.labels("a").observe(0.1)  # on the bound: the first bucket, as Histogram does
    second.labels("b").observe_many(np.array([2.0]))
    (family,) = metrics.BulkHistogramFiles(tmp_path).collect()
    got = {(s.name, s.labels.get("model"), s.labels.get("le")): s.value for s in family.samples}
    assert got[("t_wait_bucket", "a", "0.1")] == 2
    assert got[("t_wait_bucket", "a", "1.0")] == 3
    assert got[("t_wait_bucket", "a", "+Inf")] == 4
    assert got[("t_wait_count", "a", None)] == 4
    assert got[("t_wait_sum", "a", None)] == pytest.approx(5.65)
    assert got[("t_wait_count", "b", None)] == 1
    # the process's own view of one child is the same numbers as the file's
    (own,) = first.collect()
    assert {s.name: s.value for s in own.samples if s.labels.get("le") in (None, "+Inf")} == {
        "t_wait_bucket": 3,
        "t_wait_count": 3,
        "t_wait_sum": pytest.approx(5.55),
    }


def test_dead_processes_leave_live_gauges(tmp_path: Path) -> None:
    dead = os.getpid() + 1_000_000  # no such process (pid_max is at most 4,194,304)
    while metrics._alive(dead):
        dead += 1
    for pid in (os.getpid(), dead):
        (tmp_path / f"gauge_livesum_{pid}.db").write_bytes(b"x")
        (tmp_path / f"counter_{pid}.db").write_bytes(b"x")
    metrics.forget_dead_processes(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    want = [f"counter_{dead}.db", f"counter_{os.getpid()}.db", f"gauge_livesum_{os.getpid()}.db"]
    assert left == sorted(want)
