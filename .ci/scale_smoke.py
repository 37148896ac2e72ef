"""Smoke-test the scale stack (compose.scale.yaml): kill the replica serving a stream, resume it.

    python .ci/scale_smoke.py --project rnn-serving-scale-smoke [--base-url http://127.0.0.1:8000]

Run against a stack that is up (``.ci/container-smoke.sh`` starts it). Everything goes through
nginx at ``--base-url``; ``docker`` is used only to find and kill replicas and read their logs
and ``/metrics``. Steps:

1. MNIST test digits to ``POST /predict/digit`` (at least ``--min-correct`` right), and every API
   replica must have answered some of them (its ``/metrics``, read with ``docker exec``).
2. The reference: a new echo session fed ``--messages`` messages of random bits (1-64 each)
   without interruption.
3. The same messages on a second session, pipelined (``--window`` in flight) and paced. The
   replica serving it is found from its ``echo session opened`` log line (it names the session
   id, never the token); after echo ``--kill-at`` arrived, ``docker kill`` (SIGKILL) hits that
   replica while the stream goes on. The cut stream resumes through nginx with
   ``?session_id&token&last_seq=N`` (N: the last echo seq received), retrying while the close is
   1013 (``session_in_use`` until the dead replica's lease lapses, at most ``ECHO_LEASE_S``) for
   up to ``--lease-s`` + 15 s; it reads the replayed echo frames N+1..S, then sends the
   messages after S.
4. Every seq 1..messages arrived exactly once and in order, and the stream's predicted bits
   equal the reference's exactly, its probabilities within 1e-5 (the server's own tests' bound).
5. A resume of the finished session with ``last_seq`` ``--replay-check`` below its end (a client
   that lost its last replies) gets those echo frames again, exactly as first sent.
6. ``/readyz`` and digits still answer through nginx after the kill.
7. No container's log (nginx's, the replicas', the killed one's too) holds a session token.

Exits 0 when all checks pass, 1 otherwise. Needs httpx, websockets and numpy (the dev venv).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smoke_client import REPO, SmokeFailure, check, check_digits, load_test_digits

RECV_TIMEOUT_S = 10.0  # a reply, or the drop of a killed replica's connection, comes well before
PROB_TOLERANCE = 1e-5
DIGITS_ROUTE = 'http_requests_total{method="POST",route="/predict/digit",status="200"}'
METRICS_SCRIPT = (
    "import urllib.request as u; "
    "print(u.urlopen('http://127.0.0.1:8000/metrics', timeout=5).read().decode())"
)

Frame = dict[str, Any]


@dataclass
class Stream:
    """One echo session's messages and the echo frames received for them, by seq."""

    messages: list[list[int]]
    replies: dict[int, Frame] = field(default_factory=dict)
    raw: dict[int, str] = field(default_factory=dict)  # the frames as received, by seq
    session: Frame = field(default_factory=dict)

    @property
    def last_seq(self) -> int:
        return max(self.replies, default=0)

    def record(self, text: str | bytes) -> int:
        """Check ``text`` is the echo frame after the last one received (never a repeat)."""
        check(isinstance(text, str), "an echo frame is a text frame")
        frame = json.loads(text)
        check(frame.get("type") == "echo", f"expected an echo frame, got {frame}")
        seq = frame.get("seq")
        check(seq not in self.replies, f"echo seq {seq} received twice")
        check(seq == self.last_seq + 1, f"echo seq {seq} after {self.last_seq}")
        sent = self.messages[seq - 1]
        check(
            len(frame.get("bits", ())) == len(frame.get("probabilities", ())) == len(sent),
            f"seq {seq}: {len(sent)} bits sent, got {frame}",
        )
        self.replies[seq] = frame
        self.raw[seq] = str(text)
        return seq


def random_messages(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(0, 1) for _ in range(rng.randint(1, 64))] for _ in range(count)]


async def connect(url: str) -> tuple[ClientConnection, Frame]:
    """Open ``url``; the connection and its first (session) frame."""
    ws = await websockets.connect(url, open_timeout=15, close_timeout=2, proxy=None)
    try:
        frame = json.loads(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S))
    except BaseException:
        await ws.close()
        raise
    check(frame.get("type") == "session", f"first frame is not a session frame: {frame}")
    return ws, frame


async def pump(
    ws: ClientConnection,
    stream: Stream,
    window: int,
    pace_s: float,
    on_reply: Callable[[int], Awaitable[None]] | None = None,
) -> None:
    """Send the messages after the session's seq, up to ``window`` unanswered at a time, one per
    ``pace_s`` at most, and record the replies until the last one. Raises ``ConnectionClosed``
    or ``TimeoutError`` when the connection drops."""
    first = stream.last_seq
    credits = asyncio.Semaphore(window)

    async def sender() -> None:
        for message in stream.messages[first:]:
            await credits.acquire()
            await ws.send(json.dumps({"bits": message}))
            await asyncio.sleep(pace_s)

    task = asyncio.create_task(sender())
    try:
        while stream.last_seq < len(stream.messages):
            seq = stream.record(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S))
            credits.release()
            if on_reply is not None:
                await on_reply(seq)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await task


async def docker(*args: str) -> str:
    """Run ``docker args``; its stdout and stderr together (raises when it fails)."""
    proc = await asyncio.create_subprocess_exec(
        "docker", *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise SmokeFailure(f"docker {' '.join(args)}: exit {proc.returncode}: {text[-500:]}")
    return text


async def api_containers(project: str) -> dict[str, str]:
    """The running API replicas of compose project ``project``: container id -> name."""
    out = await docker(
        "ps",
        "--filter",
        f"label=com.docker.compose.project={project}",
        "--filter",
        "label=com.docker.compose.service=api",
        "--format",
        "{{.ID}} {{.Names}}",
    )
    return dict(line.split(" ", 1) for line in out.splitlines() if line.strip())


async def replicas_serving(containers: dict[str, str], session_id: str, resumed: bool) -> list[str]:
    """The containers whose logs say they opened (or resumed) ``session_id``."""
    found = []
    for cid in containers:
        for line in (await docker("logs", cid)).splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if (
                entry.get("msg") == "echo session opened"
                and entry.get("session") == session_id
                and entry.get("resumed") is resumed
            ):
                found.append(cid)
                break
    return found


async def check_no_token_logged(project: str, tokens: list[str]) -> None:
    """No container of the stack (the killed replica too) wrote a session token to its log."""
    label = f"label=com.docker.compose.project={project}"
    ids = (await docker("ps", "-aq", "--filter", label)).split()
    check(bool(ids), f"no containers in project {project}")
    for cid in ids:
        logs = await docker("logs", cid)
        check(not any(t in logs for t in tokens), f"container {cid} logged a session token")
    print(f"logs: {len(ids)} containers, no session token in them")


async def digits_served(cid: str) -> float:
    """How many digits (POST /predict/digit, 200) replica ``cid`` has answered, from /metrics."""
    metrics = await docker("exec", cid, "python", "-c", METRICS_SCRIPT)
    for line in metrics.splitlines():
        if line.startswith(DIGITS_ROUTE + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def resume(
    ws_url: str, stream: Stream, patience_s: float
) -> tuple[ClientConnection, Frame, dict[str, int]]:
    """Resume ``stream``'s session with ``last_seq``; retry refusals that say "later" (1013, and
    HTTP 502/503/504 or no connection from nginx) until ``patience_s`` has passed. The
    connection, its session frame and the number of retries by reason."""
    query = urlencode(
        {
            "session_id": stream.session["session_id"],
            "token": stream.session["token"],
            "last_seq": stream.last_seq,
        }
    )
    retries: dict[str, int] = {}
    deadline = time.monotonic() + patience_s
    while True:
        wait, why = 0.5, ""
        try:
            return (*await connect(f"{ws_url}/echo?{query}"), retries)
        except ConnectionClosed as exc:
            code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")
            if code != 1013:
                raise SmokeFailure(f"resume refused: close {code} {reason!r}") from exc
            why = reason.split(":", 1)[0]
            hint = re.search(r"retry in ([0-9.]+) s", reason)
            if hint:
                wait = min(float(hint.group(1)) + 0.1, 3.0)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status not in (502, 503, 504):
                raise SmokeFailure(f"resume refused: HTTP {status}") from exc
            why = f"http_{status}"
        except (OSError, TimeoutError) as exc:
            why = type(exc).__name__
        retries[why] = retries.get(why, 0) + 1
        if time.monotonic() + wait > deadline:
            raise SmokeFailure(f"could not resume within {patience_s:.0f}s; retries {retries}")
        await asyncio.sleep(wait)


async def reference_stream(ws_url: str, messages: list[list[int]], window: int) -> Stream:
    ref = Stream(messages)
    ws, ref.session = await connect(f"{ws_url}/echo")
    async with ws:
        await pump(ws, ref, window, pace_s=0)
    return ref


async def killed_stream(
    ws_url: str, project: str, messages: list[list[int]], args: argparse.Namespace
) -> tuple[Stream, dict[str, int]]:
    """Stream ``messages`` on a new session, SIGKILL its replica mid-stream, resume and finish."""
    containers = await api_containers(project)
    check(len(containers) >= 2, f"need 2+ running API replicas, found {containers}")
    stream = Stream(messages)
    ws, stream.session = await connect(f"{ws_url}/echo")
    session_id = stream.session["session_id"]
    serving = await replicas_serving(containers, session_id, resumed=False)
    check(len(serving) == 1, f"session {session_id} opened on {serving}, expected one replica")
    victim = serving[0]
    print(f"stream: session {session_id} on {containers[victim]}")

    kill: asyncio.Task[str] | None = None
    killed_at = 0.0

    async def kill_when_due(seq: int) -> None:
        nonlocal kill, killed_at
        if seq == args.kill_at and kill is None:
            killed_at = time.monotonic()
            kill = asyncio.create_task(docker("kill", "--signal", "KILL", victim))
        elif kill is not None and not kill.done() and seq >= len(messages) - args.window:
            await kill  # a slow `docker kill` must still land before the stream's end

    try:
        async with ws:
            await pump(ws, stream, args.window, args.pace, kill_when_due)
    except (ConnectionClosed, TimeoutError) as exc:
        dropped = f"{type(exc).__name__}: {exc}"
    else:
        raise SmokeFailure("the stream ended before the kill cut it: raise --messages")
    check(kill is not None, "the connection dropped before the kill")
    assert kill is not None
    await kill
    cut_at = stream.last_seq
    print(
        f"stream: SIGKILL {containers[victim]} after echo {args.kill_at}; connection dropped "
        f"{time.monotonic() - killed_at:.2f}s later with echo {cut_at} received ({dropped})"
    )

    t0 = time.monotonic()
    ws, frame, retries = await resume(ws_url, stream, args.lease_s + 15)
    waited = time.monotonic() - t0
    check(
        frame.get("resumed") is True and frame.get("session_id") == session_id,
        f"not a resume of {session_id}: {frame}",
    )
    stored = frame.get("seq")
    check(
        isinstance(stored, int) and cut_at <= stored <= cut_at + args.window,
        f"resumed at seq {stored}, {cut_at} received, at most {args.window} were in flight",
    )
    survivors = {cid: name for cid, name in containers.items() if cid != victim}
    on = await replicas_serving(survivors, session_id, resumed=True)
    print(
        f"resume: after {waited:.1f}s, retries {retries or 'none'}, on "
        f"{[containers[c] for c in on]}; stored seq {stored}, replaying {stored - cut_at}"
    )
    check(len(on) == 1, f"resumed on {on}, expected one surviving replica")
    async with ws:
        for _ in range(stored - cut_at):
            stream.record(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S))
        await pump(ws, stream, args.window, args.pace)
    return stream, retries


async def replay_check(ws_url: str, stream: Stream, back: int) -> None:
    """Resume the finished session with ``last_seq`` ``back`` below its end, as a client that
    lost its last replies would: the server must re-send them exactly as it first sent them."""
    if back <= 0:
        return
    total = stream.last_seq
    query = urlencode(
        {
            "session_id": stream.session["session_id"],
            "token": stream.session["token"],
            "last_seq": total - back,
        }
    )
    ws, frame = await connect(f"{ws_url}/echo?{query}")
    async with ws:
        check(frame.get("seq") == total, f"resumed at seq {frame.get('seq')}, expected {total}")
        for seq in range(total - back + 1, total + 1):
            again = await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S)
            check(again == stream.raw[seq], f"seq {seq} re-sent as {again!r}, not as first sent")
    print(f"replay: last_seq={total - back} re-sent echo {total - back + 1}..{total} identically")


def compare(got: Stream, want: Stream) -> None:
    """Every seq once, and the same predictions as the unbroken stream."""
    total = len(want.messages)
    check(sorted(got.replies) == list(range(1, total + 1)), "a seq is missing")
    worst = 0.0
    for seq in range(1, total + 1):
        g, w = got.replies[seq], want.replies[seq]
        check(g["bits"] == w["bits"], f"seq {seq}: bits {g['bits']} != unbroken {w['bits']}")
        worst = max(
            worst,
            *(abs(a - b) for a, b in zip(g["probabilities"], w["probabilities"], strict=True)),
        )
    check(worst <= PROB_TOLERANCE, f"probabilities differ from the unbroken stream by {worst}")
    step = want.session["echo_step"]
    sent = [b for m in want.messages for b in m]
    predicted = [b for seq in range(1, total + 1) for b in want.replies[seq]["bits"]]
    check(predicted == [0] * step + sent[:-step], "the unbroken stream is not an echo")
    print(
        f"compare: {total} echo frames ({len(sent)} bits), each seq once; bits equal, "
        f"probabilities within {worst:.1e} of the unbroken stream"
    )


async def run(args: argparse.Namespace) -> None:
    ws_url = "ws" + args.base_url.removeprefix("http")
    containers = await api_containers(args.project)
    check(len(containers) >= 2, f"need 2+ running API replicas, found {containers}")
    images, labels = load_test_digits(args.mnist_dir, args.digits, args.seed)
    before = {cid: await digits_served(cid) for cid in containers}
    check_digits(args.base_url, images, labels, args.min_correct)
    served = {containers[c]: await digits_served(c) - n for c, n in before.items()}
    print(f"digits per replica: {served}")
    check(all(n > 0 for n in served.values()), f"a replica got no digits: {served}")

    messages = random_messages(args.messages, args.seed)
    want = await reference_stream(ws_url, messages, args.window)
    got, retries = await killed_stream(ws_url, args.project, messages, args)
    compare(got, want)
    await replay_check(ws_url, got, args.replay_check)

    t0 = time.monotonic()
    with httpx.Client(base_url=args.base_url, timeout=30) as client:
        check(client.get("/readyz").status_code == 200, "/readyz through nginx after the kill")
    check_digits(args.base_url, images[:10], labels[:10], min(args.min_correct, 9))
    print(f"after the kill: /readyz and 10 digits through nginx in {time.monotonic() - t0:.1f}s")
    await check_no_token_logged(args.project, [want.session["token"], got.session["token"]])
    print(f"session_in_use retries: {retries.get('session_in_use', 0)} (all retries: {retries})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="nginx")
    p.add_argument("--project", required=True, help="compose project name of the stack")
    p.add_argument(
        "--mnist-dir",
        type=Path,
        default=os.environ.get("MNIST_DIR") or REPO.parent / "shared" / "data" / "mnist",
        help="folder with the IDX .gz files (default: $MNIST_DIR, else ../shared/data/mnist)",
    )
    p.add_argument("--digits", type=int, default=20, help="test images to send")
    p.add_argument("--min-correct", type=int, default=19, help="of --digits")
    p.add_argument("--messages", type=int, default=300, help="echo messages per stream")
    p.add_argument("--kill-at", type=int, default=60, help="kill after this echo seq arrived")
    p.add_argument("--window", type=int, default=3, help="messages in flight (<= 4, the replay)")
    p.add_argument("--pace", type=float, default=0.01, help="seconds between sends")
    p.add_argument(
        "--lease-s",
        type=float,
        default=float(os.environ.get("ECHO_LEASE_S", 10)),
        help="the stack's ECHO_LEASE_S (default: $ECHO_LEASE_S, else 10)",
    )
    p.add_argument(
        "--replay-check",
        type=int,
        default=2,
        help="after the stream, resume with last_seq this far back: the replies must come again",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not 0 < args.kill_at < args.messages:
        p.error("--kill-at must be between 0 and --messages")
    if not 1 <= args.window <= 4:
        p.error("--window must be 1 to 4 (ECHO_REPLAY_REPLIES: a resume replays at most 4)")

    started = time.perf_counter()
    try:
        asyncio.run(run(args))
    except (SmokeFailure, httpx.HTTPError, websockets.WebSocketException, OSError) as exc:
        print(f"SCALE SMOKE FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"scale smoke client: all checks passed in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
