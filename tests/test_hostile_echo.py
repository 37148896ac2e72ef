"""Echo sessions nobody can hoard: hostile clients against the real server (``python -m app``).

Attackers and the well-behaved client ("victim") connect from different loopback addresses
(victim 127.0.0.2, hoarder 127.0.0.3, never-reader 127.0.0.4, churner 127.0.0.5; a trusted proxy
127.0.0.9 and an untrusted peer 127.0.0.6 sending X-Forwarded-For), so the per-address limits
tell them apart. Caps and timeouts are small so that each case is quick.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.echo_attacks import (
    NeverReader,
    Refused,
    churn,
    closed_reason,
    hoard,
    open_session,
    resume_url,
    server_has_connection_from,
)
from tests.live_server import LiveServer, start_server, wait_until

pytestmark = pytest.mark.slow

VICTIM, HOARDER, NEVER_READER, CHURNER = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
PROXY, UNTRUSTED = "127.0.0.9", "127.0.0.6"  # only PROXY's X-Forwarded-For names the client
MAX_SESSIONS, PER_CLIENT, BURST = 500, 40, 2100  # PER_CLIENT under MAX_CONNECTIONS_PER_CLIENT
IDLE_S, SEND_TIMEOUT_S = 5.0, 2.0
ENV = {
    "ECHO_MAX_SESSIONS": str(MAX_SESSIONS),
    "ECHO_MAX_SESSIONS_PER_CLIENT": str(PER_CLIENT),
    "ECHO_NEW_SESSIONS_BURST": str(BURST),
    "ECHO_NEW_SESSIONS_PER_S": "1",
    "ECHO_IDLE_TIMEOUT_S": str(IDLE_S),
    "ECHO_SEND_TIMEOUT_S": str(SEND_TIMEOUT_S),
    "TRUSTED_PROXIES": PROXY,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with start_server(tmp_path_factory.mktemp("hostile_echo"), env=ENV) as server:
        yield server


def metric(server: LiveServer, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def served(url: str, source: str = VICTIM) -> None:
    """Open a session from ``source`` (not refused, within 10 s) and check one echo."""
    ws, frame = await open_session(url, source)
    try:
        assert frame["resumed"] is False
        await ws.send('{"bits": [1, 0, 1, 1, 0]}')
        reply: dict[str, Any] = orjson.loads(await ws.recv())
        assert reply["type"] == "echo" and reply["bits"] == [0, 0, 0, 1, 0], reply
    finally:
        await ws.close()


def test_one_address_churning_sessions_leaves_others_served(server: LiveServer) -> None:
    """2,000 sessions opened and dropped by one address at a 500-session cap: the detached ones
    are evicted LRU, the victim is admitted throughout, the churner is rate limited."""
    url = f"{server.ws_url}/echo"

    async def scenario() -> tuple[Any, int]:
        attack = asyncio.create_task(churn(url, CHURNER, 2000, concurrency=8))
        during = 0  # victim sessions served while the attack was still going on
        await served(url)
        while not attack.done():
            await served(url)  # never refused, each within open_session's 10 s
            during += not attack.done()
            await asyncio.sleep(0.2)  # pacing the victim, not synchronisation
        await served(url)
        return attack.result(), during

    result, during = asyncio.run(scenario())
    assert result.opened == 2000 and not result.refused and not result.errors, result
    # Not kept waiting until the churn is over: served again and again in the meantime (a victim
    # session takes a few ms; the attack, seconds, on a slow machine as on a fast one).
    assert during >= 3, during
    assert metric(server, "echo_sessions_evicted_total", why="lru") >= 2000 - MAX_SESSIONS
    assert metric(server, "echo_sessions_refused_total", reason="too_many_sessions") == 0

    async def resume(frame: dict[str, Any]) -> Refused:
        with pytest.raises(Refused) as refused:
            await open_session(resume_url(url, frame), CHURNER)
        return refused.value

    # 549 sessions came after this one: it was a recent LRU victim (the server remembers the
    # last ECHO_MAX_SESSIONS of them for a clear reason).
    refused = asyncio.run(resume(result.frames[-MAX_SESSIONS - 50]))
    assert refused.code == 1008 and refused.error == "session_evicted", refused

    # Its creation bucket (BURST, +1/s) runs dry: further new sessions are refused, with a reason.
    more = asyncio.run(churn(url, CHURNER, BURST, concurrency=4))
    assert more.refused["session_rate_limited"] > 0 and more.opened < BURST, more
    assert metric(server, "echo_sessions_refused_total", reason="session_rate_limited") > 0
    asyncio.run(served(url))  # not refused: the victim's own bucket is untouched


def test_idle_connections_hold_no_more_than_their_cap_and_are_closed(server: LiveServer) -> None:
    url = f"{server.ws_url}/echo"

    def idle_cut_offs() -> float:
        return metric(server, "echo_connections_cut_off_total", why="idle_timeout")

    async def scenario() -> None:
        before = idle_cut_offs()
        held, refused = await hoard(url, HOARDER, PER_CLIENT + 20)
        opened_at = time.monotonic()
        try:
            assert len(held) == PER_CLIENT
            assert refused == {"too_many_sessions_from_client": 20}, refused
            await served(url)  # another address is admitted at once: before the server has cut
            assert idle_cut_offs() == before  # off any of the hoarder's connections for idling
            closes = await asyncio.gather(*(closed_reason(ws, 30) for ws, _ in held))
            waited = time.monotonic() - opened_at
        finally:
            await asyncio.gather(*(ws.close() for ws, _ in held))
        assert all(code == 1001 and reason.startswith("idle_timeout:") for code, reason in closes)
        assert waited < IDLE_S + 10, waited
        # Idle-closed sessions are detached, not lost: one resumes with its state and seq.
        ws, frame = await open_session(resume_url(url, held[0][1]), HOARDER)
        assert frame["resumed"] is True and frame["seq"] == 0
        await ws.close()

    asyncio.run(scenario())
    assert metric(server, "echo_connections_cut_off_total", why="idle_timeout") >= PER_CLIENT
    assert metric(server, "echo_sessions_refused_total", reason="too_many_sessions_from_client")


def test_a_client_that_never_reads_is_cut_off_and_its_session_resumable(
    server: LiveServer,
) -> None:
    port = int(server.base_url.rsplit(":", 1)[1])
    before = metric(server, "echo_connections_cut_off_total", why="send_timeout")
    reader = NeverReader("127.0.0.1", port, NEVER_READER)
    try:
        sent = reader.flood(bits=4096, most=3000, stall_s=1.0)
        stalled_at = time.monotonic()
        assert sent < 3000, "the server kept reading although nothing was read back"
        wait_until(
            lambda: not server_has_connection_from(port, NEVER_READER, reader.local_port),
            SEND_TIMEOUT_S + 15,
            "the server to abort the never-reading connection",
            server,
        )
        cut_after = time.monotonic() - stalled_at
    finally:
        reader.close()
    assert cut_after < SEND_TIMEOUT_S + 10, cut_after
    assert metric(server, "echo_connections_cut_off_total", why="send_timeout") == before + 1

    async def resume() -> dict[str, Any]:
        ws, frame = await open_session(resume_url(f"{server.ws_url}/echo", reader.session), VICTIM)
        await ws.close()
        return frame

    frame = asyncio.run(resume())  # detached at once: not refused with session_in_use
    assert frame["resumed"] is True and frame["seq"] > 0


def test_behind_a_trusted_proxy_the_forwarded_address_is_the_client(server: LiveServer) -> None:
    """Per-client session limits key on X-Forwarded-For from TRUSTED_PROXIES, and only there."""
    url = f"{server.ws_url}/echo"

    def xff(client: str) -> dict[str, Any]:
        return {"additional_headers": {"X-Forwarded-For": client}}

    async def scenario() -> None:
        held: list[Any] = []
        try:
            # One client behind the proxy takes its whole share; another one is its own client.
            for peer, client, expect in [
                (PROXY, "198.51.100.1", PER_CLIENT),
                (PROXY, "198.51.100.2", PER_CLIENT),
                (UNTRUSTED, "203.0.113.1", PER_CLIENT),  # untrusted peer: header ignored,
            ]:
                got, refused = await hoard(url, peer, PER_CLIENT + 5, **xff(client))
                held += got
                assert len(got) == expect, (peer, client, refused)
                assert refused == {"too_many_sessions_from_client": 5}, refused
            got, refused = await hoard(url, UNTRUSTED, 5, **xff("203.0.113.2"))  # still the peer
            held += got
            assert not got and refused == {"too_many_sessions_from_client": 5}, refused
        finally:
            await asyncio.gather(*(ws.close() for ws, _ in held))

    asyncio.run(scenario())
