"""Open-loop load: clients that send on their own clock, latency from the *scheduled* time.

    python -m bench.openloop --port P --server-pid PID --echo 1000:2 --echo 1000:5 --digits 500

Closed-loop load (``bench.loadgen``) sends the next message when the last reply came, so a slow
server slows its own load and queueing hides. Here every echo session sends a 1-bit message
``RATE`` times a second from a random phase, whether or not its replies are in (the server
answers a connection's messages in order, so they queue there), and digit requests go out at
``RATE`` per second over a pool of connections. Latency counts from when a message was *due*,
so a late client or a queue anywhere shows up in it. One JSON line per scenario: offered and
achieved rate, p50/p99/p99.9/max, this process's and the server's CPU.

  --echo S:R     S sessions on /echo, each sending R messages/s (1 bit each)
  --digits R     R single-image requests/s on POST /predict/digit (a pool of 64 connections)

``python -m bench.openloop compare [--rounds 2]`` starts the service and the floor
(``bench.floor``: a bare uvicorn app that answers without any model) and runs the standard
scenarios on both, alternating, into ``bench/results/openloop.{json,md,png}``. For an A/B of
settings give ``--config NAME=K=V,...`` (as ``bench.ab``) and ``--echo`` / ``--digits`` instead:

    python -m bench.openloop compare --config thread=INLINE_CALL_BUDGET_MS=0 --config inline= \
        --echo 1000:5 --digits 3000 --out /tmp/ab
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import random
import sys
from collections import deque
from time import perf_counter_ns
from typing import Any

import uvloop

from bench import mnist
from bench.loadgen import digit_body, percentile
from bench.wire import http_request, ws_frame
from tests.servers import proc_cpu_seconds, self_cpu_seconds

ECHO_FRAMES = [ws_frame(b'{"bits":[%d]}' % b) for b in (0, 1)]


# The sender wakes at most once a millisecond and sends everything due by then, each message
# stamped with its due time (latency counts from there, so a late send is measured, not hidden).
# uvloop runs a timer under 0.5 ms at once, so sleeping until the next due time (~0.2 ms apart at
# 4,500 msg/s) spun the client's loop: 65 % of a core against 19 % with the tick
# (``bench.sessions``, 9,000 senders, 2026-12-06), CPU the server under test competed for.
TICK_S = 0.001


class Stats:
    def __init__(self) -> None:
        self.lat: list[int] = []
        self.errors = 0
        self.recording = False


class Conn(asyncio.Protocol):
    """A connection whose replies come in request order; each is matched to its due time."""

    def __init__(self, stats: Stats, websocket: bool) -> None:
        self.stats, self.websocket = stats, websocket
        self.due: deque[int] = deque()
        self.buf = bytearray()
        self.open = not websocket
        self.ready = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.websocket:
            transport.write(  # type: ignore[attr-defined]
                b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
        else:
            self.ready.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(str(exc)))

    def send(self, data: bytes, due: int) -> None:
        self.due.append(due)
        self.transport.write(data)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.websocket:
            self._frames()
        else:
            self._responses()

    def _done(self, ok: bool) -> None:
        now = perf_counter_ns()
        due = self.due.popleft()
        if self.stats.recording:
            self.stats.lat.append(now - due)
            self.stats.errors += not ok

    def _frames(self) -> None:
        buf = self.buf
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            del buf[: end + 4]
            self.open = True
        while len(buf) >= 2:
            n, hdr = buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, hdr = int.from_bytes(buf[2:4], "big"), 4
            end = hdr + n
            if len(buf) < end:
                return
            if not self.ready.done():
                self.ready.set_result(None)  # the session frame
            elif buf[0] & 0x0F == 1:
                self._done(buf.find(b'"echo"', hdr, hdr + 40) >= 0)
            del buf[:end]

    def _responses(self) -> None:
        buf = self.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            length = int(buf[buf.find(b"content-length:", 0, end) + 15 : end].split(b"\r")[0])
            if len(buf) < end + 4 + length:
                return
            self._done(buf[9:12] == b"200")
            del buf[: end + 4 + length]


async def connect(host: str, port: int, stats: Stats, websocket: bool, source: str) -> Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(
        lambda: Conn(stats, websocket), host, port, local_addr=(source, 0)
    )
    await asyncio.wait_for(conn.ready, 30)
    return conn


async def drive(
    conns: list[Conn], payloads: list[bytes], rate: float, args: argparse.Namespace, stats: Stats
) -> dict[str, Any]:
    """Each connection sends at ``rate``/s from a random phase; warm up, then measure."""
    period = int(1e9 / rate)
    rng = random.Random(1)
    start = perf_counter_ns() + 50_000_000
    heap = [(start + rng.randrange(period), i) for i in range(len(conns))]
    heapq.heapify(heap)
    t_measure = start + int(args.warmup * 1e9)
    t_end = t_measure + int(args.duration * 1e9)
    sent = 0
    c0 = s0 = 0.0
    while heap[0][0] < t_end:
        now = perf_counter_ns()
        if not stats.recording and now >= t_measure:
            stats.recording = True
            c0, s0, sent = self_cpu_seconds(), proc_cpu_seconds(args.server_pid), 0
        while heap[0][0] <= now:  # every message due by now, each stamped with its due time
            due, i = heap[0]
            conns[i].send(payloads[(sent + i) & 1 if len(payloads) == 2 else 0], due)
            heapq.heapreplace(heap, (due + period, i))
            sent += 1
        await asyncio.sleep(max(TICK_S, (heap[0][0] - perf_counter_ns()) / 1e9))
    wall = (perf_counter_ns() - t_measure) / 1e9
    c1, s1 = self_cpu_seconds(), proc_cpu_seconds(args.server_pid)
    stats.recording = False
    await asyncio.sleep(0.5)
    lat = sorted(stats.lat)
    return {
        "offered_per_s": len(conns) * rate,
        "sent_per_s": sent / wall,
        "achieved_per_s": len(lat) / wall,
        "errors": stats.errors,
        "p50_ms": percentile(lat, 0.50),
        "p99_ms": percentile(lat, 0.99),
        "p999_ms": percentile(lat, 0.999),
        "max_ms": lat[-1] / 1e6 if lat else float("nan"),
        "client_cpu_pct": 100 * (c1 - c0) / wall,
        "server_cpu_pct": 100 * (s1 - s0) / wall,
    }


async def main_async(args: argparse.Namespace) -> None:
    for spec in args.echo:
        sessions, rate = spec.split(":")
        stats = Stats()
        conns = [
            await connect(args.host, args.port, stats, True, f"127.0.0.{2 + i // 400}")
            for i in range(int(sessions))
        ]
        result = await drive(conns, ECHO_FRAMES, float(rate), args, stats)
        print(json.dumps({"scenario": "echo", "sessions": int(sessions), "rate": float(rate),
                          **result}), flush=True)  # fmt: skip
        for conn in conns:
            conn.transport.close()  # type: ignore[union-attr]
        await asyncio.sleep(1.0)
    for spec in args.digits:
        images, _ = mnist.load(1)
        body = http_request("/predict/digit", digit_body([images[0]]))
        stats = Stats()
        conns = [await connect(args.host, args.port, stats, False, "127.0.0.1") for _ in range(64)]
        rate = float(spec) / len(conns)
        result = await drive(conns, [body], rate, args, stats)
        print(json.dumps({"scenario": "digits", "rate": float(spec), **result}), flush=True)
        for conn in conns:
            conn.transport.close()  # type: ignore[union-attr]
        await asyncio.sleep(1.0)


ECHO_SCENARIOS = ("1000:2", "1000:5", "1000:8")
DIGIT_SCENARIOS = ("500", "1000", "2000", "3000", "4000")


def compare(argv: list[str]) -> None:
    """Configurations side by side, alternating, for every scenario (default: service vs floor,
    the standard scenarios)."""
    import subprocess
    import tempfile
    from pathlib import Path

    from bench.ab import parse_config
    from tests import servers as server

    ap = argparse.ArgumentParser(description="configurations side by side, open loop")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--out", type=Path, default=server.REPO / "bench" / "results")
    ap.add_argument("--config", action="append", help="NAME=K=V,... or NAME=@module:app (bench.ab)")
    ap.add_argument("--echo", action="append", metavar="S:R", help="instead of the standard ones")
    ap.add_argument("--digits", action="append", metavar="R", help="instead of the standard ones")
    args = ap.parse_args(argv)
    configs = args.config or ["service=", "floor=@bench.floor:app"]
    scenarios = [("--echo", s) for s in args.echo or []] + [
        ("--digits", s) for s in args.digits or []
    ]
    if not scenarios:
        scenarios = [("--echo", s) for s in ECHO_SCENARIOS]
        scenarios += [("--digits", s) for s in DIGIT_SCENARIOS]
    tmp = Path(tempfile.mkdtemp(prefix="bench-openloop-"))
    servers = {}
    rows = []
    try:
        for name, env, app, cwd in map(parse_config, configs):
            servers[name] = server.start(env, tmp / f"{name}.log", cwd=cwd, app=app)
        for r in range(args.rounds):
            for flag, spec in scenarios:
                for name, srv in servers.items():
                    cmd = [sys.executable, "-m", "bench.openloop", "--port", str(srv.port)]
                    cmd += ["--server-pid", str(srv.pid), flag, spec]
                    cmd += ["--duration", str(args.duration)]
                    out = subprocess.run(
                        cmd, capture_output=True, text=True, check=True, cwd=server.REPO
                    )
                    row = {"round": r, "server": name, **json.loads(out.stdout)}
                    rows.append(row)
                    print(
                        f"round {r} {name:>7} {flag[2:]:>6} {spec:>7}: achieved "
                        f"{row['achieved_per_s']:7.0f}/s of {row['offered_per_s']:5.0f}, p50 "
                        f"{row['p50_ms']:6.2f} p99 {row['p99_ms']:6.2f} p99.9 "
                        f"{row['p999_ms']:6.2f} ms, server {row['server_cpu_pct']:3.0f} % "
                        f"client {row['client_cpu_pct']:3.0f} %",
                        flush=True,
                    )
    finally:
        for srv in servers.values():
            server.stop(srv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "openloop.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    report(rows, args.out)


def report(rows: list[dict[str, Any]], out: Any) -> None:
    """``openloop.md`` (medians over rounds) and ``openloop.png`` (p99 vs offered load)."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["scenario"], r["offered_per_s"], r["server"]) for r in rows})
    table = [
        "| load | offered /s | server | achieved /s | p50 ms | p99 ms | p99.9 ms | server CPU % |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for scenario, offered, name in keys:
        mine = [r for r in rows if (r["scenario"], r["offered_per_s"], r["server"]) == (
            scenario, offered, name)]  # fmt: skip
        med = {
            k: statistics.median(r[k] for r in mine)
            for k in ("achieved_per_s", "p50_ms", "p99_ms", "p999_ms", "server_cpu_pct")
        }
        table.append(
            f"| {scenario} | {offered:,.0f} | {name} | {med['achieved_per_s']:,.0f} | "
            f"{med['p50_ms']:.2f} | {med['p99_ms']:.2f} | {med['p999_ms']:.2f} | "
            f"{med['server_cpu_pct']:.0f} |"
        )
        series.setdefault((scenario, name), []).append((offered, med["p99_ms"]))
    for ax, scenario in zip(axes, ("echo", "digits"), strict=True):
        for (kind, name), points in sorted(series.items()):
            if kind == scenario:
                ax.plot(*zip(*sorted(points), strict=True), marker="o", label=name)
        ax.set(
            title=f"{scenario}: p99 latency, open loop",
            xlabel="offered messages/s",
            ylabel="p99 ms (from the scheduled send), log scale",
            yscale="log",
        )
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    fig.tight_layout()
    fig.savefig(out / "openloop.png", dpi=100)
    (out / "openloop.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        compare(argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--server-pid", type=int, required=True)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--echo", action="append", default=[], metavar="S:R")
    ap.add_argument("--digits", action="append", default=[], metavar="R")
    args = ap.parse_args(argv)
    if not args.echo and not args.digits:
        ap.error("give --echo S:R and/or --digits R")
    uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
