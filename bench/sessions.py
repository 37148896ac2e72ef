"""Echo sessions at production scale (#22): what N open sessions cost, beside the uvicorn floor.

    .venv/bin/python -m bench.sessions                   # 10,000 sessions in steps of 1,000
    .venv/bin/python -m bench.sessions --quick           # 2,000 in steps of 500, shorter windows
    .venv/bin/python -m bench.sessions --configs floor,memory --config big=ECHO_MAX_SESSIONS=20000

Configurations run one after another, each on a fresh server: ``floor`` (``bench.floor``, bare
uvicorn), ``memory`` (the service, ``ECHO_STORE_URL=memory://``) and ``redis`` (the service on a
real ``redis-server``; ``ECHO_STORE_URL=redis://`` with no host means that one). ``--config
NAME=K=V,...`` adds others (``bench.ab`` syntax: ``@module:app``, ``cwd=DIR``). The service runs
with the production client limits (:data:`SERVICE_ENV`), so the client opens from many loopback
addresses (:func:`source_address`). For each configuration:

1. open ``--sessions`` sessions in steps of ``--step`` (``--concurrency`` handshakes in flight),
   every earlier one kept open and answering pings; per step: opens/s (connect → the server's
   ``session`` frame), open latency, RSS, server and client CPU;
2. ``--rest`` seconds with every session idle: server CPU, Redis commands/s (``INFO stats``);
3. open-loop 1-bit messages at ``--rate`` msg/s in total, spread over ``step`` and then
   ``sessions - step`` of the open sessions (1,000 and 9,000 by default), latency from the
   scheduled send (``bench.openloop``): p50 / p99 / p99.9; with Redis also redis-server's CPU,
   scripts/s and how long the model calls' answers waited for their commit
   (``echo_store_seconds{op="commit"}``, as histogram buckets);
4. close every session and measure RSS again (the service keeps them resumable for their TTL);
5. throughout: ``python_gc_pause_seconds{generation}`` from ``/metrics``, count and max bucket.

Writes ``sessions.{json,md,png}`` to ``--out`` with the issue's targets as PASS / FAIL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.client
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter_ns
from typing import Any

import uvloop

from bench import openloop
from bench.ab import parse_config
from bench.loadgen import percentile
from bench.stores import children, commit
from bench.wire import ws_frame
from tests import servers as server
from tests.redis_server import RedisServer
from tests.servers import proc_cpu_seconds, self_cpu_seconds

PER_ADDRESS = 50  # sessions per client address (the service allows 64 connections, 500 sessions)
PER_NETWORK = 200  # sessions per IPv4 /24 (the service will allow 256 connections)
STANDARD = {
    "floor": "@bench.floor:app",
    "memory": "ECHO_STORE_URL=memory://",
    "redis": "ECHO_STORE_URL=redis://",
}
# The service's production limits (only the total is raised to what the issue sets), and no idle
# cut-off: sessions that only answer pings must stay open for the whole run (default 120 s).
SERVICE_ENV = {
    "MAX_CONNECTIONS": "12000",
    "MAX_CONNECTIONS_PER_CLIENT": "64",
    "MAX_CONNECTIONS_PER_NETWORK": "256",
    "ECHO_MAX_SESSIONS_PER_CLIENT": "500",
    "ECHO_NEW_SESSIONS_PER_S": "50",
    "ECHO_NEW_SESSIONS_BURST": "500",
    "ECHO_IDLE_TIMEOUT_S": "3600",
}
MAX_KB_PER_SESSION = 40.0
P99_FLOOR_MS = 10.0


def source_address(i: int, per_address: int = PER_ADDRESS, per_network: int = PER_NETWORK) -> str:
    """The loopback address session ``i`` connects from: ``per_address`` sessions per address,
    ``per_network`` per /24, from 127.1.0.1 on (any 127/8 address works on Linux)."""
    address = i // per_address
    network, host = divmod(address, per_network // per_address)
    return f"127.{1 + network // 256}.{network % 256}.{1 + host}"


class Session(openloop.Conn):
    """An open-loop echo session that answers pings and tells a refusal from a session."""

    def __init__(self, stats: openloop.Stats) -> None:
        super().__init__(stats, websocket=True)
        self.lost = False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before the session frame ({exc})"))
        self.lost = True

    def _frames(self) -> None:
        buf = self.buf
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if buf[9:12] != b"101":
                head = bytes(buf[: min(end, 200)]).decode(errors="replace")
                self.ready.set_exception(ConnectionError(head))
                self.transport.close()  # type: ignore[union-attr]
                return
            del buf[: end + 4]
            self.open = True
        while len(buf) >= 2:
            n, hdr = buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, hdr = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, hdr = int.from_bytes(buf[2:10], "big"), 10
            end = hdr + n
            if len(buf) < end:
                return
            op = buf[0] & 0x0F
            if op == 9:
                self.transport.write(ws_frame(bytes(buf[hdr:end]), 0xA))  # type: ignore[union-attr]
            elif op == 8:
                if not self.ready.done():
                    code = int.from_bytes(buf[hdr : hdr + 2], "big") if n >= 2 else None
                    reason = bytes(buf[hdr + 2 : end]).decode(errors="replace")
                    self.ready.set_exception(ConnectionError(f"closed {code} {reason}".strip()))
                self.transport.close()  # type: ignore[union-attr]
            elif op == 1 and not self.ready.done():
                if buf.find(b"session", hdr, hdr + 40) >= 0:
                    self.ready.set_result(None)
                else:
                    self.ready.set_exception(ConnectionError(bytes(buf[hdr:end][:200]).decode()))
            elif op == 1 and self.due:
                self._done(buf.find(b'"echo"', hdr, hdr + 40) >= 0)
            del buf[:end]

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(ws_frame(b"\x03\xe8", 0x8))
            self.transport.close()


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its children (workers), MB."""
    total = 0
    for p in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def server_cpu_s(pid: int) -> float:
    total = 0.0
    for p in [pid, *children(pid)]:
        with contextlib.suppress(OSError):
            total += proc_cpu_seconds(p)
    return total


def scrape(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    except OSError:
        return ""
    finally:
        conn.close()


def metric_samples(text: str) -> dict[str, float]:
    """The GC-pause and echo-session samples of a ``/metrics`` page, keyed ``name{labels}``."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith(("python_gc_pause", "echo_")):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def bucket_bounds(
    before: dict[str, float], after: dict[str, float], name: str, label: str, qs: tuple[float, ...]
) -> tuple[float, list[float]]:
    """Observations of histogram ``name{label}`` (one ``k="v"``) between two scrapes, and for
    each quantile in ``qs`` the smallest bucket bound (ms) that holds at least that share of
    them (``inf`` past the last bucket, 0 with none)."""
    count = after.get(f"{name}_count{{{label}}}", 0.0) - before.get(f"{name}_count{{{label}}}", 0.0)
    buckets = []  # (bound, observations between the scrapes up to it)
    for key, value in after.items():
        if key.startswith(f"{name}_bucket{{") and label in key:
            le = key.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), value - before.get(key, 0.0)))
    buckets.sort()
    found = [next((le * 1e3 for le, n in buckets if count and n >= q * count), 0.0) for q in qs]
    return count, found


def gc_pauses(before: dict[str, float], after: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per generation: pauses between two scrapes and the upper bound of the longest (ms, the
    smallest histogram bucket that holds them all; ``inf`` past the last bucket)."""
    out: dict[str, dict[str, float]] = {}
    for gen in ("0", "1", "2"):
        labels = f'generation="{gen}"'
        count, (longest,) = bucket_bounds(before, after, "python_gc_pause_seconds", labels, (1.0,))
        out[gen] = {"count": count, "max_ms_at_most": longest}
    return out


def commit_waits(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The Redis store's commit round trips between two scrapes (``echo_store_seconds``,
    ``op="commit"``: a model call's answers wait for it): count, and the buckets that hold half
    and 99 % of them (ms)."""
    count, (p50, p99) = bucket_bounds(
        before, after, "echo_store_seconds", 'op="commit"', (0.5, 0.99)
    )
    return {"commits": count, "commit_p50_ms_at_most": p50, "commit_p99_ms_at_most": p99}


def redis_info(redis: RedisServer | None) -> dict[str, Any]:
    """Commands processed (those scripts call included), calls per command, ``used_memory``,
    and the CPU seconds redis-server has used (it shares this machine's cores)."""
    if redis is None:
        return {}
    import redis as redis_py

    client = redis_py.Redis(port=redis.port)
    try:
        stats, memory, cpu = client.info("stats"), client.info("memory"), client.info("cpu")
        calls = {k[8:]: v["calls"] for k, v in client.info("commandstats").items()}
        return {
            "commands": stats["total_commands_processed"],
            "cpu_s": cpu["used_cpu_sys"] + cpu["used_cpu_user"],
            "calls": calls,
            "used_memory": memory["used_memory"],
            "t": time.monotonic(),
        }
    finally:
        client.close()


async def open_sessions(
    port: int, first: int, count: int, concurrency: int, conns: list[Session]
) -> dict[str, Any]:
    """Open sessions ``first`` .. ``first + count - 1``, ``concurrency`` at a time."""
    loop = asyncio.get_running_loop()
    stats = openloop.Stats()  # replaced by the latency phase's
    lat: list[int] = []
    failures: list[str] = []
    todo = iter(range(first, first + count))

    async def worker() -> None:
        for i in todo:
            t = perf_counter_ns()
            try:
                _, conn = await loop.create_connection(
                    lambda: Session(stats),
                    "127.0.0.1",
                    port,
                    local_addr=(source_address(i), 0),
                )
                await asyncio.wait_for(conn.ready, 30)
            except (OSError, ConnectionError, TimeoutError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            lat.append(perf_counter_ns() - t)
            conns.append(conn)

    t0 = perf_counter_ns()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = (perf_counter_ns() - t0) / 1e9
    lat.sort()
    return {
        "opened": len(lat),
        "failed": len(failures),
        "failures": failures[:5],
        "wall_s": wall,
        "opens_per_s": len(lat) / wall,
        "open_p50_ms": percentile(lat, 0.5),
        "open_p99_ms": percentile(lat, 0.99),
    }


class Meter:
    """Server and client CPU over a phase, as % of one core."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.t, self.server, self.client = time.monotonic(), server_cpu_s(pid), self_cpu_seconds()

    def read(self) -> dict[str, float]:
        wall = time.monotonic() - self.t
        return {
            "server_cpu_pct": 100 * (server_cpu_s(self.pid) - self.server) / wall,
            "client_cpu_pct": 100 * (self_cpu_seconds() - self.client) / wall,
        }


@contextlib.contextmanager
def client_gc_paused() -> Iterator[None]:
    """No collections in this (client) process while latencies are taken: with 10,000 sessions'
    objects alive, a full collection here stalled every send for up to ~0.9 s, which the open
    loop counted as server latency (the floor's p99 at 1,000 senders was 852 ms, 2026-12-06).
    What is alive now is frozen out of the collector; a window's garbage is freed afterwards."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


async def measure(
    name: str, srv: server.Server, redis: RedisServer | None, args: argparse.Namespace
) -> dict[str, Any]:
    """Every phase on one fresh server (see the module docstring)."""
    pid, service = srv.pid, scrape(srv.port) != ""  # the floor's /metrics is empty
    out: dict[str, Any] = {"config": name, "env": srv.env, "steps": [], "latency": []}
    rss0, redis0 = rss_mb(pid), redis_info(redis)
    scrapes = [metric_samples(scrape(srv.port))]
    conns: list[Session] = []
    for first in range(0, args.sessions, args.step):
        meter, before = Meter(pid), len(conns)
        step = await open_sessions(
            srv.port, first, min(args.step, args.sessions - first), args.concurrency, conns
        )
        step |= {"first": first, "open_before": before, "open_after": len(conns)}
        step["rss_mb"] = rss_mb(pid)
        step |= meter.read()
        step["server_cpu_ms_per_open"] = (
            step["server_cpu_pct"] * step["wall_s"] * 10 / max(1, step["opened"])
        )
        out["steps"].append(step)
        log(
            f"{name:>8} open {before:>6,} -> {len(conns):>6,}: {step['opens_per_s']:7.0f} opens/s"
            f" (p99 {step['open_p99_ms']:6.1f} ms, {step['failed']} failed, server"
            f" {step['server_cpu_ms_per_open']:.2f} CPU ms/open), RSS"
            f" {step['rss_mb']:6.0f} MB, server {step['server_cpu_pct']:3.0f} % client"
            f" {step['client_cpu_pct']:3.0f} %"
        )
    rss_open, redis_open = rss_mb(pid), redis_info(redis)
    scrapes.append(metric_samples(scrape(srv.port)))
    meter, redis_rest = Meter(pid), redis_info(redis)
    await asyncio.sleep(args.rest)
    rest = meter.read()
    if redis is not None:
        now = redis_info(redis)
        wall = now["t"] - redis_rest["t"]
        by_name = {k: (v - redis_rest["calls"].get(k, 0)) / wall for k, v in now["calls"].items()}
        ours = sum(by_name.pop(k, 0.0) for k in ("info", "client", "hello"))  # this sampling
        rest["redis_commands_per_s"] = (now["commands"] - redis_rest["commands"]) / wall - ours
        rest["redis_calls_per_s"] = {k: round(v, 1) for k, v in by_name.items() if v > 0.05}
    rest["sessions_lost"] = sum(c.lost for c in conns)
    out["rest"] = rest
    log(f"{name:>8} at rest, {len(conns):,} open: " + ", ".join(f"{k} {v:.1f}" if isinstance(
        v, float | int) else f"{k} {v}" for k, v in rest.items()))  # fmt: skip
    scrapes.append(metric_samples(scrape(srv.port)))
    for count in (args.step, args.sessions - args.step):
        live = [c for c in conns if not c.lost][:count]
        stats = openloop.Stats()
        for conn in live:
            conn.stats = stats
        opts = argparse.Namespace(warmup=args.warmup, duration=args.duration, server_pid=pid)
        meter, redis_before = Meter(pid), redis_info(redis)
        metrics_before = metric_samples(scrape(srv.port))
        with client_gc_paused():
            row = await openloop.drive(
                live, openloop.ECHO_FRAMES, args.rate / len(live), opts, stats
            )
        cpu = meter.read()  # the whole phase; drive's own server_cpu_pct is the window's
        row |= {"sessions": len(live), "open": len(conns), "client_cpu_pct": cpu["client_cpu_pct"]}
        if redis is not None:
            now = redis_info(redis)
            wall = now["t"] - redis_before["t"]
            row["redis_cpu_pct"] = 100 * (now["cpu_s"] - redis_before["cpu_s"]) / wall
            row["redis_scripts_per_s"] = (
                now["calls"].get("evalsha", 0) - redis_before["calls"].get("evalsha", 0)
            ) / wall
            row |= commit_waits(metrics_before, metric_samples(scrape(srv.port)))
        out["latency"].append(row)
        log(
            f"{name:>8} {args.rate:,.0f} msg/s over {len(live):>6,} sessions: achieved"
            f" {row['achieved_per_s']:6.0f}/s, p50 {row['p50_ms']:6.2f} p99 {row['p99_ms']:6.2f}"
            f" p99.9 {row['p999_ms']:6.2f} ms, {row['errors']} errors, server"
            f" {row['server_cpu_pct']:3.0f} % client {row['client_cpu_pct']:3.0f} %"
            + (
                f" redis-server {row['redis_cpu_pct']:3.0f} %"
                f" ({row['redis_scripts_per_s']:,.0f} scripts/s), commit p50 / p99 at most"
                f" {row['commit_p50_ms_at_most']:g} / {row['commit_p99_ms_at_most']:g} ms"
                if "redis_cpu_pct" in row
                else ""
            )
        )
    scrapes.append(metric_samples(scrape(srv.port)))
    for conn in conns:
        conn.close()
    deadline = time.monotonic() + 30
    while service and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        if metric_samples(scrape(srv.port)).get("echo_active_sessions", 0) == 0:
            break
    await asyncio.sleep(2.0)
    final = metric_samples(scrape(srv.port))
    rss_closed, redis_closed = rss_mb(pid), redis_info(redis)
    n = max(1, len(conns))
    memory = {
        "sessions": len(conns),
        "rss_start_mb": rss0,
        "rss_open_mb": rss_open,
        "rss_detached_mb": rss_closed,
        "kb_per_open_session": (rss_open - rss0) * 1024 / n,
        "kb_per_detached_session": (rss_closed - rss0) * 1024 / n,
        "stored_sessions_after_close": final.get("echo_stored_sessions"),
    }
    if redis is not None:
        memory["redis_bytes_per_open_session"] = (
            redis_open["used_memory"] - redis0["used_memory"]
        ) / n
        memory["redis_bytes_per_detached_session"] = (
            redis_closed["used_memory"] - redis0["used_memory"]
        ) / n
    out["memory"] = memory
    log(f"{name:>8} memory: " + ", ".join(f"{k} {v:,.1f}" for k, v in memory.items()
        if isinstance(v, float | int)))  # fmt: skip
    if service:
        phases = ("opening", "rest", "load")
        out["gc"] = {p: gc_pauses(scrapes[i], scrapes[i + 1]) for i, p in enumerate(phases)}
        out["gc"]["run"] = gc_pauses(scrapes[0], scrapes[-1])
        out["refused"] = {
            k: v for k, v in final.items() if ("refused" in k or "cut_off" in k) and "_total" in k
        }
        log(f"{name:>8} GC pauses over the run: {out['gc']['run']}")
    return out


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for every configuration but the floor, against the floor's figures."""
    floor = next((r for r in rows if r["config"] == "floor"), None)
    if floor is None:
        return []
    floor_rates = [s["opens_per_s"] for s in floor["steps"]]
    floor_ratio = floor_rates[-1] / floor_rates[0]
    floor_p99 = floor["latency"][-1]["p99_ms"]
    found = []
    for row in rows:
        if row is floor:
            continue
        steps = row["steps"]
        rates = [s["opens_per_s"] for s in steps]
        slowest = min(rates[:-1] or rates)
        found.append({
            "config": row["config"],
            "target": f"every step to {steps[-1]['first']:,} sessions opens at >= 0.25 x the"
            " floor's slowest step, none refused",
            "value": slowest,
            "threshold": 0.25 * min(floor_rates),
            "pass": slowest >= 0.25 * min(floor_rates) and not any(s["failed"] for s in steps),
        })  # fmt: skip
        ratio = rates[-1] / rates[0]
        found.append({
            "config": row["config"],
            "target": "open rate last step / first >= 0.5 x the floor's",
            "value": ratio,
            "threshold": 0.5 * floor_ratio,
            "pass": ratio >= 0.5 * floor_ratio,
        })  # fmt: skip
        p99 = row["latency"][-1]["p99_ms"]
        limit = max(2 * floor_p99, P99_FLOOR_MS)
        found.append({
            "config": row["config"],
            "target": f"p99 at {row['latency'][-1]['sessions']:,} sessions <= max(2 x floor, "
            f"{P99_FLOOR_MS:g} ms)",
            "value": p99,
            "threshold": limit,
            "pass": p99 <= limit,
        })  # fmt: skip
        kb = row["memory"]["kb_per_open_session"]
        found.append({
            "config": row["config"],
            "target": f"RSS per open session <= {MAX_KB_PER_SESSION:g} KB",
            "value": kb,
            "threshold": MAX_KB_PER_SESSION,
            "pass": kb <= MAX_KB_PER_SESSION,
        })  # fmt: skip
    return found


def log(msg: str) -> None:
    print(f"[sessions {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def raise_fd_limit() -> int:
    """One descriptor per session here too: the soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def configs(args: argparse.Namespace) -> list[str]:
    chosen = [f"{n}={STANDARD[n]}" for n in args.configs.split(",") if n]
    return chosen + (args.config or [])


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from bench.run import machine_state, source_digest

    fds = raise_fd_limit()
    if fds < args.sessions + 100:
        raise SystemExit(f"file-descriptor limit {fds} is too low for {args.sessions} sessions")
    tmp = Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    log(f"server logs in {tmp}")
    meta = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "commit": commit(),
        "server_source_sha256": source_digest(),
        "cpu_count": os.cpu_count(),
        "sessions": args.sessions,
        "step": args.step,
        "rate": args.rate,
        "concurrency": args.concurrency,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "rest_s": args.rest,
        "server_logs": str(tmp),
        "service_env": SERVICE_ENV,
        "machine_before": machine_state(),
    }
    if meta["machine_before"]["loadavg"][0] > 0.5:
        log(f"WARNING: load average {meta['machine_before']['loadavg'][0]:.2f} > 0.5: noisy")
    t0, cpu0 = time.monotonic(), self_cpu_seconds()
    rows = []
    redis: RedisServer | None = None
    try:
        for name, env, app, cwd in map(parse_config, configs(args)):
            if app is None:
                env = {**SERVICE_ENV, "ECHO_MAX_SESSIONS": str(max(10_000, args.sessions)), **env}
                env["MAX_CONNECTIONS"] = str(max(int(env["MAX_CONNECTIONS"]), args.sessions + 100))
            uses_redis = env.get("ECHO_STORE_URL") == "redis://"
            if uses_redis:
                if redis is None:
                    redis = RedisServer(tmp / "redis")
                    redis.start()
                env["ECHO_STORE_URL"] = redis.url
                redis_info(redis)  # connect once before the baseline
                import redis as redis_py

                redis_py.Redis(port=redis.port).flushall()
            log(f"{name}: starting {'python -m app' if app is None else app}")
            with server.running(env, tmp / f"{name}.log", cwd=cwd, app=app, timeout=180) as srv:
                row = uvloop.run(measure(name, srv, redis if uses_redis else None, args))
            rows.append(row | {"cwd": str(cwd), "commit": commit(cwd)})
    finally:
        if redis is not None:
            redis.stop()
    meta["machine_after"] = machine_state()
    meta["total_s"] = time.monotonic() - t0
    meta["client_cpu_s"] = self_cpu_seconds() - cpu0  # this process: the client, all phases
    return {"meta": meta, "configs": rows, "targets": targets(rows)}


def write(results: dict[str, Any], out: Path) -> list[Path]:
    """``sessions.json``, ``sessions.md`` and ``sessions.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "sessions.json", out / "sessions.md", out / "sessions.png"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    paths[1].write_text(markdown(results))
    plot(results, paths[2])
    return paths


def markdown(results: dict[str, Any]) -> str:
    meta, rows = results["meta"], results["configs"]
    names = [r["config"] for r in rows]
    lines = [
        f"# Echo sessions at scale: {meta['sessions']:,} sessions per process",
        "",
        f"`{meta['command']}`, {meta['started']}, commit {meta['commit']}, server code "
        f"{meta['server_source_sha256']}, {meta['cpu_count']} cores, load average before "
        f"{meta['machine_before']['loadavg'][0]:.2f}. Configurations ran one after another, "
        "each on a fresh server; the client (this one process) shares the cores: "
        f"{meta['client_cpu_s']:.0f} CPU s over the {meta['total_s']:.0f} s run.",
        "",
        "## Targets",
        "",
        "| config | target | value | threshold | |",
        "|---|---|---:|---:|---|",
    ]
    for t in results["targets"]:
        lines.append(
            f"| {t['config']} | {t['target']} | {t['value']:,.2f} | {t['threshold']:,.2f} | "
            f"{'PASS' if t['pass'] else 'FAIL'} |"
        )
    lines += [
        "",
        "## Opens/s by sessions already open (server CPU ms per open)",
        "",
    ]
    lines += ["| open before | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for i, step in enumerate(rows[0]["steps"] if rows else []):
        cells = []
        for r in rows:
            s = r["steps"][i] if i < len(r["steps"]) else None
            cells.append(
                "" if s is None else f"{s['opens_per_s']:,.0f} ({s['server_cpu_ms_per_open']:.2f})"
                + (f", {s['failed']} failed" if s["failed"] else "")
            )  # fmt: skip
        lines.append(f"| {step['first']:,} | " + " | ".join(cells) + " |")
    for r in rows:
        for key, value in r.get("refused", {}).items():
            lines.append(f"\n{r['config']}: `{key}` {value:,.0f}")
    lines += [
        "",
        f"## Open loop, {meta['rate']:,.0f} msg/s in total (1-bit messages, latency from the "
        "scheduled send)",
        "",
        "| config | sessions sending | open | achieved /s | p50 ms | p99 ms | p99.9 ms | errors "
        "| server CPU % | client CPU % | redis-server CPU % (scripts/s) "
        "| commit p50 / p99 ms, at most |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for x in r["latency"]:
            lines.append(
                f"| {r['config']} | {x['sessions']:,} | {x['open']:,} | {x['achieved_per_s']:,.0f}"
                f" | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {x['p999_ms']:.2f} | {x['errors']} |"
                f" {x['server_cpu_pct']:.0f} | {x['client_cpu_pct']:.0f} | "
                + (
                    f"{x['redis_cpu_pct']:.0f} ({x['redis_scripts_per_s']:,.0f}) |"
                    f" {x['commit_p50_ms_at_most']:g} / {x['commit_p99_ms_at_most']:g} |"
                    if "commit_p99_ms_at_most" in x
                    else "- | - |"
                )
            )
    lines += [
        "",
        "## Memory and idle cost",
        "",
        "RSS of the server process; detached: after closing every session (the service keeps "
        "them resumable for their TTL; freed memory Python keeps counts too). At rest: "
        f"{meta['rest_s']:g} s with every session open and idle; Redis commands count those "
        "scripts call (calls per command in brackets: `evalsha` is one round trip).",
        "",
        "| config | sessions | RSS start MB | RSS open MB | KB / open session | KB / detached "
        "session | Redis B / open session | Redis B / detached | server CPU % at rest | "
        "Redis commands/s at rest | sessions lost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m, rest = r["memory"], r["rest"]
        redis_open = m.get("redis_bytes_per_open_session")
        redis_closed = m.get("redis_bytes_per_detached_session")
        cmds = rest.get("redis_commands_per_s")
        calls = ", ".join(f"{k} {v:,g}" for k, v in rest.get("redis_calls_per_s", {}).items())
        lines.append(
            f"| {r['config']} | {m['sessions']:,} | {m['rss_start_mb']:.0f} | "
            f"{m['rss_open_mb']:.0f} | {m['kb_per_open_session']:.1f} | "
            f"{m['kb_per_detached_session']:.1f} | "
            + (f"{redis_open:,.0f} | {redis_closed:,.0f}" if redis_open is not None else "- | -")
            + f" | {rest['server_cpu_pct']:.1f} | "
            + (f"{cmds:,.1f} ({calls})" if cmds is not None else "-")
            + f" | {rest['sessions_lost']} |"
        )
    lines += [
        "",
        "## GC pauses (`python_gc_pause_seconds`): count, longest at most (ms, histogram bucket)",
        "",
        "| config | phase | gen 0 | gen 1 | gen 2 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        for phase, gens in r.get("gc", {}).items():
            cells = [
                f"{g['count']:.0f}" + (f", ≤ {g['max_ms_at_most']:g}" if g["count"] else "")
                for g in gens.values()
            ]
            lines.append(f"| {r['config']} | {phase} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate_ax, rss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for row in results["configs"]:
        before = [s["open_before"] for s in row["steps"]]
        rate_ax.plot(before, [s["opens_per_s"] for s in row["steps"]], marker="o",
                     label=row["config"])  # fmt: skip
        rss_ax.plot([0] + [s["open_after"] for s in row["steps"]],
                    [row["memory"]["rss_start_mb"]] + [s["rss_mb"] for s in row["steps"]],
                    marker="o", label=row["config"])  # fmt: skip
    rate_ax.set(title="opens/s by sessions already open", xlabel="sessions open",
                ylabel="opens/s (handshake + session frame)")  # fmt: skip
    rss_ax.set(title="server RSS", xlabel="sessions open", ylabel="MB")
    for ax in (rate_ax, rss_ax):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    meta = results["meta"]
    fig.suptitle(f"echo sessions at scale, {meta['started']}, commit {meta['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sessions", type=int, help="sessions to open (10,000; quick 2,000)")
    ap.add_argument("--step", type=int, help="sessions per step (1,000; quick 500)")
    ap.add_argument(
        "--rate", type=float, help="total msg/s of the latency phase (4,500; quick 1,500)"
    )
    ap.add_argument("--concurrency", type=int, default=100, help="handshakes in flight (100)")
    ap.add_argument(
        "--warmup", type=float, help="unmeasured seconds before a latency window (2; quick 1)"
    )
    ap.add_argument("--duration", type=float, help="latency window, s (8; quick 3)")
    ap.add_argument("--rest", type=float, help="seconds idle with every session open (10; quick 5)")
    ap.add_argument("--configs", default="floor,memory,redis", help=f"of {', '.join(STANDARD)}")
    ap.add_argument("--config", action="append", help="NAME=K=V,... or NAME=@module:app (bench.ab)")
    ap.add_argument("--quick", action="store_true", help="2,000 sessions in steps of 500")
    ap.add_argument("--out", type=Path, default=server.REPO / "bench" / "results")
    args = ap.parse_args(argv)
    quick = args.quick
    args.sessions = args.sessions or (2000 if quick else 10_000)
    args.step = args.step or (500 if quick else 1000)
    args.rate = args.rate or (1500.0 if quick else 4500.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if quick else 2.0)
    args.duration = args.duration or (3.0 if quick else 8.0)
    args.rest = args.rest if args.rest is not None else (5.0 if quick else 10.0)
    if not 0 < args.step < args.sessions:
        ap.error("--step must be positive and below --sessions")
    unknown = set(filter(None, args.configs.split(","))) - set(STANDARD)
    if unknown:
        ap.error(f"unknown --configs {', '.join(sorted(unknown))}: use --config NAME=K=V,...")
    results = run(args, " ".join(["python -m bench.sessions", *argv]))
    paths = write(results, args.out)
    print(paths[1].read_text())
    for t in results["targets"]:
        print(f"{'PASS' if t['pass'] else 'FAIL'} {t['config']}: {t['target']}: "
              f"{t['value']:,.2f} (threshold {t['threshold']:,.2f})")  # fmt: skip
    log("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
