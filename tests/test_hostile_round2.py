"""Issue #21, "Hostile clients, round 2": each attack is refused cleanly, against the real server.

Done when every attack gets a 4xx (WebSocket: a close code with a reason) within 1 s; the server's
RSS grows at most 300 MB (the never-reading pipeliners: < 256 MB); another client's ``/livez``
(127.0.0.2, a new connection every 10 ms) never waits more than 250 ms (here: 1 s, see
``VICTIM_WAIT_S``); no echo session is left
attached; and a client from another /24 is served while one /24 holds every connection it can.
Attackers connect from 127.0.0.3 and up. ``python -m bench.attacks_round2`` measures the same
attacks at full size.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest

from tests.hostile_clients import (
    Refused,
    RssPeak,
    Victim,
    dial,
    exchange,
    get,
    hold_websocket,
    livez,
    open_session,
    post,
    resume_query,
)
from tests.live_server import LiveServer, start_server

pytestmark = pytest.mark.slow

ATTACKER, RESUMER, OTHER_NETWORK = "127.0.0.3", "127.0.0.253", "127.99.0.1"
ANSWER_S = 1.0  # a hostile request is refused within this
# Another client's /livez never waits longer. The bound is 250 ms, and
# bench.attacks_round2 measures it (158-188 ms at worst, 2026-12-06); before the fixes the victim
# waited 2.4-20 s. A test sharing 2 cores with whatever else runs uses 1 s: it still fails on
# every one of those stalls without failing on a busy machine.
VICTIM_WAIT_S = 1.0
RSS_GROWTH_MB = 300.0
PIPELINE_RSS_GROWTH_MB = 256.0
MODEL = "mnist_lstm"


# --- echo: resuming with a last_seq of non-ASCII digits -------------------------------------------


def clean_close(refused: Refused) -> bool:
    """A close code of the application's with a reason (not 1006 / 1011), or an HTTP 4xx."""
    if 400 <= refused.code < 500:
        return True
    return 1000 <= refused.code < 5000 and refused.code not in (1006, 1011) and bool(refused.reason)


NON_ASCII_DIGITS = pytest.mark.parametrize("digit", ["²", "①"], ids=["superscript-2", "circled-1"])


@NON_ASCII_DIGITS
def test_a_resume_with_a_non_ascii_last_seq_is_refused_and_leaves_the_session_resumable(
    live_server: LiveServer, digit: str
) -> None:
    url = f"{live_server.ws_url}/echo"

    async def scenario() -> tuple[Refused | None, float, Any]:
        ws, frame = await open_session(url, ATTACKER)
        await ws.close()
        hostile: Refused | None = None
        t0 = time.monotonic()
        try:
            ws, _ = await open_session(
                f"{url}?{resume_query(frame)}&last_seq={quote(digit)}", ATTACKER
            )
            await ws.close()
        except Refused as exc:
            hostile = exc
        took = time.monotonic() - t0
        try:  # the same session, with valid parameters, from another address
            ws, again = await open_session(f"{url}?{resume_query(frame)}", RESUMER)
            await ws.close()
        except Refused as exc:
            again = exc
        return hostile, took, again

    hostile, took, again = asyncio.run(scenario())
    problems = []
    if hostile is None:
        problems.append(f"the resume with last_seq={digit} was admitted")
    elif not clean_close(hostile):
        problems.append(f"refused without a clean close: {hostile.code} {hostile.reason!r}")
    if took >= ANSWER_S:
        problems.append(f"refused after {took:.2f} s")
    if not (isinstance(again, dict) and again["resumed"] is True):
        problems.append(f"the session was left attached: a valid resume got {again}")
    assert not problems, problems


def test_leaked_resumes_from_20_addresses_cannot_fill_the_session_store(tmp_path: Path) -> None:
    """The issue's 20 addresses x 500 sessions against ECHO_MAX_SESSIONS 10,000, scaled down to
    20 x 10 against 200: afterwards every session resumes and a new one is admitted."""
    addresses, each = 20, 10
    env = {"ECHO_MAX_SESSIONS": str(addresses * each), "ECHO_MAX_SESSIONS_PER_CLIENT": str(each)}

    async def scenario(url: str) -> tuple[list[Refused], list[Any], Any]:
        hostile: list[Refused] = []
        frames: list[dict[str, Any]] = []
        for i in range(addresses):
            source = f"127.0.0.{3 + i}"
            for _ in range(each):
                ws, frame = await open_session(url, source)
                await ws.close()
                frames.append(frame)
                try:
                    ws, _ = await open_session(
                        f"{url}?{resume_query(frame)}&last_seq=%C2%B2", source
                    )
                    await ws.close()
                except Refused as exc:
                    hostile.append(exc)
        resumed: list[Any] = []
        for i, frame in enumerate(frames):  # before any new session: none evicted for room
            try:  # from 40 addresses in turn: each one's previous resume has long detached
                resumer = f"127.0.0.{200 + i % 40}"
                ws, again = await open_session(f"{url}?{resume_query(frame)}", resumer)
                await ws.close()
                resumed.append(again["resumed"])
            except Refused as exc:
                resumed.append(exc)
        try:
            ws, new = await open_session(url, "127.0.0.2")
            await ws.close()
        except Refused as exc:
            new = exc
        return hostile, resumed, new

    with start_server(tmp_path, env=env) as server:
        hostile, resumed, new = asyncio.run(scenario(f"{server.ws_url}/echo"))
    unclean = [f"{r.code} {r.reason!r}" for r in hostile if not clean_close(r)]
    left_attached = [r for r in resumed if r is not True]
    problems = []
    if len(hostile) != addresses * each:
        problems.append(f"{addresses * each - len(hostile)} hostile resumes were admitted")
    if unclean:
        problems.append(f"{len(unclean)} refused without a clean close, e.g. {unclean[0]}")
    if left_attached:
        problems.append(f"{len(left_attached)} sessions left attached, e.g. {left_attached[0]}")
    if not isinstance(new, dict):
        problems.append(f"a new session was refused: {new}")
    assert not problems, problems


# --- one hostile HTTP request, the victim served meanwhile --------------------------------------


def attack_beside_a_victim(
    server: LiveServer, request: bytes, rss_limit_mb: float = RSS_GROWTH_MB
) -> None:
    """Send ``request`` from ATTACKER while the victim polls; the issue's criteria."""
    with RssPeak(server.pid) as rss, Victim(server.port) as victim:
        answer = exchange(server.port, ATTACKER, request)
        time.sleep(0.3)  # the victim's requests of the last moments are answered too
    waited = victim.longest_wait(since=answer.sent_at)
    problems = []
    if not 400 <= answer.status < 500:
        problems.append(f"answered {answer.status} {answer.error[:80]}")
    if answer.seconds >= ANSWER_S:
        problems.append(f"answered after {answer.seconds:.2f} s")
    if waited >= VICTIM_WAIT_S:
        problems.append(f"another client's /livez waited {waited:.2f} s")
    if victim.failures():
        problems.append(f"another client's /livez got {victim.failures()}")
    if rss.growth > rss_limit_mb:
        problems.append(f"RSS {rss.before:.0f} -> peak {rss.peak:.0f} MB")
    assert not problems, problems


def test_a_v2_input_shape_of_400000_dimensions_is_refused_at_once(
    live_server: LiveServer,
) -> None:
    tensor = {"name": "images", "datatype": "UINT8", "shape": [9] * 400_000, "data": [0]}
    body = orjson.dumps({"inputs": [tensor]})  # 0.76 MiB
    attack_beside_a_victim(live_server, post(f"/v2/models/{MODEL}/infer", body))


def test_a_v2_body_of_1_3_million_empty_inputs_is_refused_at_once(
    live_server: LiveServer,
) -> None:
    body = b'{"inputs":[' + b",".join([b"{}"] * 1_300_000) + b"]}"  # 3.7 MiB
    attack_beside_a_victim(live_server, post(f"/v2/models/{MODEL}/infer", body))


def test_a_digit_image_of_a_million_strings_is_refused_at_once(live_server: LiveServer) -> None:
    body = b'{"image":[' + b",".join([b'"a"'] * 1_000_000) + b"]}"  # 3.8 MiB
    attack_beside_a_victim(live_server, post("/predict/digit", body))


SEVEN = orjson.dumps({"pixels": [[0] * 28] * 28})
TINY_V2 = orjson.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28],
                                    "data": [0] * 784}]})  # fmt: skip


@NON_ASCII_DIGITS
@pytest.mark.parametrize(
    "route",
    [
        "POST /predict/digit?version={v}",
        f"GET /v2/models/{MODEL}/versions/{{v}}",
        f"GET /v2/models/{MODEL}/versions/{{v}}/ready",
        f"POST /v2/models/{MODEL}/versions/{{v}}/infer",
    ],
    ids=["predict-digit", "v2-metadata", "v2-ready", "v2-infer"],
)
def test_a_version_of_non_ascii_digits_gets_a_4xx(
    live_server: LiveServer, route: str, digit: str
) -> None:
    method, path = route.format(v=quote(digit)).split(" ")
    request = post(path, TINY_V2 if "infer" in path else SEVEN) if method == "POST" else get(path)
    answer = exchange(live_server.port, ATTACKER, request)
    assert 400 <= answer.status < 500, f"{method} {path}: {answer.status} {answer.error}"
    assert answer.seconds < ANSWER_S


# --- connections: pipeliners that never read; one /24 holding every connection ------------------


@pytest.mark.parametrize("path", ["/openapi.json", "/livez"])
def test_200_pipelining_connections_that_never_read_are_bounded(tmp_path: Path, path: str) -> None:
    """200 connections (50 an address, off the victim's /24) each send 2,000 pipelined
    ``GET path`` and read nothing: the server's RSS stays under +256 MB and another client is
    served throughout."""
    requests = f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode() * 2000
    with start_server(tmp_path) as server:
        socks = []
        with RssPeak(server.pid) as rss, Victim(server.port) as victim:
            started = time.monotonic()
            try:
                for i in range(200):
                    if time.monotonic() - started > 30:
                        break  # bounded: a server that stops reading stalls every send
                    try:  # 50 an address, each in a /24 of its own (not the victim's)
                        sock = dial(server.port, f"127.0.{1 + i // 50}.3", timeout=1)
                    except OSError:
                        continue  # not even accepted: the server's choice
                    socks.append(sock)
                    with contextlib.suppress(OSError):  # refused, cut off or stalled
                        sock.sendall(requests)
                time.sleep(10)  # and never read
            finally:
                for sock in socks:
                    sock.close()
            time.sleep(1)
        assert server.process.poll() is None, "the server died"
    waited = victim.longest_wait(since=started)
    problems = []
    if rss.growth >= PIPELINE_RSS_GROWTH_MB:
        problems.append(f"RSS {rss.before:.0f} -> peak {rss.peak:.0f} MB")
    if waited >= VICTIM_WAIT_S:
        problems.append(f"another client's /livez waited {waited:.2f} s")
    if victim.failures():
        problems.append(f"another client's /livez got {victim.failures()}")
    assert not problems, problems


def test_one_network_holding_every_connection_it_can_leaves_other_networks_served(
    tmp_path: Path,
) -> None:
    """Addresses of 127.0.0.0/24 hold WebSocket connections until refused (at most 64 x 64):
    the excess is refused with a 503 and a client of another /24 is still served."""
    held = []
    refusals: set[bytes] = set()
    with start_server(tmp_path) as server:
        try:
            for host in range(3, 67):
                got = 0
                for _ in range(64):
                    sock, line = hold_websocket(server.port, f"127.0.0.{host}")
                    if sock is None:
                        refusals.add(line)
                        break
                    held.append(sock)
                    got += 1
                if not got:  # this network is full
                    break
            other = livez(server.port, OTHER_NETWORK, timeout=10)
        finally:
            for sock in held:
                sock.close()
    assert refusals, f"{len(held)} connections from one /24 and none refused"
    assert all(line.startswith(b"HTTP/1.1 503") for line in refusals), refusals
    assert other == 200, (
        f"{len(held)} connections held from 127.0.0.0/24; {OTHER_NETWORK} got {other}"
    )
