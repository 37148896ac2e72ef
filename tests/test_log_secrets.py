"""No credential in any output of the server: echo resume tokens never reach its logs (issue 9).

A server of its own, at ``LOG_LEVEL=DEBUG``, goes through every echo flow that carries a token in
the URL (new sessions, resumes, a resume while attached, wrong and unknown tokens, half a resume
query, plain HTTP requests with credentials in the query); then everything it wrote to stdout and
stderr, uvicorn's handshake lines included, is searched for each secret.
"""

from __future__ import annotations

import json
import secrets
import signal
import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from app.core.logging import redact
from tests.live_server import start_server, wait_until
from tests.redis_cluster import running_cluster

pytestmark = pytest.mark.slow


def echo(ws_url: str, query: str = "", bits: int = 3) -> dict | None:
    """Connect to ``/echo{query}``, send ``bits`` bits; the session frame (None if refused)."""
    with connect(f"{ws_url}/echo{query}", proxy=None, compression=None) as ws:
        try:
            frame = json.loads(ws.recv(timeout=10))
        except ConnectionClosed:
            return None
        ws.send(json.dumps({"bits": [1] * bits}))
        assert json.loads(ws.recv(timeout=10))["type"] == "echo"
        return frame


def test_no_token_in_any_server_output(tmp_path: Path) -> None:
    secrets_seen: list[str] = []
    with start_server(tmp_path, {"LOG_LEVEL": "DEBUG"}) as server:
        ws_url, base = server.ws_url, server.base_url
        for _ in range(3):
            frame = echo(ws_url)
            assert frame is not None
            secrets_seen.append(frame["token"])
            query = f"?session_id={frame['session_id']}&token={frame['token']}"
            for _ in range(2):  # resumes
                again = echo(ws_url, query)
                assert again is not None and again["resumed"] is True
            with connect(f"{ws_url}/echo{query}", proxy=None) as ws:  # attached here …
                ws.recv(timeout=10)
                assert echo(ws_url, query) is None  # … so this resume is refused
        unknown, wrong = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        secrets_seen += [unknown, wrong]
        assert echo(ws_url, f"?session_id={frame['session_id']}&token={wrong}") is None
        assert echo(ws_url, f"?session_id={secrets.token_urlsafe(16)}&token={unknown}") is None
        half = secrets.token_urlsafe(32)
        secrets_seen.append(half)
        assert echo(ws_url, f"?token={half}") is None
        for param in ("token", "access_token", "key"):
            value = secrets.token_urlsafe(32)
            secrets_seen.append(value)
            httpx.get(f"{base}/echo?{param}={value}")
            httpx.get(f"{base}/livez?{param}={value}")
    output = server.log_text()
    leaked = [s for s in secrets_seen if s in output]
    assert not leaked, f"{len(leaked)} of {len(secrets_seen)} secrets are in the server's output"
    # Not vacuous: the handshakes were logged, with the query's values redacted.
    assert output.count("token=[redacted]") >= 9, output[-3000:]


def test_no_store_password_in_any_server_output(tmp_path: Path) -> None:
    """``ECHO_STORE_URL=redis+sentinel://:password@...`` (issue 24): the Redis password never
    reaches the server's output, through sessions, a write the replicas did not acknowledge, a
    failover, and a server given a wrong password (every store command fails)."""
    password, wrong = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    fast = {"ECHO_STORE_TIMEOUT_S": "0.5", "ECHO_STORE_CONNECT_TIMEOUT_S": "0.5"}
    with running_cluster(tmp_path / "cluster", password=password) as cluster:
        env = {
            "LOG_LEVEL": "DEBUG",
            "ECHO_STORE_URL": cluster.url,
            "ECHO_STORE_MIN_REPLICAS": "1",
            **fast,
        }
        assert password in cluster.url
        with start_server(tmp_path / "good", env) as server:
            frame = echo(server.ws_url)
            assert frame is not None
            query = f"?session_id={frame['session_id']}&token={frame['token']}"
            assert echo(server.ws_url, query) is not None
            primary = cluster.primary_port()
            replicas = [n for n in cluster.data if n.port != primary]
            for node in replicas:
                node.stop()
            assert echo(server.ws_url) is None  # not replicated: refused
            for node in replicas:
                node.start()
            cluster.wait_synced()
            cluster.node(primary).stop(signal.SIGKILL)
            wait_until(lambda: echo(server.ws_url) is not None, 30, "a failover", server)
            time.sleep(0.5)
        bad = cluster.url.replace(password, wrong)
        with start_server(
            tmp_path / "bad", {**env, "ECHO_STORE_URL": bad}, wait_ready=False
        ) as refused:
            assert echo(refused.ws_url) is None
    for output in (server.log_text(), refused.log_text()):
        assert password not in output and wrong not in output
    assert "echo session store unavailable" in server.log_text()  # not vacuous
    assert "not replicated" in server.log_text()
    assert "echo session store unavailable" in refused.log_text()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '1.2.3.4:5 - "WebSocket /echo?session_id=a-b_c&token=Xy_9-z" [accepted]',
            '1.2.3.4:5 - "WebSocket /echo?session_id=[redacted]&token=[redacted]" [accepted]',
        ),
        (
            "GET /metrics?ACCESS_TOKEN=k1&x=2 HTTP/1.1",
            "GET /metrics?ACCESS_TOKEN=[redacted]&x=2 HTTP/1.1",
        ),
        ("/v1/models?key=abc#frag", "/v1/models?key=[redacted]#frag"),
        ("a token=3 in prose, monkey=1", "a token=3 in prose, monkey=1"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected
