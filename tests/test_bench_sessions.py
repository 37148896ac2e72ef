"""``bench.sessions``: its client address plan stays under the service's per-address and
per-network caps, its targets are computed against the floor, GC pauses are read from a real
histogram; and (slow) a tiny run against the floor."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from bench.sessions import (
    PER_ADDRESS,
    PER_NETWORK,
    commit_waits,
    gc_pauses,
    metric_samples,
    source_address,
)
from bench.sessions import targets as issue_targets
from tests.live_server import REPO


def test_sessions_spread_over_loopback_addresses_under_the_caps() -> None:
    addresses = [ipaddress.IPv4Address(source_address(i)) for i in range(20_000)]
    per_address = Counter(addresses)
    per_network = Counter(ipaddress.IPv4Network(f"{a}/24", strict=False) for a in addresses)
    assert all(a.is_loopback and str(a) != "127.0.0.1" for a in per_address)
    assert max(per_address.values()) == PER_ADDRESS <= 50
    assert max(per_network.values()) == PER_NETWORK <= 200
    assert len(per_address) == 20_000 // PER_ADDRESS


def row(config: str, rates: list[float], p99: float, kb: float) -> dict[str, Any]:
    steps = [
        {"first": 1000 * i, "open_after": 1000 * (i + 1), "opens_per_s": r, "failed": 0}
        for i, r in enumerate(rates)
    ]
    latency = [{"sessions": 1000, "p99_ms": 1.0}, {"sessions": 9000, "p99_ms": p99}]
    return {"config": config, "steps": steps, "latency": latency,
            "memory": {"kb_per_open_session": kb}}  # fmt: skip


def test_targets_against_the_floor() -> None:
    floor = row("floor", [4000, 3800, 3600], p99=3.0, kb=20)
    good = row("good", [1200, 1100, 1000], p99=9.0, kb=30)
    (rate, flat, p99, memory) = issue_targets([floor, good])
    assert rate["threshold"] == 0.25 * 3600 and rate["value"] == 1100 and rate["pass"]
    assert flat["value"] == 1000 / 1200 and flat["threshold"] == 0.5 * 0.9 and flat["pass"]
    assert p99["threshold"] == 10.0 and p99["pass"]  # 2 x 3 ms is under the 10 ms floor
    assert memory["pass"]
    bad = row("bad", [1200, 800, 200], p99=25.0, kb=41)
    bad["steps"][1]["failed"] = 1
    assert [t["pass"] for t in issue_targets([floor, bad])] == [False, False, False, False]
    assert issue_targets([good]) == []  # no floor in the run: no targets


def test_gc_pauses_count_and_longest_bucket_between_scrapes() -> None:
    registry = CollectorRegistry()
    pauses = Histogram("python_gc_pause_seconds", "GC", ["generation"],
                       buckets=(0.001, 0.01, 0.1), registry=registry)  # fmt: skip
    pauses.labels("0").observe(0.0005)
    before = metric_samples(generate_latest(registry).decode())
    pauses.labels("0").observe(0.0002)
    pauses.labels("1").observe(0.005)
    pauses.labels("2").observe(0.5)
    found = gc_pauses(before, metric_samples(generate_latest(registry).decode()))
    assert found["0"] == {"count": 1, "max_ms_at_most": 1.0}
    assert found["1"] == {"count": 1, "max_ms_at_most": 10.0}
    assert found["2"]["count"] == 1 and found["2"]["max_ms_at_most"] == float("inf")


def test_commit_waits_give_the_buckets_that_hold_half_and_99_percent() -> None:
    registry = CollectorRegistry()
    store = Histogram("echo_store_seconds", "store", ["op"],
                      buckets=(0.001, 0.0025, 0.01), registry=registry)  # fmt: skip
    store.labels("commit").observe(0.02)  # before: not counted
    before = metric_samples(generate_latest(registry).decode())
    for _ in range(98):
        store.labels("commit").observe(0.0008)
    store.labels("commit").observe(0.002)
    store.labels("commit").observe(0.005)
    store.labels("renew").observe(0.5)  # another op
    found = commit_waits(before, metric_samples(generate_latest(registry).decode()))
    assert found == {"commits": 100, "commit_p50_ms_at_most": 1.0, "commit_p99_ms_at_most": 2.5}
    assert commit_waits(before, before)["commits"] == 0


@pytest.mark.slow
def test_a_tiny_run_against_the_floor(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.sessions", "--configs", "floor", "--sessions", "200"]
    cmd += ["--step", "100", "--rate", "200", "--rest", "0.5", "--warmup", "0.5"]
    cmd += ["--duration", "1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "sessions.json").read_text())
    (floor,) = results["configs"]
    assert [(s["open_after"], s["failed"]) for s in floor["steps"]] == [(100, 0), (200, 0)]
    assert all(x["errors"] == 0 and x["achieved_per_s"] > 150 for x in floor["latency"])
    assert floor["rest"]["sessions_lost"] == 0 and floor["memory"]["sessions"] == 200
    assert results["meta"]["command"].startswith("python -m bench.sessions --configs floor")
    assert (tmp_path / "sessions.png").stat().st_size > 0


@pytest.mark.slow
def test_redis_info_reports_the_servers_own_cpu(tmp_path: Path) -> None:
    """The Redis store's benchmark shares the cores with redis-server; its CPU is reported."""
    import redis as redis_py

    from bench.sessions import redis_info
    from tests.redis_server import running_redis

    with running_redis(tmp_path / "redis") as server:
        before = redis_info(server)
        client = redis_py.Redis(port=server.port)
        for i in range(2000):
            client.set(f"k{i}", "v" * 100)
        client.close()
        after = redis_info(server)
    assert after["cpu_s"] > before["cpu_s"] >= 0
    assert after["calls"]["set"] - before["calls"].get("set", 0) == 2000
