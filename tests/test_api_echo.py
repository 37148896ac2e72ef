"""``WS /echo`` against a real uvicorn server: sessions, resume, reset, refusals, limits, readiness.

Most tests run against both session stores (``echo_server``: the session-wide ``live_server``
with sessions in memory, and ``live_redis_server`` with them in a real Redis); the TTL /
session-cap and readiness tests start servers of their own. ``tests/test_echo_redis.py`` has
what only Redis does (several servers, crashes, Redis outages).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pydantic
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from app.schemas.echo import EchoFrame, ErrorFrame, ResetAckFrame, SessionFrame
from tests.live_server import (
    REPO,
    SERVER_COMMAND,
    LiveServer,
    free_port,
    start_server,
    wait_until,
)
from tests.metrics import sample_value

pytestmark = pytest.mark.slow


@pytest.fixture(params=["memory", "redis"])
def echo_server(request: pytest.FixtureRequest) -> LiveServer:
    """The shared server with echo sessions in memory, or the one with them in Redis."""
    name = "live_server" if request.param == "memory" else "live_redis_server"
    return request.getfixturevalue(name)


@contextmanager
def session(server: LiveServer, query: str = "") -> Iterator[tuple[ClientConnection, dict]]:
    """An open ``/echo`` connection and its first (session) frame."""
    with connect(f"{server.ws_url}/echo{query}", proxy=None, compression=None) as ws:
        yield ws, json.loads(ws.recv(timeout=10))


def resume_query(frame: dict) -> str:
    return f"?session_id={frame['session_id']}&token={frame['token']}"


def send_bits(ws: ClientConnection, bits: list[int]) -> dict:
    ws.send(json.dumps({"bits": bits}))
    reply = json.loads(ws.recv(timeout=10))
    assert reply["type"] == "echo", reply
    assert len(reply["probabilities"]) == len(reply["bits"]) == len(bits)
    return reply


def stream(ws: ClientConnection, bits: list[int], sizes: list[int]) -> list[float]:
    """Send ``bits`` in messages of ``sizes``; the probabilities of all replies in order."""
    probs: list[float] = []
    for start, size in zip(_offsets(sizes), sizes, strict=True):
        probs += send_bits(ws, bits[start : start + size])["probabilities"]
    return probs


def _offsets(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out


def random_sizes(rng: random.Random, total: int, largest: int) -> list[int]:
    sizes = []
    while total > 0:
        sizes.append(min(total, rng.randint(1, largest)))
        total -= sizes[-1]
    return sizes


def refusal(server: LiveServer, query: str = "") -> tuple[int, str]:
    """Connect and expect an immediate close: its (code, reason)."""
    with connect(f"{server.ws_url}/echo{query}", proxy=None) as ws, pytest.raises(ConnectionClosed):
        ws.recv(timeout=10)
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason or ""


def test_session_frame(echo_server: LiveServer) -> None:
    with session(echo_server) as (_, frame):
        assert frame["type"] == "session" and frame["resumed"] is False
        assert frame["echo_step"] == 3 and frame["seq"] == 0
        assert len(frame["session_id"]) >= 20 and len(frame["token"]) >= 40


def test_resumed_stream_equals_unbroken_stream_and_echoes_input(echo_server: LiveServer) -> None:
    rng = random.Random(1234)
    bits = [rng.randint(0, 1) for _ in range(10_007)]
    with session(echo_server) as (ws, _):
        unbroken = stream(ws, bits, random_sizes(rng, len(bits), 97))

    sizes = random_sizes(rng, len(bits), 97)
    split_at = sorted(rng.sample(range(1, len(sizes)), 5))
    pieces = [sizes[a:b] for a, b in zip([0, *split_at], [*split_at, len(sizes)], strict=True)]
    resumed, seqs, query, offset = [], [], "", 0
    for i, piece in enumerate(pieces):
        with session(echo_server, query) as (ws, frame):
            assert frame["resumed"] is (i > 0) and frame["seq"] == len(seqs)
            query = resume_query(frame)
            for size in piece:
                reply = send_bits(ws, bits[offset : offset + size])
                resumed += reply["probabilities"]
                seqs.append(reply["seq"])
                offset += size
    assert seqs == list(range(1, len(sizes) + 1))  # seq continues across reconnects
    assert len(resumed) == len(unbroken) == len(bits)
    assert max(abs(a - b) for a, b in zip(resumed, unbroken, strict=True)) <= 1e-6
    predicted = [int(p > 0.5) for p in resumed]
    assert predicted == [0, 0, 0, *bits[:-3]]  # the input delayed by echo_step


def test_reset_returns_to_the_initial_state(echo_server: LiveServer) -> None:
    rng = random.Random(7)
    probe = [rng.randint(0, 1) for _ in range(40)]
    with session(echo_server) as (fresh, _):
        expected = send_bits(fresh, probe)
    with session(echo_server) as (ws, _):
        send_bits(ws, [1, 1, 0, 1, 1])
        ws.send('{"type": "reset"}')
        assert json.loads(ws.recv(timeout=10)) == {"type": "reset"}
        after = send_bits(ws, probe)
    assert after["probabilities"] == expected["probabilities"]
    assert after["bits"] == expected["bits"] == [0, 0, 0, *probe[:-3]]
    assert after["seq"] == 2  # seq counts echo replies and is not reset


def test_refusals_carry_a_close_code_and_reason(echo_server: LiveServer) -> None:
    with session(echo_server) as (ws, frame):
        send_bits(ws, [1, 0, 1])
        code, reason = refusal(echo_server, resume_query(frame))  # still attached here
        assert (code, reason.split(":")[0]) == (1013, "session_in_use")
    code, reason = refusal(echo_server, f"?session_id={frame['session_id']}&token=wrong")
    assert (code, reason.split(":")[0]) == (1008, "invalid_token")
    code, reason = refusal(echo_server, f"?session_id=nope&token={frame['token']}")
    assert (code, reason.split(":")[0]) == (1008, "session_not_found")
    code, reason = refusal(echo_server, f"?session_id={frame['session_id']}")
    assert (code, reason.split(":")[0]) == (1008, "invalid_resume")
    with session(echo_server, resume_query(frame)) as (ws, again):  # the refusals changed nothing
        assert again["resumed"] and again["seq"] == 1
        assert send_bits(ws, [0, 0, 0])["bits"] == [1, 0, 1]


def test_resume_with_last_seq_resends_the_missed_replies(echo_server: LiveServer) -> None:
    """``&last_seq=N`` re-sends the echo frames after N, exactly as first sent (text equal)."""
    with session(echo_server) as (ws, frame):
        sent = []
        for bits in ([1, 0], [1, 1, 1], [0], [1, 0, 0, 1], [1]):
            ws.send(json.dumps({"bits": bits}))
            sent.append(ws.recv(timeout=10))
    query = resume_query(frame)
    with session(echo_server, f"{query}&last_seq=3") as (ws, again):
        assert again["resumed"] and again["seq"] == 5
        assert [ws.recv(timeout=10), ws.recv(timeout=10)] == sent[3:]  # seq 4 and 5, verbatim
        assert send_bits(ws, [0, 0, 0])["seq"] == 6  # then the stream goes on
    with session(echo_server, f"{query}&last_seq=6") as (ws, again):
        assert again["seq"] == 6
        assert send_bits(ws, [1])["seq"] == 7  # nothing missed, nothing re-sent
    code, reason = refusal(echo_server, f"{query}&last_seq=8")  # ahead of the session
    assert (code, reason.split(":")[0]) == (1008, "invalid_last_seq")
    code, reason = refusal(echo_server, f"{query}&last_seq=1")  # only the last 4 are kept
    assert (code, reason.split(":")[0]) == (1008, "replay_unavailable")
    code, reason = refusal(echo_server, f"{query}&last_seq=-1")
    assert (code, reason.split(":")[0]) == (1008, "invalid_resume")
    code, reason = refusal(echo_server, "?last_seq=0")  # without a session
    assert (code, reason.split(":")[0]) == (1008, "invalid_resume")
    with session(echo_server, f"{query}&last_seq=7") as (ws, again):  # the refusals let go
        assert again["seq"] == 7


MALFORMED: list[tuple[str | bytes, str]] = [
    (b'{"bits": [1]}', "binary_frame"),
    ("not json", "invalid_json"),
    ("", "invalid_json"),
    ("[0, 1]", "invalid_frame"),
    ('"bits"', "invalid_frame"),
    ('{"type": "bogus"}', "unknown_type"),
    ('{"type": 5, "bits": [1]}', "unknown_type"),
    ("{}", "missing_bits"),
    ('{"type": "bits"}', "missing_bits"),
    ('{"bits": null}', "invalid_bits"),
    ('{"bits": "0101"}', "invalid_bits"),
    ('{"bits": []}', "empty_bits"),
    ('{"bits": [0, 2]}', "invalid_bits"),
    ('{"bits": [-1]}', "invalid_bits"),
    ('{"bits": [256]}', "invalid_bits"),
    ('{"bits": [1e3]}', "invalid_bits"),
    ('{"bits": [1e400]}', "invalid_json"),
    ('{"bits": [true, false]}', "invalid_bits"),
    ('{"bits": [1, true]}', "invalid_bits"),
    ('{"bits": [1.0]}', "invalid_bits"),
    ('{"bits": [0, "1"]}', "invalid_bits"),
    ('{"bits": [[1]]}', "invalid_bits"),
    (json.dumps({"bits": [1] * 4097}), "too_many_bits"),
]


def test_malformed_frames_get_error_frames_and_leave_the_session_intact(
    echo_server: LiveServer,
) -> None:
    rng = random.Random(3)
    bits = [rng.randint(0, 1) for _ in range(60)]
    with session(echo_server) as (ws, _):
        expected = stream(ws, bits, [20, 20, 20])
    got: list[float] = []
    with session(echo_server) as (ws, _):
        for i, (frame, code) in enumerate(MALFORMED):
            if i in (0, len(MALFORMED) // 3, 2 * len(MALFORMED) // 3):
                got += send_bits(ws, bits[len(got) : len(got) + 20])["probabilities"]
            ws.send(frame)
            reply = json.loads(ws.recv(timeout=10))
            assert (reply["type"], reply["code"]) == ("error", code), frame[:80]
            assert reply["detail"]
        assert send_bits(ws, [0, 1])["seq"] == 4  # errors take no seq
    assert got == expected


def test_every_server_frame_matches_its_documented_schema(echo_server: LiveServer) -> None:
    """The pydantic frames in app/schemas/echo.py are the protocol's documentation: keep them true
    (same fields, values that validate) for every kind of frame the server sends."""

    def check(model: type[pydantic.BaseModel], frame: dict) -> None:
        assert set(frame) == set(model.model_fields), (model.__name__, frame)
        model.model_validate(frame, strict=True)

    with session(echo_server) as (ws, frame):
        check(SessionFrame, frame)
        check(EchoFrame, send_bits(ws, [1, 0, 1]))
        ws.send('{"type": "reset"}')
        check(ResetAckFrame, json.loads(ws.recv(timeout=10)))
        for bad, _ in MALFORMED:
            ws.send(bad)
            check(ErrorFrame, json.loads(ws.recv(timeout=10)))


def test_ttl_eviction_and_session_cap(tmp_path: Path) -> None:
    """Only attached sessions fill the server; at the cap the LRU detached one makes room."""
    env = {"ECHO_SESSION_TTL_S": "2", "ECHO_MAX_SESSIONS": "2"}
    with start_server(tmp_path, env=env) as server:
        with session(server) as (a, frame_a), session(server) as (b, frame_b):
            code, reason = refusal(server)
            assert code == 1013 and reason.startswith("too_many_sessions:")
            assert send_bits(a, [1, 0, 0, 0])["bits"] == [0, 0, 0, 1]  # others unaffected
            assert send_bits(b, [1])["seq"] == 1
        # b detached first, then a; resuming a makes b the least recently used.
        with session(server, resume_query(frame_a)) as (a, again):  # within the TTL
            assert again["resumed"] and send_bits(a, [1])["seq"] == 2
        with session(server) as (_, fresh):  # full of detached sessions: b is evicted
            assert fresh["resumed"] is False
        code, reason = refusal(server, resume_query(frame_b))
        assert code == 1008 and reason.startswith("session_evicted:")

        def evicted(why: str) -> float:
            text = httpx.get(f"{server.base_url}/metrics").text
            return sample_value(text, "echo_sessions_evicted_total", why=why) or 0.0

        assert evicted("lru") == 1
        wait_until(lambda: evicted("ttl") >= 2, 30, "the sweeper to evict a and fresh", server)
        code, reason = refusal(server, resume_query(frame_a))
        assert code == 1008 and reason.startswith("session_not_found:")
        with session(server) as (_, fresh):
            assert fresh["resumed"] is False
        metrics = httpx.get(f"{server.base_url}/metrics").text
        assert sample_value(metrics, "echo_stored_sessions") == 1


SITECUSTOMIZE = """
import os, time
import tensorflow as tf

_load, _gate = tf.saved_model.load, os.environ["TEST_MODEL_LOAD_GATE"]

def _gated_load(*args, **kwargs):
    while not os.path.exists(_gate):
        time.sleep(0.02)
    return _load(*args, **kwargs)

tf.saved_model.load = _gated_load
"""


def test_readiness_follows_model_loading(tmp_path: Path) -> None:
    """/readyz is 503 (and /echo refused with 1013) until the models load, then 200."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)  # holds model loading at a gate
    gate = tmp_path / "gate"
    env = {
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(tmp_path), str(REPO), os.environ.get("PYTHONPATH")])
        ),
        "TEST_MODEL_LOAD_GATE": str(gate),
    }
    with start_server(tmp_path, env=env, wait_ready=False) as server:
        response = httpx.get(f"{server.base_url}/readyz")
        assert response.status_code == 503 and response.json()["status"] == "loading"
        code, reason = refusal(server)
        assert code == 1013 and reason.startswith("not_ready:")
        gate.touch()
        wait_until(
            lambda: httpx.get(f"{server.base_url}/readyz").status_code == 200, 90, "ready", server
        )
        with session(server) as (ws, _):
            assert send_bits(ws, [1, 1, 1, 1])["bits"] == [0, 0, 0, 1]


def test_missing_model_dir_stops_the_server_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-models-here"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "MODEL_DIR": str(missing)}
    env["PORT"] = str(free_port())
    env["GRPC_PORT"] = "0"  # not the default 8001, which a running stack may hold
    cmd = SERVER_COMMAND
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert str(missing) in done.stdout + done.stderr
