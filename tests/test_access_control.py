"""Optional access control against a real server: API keys, CORS and WebSocket origins (issue 9).

One server of its own runs with two ``API_KEYS`` and one ``CORS_ALLOW_ORIGINS`` entry; the
session-wide ``live_server`` shows the defaults (no key needed, no CORS, same-origin WebSockets).
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Iterator

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from app.core import api_keys
from tests.live_server import LiveServer, start_server

pytestmark = pytest.mark.slow
KEYS = (f"k1-{secrets.token_urlsafe(24)}", f"k2-{secrets.token_urlsafe(24)}")
APP_ORIGIN = "https://app.example"
IMAGE = {"image": [[0] * 28] * 28}
V2_INFER = {
    "inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]
}
PROTECTED = [
    ("GET", "/metrics", None),
    ("GET", "/v1/models", None),
    ("GET", "/v2/models/mnist_lstm", None),
    ("POST", "/predict/digit", IMAGE),  # the JSON fast path
    ("POST", "/v2/models/mnist_lstm/infer", V2_INFER),  # the v2 fast path
]
PUBLIC = [
    "/livez",
    "/readyz",
    "/v2/health/live",
    "/openapi.json",
    "/docs",
    "/",
    "/static/style.css",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = {"API_KEYS": ",".join(KEYS), "CORS_ALLOW_ORIGINS": APP_ORIGIN}
    with start_server(tmp_path_factory.mktemp("access"), env) as live:
        yield live


def call(
    server: LiveServer, method: str, path: str, body: object, **headers: str
) -> httpx.Response:
    return httpx.request(method, f"{server.base_url}{path}", json=body, headers=headers)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def open_echo(server: LiveServer, query: str = "", **kw: object) -> dict | tuple[int, str]:
    """Open ``/echo``: its session frame, or the (code, reason) it was closed with."""
    with connect(f"{server.ws_url}/echo{query}", proxy=None, **kw) as ws:  # type: ignore[arg-type]
        try:
            return json.loads(ws.recv(timeout=10))
        except ConnectionClosed:
            return ws.close_code or 0, ws.close_reason or ""


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_protected_routes_need_a_key(
    server: LiveServer, method: str, path: str, body: object
) -> None:
    for headers in (
        {},
        bearer("wrong"),
        bearer(KEYS[0][:-1]),
        {"Authorization": f"Basic {KEYS[0]}"},
    ):
        reply = call(server, method, path, body, **headers)
        assert reply.status_code == 401, (headers, reply.text)
        assert reply.json()["error"] == "unauthorized" and "Bearer" in reply.json()["detail"]
        assert reply.headers["www-authenticate"] == "Bearer"
    # The query parameter is for WebSockets only.
    assert call(server, method, f"{path}?access_token={KEYS[0]}", body).status_code == 401
    for key in KEYS:
        assert call(server, method, path, body, **bearer(key)).status_code == 200


def test_an_upload_needs_a_key(server: LiveServer) -> None:
    files = {"file": ("a.png", b"\x89PNG\r\n\x1a\n", "image/png")}
    assert httpx.post(f"{server.base_url}/predict/digit", files=files).status_code == 401
    reply = httpx.post(f"{server.base_url}/predict/digit", files=files, headers=bearer(KEYS[1]))
    assert reply.status_code == 415  # past the guard: the (bad) picture itself is judged


@pytest.mark.parametrize("path", PUBLIC)
def test_public_routes_need_no_key(server: LiveServer, path: str) -> None:
    assert httpx.get(f"{server.base_url}{path}").status_code == 200


def test_echo_needs_a_key_in_a_header_or_the_query(server: LiveServer) -> None:
    code, reason = open_echo(server)  # type: ignore[misc]
    assert (code, reason.split(":")[0]) == (1008, "unauthorized")
    assert open_echo(server, "?access_token=wrong")[0] == 1008  # type: ignore[index]
    frame = open_echo(server, additional_headers=bearer(KEYS[0]))
    assert isinstance(frame, dict) and frame["type"] == "session"
    frame = open_echo(server, f"?access_token={KEYS[1]}")
    assert isinstance(frame, dict) and frame["type"] == "session"
    resume = f"?session_id={frame['session_id']}&token={frame['token']}&access_token={KEYS[1]}"
    again = open_echo(server, resume)
    assert isinstance(again, dict) and again["resumed"] is True


def test_echo_origins(server: LiveServer) -> None:
    auth = {"additional_headers": bearer(KEYS[0])}
    code, reason = open_echo(server, origin="https://evil.example", **auth)  # type: ignore[misc]
    assert (code, reason.split(":")[0]) == (1008, "origin_not_allowed")
    for origin in (APP_ORIGIN, server.base_url):  # listed, and the service's own
        frame = open_echo(server, origin=origin, **auth)
        assert isinstance(frame, dict) and frame["type"] == "session", origin


def test_cors(server: LiveServer) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    ok = httpx.options(
        f"{server.base_url}/predict/digit", headers={"Origin": APP_ORIGIN, **preflight}
    )
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == APP_ORIGIN
    evil = httpx.options(
        f"{server.base_url}/predict/digit", headers={"Origin": "https://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in evil.headers
    # A refusal carries the CORS headers too, so the page can read why.
    refused = call(server, "POST", "/predict/digit", IMAGE, Origin=APP_ORIGIN)
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == APP_ORIGIN


def test_keys_never_reach_the_logs(server: LiveServer) -> None:
    open_echo(server, f"?access_token={KEYS[0]}")
    call(server, "GET", f"/metrics?access_token={KEYS[1]}", None)
    log = server.log_text()
    assert "access_token=[redacted]" in log
    assert not any(key in log for key in KEYS)


def test_defaults_are_open_but_same_origin(live_server: LiveServer) -> None:
    assert httpx.get(f"{live_server.base_url}/metrics").status_code == 200
    reply = httpx.get(f"{live_server.base_url}/livez", headers={"Origin": APP_ORIGIN})
    assert "access-control-allow-origin" not in reply.headers
    code, reason = open_echo(live_server, origin=APP_ORIGIN)  # type: ignore[misc]
    assert (code, reason.split(":")[0]) == (1008, "origin_not_allowed")
    for kw in ({}, {"origin": live_server.base_url}):  # no Origin (not a browser), same origin
        frame = open_echo(live_server, **kw)
        assert isinstance(frame, dict) and frame["type"] == "session"


def test_every_key_is_compared_whatever_the_input(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = api_keys.ApiKeys(["alpha", "beta", "gamma"])
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(len(b))
        return real(a, b)

    monkeypatch.setattr(api_keys.hmac, "compare_digest", counting)
    for presented, expected in [
        ("alpha", True),
        ("gamma", True),
        ("alph", False),
        ("", False),
        (None, False),
    ]:
        calls.clear()
        assert keys.check(presented) is expected
        assert calls == [32, 32, 32]  # all keys, as fixed-length digests
    assert not api_keys.ApiKeys([]) and not api_keys.ApiKeys([""]).check("")
