"""Chaos test of the scale stack (compose.scale.yaml): exactly once, whatever dies (#24).

    make chaos                                     # python -m bench.chaos: 40 streams, 4 faults
    python -m bench.chaos --streams 8 --faults kill-primary,stall-primary --no-up \\
        --project rnn-serving-scale-smoke          # the short form in .ci/container-smoke.sh

The stack: nginx, 2 API replicas, a Redis primary, 2 replicas and 3 Sentinels
(``ECHO_STORE_URL=redis+sentinel://...``, ``ECHO_STORE_MIN_REPLICAS=2``). ``--streams`` echo
streams run through nginx for the whole test, each a session of the project's Python client
(``clients/python``, ``rnn_serving_client``: it resumes with ``last_seq`` and hands every reply
over exactly once), one message of 1-64 random bits every ``--pace`` s, up to ``--window`` in
flight. Then, in turn (``--faults``), each once the stack has settled from the one before:

- ``kill-api``: SIGKILL the API replica holding the most sessions (a crash: the signal goes to
  its process from the host, so that the restart policy brings it back, as after an OOM kill;
  ``docker kill`` would count as a manual stop). Its streams resume on the other replica once
  the dead one's lease lapses (``ECHO_LEASE_S``).
- ``kill-primary``: SIGKILL the Redis primary; the Sentinels promote a replica; the killed node
  comes back (restart policy) as a replica (``deploy/redis/node.sh``).
- ``stall-primary``: SIGSTOP the primary for ``--stall`` s (3), then SIGCONT: the Sentinels fail
  over meanwhile and the node wakes up to be demoted; ``min-replicas-to-write`` and the
  service's ``WAIT`` keep it from acknowledging writes on its own.
- ``restart-nginx``: ``docker restart`` of nginx (its stop grace period: streams go on until the
  old nginx is killed, then reconnect).

Settled means: every container that ran at the start runs again and is healthy, each API
replica's ``/readyz`` says ``ready``, the Sentinels agree on a primary that has both replicas
online and know them both, and every stream has been answered since. Redis faults also wait for
twice the Sentinels' ``failover-timeout`` after the last one (Sentinel does not fail the same
primary over again sooner).

Per fault, over the replies until every stream flowed again after the stack settled: a stream
is *cut* when its client reconnected; its *time to flow again* runs from the fault to the first
reply on its last new connection, its *outage* is the gap before that reply. Reported: how many
streams were cut, median and maximum of both over them, each stream's longest gap between
replies (median and maximum over all streams: the ones not cut were slowed at most), and the
drops and failed connects the clients logged, by error code.

At the end every stream stops sending and finishes what is in flight, then the checks: no
stream failed; message k of each got the reply with seq k, once (the client hands replies over
in order); each session's stored ``seq``, read from the primary, equals the replies its client
got (0 acknowledged steps lost); each stream equals an unbroken one (a fresh session fed the
same messages after the faults, through nginx, never reconnected): bits equal, probabilities
within 1e-5; the unbroken streams are echoes (bits = the input ``echo_step`` earlier). Exit 1
when a check fails. ``--out DIR`` writes ``DIR/chaos.json`` and ``DIR/chaos.md``.

Needs a local Docker engine (container PIDs are signalled from this host, as root or the
engine's user) and the dev venv; the client is imported from clients/python/src when it is not
installed. Without ``--no-up`` the stack is started (``up -d --wait``; ``--build`` builds the
API image first, as ``make chaos`` does) as compose project ``--project`` on
``127.0.0.1:--port`` and taken down with its volumes at the end (``--keep`` leaves it up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import importlib
import json
import logging
import os
import random
import shlex
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILES = ("compose.yaml", "compose.cpu.yaml", "compose.scale.yaml")
FAULTS = ("kill-api", "kill-primary", "stall-primary", "restart-nginx")
REDIS_FAULTS = frozenset({"kill-primary", "stall-primary"})
MASTER = "mymaster"
PROB_TOLERANCE = 1e-5
READYZ = (
    "import urllib.request as u; "
    "print(u.urlopen('http://127.0.0.1:8000/readyz', timeout=4).read().decode())"
)
METRICS = (
    "import urllib.request as u; "
    "print(u.urlopen('http://127.0.0.1:8000/metrics', timeout=4).read().decode())"
)


def client_library() -> ModuleType:
    """``rnn_serving_client``: installed, else from this checkout's clients/python/src."""
    try:
        return importlib.import_module("rnn_serving_client")
    except ModuleNotFoundError:
        sys.path.insert(0, str(REPO / "clients" / "python" / "src"))
        return importlib.import_module("rnn_serving_client")


rsc = client_library()


class ChaosFailure(Exception):
    """A check failed or the stack did not get back to health."""


class Stuck(ChaosFailure):
    """Streams that did not flow again."""

    def __init__(self, message: str, flows: list[int]) -> None:
        super().__init__(message)
        self.flows = flows


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def messages(seed: int) -> Iterator[list[int]]:
    """Stream ``seed``'s messages, 1-64 random bits each, without end (the same every time)."""
    rng = random.Random(seed)
    while True:
        yield [rng.randint(0, 1) for _ in range(rng.randint(1, 64))]


# --- the streams --------------------------------------------------------------------------------

# The stream whose client is running (asyncio tasks inherit it): the client library's log
# records of drops and failed connects are filed under it.
current_flow: contextvars.ContextVar[Flow | None] = contextvars.ContextVar("flow", default=None)


class DropRecorder(logging.Handler):
    """Files ``rnn_serving_client.echo``'s "connection dropped" and "connect failed" records
    (their error code) under the stream they belong to, with the loop time."""

    def emit(self, record: logging.LogRecord) -> None:
        flow = current_flow.get()
        if flow is not None and record.args and isinstance(record.args, tuple):
            kind = "dropped" if "dropped" in str(record.msg) else "connect_failed"
            flow.events.append((asyncio.get_running_loop().time(), kind, str(record.args[0])))


@dataclass
class Flow:
    """One echo stream: its replies, when each arrived and on which connection (the client's
    count of connections opened so far)."""

    index: int
    seed: int
    session_id: str = ""
    echo_step: int = 0
    sent: int = 0
    replies: list[Any] = field(default_factory=list)  # rnn_serving_client.EchoReply, by seq - 1
    arrivals: list[float] = field(default_factory=list)
    connections: list[int] = field(default_factory=list)
    retried: dict[str, int] = field(default_factory=dict)
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (time, kind, code)
    error: str | None = None

    def record(self, k: int, reply: Any, at: float, connections: int) -> None:
        if reply.seq != k or len(self.replies) != k - 1:
            raise ChaosFailure(
                f"stream {self.index}: message {k} answered by seq {reply.seq} "
                f"after {len(self.replies)} replies"
            )
        self.replies.append(reply)
        self.arrivals.append(at)
        self.connections.append(connections)

    def last_arrival(self) -> float:
        return self.arrivals[-1] if self.arrivals else float("-inf")


async def run_flow(
    client: Any, flow: Flow, stop: asyncio.Event, pace: float, window: int, deadline: float
) -> None:
    """Send ``flow``'s messages one per ``pace`` s, at most ``window`` unanswered, until ``stop``;
    then wait for the replies in flight. Failures are recorded in ``flow.error``."""
    loop = asyncio.get_running_loop()
    current_flow.set(flow)
    try:
        async with client.echo(max_in_flight=min(window, 4), reconnect_deadline=deadline) as s:
            flow.session_id, flow.echo_step = s.session_id, s.echo_step
            credits = asyncio.Semaphore(window)
            tasks: set[asyncio.Task[None]] = set()

            async def one(k: int, bits: list[int]) -> None:
                try:
                    reply = await s.send(bits)
                    flow.record(k, reply, loop.time(), s.connections)
                finally:
                    credits.release()

            source = messages(flow.seed)
            while not stop.is_set():
                await credits.acquire()
                flow.sent += 1
                # Tasks start in the order they are created, and send() queues its message
                # before its first await: the messages go out in order.
                task = asyncio.create_task(one(flow.sent, next(source)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(pace)
            await asyncio.gather(*tasks)
            flow.retried = dict(s.retried)
    except Exception as exc:  # reported as the stream's failure
        flow.error = f"{type(exc).__name__}: {exc}"


async def unbroken(client: Any, flow: Flow) -> tuple[list[Any], int, dict[str, int]]:
    """The replies of a fresh session fed ``flow``'s messages without a break: (replies,
    connections opened, retries)."""
    source = messages(flow.seed)
    chunks = [next(source) for _ in range(len(flow.replies))]
    async with client.echo(reconnect_deadline=10) as s:
        replies = [reply async for reply in s.stream(chunks)]
        return replies, s.connections, dict(s.retried)


def compare(flow: Flow, want: list[Any], echo_step: int) -> float:
    """``flow``'s replies equal the unbroken ones (bits exactly, probabilities within
    :data:`PROB_TOLERANCE`), and those are an echo; the largest probability difference."""
    got = flow.replies
    if [r.seq for r in want] != list(range(1, len(got) + 1)):
        raise ChaosFailure(f"stream {flow.index}: the unbroken stream's seqs are not 1..n")
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        if g.bits != w.bits:
            raise ChaosFailure(f"stream {flow.index}: seq {g.seq} bits differ from unbroken")
        for a, b in zip(g.probabilities, w.probabilities, strict=True):
            worst = max(worst, abs(a - b))
    if worst > PROB_TOLERANCE:
        raise ChaosFailure(f"stream {flow.index}: probabilities differ by {worst:.2e}")
    source = messages(flow.seed)
    sent = [b for _ in got for b in next(source)]
    predicted = [b for r in want for b in r.bits]
    if predicted != ([0] * echo_step + sent)[: len(sent)]:
        raise ChaosFailure(f"stream {flow.index}: the unbroken stream is not an echo")
    return worst


# --- recovery times -----------------------------------------------------------------------------


def recovery(flows: Sequence[Flow], t0: float, t1: float) -> dict[str, Any]:
    """Over the replies that arrived in ``(t0, t1]``: the streams that were cut (their client
    reconnected), for each the time from ``t0`` to the first reply on its last new connection
    (time to flow again) and the gap before that reply (outage); for every stream its longest
    gap between replies (the ones not cut were slowed at most); the drops and failed connects
    the clients logged, by error code. Median and max over the streams concerned."""
    to_flow, outages, gaps = [], [], []
    per_stream: list[list[float | None]] = []  # time to flow again, outage, longest gap
    drops: Counter[str] = Counter()
    for flow in flows:
        last: tuple[float, float] | None = None
        longest = 0.0
        for i in range(1, len(flow.arrivals)):
            at, before = flow.arrivals[i], flow.arrivals[i - 1]
            if at <= t0:
                continue
            if at > t1:
                break
            longest = max(longest, at - before)
            if flow.connections[i] > flow.connections[i - 1]:
                last = (before, at)
        gaps.append(longest)
        if last is not None:
            to_flow.append(last[1] - t0)
            outages.append(last[1] - last[0])
        per_stream.append(
            [round(x, 2) if x is not None else None for x in (
                last[1] - t0 if last else None, last[1] - last[0] if last else None, longest
            )]
        )  # fmt: skip
        drops.update(f"{kind}:{code}" for at, kind, code in flow.events if t0 < at <= t1)
    return {
        "streams": len(flows),
        "cut": len(to_flow),
        "time_to_flow_s": spread(to_flow),
        "outage_s": spread(outages),
        "longest_gap_s": spread(gaps),
        "client_events": dict(sorted(drops.items())),
        "per_stream": per_stream,
    }


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 2), "max": round(max(values), 2)}


# --- the stack ----------------------------------------------------------------------------------


def parse_info(text: str) -> dict[str, str]:
    """``INFO``'s ``key:value`` lines."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and not key.startswith("#"):
            out[key] = value
    return out


def parse_pairs(text: str) -> list[dict[str, str]]:
    """``redis-cli``'s flat output of a list of field/value lists (``SENTINEL REPLICAS``):
    one dict per entry, each starting at its ``name`` field."""
    lines = text.splitlines()
    entries: list[dict[str, str]] = []
    for key, value in zip(lines[::2], lines[1::2], strict=False):
        if key == "name":
            entries.append({})
        if entries:
            entries[-1][key] = value
    return entries


@dataclass
class Container:
    id: str
    name: str
    service: str
    status: str
    health: str | None
    pid: int
    restarts: int
    env: dict[str, str]

    @property
    def healthy(self) -> bool:
        return self.status == "running" and self.health in (None, "healthy")


class Stack:
    """The compose project under test, through the ``docker`` CLI."""

    def __init__(self, project: str, env: dict[str, str]) -> None:
        self.project = project
        self.env = {**os.environ, **env}
        self.compose = ["docker", "compose", "-p", project]
        for name in COMPOSE_FILES:
            self.compose += ["-f", str(REPO / name)]
        self.expected: Counter[str] = Counter()  # running containers per service at the start
        self.last_failover = float("-inf")

    async def run(self, *argv: str, stdin: str | None = None, check: bool = True) -> str:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
        )
        out, _ = await proc.communicate(stdin.encode() if stdin is not None else None)
        text = out.decode(errors="replace")
        if check and proc.returncode != 0:
            raise ChaosFailure(f"{shlex.join(argv[:6])} ...: exit {proc.returncode}: {text[-800:]}")
        return text

    async def containers(self) -> list[Container]:
        label = f"label=com.docker.compose.project={self.project}"
        ids = (await self.run("docker", "ps", "-aq", "--filter", label)).split()
        if not ids:
            return []
        found = []
        for c in json.loads(await self.run("docker", "inspect", *ids)):
            state = c["State"]
            found.append(
                Container(
                    id=c["Id"][:12],
                    name=c["Name"].lstrip("/"),
                    service=c["Config"]["Labels"].get("com.docker.compose.service", ""),
                    status=state["Status"],
                    health=(state.get("Health") or {}).get("Status"),
                    pid=int(state.get("Pid") or 0),
                    restarts=int(c.get("RestartCount", 0)),
                    env=dict(e.split("=", 1) for e in c["Config"]["Env"] if "=" in e),
                )
            )
        return sorted(found, key=lambda c: c.name)

    async def of(self, service: str) -> list[Container]:
        return [c for c in await self.containers() if c.service == service]

    async def exec(self, container: Container, *argv: str, stdin: str | None = None) -> str:
        flags = ["-i"] if stdin is not None else []
        return await self.run("docker", "exec", *flags, container.id, *argv, stdin=stdin)

    async def sentinels(self) -> list[Container]:
        return [
            c
            for c in await self.containers()
            if c.service.startswith("sentinel") and c.status == "running"
        ]

    async def primary(self) -> Container:
        """The data node every running Sentinel names as the primary."""
        named = set()
        for sentinel in await self.sentinels():
            out = await self.exec(
                sentinel, "redis-cli", "-p", "26379", "sentinel", "get-master-addr-by-name", MASTER
            )
            named.add(out.split()[0] if out.split() else "")
        if len(named) != 1:
            raise ChaosFailure(f"the Sentinels name {sorted(named)} as the primary")
        (addr,) = named
        nodes = [c for c in await self.containers() if c.env.get("NODE_ADDR") == addr]
        if len(nodes) != 1:
            raise ChaosFailure(f"no single data node has the address {addr}")
        return nodes[0]

    async def unsettled(self) -> str | None:
        """Why the stack is not settled yet (None: it is)."""
        try:
            return await self._unsettled()
        except ChaosFailure as exc:  # a node or Sentinel not answering yet
            return str(exc)[:300]

    async def _unsettled(self) -> str | None:
        containers = await self.containers()
        running = Counter(c.service for c in containers if c.status == "running")
        for service, count in self.expected.items():
            if running[service] < count:
                return f"{service}: {running[service]} of {count} running"
        for c in containers:
            if c.service in self.expected and c.status == "running" and not c.healthy:
                return f"{c.name}: {c.health}"
        primary = await self.primary()
        info = parse_info(await self.exec(primary, "redis-cli", "info", "replication"))
        online = [v for k, v in info.items() if k.startswith("slave") and "state=online" in v]
        if info.get("role") != "master" or len(online) < 2:
            return f"primary {primary.service}: role {info.get('role')}, {len(online)} online"
        for sentinel in await self.sentinels():
            replicas = parse_pairs(
                await self.exec(
                    sentinel, "redis-cli", "-p", "26379", "sentinel", "replicas", MASTER
                )
            )
            good = [
                r
                for r in replicas
                if r.get("flags") == "slave" and r.get("master-link-status") == "ok"
            ]
            if len(good) < 2:
                return f"{sentinel.service} knows {len(good)} healthy replicas"
        for api in [c for c in containers if c.service == "api" and c.status == "running"]:
            try:
                status = json.loads(await self.exec(api, "python", "-c", READYZ))["status"]
            except (ValueError, KeyError) as exc:
                return f"{api.name}: /readyz {exc}"[:200]
            if status != "ready":
                return f"{api.name}: /readyz {status}"
        return None

    async def wait_settled(self, timeout: float) -> float:
        """Until :meth:`unsettled` says nothing; the seconds it took."""
        t0 = time.monotonic()
        why = None
        while time.monotonic() - t0 < timeout:
            why = await self.unsettled()
            if why is None:
                return time.monotonic() - t0
            await asyncio.sleep(0.5)
        raise ChaosFailure(f"not settled after {timeout:.0f} s: {why}")

    async def failover_timeout_s(self) -> float:
        (sentinel, *_) = await self.sentinels()
        out = await self.exec(sentinel, "redis-cli", "-p", "26379", "sentinel", "master", MASTER)
        fields = dict(zip(out.splitlines()[::2], out.splitlines()[1::2], strict=False))
        return int(fields["failover-timeout"]) / 1000

    async def sessions_of(self, api: Container) -> float:
        for line in (await self.exec(api, "python", "-c", METRICS)).splitlines():
            if line.startswith("echo_active_sessions "):
                return float(line.split()[1])
        return 0.0

    async def describe_sessions(self, session_ids: list[str]) -> str:
        """For a failure report: each session's holder, fence and seq on the primary, and the
        owner keys (live processes) with their time to live."""
        primary = await self.primary()
        commands = "".join(f"HMGET rnn:echo:s:{sid} own fence seq\n" for sid in session_ids)
        rows = (await self.exec(primary, "redis-cli", stdin=commands)).splitlines()
        owners = await self.exec(primary, "redis-cli", "--scan", "--pattern", "rnn:echo:o:*")
        ttls = (
            await self.exec(
                primary, "redis-cli", stdin="".join(f"PTTL {k}\n" for k in owners.split())
            )
            if owners.split()
            else ""
        )
        sessions = [" ".join(rows[i : i + 3]) for i in range(0, len(rows), 3)]
        return (
            f"primary {primary.name}; owner keys (ms left): "
            f"{dict(zip(owners.split(), ttls.split(), strict=False))}; sessions (own fence seq): "
            + "; ".join(f"{sid}: {row}" for sid, row in zip(session_ids, sessions, strict=False))
        )

    async def stored_seqs(self, session_ids: list[str]) -> list[int | None]:
        """Each session's stored ``seq``, read from the primary."""
        primary = await self.primary()
        commands = "".join(f"HGET rnn:echo:s:{sid} seq\n" for sid in session_ids)
        out = (await self.exec(primary, "redis-cli", stdin=commands)).splitlines()
        if len(out) != len(session_ids):
            raise ChaosFailure(f"redis-cli answered {len(out)} lines for {len(session_ids)}")
        return [int(v) if v.isdigit() else None for v in out]


def signal_container(container: Container, sig: signal.Signals) -> None:
    """Send ``sig`` to the container's main process from this host: a crash or a stall as the
    container sees it (``docker kill`` would mark the container stopped by hand, and its restart
    policy would not bring it back)."""
    if container.pid <= 0:
        raise ChaosFailure(f"{container.name} has no process")
    try:
        os.kill(container.pid, sig)
    except PermissionError as exc:
        raise ChaosFailure(f"cannot signal {container.name} (pid {container.pid}): {exc}") from exc


# --- faults -------------------------------------------------------------------------------------


async def inject(stack: Stack, fault: str, args: argparse.Namespace) -> tuple[float, dict]:
    """Cause ``fault``: when (loop time) and what was hit."""
    now = asyncio.get_running_loop().time
    if fault == "kill-api":
        apis = [c for c in await stack.of("api") if c.status == "running"]
        held = {c.name: await stack.sessions_of(c) for c in apis}
        victim = max(apis, key=lambda c: held[c.name])
        t0 = now()
        signal_container(victim, signal.SIGKILL)
        return t0, {"target": victim.name, "sessions_held": held, "restarts": victim.restarts}
    if fault in REDIS_FAULTS:
        primary = await stack.primary()
        t0 = now()
        if fault == "kill-primary":
            signal_container(primary, signal.SIGKILL)
        else:
            signal_container(primary, signal.SIGSTOP)
            try:
                await asyncio.sleep(args.stall)
            finally:
                signal_container(primary, signal.SIGCONT)
        stack.last_failover = time.monotonic()
        return t0, {"target": primary.name, "restarts": primary.restarts}
    if fault == "restart-nginx":
        (nginx,) = await stack.of("nginx")
        t0 = now()
        await stack.run("docker", "restart", nginx.id)
        return t0, {"target": nginx.name}
    raise ValueError(fault)


async def outcome(stack: Stack, fault: str, hit: dict[str, Any]) -> dict[str, Any]:
    """After the stack settled: did the restart policy bring the target back, and who is the
    Redis primary now."""
    out: dict[str, Any] = {}
    if fault in ("kill-api", "kill-primary"):
        (target,) = [c for c in await stack.containers() if c.name == hit["target"]]
        out["restarted_by_policy"] = target.restarts > hit.pop("restarts")
    if fault in REDIS_FAULTS:
        primary = await stack.primary()
        out["primary_after"] = primary.name
        out["target_demoted"] = primary.name != hit["target"]
    return out


async def wait_flowing(flows: Sequence[Flow], after: float, timeout: float) -> float:
    """Until every stream has a reply that arrived after ``after`` (loop time); that time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        stuck = [f.index for f in flows if f.last_arrival() <= after and f.error is None]
        failed = [f for f in flows if f.error is not None]
        if failed:
            raise ChaosFailure(f"stream {failed[0].index} failed: {failed[0].error}")
        if not stuck:
            return loop.time()
        if loop.time() > deadline:
            raise Stuck(f"streams {stuck[:10]} did not flow again in {timeout:.0f} s", stuck)
        await asyncio.sleep(0.1)


async def chaos(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    base_url = f"http://127.0.0.1:{args.port}"
    stack.expected = Counter(c.service for c in await stack.containers() if c.status == "running")
    log(f"stack: {dict(stack.expected)}; waiting until it has settled")
    await stack.wait_settled(args.settle_timeout)
    failover_timeout = await stack.failover_timeout_s()

    client_log = logging.getLogger("rnn_serving_client.echo")
    client_log.setLevel(logging.INFO)
    client_log.addHandler(DropRecorder())
    client_log.propagate = False
    flows = [Flow(index=k, seed=args.seed + k) for k in range(args.streams)]
    stop = asyncio.Event()
    results: list[dict[str, Any]] = []
    async with rsc.AsyncClient(base_url, timeout=30) as client:
        log(f"{args.streams} streams through nginx at {base_url}, one message every {args.pace} s")
        tasks = [
            asyncio.create_task(
                run_flow(client, f, stop, args.pace, args.window, args.reconnect_deadline)
            )
            for f in flows
        ]
        try:
            await wait_flowing(flows, loop.time() + args.warmup, args.settle_timeout)
            for fault in args.faults:
                if fault in REDIS_FAULTS:  # Sentinel fails the same primary over again only then
                    due = stack.last_failover + 2 * failover_timeout + 1.5
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                log(f"fault: {fault}")
                t0, hit = await inject(stack, fault, args)
                await stack.wait_settled(args.settle_timeout)
                settled = loop.time()
                t1 = await wait_flowing(flows, settled, args.settle_timeout)
                row = {"fault": fault, **await outcome(stack, fault, hit), **hit}
                row.pop("restarts", None)
                row |= recovery(flows, t0, t1)
                row["stack_settled_after_s"] = round(settled - t0, 2)
                results.append(row)
                log(
                    f"{fault}: {row['cut']} of {row['streams']} streams cut; flowing again "
                    f"after {row['time_to_flow_s']}, outage {row['outage_s']}, longest gap "
                    f"{row['longest_gap_s']}; client events {row['client_events']}"
                )
        except Stuck as exc:
            ids = [flows[k].session_id for k in exc.flows]
            with contextlib.suppress(ChaosFailure):
                log(f"stuck sessions: {await stack.describe_sessions(ids)}")
            raise
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        log("stopped; checking every stream")
        checks = await verify(stack, client, flows)
    return {"faults": results, "checks": checks, "failover_timeout_s": failover_timeout}


async def verify(stack: Stack, client: Any, flows: list[Flow]) -> dict[str, Any]:
    failed = [f"stream {f.index}: {f.error}" for f in flows if f.error]
    if failed:
        raise ChaosFailure("; ".join(failed[:5]))
    replies = sum(len(f.replies) for f in flows)
    if any(len(f.replies) != f.sent for f in flows):
        raise ChaosFailure("a stream got fewer replies than messages sent")
    stored = await stack.stored_seqs([f.session_id for f in flows])
    lost = sum(max(0, len(f.replies) - (s or 0)) for f, s in zip(flows, stored, strict=True))
    extra = [
        f.index for f, s in zip(flows, stored, strict=True) if s is not None and s > len(f.replies)
    ]
    if lost or extra:
        raise ChaosFailure(f"{lost} acknowledged steps lost; stored ahead on streams {extra}")
    references = await asyncio.gather(*(unbroken(client, f) for f in flows))
    worst = 0.0
    for flow, (want, connections, retried) in zip(flows, references, strict=True):
        if connections != 1 or retried:
            raise ChaosFailure(f"the unbroken stream {flow.index} reconnected ({retried})")
        worst = max(worst, compare(flow, want, flow.echo_step))
    retried: Counter[str] = Counter()
    for f in flows:
        retried.update(f.retried)
    return {
        "streams": len(flows),
        "replies": replies,
        "acknowledged_steps_lost": lost,
        "streams_exact": len(flows),
        "largest_probability_difference": worst,
        "client_retries": dict(sorted(retried.items())),
        "connections": sum(f.connections[-1] for f in flows if f.connections),
    }


# --- report -------------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    meta, checks = result["meta"], result["checks"]
    lines = [
        f"# Chaos test of the scale stack ({meta['started'][:10]})",
        "",
        f"`{meta['command']}`, {meta['started']}, commit {meta['commit']}, "
        f"{meta['cpu_count']} cores, load average before {meta['machine_before']['loadavg'][0]:.2f}"
        " (the machine was shared with other work).",
        f"{checks['streams']} streams through nginx, one message every {meta['pace_s']} s "
        f"(up to {meta['window']} in flight); ECHO_LEASE_S {meta['lease_s']:g}, Sentinel "
        f"failover-timeout {result['failover_timeout_s']:g} s, stall {meta['stall_s']:g} s. "
        "Seconds from the fault, median / max: time to flow again and outage over the streams "
        "cut (their client reconnected), longest gap between replies over all streams.",
        "",
        "| fault | target | cut | time to flow again | outage | longest gap | stack settled | "
        "notes |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]

    def mm(v: dict[str, float] | None) -> str:
        return "-" if v is None else f"{v['median']:.2f} / {v['max']:.2f}"

    for row in result["faults"]:
        notes = []
        if "restarted_by_policy" in row:
            notes.append(f"restarted by policy: {'yes' if row['restarted_by_policy'] else 'no'}")
        if "primary_after" in row:
            notes.append(f"primary after: {row['primary_after']}")
        if "target_demoted" in row:
            notes.append(f"demoted: {'yes' if row['target_demoted'] else 'no'}")
        events = ", ".join(f"{k} {v}" for k, v in row["client_events"].items())
        notes.append(f"client: {events or 'nothing'}")
        lines.append(
            f"| {row['fault']} | {row['target']} | {row['cut']} of {row['streams']} "
            f"| {mm(row['time_to_flow_s'])} | {mm(row['outage_s'])} | {mm(row['longest_gap_s'])} "
            f"| {row['stack_settled_after_s']:.1f} | {'; '.join(notes)} |"
        )
    lines += [
        "",
        f"Checks: {checks['replies']:,} replies, {checks['acknowledged_steps_lost']} acknowledged "
        f"steps lost, {checks['streams_exact']} of {checks['streams']} streams equal to an "
        f"unbroken stream (probabilities within {checks['largest_probability_difference']:.1e}); "
        f"client retries {checks['client_retries']}.",
        "",
    ]
    return "\n".join(lines)


def docker_nofile() -> dict[str, str]:
    """``NOFILE`` for compose.yaml's ``ulimits`` when the Docker daemon here may hand out fewer
    than its 65,536 descriptors (runc refuses more than the daemon has), as
    .ci/container-smoke.sh does; nothing when ``NOFILE`` is set or the daemon is not local."""
    if os.environ.get("NOFILE"):
        return {}
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == "dockerd":
                for line in (comm.parent / "limits").read_text().splitlines():
                    if line.startswith("Max open files"):
                        hard = line.split()[4]
                        if hard.isdigit() and int(hard) < 65536:
                            return {"NOFILE": hard}
    return {}


def commit() -> str:
    from bench.sessions import commit as describe

    return describe(REPO)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from bench.run import machine_state

    env = {"API_PORT": str(args.port), **docker_nofile()}
    if args.redis_net:
        env["REDIS_NET"] = args.redis_net
    stack = Stack(args.project, env)
    meta = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": args.command,
        "commit": commit(),
        "cpu_count": os.cpu_count(),
        "machine_before": machine_state(),
        "project": args.project,
        "pace_s": args.pace,
        "window": args.window,
        "stall_s": args.stall,
        "faults": args.faults,
    }
    brought_up = False
    try:
        if not args.no_up:
            log(f"starting the stack (compose project {args.project})")
            build = ["--build"] if args.build else ["--no-build"]
            await stack.run(*stack.compose, "up", "-d", *build, "--wait", "--wait-timeout", "600")
            brought_up = True
        (api, *_) = await stack.of("api")
        meta["lease_s"] = float(api.env.get("ECHO_LEASE_S", "10"))
        result = await chaos(stack, args)
    except BaseException:
        if brought_up or args.no_up:
            log("--- ps and logs (last 40 lines each) ---")
            print(await stack.run(*stack.compose, "ps", "-a", check=False), file=sys.stderr)
            print(
                await stack.run(*stack.compose, "logs", "--no-color", "--tail", "40", check=False),
                file=sys.stderr,
            )
        raise
    finally:
        if brought_up and not args.keep:
            log("taking the stack down (down -v)")
            await stack.run(*stack.compose, "down", "-v", "--timeout", "30", check=False)
    meta["machine_after"] = machine_state()
    return {"meta": meta, **result}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--streams", type=int, default=40, help="echo streams (40)")
    ap.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated, in order (default {','.join(FAULTS)})",
    )
    ap.add_argument("--pace", type=float, default=0.1, help="seconds between a stream's messages")
    ap.add_argument("--window", type=int, default=4, help="unanswered messages per stream (4)")
    ap.add_argument("--stall", type=float, default=3.0, help="stall-primary: seconds stopped (3)")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of streaming before faults")
    ap.add_argument("--settle-timeout", type=float, default=300.0, help="per fault (300 s)")
    ap.add_argument("--reconnect-deadline", type=float, default=120.0, help="client's (120 s)")
    ap.add_argument("--project", default="rnn-serving-chaos", help="compose project")
    ap.add_argument("--port", type=int, default=8000, help="nginx's host port (API_PORT)")
    ap.add_argument("--redis-net", help="REDIS_NET for the stack (its default: 10.240.24)")
    ap.add_argument("--no-up", action="store_true", help="use a running stack; leave it up")
    ap.add_argument("--build", action="store_true", help="build the API image first")
    ap.add_argument("--keep", action="store_true", help="leave the stack up at the end")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write chaos.json and chaos.md into this folder")
    args = ap.parse_args(argv)
    args.faults = [f for f in args.faults.split(",") if f]
    unknown = set(args.faults) - set(FAULTS)
    if unknown:
        ap.error(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
    if not 1 <= args.window <= 8:
        ap.error("--window is 1 to 8")
    args.command = "python -m bench.chaos " + shlex.join(argv if argv is not None else sys.argv[1:])

    started = time.monotonic()
    try:
        result = asyncio.run(main_async(args))
    except ChaosFailure as exc:
        log(f"FAILED: {exc}")
        return 1
    report = markdown(result)
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "chaos.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "chaos.md").write_text(report)
        log(f"wrote {args.out / 'chaos.json'} and chaos.md")
    log(f"passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
