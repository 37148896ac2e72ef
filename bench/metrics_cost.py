"""What a metric update costs, in one process (memory) vs prometheus_client's multiprocess mode.

    .venv/bin/python -m bench.metrics_cost [--repeats 7] [--out bench/results]

Runs the same loops in two fresh interpreters, one without and one with
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client picks its value class when it is imported):
a labelled ``Counter.inc``, a labelled ``Histogram.observe`` (what every HTTP request does, in
``app/core/middleware.py``), and one batch's queue waits observed by ``BulkHistogram.observe_many``
vs a ``Histogram.observe`` per value (what ``app/services/batching/core.py`` does per model call).
Reports the best of ``--repeats`` runs in ns per call (the least disturbed by the rest of a shared
machine), and the multiprocess / memory ratios. Writes ``metrics_cost.json`` and
``metrics_cost.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter_ns

from bench.stores import commit
from tests.servers import REPO

BATCHES = (64, 1000)  # values per observe_many: a digit batch, a 1,000-session echo call


def best_ns(call: Callable[[], object], calls: int, repeats: int) -> float:
    """The fastest of ``repeats`` timings of ``calls`` calls, in ns per call."""
    best = float("inf")
    for _ in range(repeats):
        t0 = perf_counter_ns()
        for _ in range(calls):
            call()
        best = min(best, (perf_counter_ns() - t0) / calls)
    return best


def measure(repeats: int) -> dict[str, float]:
    """The loops, in this interpreter (its mode fixed by the environment at import)."""
    import numpy as np
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from app.core.metrics import LATENCY_BUCKETS, BulkHistogram

    registry = CollectorRegistry()
    counter = Counter("c_total", "c", ["route", "method", "status"], registry=registry)
    histogram = Histogram("h_seconds", "h", ["route", "method"], buckets=LATENCY_BUCKETS,
                          registry=registry)  # fmt: skip
    bulk = BulkHistogram("b_seconds", "b", ["model"], LATENCY_BUCKETS, registry=registry)
    c, h, b = counter.labels("/x", "POST", "200"), histogram.labels("/x", "POST"), bulk.labels("m")
    out = {
        "counter_inc": best_ns(c.inc, 20_000, repeats),
        "histogram_observe": best_ns(lambda: h.observe(0.003), 20_000, repeats),
        "bulk_observe_one": best_ns(lambda: b.observe(0.003), 20_000, repeats),
    }
    rng = np.random.default_rng(0)
    for n in BATCHES:
        values = rng.exponential(0.002, n)
        listed = values.tolist()

        def loop(listed: list[float] = listed) -> None:
            for v in listed:
                h.observe(v)

        calls = max(20, 20_000 // n)
        out[f"histogram_loop_{n}"] = best_ns(loop, calls, repeats)
        out[f"bulk_observe_many_{n}"] = best_ns(lambda v=values: b.observe_many(v), calls, repeats)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.repeats)))
        return
    started = datetime.now(UTC).isoformat(timespec="seconds")
    modes: dict[str, dict[str, float]] = {}
    for mode in ("memory", "multiprocess"):
        with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
            env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
            if mode == "multiprocess":
                env["PROMETHEUS_MULTIPROC_DIR"] = tmp
            cmd = [sys.executable, "-m", "bench.metrics_cost", "--child"]
            cmd += ["--repeats", str(args.repeats)]
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(done.stderr[-2000:])
            modes[mode] = json.loads(done.stdout.splitlines()[-1])
    meta = {
        "command": f"python -m bench.metrics_cost --repeats {args.repeats}",
        "started": started,
        "commit": commit(),
        "cpu_count": os.cpu_count(),
        "loadavg_after": os.getloadavg(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics_cost.json").write_text(
        json.dumps({"meta": meta, "ns_per_call": modes}, indent=1) + "\n"
    )
    lines = [
        "# Metric updates: one process (memory) vs prometheus_client's multiprocess mode",
        "",
        f"`{meta['command']}` at commit `{meta['commit']}`, started {started}, on "
        f"{meta['cpu_count']} cores (shared with other work); best of {args.repeats} runs, "
        "ns per call.",
        "",
        "| call | memory ns | multiprocess ns | multiprocess / memory |",
        "|---|---:|---:|---:|",
    ]
    for key, memory in modes["memory"].items():
        multi = modes["multiprocess"][key]
        lines.append(f"| `{key}` | {memory:,.0f} | {multi:,.0f} | {multi / memory:.2f}x |")
    (args.out / "metrics_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
