"""gRPC beside HTTP and the WebSocket, in one run, on one server:

    python -m bench.grpc [--rounds 2] [--quick] [--out bench/results]   # → grpc.{md,json}
    python -m bench.run --only grpc                                     # the same
    python -m bench.grpc load --port P --grpc-port G --server-pid PID --case ...  # loadgen

Cases (each round runs all of them, the protocols of a case one after the other, every other
round in reverse order; ratios are taken within a round, medians over rounds):

* ``digits:PROTOCOL:N``: 64 requests in flight (closed loop), N = 1 or 128 real MNIST images
  per request, through gRPC ``ModelInfer`` (raw tensors; 4 connections × 16 streams), v2 HTTP
  binary and ``/predict/digit`` JSON (64 keep-alive connections each, ``bench.protocols``);
* ``echo:PROTOCOL:S``: S sessions, each a closed loop of 1-bit messages: echo sequences on
  gRPC ``ModelStreamInfer`` (S sequences over min(S, 16) connections, one stream each) vs
  WebSocket ``/echo`` sessions (``bench.loadgen``);
* ``open:PROTOCOL:S:R``: open loop, S sessions each sending 1 bit R times a second whatever
  the replies (``bench.openloop``'s standard rates: 1,000 sessions at 2, 5 and 8 msg/s),
  latency from the scheduled time.

The clients are equally cheap: the HTTP and WebSocket ones of ``bench.wire`` and the gRPC one
of ``bench.grpc_wire`` (framing only, pre-encoded protobuf), each in the load generator's one
process and event loop, so the server's CPU, not a client's, sets the figures. Sampled replies
are checked: digits against the MNIST labels, echo bits against the bits sent 3 steps before.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter_ns
from typing import Any

from bench import mnist, openloop, protocols
from bench.grpc_wire import GrpcConn, request_headers
from bench.loadgen import BATCHES, SINGLE_IMAGES, Cfg, emit, measure_quiet, run_echo
from bench.report import n, table
from bench.wire import Run
from tests import servers as server

DIGIT_PROTOCOLS = ("grpc", "v2-binary", "native")
ECHO_PROTOCOLS = ("grpc", "ws")
DIGIT_CONCURRENCY = 64
GRPC_CONNECTIONS = 4  # digits: 4 connections × 16 streams in flight
IMAGES_PER_REQUEST = (1, 128)
ECHO_SESSIONS = (100, 1000)
OPEN_SESSIONS = 1000
OPEN_RATES = (2, 5, 8)  # bench.openloop.ECHO_SCENARIOS
MAX_STREAM_CONNECTIONS = 16
ECHO_STEP = 3  # the shipped echo model echoes 3 bits late
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
LABELS = {
    "grpc": "gRPC",
    "v2-binary": "v2 HTTP binary",
    "native": "/predict/digit JSON",
    "ws": "WebSocket /echo",
}


def _pb() -> Any:
    from tritonclient.grpc import service_pb2  # the generated messages the server uses

    return service_pb2


# --- gRPC digits: unary ModelInfer, closed loops of streams ---------------------------------


class UnaryLoops:
    """``depth`` closed loops of unary calls on one connection."""

    def __init__(self, headers: bytes, bodies: list[bytes], depth: int, offset: int) -> None:
        self.headers, self.bodies, self.depth, self.i = headers, bodies, depth, offset
        self.conn: GrpcConn | None = None
        self.run: Run | None = None
        self.started: dict[int, tuple[int, int]] = {}  # stream -> (send time, body index)
        self.got: dict[int, bytes] = {}

    def begin(self, run: Run) -> None:
        self.run = run
        for _ in range(self.depth):
            run.inflight += 1
            self._call(perf_counter_ns())

    def _call(self, now: int) -> None:
        k = self.i % len(self.bodies)
        self.i += 1
        stream = self.conn.open(self.headers, self.bodies[k], end=True)  # type: ignore[union-attr]
        self.started[stream] = (now, k)

    def on_message(self, stream: int, data: bytes) -> None:
        self.got[stream] = data

    def on_end(self, stream: int, messages: int, reset: bool) -> None:
        run = self.run
        t_send, k = self.started.pop(stream, (0, 0))
        reply = self.got.pop(stream, None)
        if run is None:
            return
        now = perf_counter_ns()
        if run.recording:
            run.lat.append(now - t_send)
            run.errors += reply is None or reset
        run.n += 1
        if reply is not None and run.n % run.sample_every == 0:
            run.samples.append((k, reply))
        if run.stopped:
            run.finish_one()
        else:
            self._call(now)


def digit_request(images: list[bytes]) -> bytes:
    pb = _pb()
    request = pb.ModelInferRequest(model_name="mnist_lstm")
    request.inputs.add(name="images", datatype="UINT8", shape=[len(images), 28, 28])
    request.raw_input_contents.append(b"".join(images))
    return request.SerializeToString()


def verify_grpc_digits(
    samples: list[tuple[int, bytes]], groups: list[list[int]], labels: list[int]
) -> dict[str, int]:
    pb = _pb()
    checked = correct = malformed = 0
    for k, body in samples:
        try:
            reply = pb.ModelInferResponse.FromString(body)
            names = [o.name for o in reply.outputs]
            raw = reply.raw_output_contents[names.index("digit")]
            digits = [int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8)]
            group = groups[k]
            if len(digits) != len(group):
                raise ValueError("wrong number of digits")
            checked += len(group)
            correct += sum(d == labels[j] for d, j in zip(digits, group, strict=True))
        except (ValueError, IndexError):
            malformed += 1
    return {"checked": checked, "correct": correct, "malformed": malformed}


async def run_grpc_digits(cfg: Cfg, grpc_port: int, per_req: int) -> dict[str, Any]:
    count = SINGLE_IMAGES if per_req == 1 else BATCHES * per_req
    images, labels = mnist.load(count)
    groups = [list(range(i, i + per_req)) for i in range(0, count, per_req)]
    bodies = [digit_request([images[j] for j in g]) for g in groups]
    headers = request_headers(INFER, f"{cfg.host}:{grpc_port}")
    depth = DIGIT_CONCURRENCY // GRPC_CONNECTIONS
    loops = [UnaryLoops(headers, bodies, depth, j * 7) for j in range(GRPC_CONNECTIONS)]
    loop = asyncio.get_running_loop()
    for lp in loops:
        _, lp.conn = await loop.create_connection(
            lambda lp=lp: GrpcConn(lp.on_message, lp.on_end), cfg.host, grpc_port
        )
        await asyncio.wait_for(lp.conn.ready, 10)

    def start(run: Run) -> None:
        for lp in loops:
            lp.begin(run)

    every = 31 if per_req == 1 else 3
    result, run = await measure_quiet(cfg, start, "mnist_lstm", per_req, every)
    for lp in loops:
        lp.conn.close()  # type: ignore[union-attr]
    return {
        "request_bytes": sum(map(len, bodies)) // len(bodies),
        **result,
        "verify": verify_grpc_digits(run.samples, groups, labels),
    }


# --- gRPC echo: sequences on ModelStreamInfer -----------------------------------------------


class Sequences:
    """Echo sequences on one stream of one connection, each sending 1 bit a step."""

    def __init__(self, first: int, count: int, sampled: int) -> None:
        pb = _pb()
        self.first = first
        self.templates = []
        for bit in (0, 1):
            request = pb.ModelInferRequest(model_name="echo_rnn")
            request.inputs.add(name="bits", datatype="UINT8", shape=[1, 1])
            request.raw_input_contents.append(bytes([bit]))
            self.templates.append(request)
        self.count = count
        self.steps = [0] * count
        self.rng = random.Random(first)
        self.sent: list[list[int]] = [[] for _ in range(min(sampled, count))]  # sampled bits
        self.replies: list[list[tuple[int, int]]] = [[] for _ in self.sent]  # (step, bit back)
        self.conn: GrpcConn | None = None
        self.stream = 0
        self.errors = 0
        self.parse = pb.ModelStreamInferResponse.FromString

    def request(self, i: int, start: bool = False) -> bytes:
        """Sequence ``first + i``'s next step: a random bit, id ``"<i>:<step>"``."""
        bit = self.rng.getrandbits(1)
        request = self.templates[bit]
        request.id = f"{i}:{self.steps[i]}"
        params = request.parameters
        params["sequence_id"].int64_param = self.first + i + 1
        params["sequence_start"].bool_param = start
        if i < len(self.sent):
            self.sent[i].append(bit)
        self.steps[i] += 1
        return request.SerializeToString()

    def reply(self, data: bytes) -> tuple[int, bool]:
        """The sequence a reply belongs to, and whether it is a good one (sampled: its bit)."""
        reply = self.parse(data)
        response = reply.infer_response
        i, _, step = response.id.partition(":")
        k = int(i)
        ok = not reply.error_message and len(response.raw_output_contents) == 2
        if ok and k < len(self.replies) and int(step) % 10 == 0:
            self.replies[k].append((int(step), response.raw_output_contents[1][0]))
        return k, ok

    async def open(self, host: str, port: int) -> None:
        """Connect, open the stream and start every sequence (answered before returning)."""
        started = asyncio.get_running_loop().create_future()
        left = [self.count]

        def on_start(stream: int, data: bytes) -> None:
            _, ok = self.reply(data)
            if not ok:
                self.errors += 1
            left[0] -= 1
            if not left[0] and not started.done():
                started.set_result(None)

        self.on_message = on_start
        _, self.conn = await asyncio.get_running_loop().create_connection(
            lambda: GrpcConn(lambda s, d: self.on_message(s, d)), host, port
        )
        await asyncio.wait_for(self.conn.ready, 10)
        self.stream = self.conn.open(request_headers(STREAM, f"{host}:{port}"))
        for i in range(self.count):
            self.conn.send(self.stream, self.request(i, start=True))
        await asyncio.wait_for(started, 60)
        if self.errors:
            raise RuntimeError(f"{self.errors} sequences failed to start")

    def on_message(self, stream: int, data: bytes) -> None:  # replaced per use
        raise NotImplementedError

    def verify(self) -> dict[str, int]:
        checked = correct = 0
        for sent, replies in zip(self.sent, self.replies, strict=True):
            for step, bit in replies:
                want = sent[step - ECHO_STEP] if step >= ECHO_STEP else 0
                checked += 1
                correct += bit == want
        return {"checked_bits": checked, "correct_bits": correct, "malformed": self.errors}


class ClosedSequences(Sequences):
    """Each sequence sends its next step when the last one's reply is in."""

    def begin(self, run: Run) -> None:
        self.run = run
        self.t_send = [0] * self.count
        self.on_message = self._on_reply
        now = perf_counter_ns()
        for i in range(self.count):
            run.inflight += 1
            self.t_send[i] = now
            self.conn.send(self.stream, self.request(i))  # type: ignore[union-attr]

    def _on_reply(self, stream: int, data: bytes) -> None:
        run = self.run
        i, ok = self.reply(data)
        now = perf_counter_ns()
        if run.recording:
            run.lat.append(now - self.t_send[i])
            run.errors += not ok
        run.n += 1
        if run.stopped:
            run.finish_one()
        else:
            self.t_send[i] = now
            self.conn.send(self.stream, self.request(i))  # type: ignore[union-attr]


class OpenSequences(Sequences):
    """Each sequence sends on its own clock (``bench.openloop.drive``), replies matched to the
    step's due time; one sequence's replies come in the order sent."""

    def begin(self, stats: openloop.Stats) -> None:
        self.stats = stats
        self.due: list[deque[int]] = [deque() for _ in range(self.count)]
        self.on_message = self._on_reply

    def sender(self, i: int) -> _Sender:
        return _Sender(self, i)

    def _on_reply(self, stream: int, data: bytes) -> None:
        i, ok = self.reply(data)
        now = perf_counter_ns()
        due = self.due[i].popleft()
        if self.stats.recording:
            self.stats.lat.append(now - due)
            self.stats.errors += not ok


class _Sender:
    """What ``bench.openloop.drive`` sends through: ``send(payload, due)``."""

    __slots__ = ("i", "seqs")

    def __init__(self, seqs: OpenSequences, i: int) -> None:
        self.seqs, self.i = seqs, i

    def send(self, payload: object, due: int) -> None:
        seqs = self.seqs
        seqs.due[self.i].append(due)
        seqs.conn.send(seqs.stream, seqs.request(self.i))  # type: ignore[union-attr]


async def open_sequences(cfg: Cfg, grpc_port: int, sessions: int, cls: type) -> list[Any]:
    k = min(sessions, MAX_STREAM_CONNECTIONS)
    per = [sessions // k + (j < sessions % k) for j in range(k)]
    firsts = [random.Random().randrange(1, 2**40) * 4096 for _ in range(k)]
    groups = [cls(firsts[j], per[j], 3 if j == 0 else 0) for j in range(k)]
    for g in groups:
        await g.open(cfg.host, grpc_port)
    return groups


async def run_grpc_echo(cfg: Cfg, grpc_port: int, sessions: int) -> dict[str, Any]:
    t0 = perf_counter_ns()
    groups = await open_sequences(cfg, grpc_port, sessions, ClosedSequences)
    open_s = (perf_counter_ns() - t0) / 1e9

    def start(run: Run) -> None:
        for g in groups:
            g.begin(run)

    result, _ = await measure_quiet(cfg, start, "echo_rnn", 1, 97)
    verify = [g.verify() for g in groups]
    for g in groups:
        g.conn.close()
    return {
        "connect_s": open_s,
        **result,
        "verify": {k: sum(v[k] for v in verify) for k in verify[0]},
    }


async def run_open(cfg: Cfg, protocol: str, grpc_port: int, sessions: int, rate: float) -> dict:
    args = argparse.Namespace(warmup=cfg.warmup, duration=cfg.duration, server_pid=cfg.server_pid)
    stats = openloop.Stats()
    if protocol == "ws":
        conns = [
            await openloop.connect(cfg.host, cfg.port, stats, True, f"127.0.0.{2 + i // 400}")
            for i in range(sessions)
        ]
        result = await openloop.drive(conns, openloop.ECHO_FRAMES, rate, args, stats)
        for conn in conns:
            conn.transport.close()  # type: ignore[union-attr]
        return result
    groups = await open_sequences(cfg, grpc_port, sessions, OpenSequences)
    senders = []
    for g in groups:
        g.begin(stats)
        senders += [g.sender(i) for i in range(g.count)]
    result = await openloop.drive(senders, [0, 1], rate, args, stats)  # type: ignore[arg-type]
    verify = [g.verify() for g in groups]
    for g in groups:
        g.conn.close()
    return {**result, "verify": {k: sum(v[k] for v in verify) for k in verify[0]}}


# --- the load generator ---------------------------------------------------------------------


async def run_case(cfg: Cfg, grpc_port: int, case: str) -> dict[str, Any]:
    kind, protocol, *numbers = case.split(":")
    row: dict[str, Any] = {"case": case, "kind": kind, "protocol": protocol}
    if kind == "digits":
        (per_req,) = map(int, numbers)
        row["images_per_request"] = per_req
        if protocol == "grpc":
            return {**row, **await run_grpc_digits(cfg, grpc_port, per_req)}
        return {**row, **await protocols.run_case(cfg, protocol, DIGIT_CONCURRENCY, per_req)}
    if kind == "echo":
        (sessions,) = map(int, numbers)
        row["sessions"] = sessions
        if protocol == "grpc":
            return {**row, **await run_grpc_echo(cfg, grpc_port, sessions)}
        (result,) = await run_echo(cfg, sessions, [1])
        return {**row, **result}
    sessions, rate = int(numbers[0]), float(numbers[1])
    row |= {"sessions": sessions, "rate": rate}
    return {**row, **await run_open(cfg, protocol, grpc_port, sessions, rate)}


async def load_async(cfg: Cfg, grpc_port: int, cases: list[str]) -> None:
    for case in cases:
        try:
            emit(await run_case(cfg, grpc_port, case))
        except Exception as exc:
            emit({"case": case, "error": repr(exc)})
        await asyncio.sleep(1.0)


def load(argv: list[str]) -> None:
    import resource

    import uvloop

    ap = argparse.ArgumentParser(description="the load generator of bench.grpc")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--server-pid", type=int, required=True)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--max-other", type=float, default=20.0)
    ap.add_argument("--case", action="append", default=[])
    args = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    cfg = Cfg(args.host, args.port, args.server_pid, args.warmup, args.duration, args.max_other)
    uvloop.run(load_async(cfg, args.grpc_port, args.case))


# --- the comparison and its report ----------------------------------------------------------


def cases(quick: bool, only: list[str] | None = None) -> list[str]:
    out = [f"digits:{p}:{k}" for k in IMAGES_PER_REQUEST for p in DIGIT_PROTOCOLS]
    out += [f"echo:{p}:{s}" for s in ECHO_SESSIONS[: 1 if quick else None] for p in ECHO_PROTOCOLS]
    rates = OPEN_RATES[1:2] if quick else OPEN_RATES
    out += [f"open:{p}:{OPEN_SESSIONS}:{r}" for r in rates for p in ECHO_PROTOCOLS]
    return [c for c in out if not only or c.split(":")[0] in only]


def run_load(srv: server.Server, todo: list[str], warmup: float, duration: float) -> list[dict]:
    """One load-generator process through ``todo`` against ``srv``; its rows."""
    cmd = [sys.executable, "-m", "bench.grpc", "load", "--port", str(srv.port),
           "--grpc-port", str(srv.grpc_port), "--server-pid", str(srv.pid),
           "--warmup", str(warmup), "--duration", str(duration)]  # fmt: skip
    cmd += [f"--case={c}" for c in todo]
    timeout = len(todo) * 4 * (warmup + duration + 20) + 120
    proc = subprocess.run(cmd, cwd=server.REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=server.REPO, capture_output=True, text=True
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return head + ("+uncommitted" if git("status", "--porcelain", "--", "app", "bench") else "")


def compare(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="gRPC beside HTTP and the WebSocket")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--warmup", type=float)
    ap.add_argument("--duration", type=float)
    ap.add_argument("--only", action="append", choices=["digits", "echo", "open"])
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="server setting")
    ap.add_argument("--no-floor", action="store_true", help="skip the transports' floor")
    ap.add_argument("--out", type=Path, default=server.REPO / "bench" / "results")
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 2)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    duration = args.duration if args.duration is not None else (2.0 if args.quick else 6.0)
    todo = cases(args.quick, args.only)
    floor_todo = [] if args.no_floor else [c for c in todo if c.startswith("echo:")]
    env = dict(item.split("=", 1) for item in args.env)
    meta = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.grpc", *argv]),
        "commit": commit(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "rounds": rounds,
        "warmup_s": warmup,
        "duration_s": duration,
        "server_env": env,
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-grpc-"))
    servers = {"service": server.start({"LOG_LEVEL": "WARNING", **env}, tmp / "service.log")}
    rows: list[dict[str, Any]] = []
    try:
        if floor_todo:
            servers["floor"] = server.start({}, tmp / "floor.log", app="bench.floor:app")
        for r in range(rounds):
            for name, work in (("service", todo), ("floor", floor_todo)):
                if not work:
                    continue
                if r % 2:  # every other round in reverse: no protocol always goes first
                    work = work[::-1]
                print(f"[bench.grpc] round {r + 1}/{rounds}, {name}: {len(work)} cases", flush=True)
                for row in run_load(servers[name], work, warmup, duration):
                    row = {"round": r, "server": name, **row}
                    rows.append(row)
                    print(f"  {row['case']:>22}: " + brief(row), flush=True)
    finally:
        for srv in servers.values():
            server.stop(srv)
    meta["loadavg_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    (args.out / "grpc.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n"
    )
    (args.out / "grpc.md").write_text(markdown(meta, summary, rows))
    print((args.out / "grpc.md").read_text())


def brief(row: dict[str, Any]) -> str:
    if "error" in row:
        return "ERROR " + row["error"][:200]
    if row["kind"] == "open":
        return (
            f"achieved {row['achieved_per_s']:,.0f}/s of {row['offered_per_s']:,.0f}, p50 "
            f"{row['p50_ms']:.2f} p99 {row['p99_ms']:.2f} ms, server "
            f"{row['server_cpu_pct']:.0f} %"
        )
    return (
        f"{row['msgs_per_s']:,.0f} req/s ({row['items_per_s']:,.0f} items/s), p50 "
        f"{row['p50_ms']:.2f} p99 {row['p99_ms']:.2f} ms, server {row['server_cpu_pct']:.0f} "
        f"% client {row['client_cpu_pct']:.0f} %"
    )


def _key(row: dict[str, Any]) -> tuple:
    return (row.get("server", "service"), row["kind"], row.get("images_per_request"),
            row.get("sessions"), row.get("rate"))  # fmt: skip


BASELINE = {"digits": "v2-binary", "echo": "ws", "open": "ws"}
RATE = {"digits": "items_per_s", "echo": "msgs_per_s", "open": "achieved_per_s"}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case and protocol: medians over rounds, and the ratio to the baseline of its kind
    (v2 HTTP binary for digits, the WebSocket for echo) taken within each round."""
    good = [r for r in rows if "error" not in r]
    out = []
    for key in dict.fromkeys(_key(r) for r in good):
        mine = [r for r in good if _key(r) == key]
        kind = key[1]
        base = {r["round"]: r[RATE[kind]] for r in mine if r["protocol"] == BASELINE[kind]}
        for protocol in dict.fromkeys(r["protocol"] for r in mine):
            these = [r for r in mine if r["protocol"] == protocol]
            ratios = [r[RATE[kind]] / base[r["round"]] for r in these if base.get(r["round"])]

            def med(name: str, these: list[dict[str, Any]] = these) -> float:
                values = [r[name] for r in these if name in r]
                return statistics.median(values) if values else float("nan")

            entry = {
                "server": key[0],
                "kind": kind,
                "protocol": protocol,
                "images_per_request": key[2],
                "sessions": key[3],
                "rate": key[4],
                "rounds": len(these),
                "vs_baseline": statistics.median(ratios) if ratios else None,
                "vs_baseline_range": [min(ratios), max(ratios)] if ratios else None,
                "errors": sum(r.get("errors", 0) for r in these),
            }
            for name in (
                "items_per_s",
                "msgs_per_s",
                "achieved_per_s",
                "offered_per_s",
                "p50_ms",
                "p99_ms",
                "p999_ms",
                "server_cpu_pct",
                "client_cpu_pct",
                "other_cpu_pct",
                "server_cpu_ms_per_msg",
                "rows_per_call",
            ):
                entry[name] = med(name)
            checks = [r["verify"] for r in these if "verify" in r]
            entry["verify"] = {
                k: sum(c.get(k, 0) for c in checks) for k in (checks[0] if checks else {})
            }
            out.append(entry)
    return out


def _ratio(s: dict[str, Any]) -> str:
    if s["protocol"] == BASELINE[s["kind"]] or s["vs_baseline"] is None:
        return "1.00×" if s["vs_baseline"] is not None else "–"
    lo, hi = s["vs_baseline_range"]
    return f"{s['vs_baseline']:.2f}× ({lo:.2f}–{hi:.2f})"


def _checked(s: dict[str, Any]) -> str:
    v = s["verify"]
    if s["server"] == "floor":
        return "–"
    if "checked" in v:
        return f"{v['correct']}/{v['checked']} digits"
    if "checked_bits" in v:
        return f"{v['correct_bits']}/{v['checked_bits']} bits"
    return "–"


def _target(summary: list[dict[str, Any]], kind: str, want: float, **match: Any) -> str:
    found = [
        s
        for s in summary
        if s["kind"] == kind
        and s["protocol"] == "grpc"
        and s["server"] == "service"
        and all(s[k] == v for k, v in match.items())
    ]
    if not found or found[0]["vs_baseline"] is None:
        return "– (not measured)"
    ratio = found[0]["vs_baseline"]
    return f"{ratio:.2f}× ({'✅ met' if ratio >= want else '❌ missed'})"


def markdown(meta: dict[str, Any], summary: list[dict[str, Any]], rows: list[dict]) -> str:
    digits = [s for s in summary if s["kind"] == "digits"]
    echo = [s for s in summary if s["kind"] == "echo"]
    opened = [s for s in summary if s["kind"] == "open"]
    errors = [r for r in rows if "error" in r]
    lines = [
        "# gRPC beside HTTP and the WebSocket",
        "",
        f"`{meta['command']}` at commit `{meta['commit']}`, started {meta['started']}: "
        f"{meta['cpu_count']} CPU cores (load average {meta['loadavg_before'][0]:.1f} before, "
        f"{meta['loadavg_after'][0]:.1f} after: above ~1.5 other work shared them), one "
        f"server (batching on), {meta['warmup_s']:g} s warm-up + {meta['duration_s']:g} s "
        f"measured per row, {meta['rounds']} round(s); medians over rounds, ratios within a "
        "round. The load generator is one process with equally cheap clients for every "
        "protocol (`bench/wire.py`, `bench/grpc_wire.py`).",
        "",
        "**Targets** (issue 25): gRPC digits at 128 images per request ≥ v2 HTTP binary: "
        + _target(summary, "digits", 1.0, images_per_request=128)
        + "; gRPC stream echo ≥ 0.8 × the WebSocket's msgs/s (closed loop, "
        + ", ".join(
            f"{s} sessions: " + _target(summary, "echo", 0.8, sessions=s) for s in ECHO_SESSIONS
        )
        + ").",
        "",
        "## Digits: 64 requests in flight",
        "",
        *table(
            [
                "images/request",
                "protocol",
                "img/s",
                "vs v2 HTTP binary (range)",
                "req/s",
                "p50 / p99 ms",
                "server CPU ms/request",
                "rows/model call",
                "client CPU %",
                "other CPU %",
                "sampled",
            ],
            [
                [
                    str(s["images_per_request"]),
                    LABELS[s["protocol"]],
                    n(s["items_per_s"]),
                    _ratio(s),
                    n(s["msgs_per_s"]),
                    f"{n(s['p50_ms'])} / {n(s['p99_ms'])}",
                    n(s["server_cpu_ms_per_msg"]),
                    n(s["rows_per_call"]),
                    n(s["client_cpu_pct"]),
                    n(s["other_cpu_pct"]),
                    _checked(s),
                ]
                for s in digits
            ],
        ),
        "",
        "## Echo, closed loop: sessions sending 1 bit and waiting for the reply",
        "",
        "The floor is `bench/floor.py`: uvicorn and grpc.aio in one event loop answering every "
        "message with a fixed reply, no model and no service code: what each transport alone "
        "costs per message (its sampled replies are not checked).",
        "",
        *table(
            [
                "server",
                "sessions",
                "protocol",
                "msgs/s",
                "vs WebSocket (range)",
                "p50 / p99 ms",
                "server CPU µs/msg",
                "rows/model call",
                "server CPU %",
                "client CPU %",
                "other CPU %",
                "sampled",
            ],
            [
                [
                    "the service" if s["server"] == "service" else "floor (`bench/floor.py`)",
                    str(s["sessions"]),
                    LABELS[s["protocol"]],
                    n(s["msgs_per_s"]),
                    _ratio(s),
                    f"{n(s['p50_ms'])} / {n(s['p99_ms'])}",
                    n(1000 * s["server_cpu_ms_per_msg"]),
                    n(s["rows_per_call"]),
                    n(s["server_cpu_pct"]),
                    n(s["client_cpu_pct"]),
                    n(s["other_cpu_pct"]),
                    _checked(s),
                ]
                for s in echo
            ],
        ),
        "",
        f"## Echo, open loop: {OPEN_SESSIONS:,} sessions each sending 1 bit R times a second",
        "",
        *table(
            [
                "offered msgs/s",
                "protocol",
                "achieved msgs/s",
                "p50 ms",
                "p99 ms",
                "p99.9 ms",
                "server CPU %",
                "client CPU %",
                "errors",
            ],
            [
                [
                    n(s["offered_per_s"]),
                    LABELS[s["protocol"]],
                    n(s["achieved_per_s"]),
                    n(s["p50_ms"]),
                    n(s["p99_ms"]),
                    n(s["p999_ms"]),
                    n(s["server_cpu_pct"]),
                    n(s["client_cpu_pct"]),
                    str(s["errors"]),
                ]
                for s in opened
            ],
        ),
        "",
        f"Rows that failed: {len(errors)}."
        + "".join(f"\n- `{r['case']}` (round {r['round']}): {r['error'][:300]}" for r in errors),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["load"]:
        load(argv[1:])
    else:
        compare(argv)


if __name__ == "__main__":
    main()
