"""Issue #21's hostile clients, round 2: each attack against a server with default settings.

    python -m bench.attacks_round2 [--only ROW ...] [--config NAME=K=V,...] [--out DIR]
    python -m bench.attacks_round2 --config fixed= --config before=cwd=../old-checkout

Every row starts from a server (``python -m app``, the service's defaults: none of the limits
that ``tests.servers`` lifts for the load generator) on 127.0.0.1; rows that leave state behind
(leaked sessions, held connections, memory kept after a flood) get a fresh one. While the attack
runs from 127.0.0.3 and up, a well-behaved client on 127.0.0.2 (a process of its own) asks
``GET /livez`` on a new connection every ~10 ms (its longest and p99 wait), and a sampler reads
the server's VmRSS (/proc/<pid>/status) and the kernel's TCP memory (/proc/net/sockstat
``TCP: ... mem`` pages) every ~50 ms. Rows (``--only``):

* ``echo_resume``: 20 addresses each open 500 sessions, drop them, and resume every one with
  ``last_seq=²`` (odd addresses: ``①``). Afterwards: can 127.0.0.2 open a new session, and can
  one leaked session per address be resumed with valid parameters from 127.0.0.253 (not left
  attached: today it is refused ``session_in_use``)?
* ``v2_shape``: v2 infer whose input shape has 400,000 dimensions (0.76 MiB).
* ``v2_inputs``: v2 infer ``{"inputs": [{}] * 1.3M}`` (3.7 MiB).
* ``digit_strings``: ``/predict/digit`` ``{"image": ["a"] * 1M}`` (3.8 MiB).
* ``pipeline_openapi`` / ``pipeline_livez``: 200 connections (from 127.0.1.3, 127.0.2.3, ...: 50
  an address, off the victim's /24) each pipeline 2,000 ``GET`` of the path and never read; held
  ``--hold`` (20) s, then closed. The livez one also runs an echo client on 127.0.0.2 (a 1-bit
  message every 20 ms) and reports its p99.
* ``bad_version``: ``?version=²`` and ``/versions/①`` on every route that takes a version.
* ``conn_caps``: WebSocket connections held from 127.0.0.3, .4, ... (the next /24 once an
  address of a /24 gets none) until a fresh address of a fresh /24 gets none too or the bounds
  are hit; then is a client from 127.99.0.1 (another /24) still served?

Criteria (issue #21), PASS/FAIL per row: every hostile request refused cleanly, a 4xx (WebSocket:
a close code with a reason) within 1 s; server RSS growth <= 300 MB (the pipelining rows: peak
< +256 MB); the victim's ``/livez`` never waits more than 250 ms (not in ``conn_caps``, whose
victim shares 127.0.0.0/24 with the attackers); no session left attached, a new one admitted; a
client from another /24 served while the connection caps are full. Writes
``attacks_round2.{json,md}`` to ``--out`` (bench/results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from bench.ab import parse_config
from tests import servers as srv
from tests.echo_attacks import Refused, open_session, resume_url
from tests.hostile_clients import get, post, read_response

VICTIM = "127.0.0.2"
FRESH_NET = "127.99.0.1"  # a client of another /24 than every attacker's
RESUMER = "127.0.0.253"  # resumes the leaked sessions (its own per-address counts are zero)
MODEL = "mnist_lstm"
ANSWER_S = 1.0  # a hostile request's refusal comes within this
VICTIM_MAX_S = 0.25  # another client's /livez never waits longer
RSS_GROWTH_MB = 300.0
PIPELINE_RSS_GROWTH_MB = 256.0
PAGE = os.sysconf("SC_PAGE_SIZE")
UPGRADE = (
    b"GET /echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def attacker(i: int) -> str:
    """The i-th attacker address: 127.0.0.3, 127.0.0.4, ... 127.0.0.252 (never the victim's)."""
    return f"127.0.0.{3 + i % 250}"


# --- measurement: the server's RSS and the kernel's TCP memory; the victim's waits -------------


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return float("nan")


def tcp_mem_mib() -> float:
    """The kernel's TCP buffer memory (all sockets of this network namespace), in MiB."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()
                return int(parts[parts.index("mem") + 1]) * PAGE / 2**20
    return float("nan")


class Sampler(threading.Thread):
    """(seconds, RSS MB, TCP MiB) every ``interval`` until stopped."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.t0 = time.monotonic()
        self.samples: list[tuple[float, float, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.monotonic() - self.t0, rss_mb(self.pid), tcp_mem_mib()))
            self.done.wait(self.interval)

    def stop(self) -> None:
        self.done.set()
        self.join(5)

    def between(self, start: float, end: float = float("inf")) -> list[tuple[float, float, float]]:
        return [s for s in self.samples if start <= s[0] + self.t0 <= end]


def livez(port: int, source: str, timeout: float = 5.0) -> int:
    """Status of ``GET /livez`` on a new connection from ``source``; 0 if none came."""
    try:
        with socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        ) as sock:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    except (OSError, ValueError, IndexError):
        return 0


class VictimLoop(threading.Thread):
    """A well-behaved client: ``GET /livez`` every ``interval`` from ``source``."""

    def __init__(self, port: int, source: str = VICTIM, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.port, self.source, self.interval = port, source, interval
        self.waits: list[tuple[float, float, int]] = []  # (started, seconds, status)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            t0 = time.monotonic()
            status = livez(self.port, self.source, timeout=30.0)  # the whole stall
            wait = time.monotonic() - t0
            self.waits.append((t0, wait, status))
            self.done.wait(max(0.0, self.interval - wait))

    def stop(self) -> dict[str, Any]:
        self.done.set()
        self.join(10)
        waits = sorted(w for _, w, _ in self.waits)
        statuses = Counter(str(s) for _, _, s in self.waits)
        return {
            "requests": len(waits),
            "max_ms": round(waits[-1] * 1000, 1) if waits else None,
            "p99_ms": round(pct(waits, 0.99) * 1000, 1) if waits else None,
            "statuses": dict(statuses),
        }


class Victim:
    """``VictimLoop`` in a process of its own (``--victim PORT,SOURCE,INTERVAL``), so that the
    attacking client's work in this one (thousands of handshakes) never delays it."""

    def __init__(self, port: int, source: str = VICTIM, interval: float = 0.01) -> None:
        self.cmd = [sys.executable, "-m", "bench.attacks_round2"]
        self.cmd += ["--victim", f"{port},{source},{interval}"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.cmd, cwd=srv.REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # "ready": its first /livez is answered

    def stop(self) -> dict[str, Any]:
        assert self.proc is not None
        out, _ = self.proc.communicate(b"", timeout=90)  # end of stdin: stop and report
        return json.loads(out)


def victim_main(spec: str) -> int:
    port, source, interval = spec.split(",")
    loop = VictimLoop(int(port), source, float(interval))
    loop.start()
    while not loop.waits:
        time.sleep(0.005)
    print("ready", flush=True)
    sys.stdin.read()
    print(json.dumps(loop.stop()), flush=True)
    return 0


class EchoVictim(threading.Thread):
    """A well-behaved /echo client: a 1-bit message every ``interval``, its reply awaited."""

    def __init__(self, port: int, source: str = VICTIM, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.port, self.source, self.interval = port, source, interval
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        from websockets.sync.client import connect

        try:
            sock = socket.create_connection(
                ("127.0.0.1", self.port), timeout=10, source_address=(self.source, 0)
            )
            with connect(f"ws://127.0.0.1:{self.port}/echo", sock=sock, proxy=None) as ws:
                ws.recv(timeout=10)
                while not self.done.is_set():
                    t0 = time.monotonic()
                    ws.send('{"bits": [1]}')
                    ws.recv(timeout=10)
                    self.latencies.append(time.monotonic() - t0)
                    self.done.wait(max(0.0, self.interval - (time.monotonic() - t0)))
        except Exception as exc:  # reported, not raised: the row goes on
            self.failures.append(f"{type(exc).__name__}: {exc}"[:200])

    def stop(self) -> dict[str, Any]:
        self.done.set()
        self.join(15)
        lat = sorted(self.latencies)
        return {
            "messages": len(lat),
            "p99_ms": round(pct(lat, 0.99) * 1000, 1) if lat else None,
            "max_ms": round(lat[-1] * 1000, 1) if lat else None,
            "failures": self.failures,
        }


def pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@dataclass
class Row:
    """One attack: ``run(port, result)`` fills ``result`` (answers, row-specific facts)."""

    name: str
    run: Callable[[int, dict[str, Any]], None]
    fresh: bool = False  # a server of its own (the attack leaves state behind)
    rss_limit_mb: float = RSS_GROWTH_MB
    victim_counts: bool = True  # the victim's waits are part of the verdict
    echo_victim: bool = False
    after_s: float = 6.0  # kept sampling after the attack
    answers: list[dict[str, Any]] = field(default_factory=list)


def measure(server: srv.Server, row: Row) -> dict[str, Any]:
    """Run ``row`` beside the victim and the sampler; its figures and verdict."""
    sampler = Sampler(server.pid)
    sampler.start()
    time.sleep(0.5)
    before = sampler.samples[-1]
    victim = Victim(server.port)
    victim.start()
    echo_victim = EchoVictim(server.port) if row.echo_victim else None
    if echo_victim:
        echo_victim.start()
    time.sleep(0.3)
    result: dict[str, Any] = {"row": row.name}
    t_start = time.monotonic()
    try:
        row.run(server.port, result)
    except Exception as exc:  # a row that breaks is reported as such
        result["error"] = f"{type(exc).__name__}: {exc}"[:300]
    t_end = time.monotonic()
    time.sleep(row.after_s)
    victim_stats = victim.stop()
    echo_stats = echo_victim.stop() if echo_victim else None
    sampler.stop()
    during = sampler.between(t_start)
    after = sampler.samples[-1]
    five_s = sampler.between(t_end + 5.0)
    result.update(
        {
            "attack_s": round(t_end - t_start, 2),
            "rss_mb": {
                "before": round(before[1]),
                "peak": round(max(s[1] for s in during)),
                "after": round(after[1]),
            },
            "tcp_mem_mib": {
                "before": round(before[2], 1),
                "peak": round(max(s[2] for s in during), 1),
                "5s_after": round(five_s[0][2], 1) if five_s else None,
            },
            "victim_livez": victim_stats,
        }
    )
    if echo_stats:
        result["victim_echo"] = echo_stats
    result["server_alive"] = server.proc.poll() is None
    verdict(row, result)
    return result


def verdict(row: Row, result: dict[str, Any]) -> None:
    """PASS/FAIL against the issue's criteria, and why."""
    why: list[str] = []
    if "error" in result:
        why.append(f"the attack broke: {result['error']}")
    if not result["server_alive"]:
        why.append("the server died")
    answers = result.get("answers", [])
    unclean = [a for a in answers if not a.get("clean")]
    if len(unclean) == 1:
        why.append(f"{unclean[0]['what']}: {summarize(unclean)}")
    elif unclean:
        why.append(f"{len(unclean)} of {len(answers)} answers: {summarize(unclean)}")
    for answer in answers:
        if answer.get("seconds") is not None and answer["seconds"] > ANSWER_S:
            why.append(f"{answer['what']}: answered after {answer['seconds']} s")
    growth = result["rss_mb"]["peak"] - result["rss_mb"]["before"]
    result["rss_growth_mb"] = growth
    if growth > row.rss_limit_mb:
        why.append(f"RSS +{growth} MB (limit {row.rss_limit_mb:g})")
    v = result["victim_livez"]
    if row.victim_counts:
        if v["max_ms"] is None or v["max_ms"] > VICTIM_MAX_S * 1000:
            why.append(f"victim /livez waited {v['max_ms']} ms")
        if set(v["statuses"]) - {"200"}:
            why.append(f"victim /livez got {v['statuses']}")
    for fact, ok in result.get("checks", {}).items():
        if not ok:
            why.append(f"not: {fact}")
    result["pass"] = not why
    result["why"] = why


# --- the attacks ---------------------------------------------------------------------------------


def http_exchange(port: int, source: str, request: bytes, timeout: float = 30.0) -> dict[str, Any]:
    """Send ``request`` whole from ``source``; the status, error code and seconds to the answer
    (from the end of the send), read until the server closes or one response is complete."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    ) as sock:
        t0 = time.monotonic()
        try:
            sock.sendall(request)
        except OSError as exc:
            return {"status": 0, "outcome": f"send failed: {exc}", "seconds": None}
        sent = time.monotonic()
        data = read_response(sock)
        done = time.monotonic()
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    code = ""
    body = data.partition(b"\r\n\r\n")[2]
    try:
        code = str(orjson.loads(body).get("error", ""))
    except (orjson.JSONDecodeError, AttributeError):
        code = body[:60].decode(errors="replace")
    return {
        "status": status,
        "outcome": f"{status} {code.split(':')[0]}"[:80].strip() if status else "no answer",
        "detail": code[:200],
        "seconds": round(done - sent, 3),
        "send_s": round(sent - t0, 3),
    }


def one_request(what: str, request: bytes) -> Callable[[int, dict[str, Any]], None]:
    def run(port: int, result: dict[str, Any]) -> None:
        answer = http_exchange(port, attacker(0), request)
        answer["what"] = what
        answer["clean"] = 400 <= answer["status"] < 500
        result["answers"] = [answer]

    return run


def v2_shape_body(dims: int = 400_000, size: int = 9) -> bytes:
    """An input whose shape has ``dims`` dimensions of ``size`` (its element count, a number of
    ``dims`` digits, is what costs)."""
    tensor = {"name": "images", "datatype": "UINT8", "shape": [size] * dims, "data": [0]}
    return orjson.dumps({"inputs": [tensor]})


def v2_inputs_body(count: int = 1_300_000) -> bytes:
    return b'{"inputs":[' + b",".join([b"{}"] * count) + b"]}"


def digit_strings_body(count: int = 1_000_000) -> bytes:
    return b'{"image":[' + b",".join([b'"a"'] * count) + b"]}"


def bad_version(port: int, result: dict[str, Any]) -> None:
    seven = orjson.dumps({"pixels": [[0] * 28] * 28})
    answers = []
    for raw in ("²", "①"):
        v = quote(raw)
        for what, request in [
            (f"POST /predict/digit?version={raw}", post(f"/predict/digit?version={v}", seven)),
            (f"GET /v2/models/{MODEL}/versions/{raw}", get(f"/v2/models/{MODEL}/versions/{v}")),
            (
                f"GET /v2/models/{MODEL}/versions/{raw}/ready",
                get(f"/v2/models/{MODEL}/versions/{v}/ready"),
            ),
            (
                f"POST /v2/models/{MODEL}/versions/{raw}/infer",
                post(f"/v2/models/{MODEL}/versions/{v}/infer", v2_shape_body(3, 1)),
            ),
        ]:
            answer = http_exchange(port, attacker(len(answers) % 8), request)
            answer["what"] = what
            answer["clean"] = 400 <= answer["status"] < 500
            answers.append(answer)
    result["answers"] = answers


# Echo: sessions resumed with a non-ASCII digit as last_seq.


def echo_resume(port: int, result: dict[str, Any], addresses: int = 20, each: int = 500) -> None:
    url = f"ws://127.0.0.1:{port}/echo"
    result.update(asyncio.run(_echo_resume(url, addresses, each, deadline_s=240)))
    checks = result["checks"] = {}
    checks["a new session is admitted afterwards"] = result["new_session_after"] == "admitted"
    checks["every leaked session resumable (none left attached)"] = (
        result["resumable_after"].get("resumed", 0) == sum(result["resumable_after"].values()) > 0
    )


async def _echo_resume(url: str, addresses: int, each: int, deadline_s: float) -> dict[str, Any]:
    stop_at = time.monotonic() + deadline_s
    outcomes: Counter[str] = Counter()
    unclean: Counter[str] = Counter()
    opened: Counter[str] = Counter()
    slowest = 0.0
    samples: list[tuple[str, dict[str, Any]]] = []  # one dropped session per address

    async def pool(jobs: list[Any], worker: Callable[[Any], Any], concurrency: int = 16) -> None:
        it = iter(jobs)

        async def run() -> None:
            for job in it:
                if time.monotonic() > stop_at:
                    return
                await worker(job)

        await asyncio.gather(*(run() for _ in range(concurrency)))

    for i in range(addresses):
        source, digit = attacker(i), ("²", "①")[i % 2]
        frames: list[dict[str, Any]] = []

        async def new(_: int, source: str = source, frames: list[Any] = frames) -> None:
            try:
                ws, frame = await open_session(url, source)
            except Refused as exc:
                opened[f"refused {exc.code} {exc.error}"] += 1
                return
            except (OSError, TimeoutError) as exc:
                opened[f"error {type(exc).__name__}"] += 1
                return
            opened["opened"] += 1
            frames.append(frame)
            await ws.close()

        await pool(list(range(each)), new)

        async def hostile(frame: dict[str, Any], source: str = source, digit: str = digit) -> None:
            nonlocal slowest
            t0 = time.monotonic()
            try:
                ws, _ = await open_session(
                    f"{resume_url(url, frame)}&last_seq={quote(digit)}", source
                )
                await ws.close()
                outcomes["accepted (session frame)"] += 1
                unclean["accepted"] += 1
            except Refused as exc:
                outcomes[f"{exc.code} {exc.reason[:40]}"] += 1
                # A close code of the application's with a reason, or an HTTP 4xx: clean.
                good = exc.code not in (1006, 1011) and 1000 <= exc.code < 5000 and exc.reason
                unclean[f"{exc.code} {exc.reason[:40]}"] += not (good or 400 <= exc.code < 500)
            except (OSError, TimeoutError) as exc:
                outcomes[f"error {type(exc).__name__}"] += 1
                unclean[f"error {type(exc).__name__}"] += 1
            slowest = max(slowest, time.monotonic() - t0)

        await pool(frames, hostile)
        if frames:
            samples.append((source, frames[0]))
        if time.monotonic() > stop_at:
            break

    # Resumable first: at the session cap a new session evicts the least recently used
    # detached one (by design), which may be one of these.
    resumable: Counter[str] = Counter()
    for _, frame in samples:
        try:
            ws, got = await open_session(resume_url(url, frame), RESUMER)
            await ws.close()
            resumable["resumed" if got.get("resumed") else "not resumed"] += 1
        except Refused as exc:
            resumable[f"refused {exc.code} {exc.error}"] += 1
    new_after = "admitted"
    try:
        ws, _ = await open_session(url, VICTIM)
        await ws.close()
    except Refused as exc:
        new_after = f"refused {exc.code} {exc.reason[:60]}"
    return {
        "addresses": addresses,
        "sessions_opened": dict(opened),
        "answers": [
            {
                "what": f"{sum(outcomes.values())} resumes with last_seq=² / ①",
                "outcome": dict(outcomes),
                "seconds": round(slowest, 3),
                "clean": not +unclean,
            }
        ],
        "new_session_after": new_after,
        "resumable_after": dict(resumable),
    }


# Pipelining clients that never read.


HOLD_S = [20.0]  # --hold


def pipeline(path: str, conns: int = 200, each: int = 2000) -> Any:
    def run(port: int, result: dict[str, Any]) -> None:
        result.update(asyncio.run(_pipeline(port, path, conns, each, HOLD_S[0])))

    return run


async def _pipeline(port: int, path: str, conns: int, each: int, hold_s: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    request = f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode() * each
    outcome: Counter[str] = Counter()
    socks: list[socket.socket] = []

    async def one(i: int) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        # 50 an address (under the per-address cap), each address in a /24 of its own: none
        # shares the victim's 127.0.0.0/24 (a per-network cap would refuse the victim, not them)
        sock.bind((f"127.0.{1 + i // 50}.3", 0))
        socks.append(sock)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 5)
            await asyncio.wait_for(loop.sock_sendall(sock, request), 20)
            outcome["sent whole"] += 1
        except TimeoutError:
            outcome["send stalled"] += 1
        except OSError as exc:
            outcome[f"error {type(exc).__name__}"] += 1

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(conns)))
    sent_s = time.monotonic() - t0
    await asyncio.sleep(min(5.0, hold_s))  # never reading
    tcp_5s = tcp_mem_mib()
    await asyncio.sleep(max(0.0, hold_s - 5.0))
    tcp_end = tcp_mem_mib()
    ports = {s.getsockname()[1] for s in socks if s.fileno() >= 0}
    still = len(ports & server_side_open(port))
    for sock in socks:
        sock.close()  # unread data: a reset
    return {
        "connections": conns,
        "requests_each": each,
        "sends": dict(outcome),
        "send_s": round(sent_s, 2),
        "held_s": hold_s,
        "tcp_mem_mib_held": {"5s_after_sends": round(tcp_5s, 1), "end_of_hold": round(tcp_end, 1)},
        "server_still_connected_after_hold": still,
    }


def server_side_open(port: int) -> set[int]:
    """Peer ports of the server's connections on ``port`` not yet closed (/proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    found = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[1] == local and parts[3] not in ("06", "07"):
                found.add(int(parts[2].split(":")[1], 16))
    return found


# Connection caps: hold WebSocket connections from address after address.


def conn_caps(port: int, result: dict[str, Any]) -> None:
    result.update(asyncio.run(_conn_caps(port)))
    result["checks"] = {
        f"a client from another /24 ({FRESH_NET}) is served": result["fresh_net_status"] == 200
    }


async def _hold(port: int, source: str, socks: list[socket.socket]) -> str:
    """A WebSocket upgrade from ``source``, kept open: "held" (upgraded and its first frame is
    not a close: the session frame), or what refused it (a status line, ``ws close CODE``)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        sock.bind((source, 0))
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 5)
        await loop.sock_sendall(sock, UPGRADE)
        data = b""
        while b"\r\n\r\n" not in data or (data.startswith(b"HTTP/1.1 101") and
                                             len(data.partition(b"\r\n\r\n")[2]) < 4):  # fmt: skip
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, OSError) as exc:
        sock.close()
        return f"error {type(exc).__name__}"
    head, _, frame = data.partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 101") and len(frame) >= 2 and frame[0] & 0x0F != 0x8:
        socks.append(sock)
        return "held"
    sock.close()
    if head.startswith(b"HTTP/1.1 101"):
        code = int.from_bytes(frame[2:4], "big") if len(frame) >= 4 else 1006
        return f"ws close {code}"
    return head.split(b"\r\n", 1)[0].decode(errors="replace")[9:] or "closed"


async def _conn_caps(
    port: int, per_address: int = 300, addresses: int = 250, most: int = 15_000, limit_s=90.0
) -> dict[str, Any]:
    socks: list[socket.socket] = []
    refused: Counter[str] = Counter()
    held_by: dict[str, int] = {}
    stop_at = time.monotonic() + limit_s
    net, host, full = 0, 3, ""
    while not full:
        if len(held_by) >= addresses or len(socks) >= most or time.monotonic() > stop_at:
            full = "bounds reached (not filled)"
            break
        source = f"127.0.{net}.{host}"
        got = 0
        while got < per_address:  # batches of 16 until one is refused
            outcomes = await asyncio.gather(*(_hold(port, source, socks) for _ in range(16)))
            got += outcomes.count("held")
            for o in outcomes:
                if o != "held":
                    refused[o] += 1
            if len(set(outcomes)) > 1 or outcomes[0] != "held":
                break
        held_by[source] = got
        if got:
            host += 1
            if host > 254:
                net, host = net + 1, 1
        elif host == (3 if net == 0 else 1):
            full = f"the server: a fresh /24's first address ({source}) got none"
        else:
            net, host = net + 1, 1  # this /24 is full: the next one
    fresh_t0 = time.monotonic()
    fresh = await asyncio.to_thread(livez, port, FRESH_NET)
    fresh_s = time.monotonic() - fresh_t0
    same_net = await asyncio.to_thread(livez, port, "127.0.0.253")
    for sock in socks:
        sock.close()
    with_any = [a for a, n in held_by.items() if n]
    return {
        "held": len(socks),
        "addresses_holding": len(with_any),
        "networks_holding": len({a.rsplit(".", 1)[0] for a in with_any}),
        "most_from_one_address": max(held_by.values(), default=0),
        "stopped_because": full,
        "refusals": dict(refused),
        "fresh_net_status": fresh,
        "fresh_net_s": round(fresh_s, 3),
        "same_net_new_address_status": same_net,
    }


ROWS: dict[str, Row] = {
    row.name: row
    for row in [
        Row("bad_version", bad_version),
        Row(
            "v2_shape",
            one_request("v2 infer, a 400,000-dim shape", post(f"/v2/models/{MODEL}/infer", b"")),
        ),
        Row("v2_inputs", one_request("v2 infer, 1.3M empty inputs", b"")),
        Row("digit_strings", one_request("/predict/digit, 1M strings", b"")),
        Row(
            "pipeline_livez",
            pipeline("/livez"),
            fresh=True,
            rss_limit_mb=PIPELINE_RSS_GROWTH_MB,
            echo_victim=True,
        ),
        Row(
            "pipeline_openapi",
            pipeline("/openapi.json"),
            fresh=True,
            rss_limit_mb=PIPELINE_RSS_GROWTH_MB,
        ),
        Row("conn_caps", conn_caps, fresh=True, victim_counts=False),
        Row("echo_resume", echo_resume, fresh=True),
    ]
}


def build_bodies() -> None:
    """The big bodies, built once (before any measurement)."""
    ROWS["v2_shape"].run = one_request(
        "v2 infer, a 400,000-dim shape", post(f"/v2/models/{MODEL}/infer", v2_shape_body())
    )
    ROWS["v2_inputs"].run = one_request(
        "v2 infer, 1.3M empty inputs", post(f"/v2/models/{MODEL}/infer", v2_inputs_body())
    )
    ROWS["digit_strings"].run = one_request(
        "/predict/digit, 1M strings", post("/predict/digit", digit_strings_body())
    )


# --- the run -------------------------------------------------------------------------------------


def commit_of(cwd: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=False
        ).stdout.strip()

    sha = git("rev-parse", "--short=12", "HEAD")
    return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def log(message: str) -> None:
    print(f"[attacks_round2 {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_all(configs: list[tuple[str, dict[str, str], str | None, Path]], rows: list[str],
            tmp: Path) -> list[dict[str, Any]]:  # fmt: skip
    """Row by row, each configuration in turn (a shared machine's drifts hit all alike)."""
    results = []
    shared: dict[str, srv.Server] = {}
    try:
        for row_name in rows:
            row = ROWS[row_name]
            for name, env, app, cwd in configs:
                if row.fresh or name not in shared:
                    server = srv.start(env, tmp / f"{name}-{row_name}.log", cwd=cwd, app=app,
                                       bench=False)  # fmt: skip
                    if not row.fresh:
                        shared[name] = server
                else:
                    server = shared[name]
                log(f"{name}: {row_name} (server pid {server.pid}, port {server.port})")
                try:
                    result = measure(server, row)
                finally:
                    if row.fresh:
                        srv.stop(server)
                result["config"] = name
                results.append(result)
                verdict_text = "PASS" if result["pass"] else f"FAIL {result['why']}"
                log(f"{name}: {row_name}: {verdict_text}")
    finally:
        for server in shared.values():
            srv.stop(server)
    return results


def summarize(answers: list[dict[str, Any]]) -> str:
    """Answers' outcomes, each with how many got it (an echo row's are counts already)."""
    counts: Counter[str] = Counter()
    for a in answers:
        if isinstance(a["outcome"], dict):
            counts.update({f"close {k.strip()}": v for k, v in a["outcome"].items()})
        else:
            counts[str(a["outcome"])] += 1
    return ", ".join(f"{k} x{v:,}" if v > 1 else k for k, v in counts.items())


def table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| config | row | answer (status / close) | answer s | RSS MB before / peak / after "
        "| TCP MiB peak / 5 s after | victim /livez max / p99 ms | other | verdict |",
        "|---|---|---|---:|---|---|---|---|---|",
    ]
    for r in results:
        answers = r.get("answers", [])
        outcome = summarize(answers)
        secs = max((a["seconds"] for a in answers if a.get("seconds") is not None), default=None)
        rss, tcp, v = r["rss_mb"], r["tcp_mem_mib"], r["victim_livez"]
        other = {
            k: r[k]
            for k in (
                "new_session_after",
                "resumable_after",
                "sends",
                "tcp_mem_mib_held",
                "server_still_connected_after_hold",
                "held",
                "addresses_holding",
                "networks_holding",
                "stopped_because",
                "fresh_net_status",
                "same_net_new_address_status",
                "victim_echo",
                "error",
            )
            if k in r
        }
        if set(v["statuses"]) - {"200"}:
            other["victim_statuses"] = v["statuses"]
        verdict_text = "PASS" if r["pass"] else "FAIL: " + "; ".join(r["why"])
        lines.append(
            f"| {r['config']} | {r['row']} | {outcome or '-'} | "
            f"{secs if secs is not None else '-'} | {rss['before']} / {rss['peak']} / "
            f"{rss['after']} | {tcp['peak']} / {tcp['5s_after']} | {v['max_ms']} / {v['p99_ms']} "
            f"| {json.dumps(other, ensure_ascii=False) if other else ''} | {verdict_text} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=list(ROWS), help="one row (repeatable)")
    ap.add_argument("--config", action="append", help="NAME=K=V,... ; cwd=DIR another checkout")
    ap.add_argument("--out", type=Path, default=srv.REPO / "bench" / "results")
    ap.add_argument("--hold", type=float, default=20.0, help="pipelining rows: seconds held")
    ap.add_argument("--victim", help=argparse.SUPPRESS)  # PORT,SOURCE,INTERVAL: Victim's process
    args = ap.parse_args(argv)
    if args.victim:
        return victim_main(args.victim)
    HOLD_S[0] = args.hold
    rows = args.only or list(ROWS)
    configs = [parse_config(c) for c in args.config or ["current="]]
    build_bodies()
    tmp = Path(tempfile.mkdtemp(prefix="attacks-round2-"))
    meta = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.attacks_round2", *argv]),
        "bench_commit": commit_of(srv.REPO),
        "configs": {
            name: {"env": env, "app": app, "cwd": str(cwd), "commit": commit_of(cwd)}
            for name, env, app, cwd in configs
        },
        "cpu_count": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "logs": str(tmp),
    }
    results = run_all(configs, rows, tmp)
    meta["loadavg_after"] = os.getloadavg()
    meta["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attacks_round2.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1, ensure_ascii=False) + "\n"
    )
    lines = [
        "# Hostile clients, round 2 (issue #21)",
        "",
        f"`{meta['command']}`, started {meta['started']} on {meta['cpu_count']} cores "
        f"(load {meta['loadavg_before'][0]:.2f} before, {meta['loadavg_after'][0]:.2f} after). "
        + ", ".join(f"{n}: commit {c['commit']} ({c['cwd']})" for n, c in meta["configs"].items())
        + ".",
        "",
        f"Criteria: refused with a 4xx (WebSocket: a close code with a reason) within {ANSWER_S:g}"
        f" s; RSS growth <= {RSS_GROWTH_MB:g} MB (pipelining: < {PIPELINE_RSS_GROWTH_MB:g}); the "
        f"victim's /livez (127.0.0.2, every 10 ms) never waits over {VICTIM_MAX_S * 1000:g} ms; "
        "no session left attached; a client from another /24 served under full connection caps.",
        "TCP memory is the kernel's for all loopback sockets (both ends); *5 s after* is 5 s after "
        "the attack ended (pipelining: after its connections were dropped; `tcp_mem_mib_held` is "
        "while they were held unread). RSS *after*: 6 s after the attack.",
        "",
        *table(results),
    ]
    (args.out / "attacks_round2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["pass"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
