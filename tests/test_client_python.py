"""The Python client (clients/python): built as a wheel, installed into a fresh virtual
environment with nothing but its dependencies, and run there against the real servers
(tests/client_scenario.py is the client side). Echo streams must hand every reply to the
application exactly once, in order, equal to an unbroken stream's, through connections cut
mid-frame, a SIGKILLed server (two servers on one Redis) and a client process killed and
restarted with its file store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.schemas.digits import EXAMPLE_IMAGE
from tests.live_server import REPO, LiveServer, RedisServer, free_port, start_server, wait_until
from tests.redis_server import running_redis

pytestmark = pytest.mark.slow

SCENARIO = REPO / "tests" / "client_scenario.py"
API_KEY = "client-test-key"
FAST_FAILOVER = {"ECHO_LEASE_S": "1.5", "ECHO_STORE_TIMEOUT_S": "0.5"}


@pytest.fixture(scope="session")
def client_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Python of a new venv holding only the client's wheel and what it depends on."""
    root = tmp_path_factory.mktemp("client")
    source = root / "src"
    shutil.copytree(REPO / "clients" / "python", source, ignore=shutil.ignore_patterns("build"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", root / "dist", source], check=True)
    (wheel,) = (root / "dist").glob("rnn_serving_client-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        meta = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "rnn_serving_client/py.typed" in names
    requires = sorted(
        line.split()[1] for line in meta.splitlines() if line.startswith("Requires-Dist")
    )
    assert [r.split(">")[0].split("<")[0] for r in requires] == ["httpx", "websockets"], requires
    subprocess.run([sys.executable, "-m", "venv", root / "venv"], check=True)
    python = root / "venv" / "bin" / "python"
    subprocess.run([python, *pip[1:], "install", wheel], check=True, timeout=300)
    return python


def scenario(python: Path, mode: str, cfg: dict[str, Any], timeout: float = 120) -> dict:
    """Run a client scenario in the client's venv (isolated: ``-I``, nothing of the repo)."""
    run = subprocess.run(
        [python, "-I", SCENARIO, mode, json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=python.parent,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def replies(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def same_stream(got: list[dict], want: list[dict], count: int) -> None:
    """Exactly once, in order, and equal to the unbroken stream ``want``."""
    assert [r["seq"] for r in got] == list(range(1, count + 1))
    assert [r["bits"] for r in got] == [r["bits"] for r in want]
    worst = max(
        abs(a - b)
        for g, w in zip(got, want, strict=True)
        for a, b in zip(g["probabilities"], w["probabilities"], strict=True)
    )
    assert worst <= 1e-5


def reference(python: Path, server: LiveServer, tmp_path: Path, **cfg: Any) -> list[dict]:
    """The same messages streamed to ``server`` with nothing in the way."""
    out = tmp_path / "reference.jsonl"
    scenario(python, "stream", {"urls": [server.base_url], "out": str(out), **cfg})
    got = replies(out)
    bits = [b for r in got for b in r["bits"]]
    sent = [b for m in _messages(cfg["seed"], cfg["count"], cfg["bits"]) for b in m]
    assert bits == [0, 0, 0, *sent[:-3]]  # the echo, 3 steps late: the reference is sound
    return got


def _messages(seed: int, count: int, bits: int) -> list[list[int]]:  # as client_scenario.py
    rng = random.Random(seed)
    return [[rng.randint(0, 1) for _ in range(bits)] for _ in range(count)]


class CuttingProxy:
    """A TCP proxy (asyncio, on its own thread) to 127.0.0.1:``upstream``. Each connection is
    cut with a TCP reset on both sides after a random 1,500 to 3,000 bytes sent to the client
    (mid-frame: past the handshake, the session frame and up to 4 replays, ~1,300 bytes), until
    ``cuts`` connections were cut; later ones are left alone."""

    def __init__(self, upstream: int, cuts: int, seed: int = 1) -> None:
        self.upstream, self.target, self.rng = upstream, cuts, random.Random(seed)
        self.cuts = self.connections = 0
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> CuttingProxy:
        self.thread.start()
        coro = asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.server = asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        budget = self.rng.randint(1500, 3000) if self.cuts < self.target else None
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)

        def cut() -> None:
            for w in (writer, up_writer):
                with contextlib.suppress(OSError):
                    w.get_extra_info("socket").setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                w.transport.abort()  # SO_LINGER 0: a reset, not a close

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, down: bool) -> None:
            nonlocal budget
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    if down and budget is not None and self.cuts < self.target:
                        if len(data) >= budget:
                            dst.write(data[:budget])
                            await dst.drain()
                            self.cuts += 1
                            cut()
                            return
                        budget -= len(data)
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))


@pytest.fixture(scope="module")
def client_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of these tests' own, which they stop and start again."""
    with running_redis(tmp_path_factory.mktemp("client_redis")) as server:
        yield server


@pytest.fixture(scope="module")
def kill_pair(
    tmp_path_factory: pytest.TempPathFactory, client_redis: RedisServer
) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two servers on the same Redis, API keys required, leases of 1.5 s, idle connections closed
    after 1.5 s; started together."""
    env = {
        "ECHO_STORE_URL": client_redis.url,
        "API_KEYS": API_KEY,
        "ECHO_IDLE_TIMEOUT_S": "1.5",
        **FAST_FAILOVER,
    }
    logs = tmp_path_factory.mktemp("kill_pair")
    with (
        start_server(logs, env, wait_ready=False) as a,
        start_server(logs, env, wait_ready=False) as b,
    ):
        for server in (a, b):
            ready = lambda s=server: httpx.get(f"{s.base_url}/readyz").status_code == 200  # noqa: E731
            wait_until(ready, 120, "readyz", server)
        yield a, b


def test_the_wheel_installs_alone(client_python: Path) -> None:
    """Only httpx, websockets and theirs: no NumPy, no TensorFlow; the package is typed."""
    code = (
        "import importlib.metadata as m, json, pathlib, rnn_serving_client as r; "
        "print(json.dumps([sorted(d.metadata['Name'].lower() for d in m.distributions()), "
        "(pathlib.Path(r.__file__).parent / 'py.typed').exists(), r.__file__]))"
    )
    run = subprocess.run([client_python, "-I", "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    names, typed, where = json.loads(run.stdout)
    assert typed and str(client_python.parent.parent) in where
    assert "httpx" in names and "websockets" in names and "rnn-serving-client" in names
    assert not {"numpy", "tensorflow", "tensorflow-cpu", "rnn-serving"} & set(names), names


def test_errors_store_and_reprs(client_python: Path, tmp_path: Path) -> None:
    assert scenario(client_python, "units", {"dir": str(tmp_path)}) == {"ok": True}


def test_digits(client_python: Path, live_server: LiveServer, tmp_path: Path) -> None:
    from PIL import Image, ImageDraw

    picture = tmp_path / "one.png"
    paper = Image.new("L", (120, 160), 255)
    ImageDraw.Draw(paper).line([(60, 20), (60, 140)], fill=0, width=12)  # a dark "1"
    paper.save(picture)
    got = scenario(
        client_python,
        "digits",
        {"urls": [live_server.base_url], "image": EXAMPLE_IMAGE, "picture": str(picture)},
    )
    direct = httpx.post(f"{live_server.base_url}/predict/digit", json={"image": EXAMPLE_IMAGE})
    assert got["one"] == [
        direct.json()["digit"],
        direct.json()["probabilities"],
        "mnist_lstm",
        direct.json()["model"]["version"],
    ]
    assert got["batch"][0] == got["batch"][2] == got["one"][0] and got["batch_close"] <= 1e-5
    assert got["floats_close"] <= 1e-5  # 0–1 floats were sent with pixel_scale 1
    assert got["picture"] == 1
    assert got["errors"] == {
        "shape": ["InvalidInput", "invalid_shape", 422, True],
        "pixels": ["InvalidInput", "invalid_pixels", 422, True],
        "version": ["NotFound", "version_not_found", 404, True],
        "picture": ["InvalidInput", "unsupported_image", 415, True],
    }
    assert ["mnist_lstm", 1] in got["models"] and ["echo_rnn", 1] in got["models"]
    assert got["echo_store"] == "memory" and got["health"] == [True, True, "ready"]


@pytest.mark.parametrize("server", ["live_server", "live_redis_server"])
def test_echo_exactly_once_through_cut_connections(
    server: str, client_python: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Eight connections in a row reset mid-frame (replies lost on the way, messages in
    flight): every reply still reaches the application once, in order; the token is in no
    log line (DEBUG, websockets' handshakes included) and no repr."""
    live: LiveServer = request.getfixturevalue(server)
    plan = {"seed": 5, "count": 160, "bits": 10}
    want = reference(client_python, live, tmp_path, **plan)
    out = tmp_path / "cut.jsonl"
    with CuttingProxy(live.port, cuts=8) as proxy:
        got = scenario(
            client_python,
            "stream",
            {"urls": [proxy.url], "out": str(out), "secrets": True, **plan},
        )
    assert proxy.cuts == 8 and got["connections"] == 9, (proxy.cuts, got)
    same_stream(replies(out), want, plan["count"])
    assert got["redacted_in_logs"] and got["log_lines"] > 20
    assert not got["token_in_logs"] and not got["token_in_reprs"]


def test_echo_sigkilled_server_two_servers_one_redis(
    client_python: Path, kill_pair: tuple[LiveServer, LiveServer], tmp_path: Path
) -> None:
    """The issue's done-when: 2,000 bits (200 messages × 10) through two Redis-backed servers,
    the serving one SIGKILLed midway, arrive exactly once and equal an unbroken stream."""
    a, b = kill_pair
    plan = {"seed": 26, "count": 200, "bits": 10, "api_key": API_KEY}
    out = tmp_path / "killed.jsonl"
    cfg = {"urls": [a.base_url, b.base_url], "out": str(out), "delay": 0.01, **plan}
    child = subprocess.Popen(
        [client_python, "-I", SCENARIO, "stream", json.dumps(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: out.exists() and out.read_text().count("\n") >= 70, 60, "70 replies")
        os.kill(a.pid, signal.SIGKILL)
        stdout, stderr = child.communicate(timeout=90)
    finally:
        child.kill()
    assert child.returncode == 0, stderr[-4000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["connections"] == 2, result  # the second one on b, after the lease lapsed
    assert {"connection_failed", "session_in_use"} <= set(result["retried"]), result
    want = reference(client_python, b, tmp_path, **plan)
    same_stream(replies(out), want, plan["count"])

    keys = scenario(client_python, "keys", {"urls": [b.base_url], "api_key": API_KEY})
    assert keys == {
        "http": ["unauthorized", 401],
        "echo": ["unauthorized", 1008],
        "with_key": "mnist_lstm",
    }


def test_echo_redis_down_and_back(
    client_python: Path,
    kill_pair: tuple[LiveServer, LiveServer],
    client_redis: RedisServer,
    tmp_path: Path,
) -> None:
    """Redis stops mid-stream for 2 s: the message in flight is refused (error frame, 1013
    ``store_unavailable``), new attaches too; the stream retries until Redis is back and the
    dead connection's lease has lapsed, and the replies are still exactly the unbroken stream."""
    b = kill_pair[1]
    plan = {"seed": 13, "count": 120, "bits": 10, "api_key": API_KEY}
    out = tmp_path / "outage.jsonl"
    cfg = {"urls": [b.base_url], "out": str(out), "delay": 0.02, **plan}
    child = subprocess.Popen(
        [client_python, "-I", SCENARIO, "stream", json.dumps(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: out.exists() and out.read_text().count("\n") >= 30, 60, "30 replies")
        client_redis.stop()
        time.sleep(2)
        client_redis.start()
        stdout, stderr = child.communicate(timeout=90)
    finally:
        child.kill()
        if not client_redis.answers():
            client_redis.start()
    assert child.returncode == 0, stderr[-4000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["connections"] >= 2 and "store_unavailable" in result["retried"], result
    same_stream(replies(out), reference(client_python, b, tmp_path, **plan), plan["count"])


def test_echo_idle_connection_closed_by_the_server(
    client_python: Path, kill_pair: tuple[LiveServer, LiveServer]
) -> None:
    got = scenario(
        client_python,
        "idle",
        {"urls": [kill_pair[1].base_url], "api_key": API_KEY, "sleep": 4},
    )
    assert got == {"seqs": [1, 2], "idle_connections": 1, "connections": 2}


def test_echo_client_process_restarted_with_its_file_store(
    client_python: Path, live_redis_server: LiveServer, tmp_path: Path
) -> None:
    """A client process dies (``os._exit``) with messages in flight; a new process with the
    same FileSessionStore resumes the session: the replies of both processes together are the
    stream, exactly once, in order."""
    plan = {"seed": 9, "count": 80, "bits": 10}
    out, store = tmp_path / "restarted.jsonl", tmp_path / "session.json"
    cfg = {"urls": [live_redis_server.base_url], "out": str(out), "store": str(store), **plan}
    first = subprocess.run(
        [client_python, "-I", SCENARIO, "stream", json.dumps({**cfg, "exit_after": 33})],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.returncode == 3, first.stderr[-4000:]
    assert len(replies(out)) == 33
    left = json.loads(store.read_text())
    assert left["pending"] or left["replies"], "nothing was in flight at the kill"
    assert oct(store.stat().st_mode & 0o777) == "0o600"
    second = scenario(client_python, "stream", cfg)
    assert second["recovered"] >= 1 and second["started_at"] > 33, second
    want = reference(client_python, live_redis_server, tmp_path, **plan)
    same_stream(replies(out), want, plan["count"])


def test_echo_session_in_use_is_retried_until_the_deadline(
    client_python: Path, live_server: LiveServer
) -> None:
    got = scenario(
        client_python,
        "attached_elsewhere",
        {"urls": [live_server.base_url], "dead_url": f"http://127.0.0.1:{free_port()}"},
    )
    assert got["in_use"] == "session_in_use" and 1.4 <= got["in_use_waited"] < 5, got
    assert got["first_goes_on"] == 2 and got["dead"] == "ConnectionFailed"
