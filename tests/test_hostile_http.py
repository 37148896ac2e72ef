"""Hostile clients at the server's edge, against the real server (``python -m app``).

WebSocket messages over ``ECHO_MAX_FRAME_BYTES`` close with 1009; compression is never negotiated.
``X-Forwarded-For`` is ignored unless the peer is one of ``TRUSTED_PROXIES`` (none by default).
"""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from app.api.echo import FrameError, parse_frame
from app.core.config import Settings
from tests.live_server import LiveServer

pytestmark = pytest.mark.slow

MAX_FRAME = Settings().echo_max_frame_bytes


@pytest.mark.parametrize("pad", ["x" * 70_000, "é" * 40_000])  # the second is over in bytes only
def test_a_websocket_message_over_the_frame_limit_closes_1009(
    live_server: LiveServer, pad: str
) -> None:
    with connect(f"{live_server.ws_url}/echo", proxy=None, max_size=None) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session"
        ws.send(json.dumps({"bits": [1], "pad": pad}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_a_message_of_exactly_the_limit_is_still_parsed(live_server: LiveServer) -> None:
    frame = json.dumps({"bits": [1, 0], "pad": ""})
    frame = frame.replace('""', '"' + "x" * (MAX_FRAME - len(frame)) + '"')
    assert len(frame.encode()) == MAX_FRAME
    with connect(f"{live_server.ws_url}/echo", proxy=None) as ws:
        ws.recv(timeout=10)
        ws.send(frame)
        assert json.loads(ws.recv(timeout=10))["type"] == "echo"


def test_permessage_deflate_is_not_negotiated_even_when_offered(live_server: LiveServer) -> None:
    with connect(f"{live_server.ws_url}/echo", proxy=None, compression="deflate") as ws:
        offered = ws.request.headers.get("Sec-WebSocket-Extensions")
        assert offered and "permessage-deflate" in offered
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        ws.recv(timeout=10)


def test_the_app_refuses_oversized_text_too_when_served_by_another_launcher() -> None:
    with pytest.raises(FrameError) as refused:
        parse_frame('{"bits": [1]}' + " " * MAX_FRAME, MAX_FRAME, 4096)
    assert refused.value.code == "frame_too_large"


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(live_server: LiveServer) -> None:
    headers = {"X-Forwarded-For": "203.0.113.9"}
    assert httpx.get(f"{live_server.base_url}/xff-probe", headers=headers).status_code == 404
    lines = [json.loads(x) for x in live_server.log_text().splitlines() if "/xff-probe" in x]
    assert lines and all(line["client"] == "127.0.0.1" for line in lines), lines
