"""Echo with sessions in memory, in Redis, in Redis with a replica acknowledging every write,
and on 2 workers, side by side in one run.

    .venv/bin/python -m bench.stores [--rounds 3] [--duration 5] [--configs memory,redis,...]
        [--before DIR]

Starts a real ``redis-server`` (``tests/redis_server.py``), a second one with a replica
(``tests/redis_cluster.py``, no Sentinels; both with the append-only file, fsync every second)
and one server per configuration, all up for the whole run:

- ``memory``: ``ECHO_STORE_URL=memory://``
- ``redis``: the standalone Redis, no replica
- ``redis-r1``: the primary with one replica and ``ECHO_STORE_MIN_REPLICAS=1`` (every step is
  answered only once the replica acknowledged it: ``WAIT 1``)
- ``redis-2w``: the standalone Redis, ``WEB_CONCURRENCY=2`` (not run by default)

``--before DIR`` also serves every Redis configuration from another checkout (``<config>@before``,
e.g. ``git archive <commit> | tar -x -C DIR``), on the same Redis servers.

Every round drives each in turn with ``bench.loadgen`` (1-bit messages, closed loop, 200 and
1,000 sessions), so drifts of a shared machine hit all alike. Reports msgs/s, p50/p99, the ratios
to ``memory`` of the same round, and the CPU of every process (each server process, each worker,
the Redis servers, the load generator) over the measurement. Writes ``stores.json`` and
``stores.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests import servers as server
from tests.redis_cluster import running_cluster
from tests.redis_server import running_redis

SESSIONS = (200, 1000)
CONFIGS = ("memory", "redis", "redis-r1", "redis-2w")
DEFAULT_CONFIGS = "memory,redis,redis-r1"
PERSISTENCE = ("--appendonly", "yes", "--appendfsync", "everysec")  # as tests/redis_server.py
TICK = os.sysconf("SC_CLK_TCK")


def commit(cwd: Path = server.REPO) -> str:
    done = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=cwd, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError):
        return 0.0


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def processes(srv: server.Server, redis_pids: dict[str, int]) -> dict[str, int]:
    """The processes whose CPU a measurement reports: the server (and its workers), Redis."""
    found = {"server": srv.pid}
    workers = [
        pid
        for pid in children(srv.pid)
        if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    for i, pid in enumerate(workers):
        found[f"worker{i + 1}"] = pid
    return found | redis_pids


def drive(
    srv: server.Server, redis_pids: dict[str, int], sessions: int, args: argparse.Namespace
) -> dict:
    procs = processes(srv, redis_pids)
    cmd = [sys.executable, "-m", "bench.loadgen", "--port", str(srv.port)]
    cmd += ["--server-pid", str(srv.pid), f"--echo={sessions}:1", "--max-other", "400"]
    cmd += ["--warmup", str(args.warmup), "--duration", str(args.duration)]
    before = {name: cpu_s(pid) for name, pid in procs.items()}
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=server.REPO, capture_output=True, text=True)
    wall = time.monotonic() - t0
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"load generator failed:\n{done.stderr[-2000:]}")
    (row,) = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if "error" in row:
        sys.exit(f"load generator: {row['error']}")
    cpu = {name: 100 * (cpu_s(pid) - before[name]) / wall for name, pid in procs.items()}
    loadgen = kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
    cpu["loadgen"] = 100 * loadgen / wall
    return {
        "msgs_per_s": row["msgs_per_s"],
        "p50_ms": row["p50_ms"],
        "p99_ms": row["p99_ms"],
        "rows_per_call": row.get("rows_per_call"),  # sessions per echo model call (/metrics)
        "server_cpu_ms_per_msg": row.get("server_cpu_ms_per_msg"),  # the server's main process
        "cpu_pct_whole_run": cpu,
        "verify": row.get("verify"),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=server.REPO / "bench" / "results")
    ap.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help=f"comma-separated, from {', '.join(CONFIGS)}; memory is the baseline (first)",
    )
    ap.add_argument("--before", type=Path, help="another checkout to serve the Redis configs from")
    args = ap.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(args.configs) - set(CONFIGS)
    if unknown or "memory" not in args.configs:
        ap.error(f"--configs: from {', '.join(CONFIGS)}, with memory (unknown: {unknown or '-'})")
    measure(args)


def measure(args: argparse.Namespace) -> None:
    """Every round, every session count, every configuration; then ``write``."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-stores-"))
    rows: list[dict[str, Any]] = []
    args.started = datetime.now(UTC).isoformat(timespec="seconds")
    with (
        running_redis(tmp / "redis") as redis,
        running_cluster(tmp / "replicated", replicas=1, sentinels=0, server_args=PERSISTENCE) as rc,
    ):
        assert redis.proc is not None
        primary, replica = rc.data
        assert primary.proc is not None and replica.proc is not None
        standalone = {"redis-server": redis.proc.pid}
        replicated = {"redis-primary": primary.proc.pid, "redis-replica": replica.proc.pid}
        every = {
            "memory": ({"ECHO_STORE_URL": "memory://"}, {}),
            "redis": ({"ECHO_STORE_URL": redis.url}, standalone),
            "redis-r1": (
                {"ECHO_STORE_URL": rc.primary_url, "ECHO_STORE_MIN_REPLICAS": "1"},
                replicated,
            ),
            "redis-2w": ({"ECHO_STORE_URL": redis.url, "WEB_CONCURRENCY": "2"}, standalone),
        }
        configs = {}
        for name in args.configs:  # each one beside its @before, if any
            configs[name] = (*every[name], server.REPO)
            if args.before and name != "memory":
                configs[f"{name}@before"] = (*every[name], args.before.resolve())
        args.configs = list(configs)
        servers = {}
        try:
            for name, (env, _, cwd) in configs.items():
                servers[name] = server.start(env, tmp / f"{name}.log", cwd=cwd, timeout=180)
                time.sleep(5 if "WEB_CONCURRENCY" in env else 0)  # the other worker too
            for r in range(args.rounds):
                for n in SESSIONS:
                    for name, srv in servers.items():
                        row = {"round": r, "sessions": n, "config": name}
                        row |= drive(srv, configs[name][1], n, args)
                        rows.append(row)
                        cpu = ", ".join(
                            f"{k} {v:.0f}%" for k, v in row["cpu_pct_whole_run"].items()
                        )
                        print(
                            f"round {r} {n:>5} sessions {name:>15}: {row['msgs_per_s']:8,.0f}"
                            f" msgs/s p50 {row['p50_ms']:6.2f} p99 {row['p99_ms']:6.2f} ms"
                            f" rows/call {row['rows_per_call'] or 0:.0f}  CPU: {cpu}",
                            flush=True,
                        )
        finally:
            for srv in servers.values():
                server.stop(srv)
    write(rows, args)


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    summary = []
    for n in SESSIONS:
        base = {r["round"]: r for r in rows if r["sessions"] == n and r["config"] == "memory"}
        for name in args.configs:
            mine = [r for r in rows if r["sessions"] == n and r["config"] == name]
            ratios = [r["msgs_per_s"] / base[r["round"]]["msgs_per_s"] for r in mine]
            p99 = [r["p99_ms"] / base[r["round"]]["p99_ms"] for r in mine]
            cpu: dict[str, float] = {}
            for key in mine[0]["cpu_pct_whole_run"]:
                cpu[key] = statistics.median(r["cpu_pct_whole_run"][key] for r in mine)
            summary.append({
                "sessions": n,
                "config": name,
                "msgs_per_s": statistics.median(r["msgs_per_s"] for r in mine),
                "p50_ms": statistics.median(r["p50_ms"] for r in mine),
                "p99_ms": statistics.median(r["p99_ms"] for r in mine),
                "throughput_vs_memory": statistics.median(ratios),
                "p99_vs_memory": statistics.median(p99),
                "rows_per_call": statistics.median(r["rows_per_call"] or 0 for r in mine),
                # the server process's CPU per message (not its workers': None for redis-2w),
                # and its ratio to memory's in the same round: what a shared machine's load
                # moves least
                "cpu_ms_per_msg": None if "2w" in name else statistics.median(
                    r["server_cpu_ms_per_msg"] for r in mine
                ),
                "cpu_per_msg_vs_memory": None if "2w" in name else statistics.median(
                    r["server_cpu_ms_per_msg"] / base[r["round"]]["server_cpu_ms_per_msg"]
                    for r in mine
                ),
                "cpu_pct": cpu,
            })  # fmt: skip
    meta = {
        "command": f"python -m bench.stores --rounds {args.rounds} --warmup {args.warmup:g} "
        f"--duration {args.duration:g} --configs "
        f"{','.join(c for c in args.configs if '@' not in c)}"
        + (f" --before {args.before}" if args.before else ""),
        "configs": args.configs,
        "started": args.started,
        "commit": commit(),
        "before_commit": commit(args.before) if args.before else None,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "cpu_count": os.cpu_count(),
        "loadavg_after": os.getloadavg(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stores.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n"
    )
    lines = [
        "# Echo: sessions in memory vs Redis (no replica, one replica acknowledging)",
        "",
        f"`{meta['command']}` at commit `{meta['commit']}`, started {meta['started']}, on "
        f"{meta['cpu_count']} cores (shared with other work); medians of {args.rounds} rounds "
        f"({args.duration:g} s windows, 1-bit messages, closed loop); ratios are per round "
        "against `memory`. Server CPU ms/msg: the server process's CPU per answered message in the "
        "window (not the workers' of `redis-2w`). CPU: % of one core over the whole "
        "load-generator run.",
        "",
        "| sessions | store | msgs/s | vs memory | p50 ms | p99 ms | p99 vs memory | rows/call "
        "| server CPU ms/msg | vs memory | CPU |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in summary:
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in s["cpu_pct"].items())
        lines.append(
            f"| {s['sessions']:,} | {s['config']} | {s['msgs_per_s']:,.0f} | "
            f"{s['throughput_vs_memory']:.2f}x | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
            f"{s['p99_vs_memory']:.2f}x | {s['rows_per_call']:.0f} | "
            f"{_num(s['cpu_ms_per_msg'], '.3f')} | {_num(s['cpu_per_msg_vs_memory'], '.2f')}x | "
            f"{cpu} |"
        )
    (args.out / "stores.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
