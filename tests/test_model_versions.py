"""Model versions while serving: hot loading under load, broken versions, SIGHUP, pins, policies.

Real servers on a temporary ``MODEL_DIR`` holding copies of the shipped models; a new version is
published the way the training scripts do it (written elsewhere, then renamed into place).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from app.services.version_policy import VersionPolicy
from tests.live_server import REPO, LiveServer, start_server, wait_until
from tests.test_api_echo import send_bits

pytestmark = pytest.mark.slow

SHIPPED = REPO / "models"
IMAGE = {"image": [[0] * 28] * 28}


def publish(model_dir: Path, name: str, version: int, source: int = 1) -> Path:
    """Copy shipped ``name``/``source`` in as ``version``: written aside, renamed into place."""
    target = model_dir / name / str(version)
    staging = model_dir / name / f".tmp-{version}"
    shutil.copytree(SHIPPED / name / str(source), staging)
    staging.rename(target)
    return target


def versions(server: LiveServer, name: str) -> dict[int, dict]:
    listing = httpx.get(f"{server.base_url}/v1/models").json()["models"]
    return {m["version"]: m for m in listing if m["name"] == name}


def state_of(server: LiveServer, name: str, version: int) -> str | None:
    found = versions(server, name).get(version)
    return found["state"] if found else None


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    for name in ("mnist_lstm", "echo_rnn"):
        (tmp_path / "models" / name).mkdir(parents=True)
        publish(tmp_path / "models", name, 1)
    return tmp_path / "models"


def test_policies() -> None:
    assert VersionPolicy.parse("latest").select([1, 2, 3]) == [3]
    assert VersionPolicy.parse("latest:2").select([3, 1, 2]) == [2, 3]
    assert VersionPolicy.parse("specific:1,3").select([1, 2, 3]) == [1, 3]
    assert VersionPolicy.parse("specific:4").select([1, 2, 3]) == []
    for bad in ("newest", "latest:0", "latest:x", "specific:", "specific:0"):
        with pytest.raises(ValueError, match="version policy"):
            VersionPolicy.parse(bad)


def test_a_new_version_under_load_drops_nothing(model_dir: Path, tmp_path: Path) -> None:
    """Digits at concurrency 32 and 50 echo streams while version 2 of both models appears:
    no request fails, every stream stays exact, new sessions get v2, v1 drains and unloads."""
    env = {"MODEL_DIR": str(model_dir), "MODEL_POLL_S": "0.5", "ECHO_SESSION_TTL_S": "1"}
    env["ECHO_MODEL_VERSIONS"] = "latest"  # the shipped setting pins version 1
    with start_server(tmp_path, env) as server:
        stop = threading.Event()
        statuses: list[int] = []
        served: set[int] = set()
        streams: dict[int, tuple[list[int], list[int], list[int]]] = {}  # bits, got, seqs
        errors: list[BaseException] = []

        def digits() -> None:
            with httpx.Client(base_url=server.base_url, timeout=30) as client:
                while not stop.is_set():
                    r = client.post("/predict/digit", json=IMAGE)
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        served.add(r.json()["model"]["version"])

        def echo(k: int) -> None:
            rng, bits, got, seqs = random.Random(k), [], [], []
            streams[k] = (bits, got, seqs)
            try:
                with connect(
                    f"{server.ws_url}/echo", proxy=None, source_address=("127.0.0.2", 0)
                ) as ws:  # another client address than the 32 digit clients (64 each at most)
                    assert json.loads(ws.recv(timeout=10))["model_version"] == 1
                    while not stop.is_set():
                        chunk = [rng.randint(0, 1) for _ in range(rng.randint(1, 20))]
                        reply = send_bits(ws, chunk)
                        bits += chunk
                        got += reply["bits"]
                        seqs.append(reply["seq"])
                        time.sleep(0.01)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=digits) for _ in range(32)]
        threads += [threading.Thread(target=echo, args=(k,)) for k in range(50)]
        for t in threads:
            t.start()
        wait_until(lambda: len(streams) == 50 and len(statuses) > 200, 60, "load", server)
        publish(model_dir, "mnist_lstm", 2)
        publish(model_dir, "echo_rnn", 2)
        wait_until(lambda: 2 in served, 120, "digits from version 2", server)
        wait_until(lambda: state_of(server, "echo_rnn", 2) == "available", 60, "echo v2", server)
        new = connect(f"{server.ws_url}/echo", proxy=None, source_address=("127.0.0.3", 0))
        with new as ws:  # new sessions: version 2
            assert json.loads(ws.recv(timeout=10))["model_version"] == 2
            assert send_bits(ws, [1, 0, 1, 1])["bits"] == [0, 0, 0, 1]
        assert state_of(server, "echo_rnn", 1) == "draining"  # live sessions keep it serving
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(30)
        assert not errors, errors[:3]
        assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
        for bits, got, seqs in streams.values():  # every stream exact, across the switch
            assert seqs == list(range(1, len(seqs) + 1))
            assert got == [0, 0, 0, *bits[:-3]]
        wait_until(
            lambda: (
                state_of(server, "mnist_lstm", 1) == state_of(server, "echo_rnn", 1) == "unloaded"
            ),
            60,
            "version 1 to drain and unload",
            server,
        )
        listing = versions(server, "mnist_lstm")
        assert listing[2]["state"] == "available" and listing[2]["default"] is True
        assert listing[1]["loaded"] is False

        # A broken version appears: refused with its reason; serving goes on, undisturbed.
        broken = model_dir / "mnist_lstm" / ".tmp-3"
        shutil.copytree(SHIPPED / "mnist_lstm" / "1", broken)
        for shard in (broken / "variables").glob("variables.data-*"):
            shard.write_bytes(shard.read_bytes()[:100])  # truncated weights
        broken.rename(model_dir / "mnist_lstm" / "3")
        wrong = model_dir / "echo_rnn" / ".tmp-3"
        shutil.copytree(SHIPPED / "mnist_lstm" / "1", wrong)  # a digit model as echo: no step
        meta = json.loads((wrong / "metadata.json").read_text())
        (wrong / "metadata.json").write_text(json.dumps({**meta, "state_dim": 4, "echo_step": 3}))
        wrong.rename(model_dir / "echo_rnn" / "3")
        wait_until(
            lambda: (
                state_of(server, "mnist_lstm", 3) == state_of(server, "echo_rnn", 3) == "failed"
            ),
            60,
            "the broken versions to fail",
            server,
        )
        assert "step" in versions(server, "echo_rnn")[3]["reason"]
        assert versions(server, "mnist_lstm")[3]["reason"]
        r = httpx.post(f"{server.base_url}/predict/digit", json=IMAGE)
        assert r.status_code == 200 and r.json()["model"]["version"] == 2
        with connect(f"{server.ws_url}/echo", proxy=None) as ws:
            assert json.loads(ws.recv(timeout=10))["model_version"] == 2
        metrics = httpx.get(f"{server.base_url}/metrics").text
        assert 'model_version_events_total{event="failed",model="mnist_lstm"} 1.0' in metrics


@pytest.fixture
def pinned(model_dir: Path, tmp_path: Path) -> Iterator[LiveServer]:
    env = {
        "MODEL_DIR": str(model_dir),
        "MODEL_POLL_S": "0",
        "DIGIT_MODEL_VERSIONS": "latest:2",
        "DIGIT_XLA": "false",
    }
    with start_server(tmp_path, env) as server:
        yield server


def test_sighup_rescans_and_versions_can_be_pinned(pinned: LiveServer, model_dir: Path) -> None:
    publish(model_dir, "mnist_lstm", 2)
    (model_dir / "mnist_lstm" / "5").mkdir()  # half-published: never loaded, reported
    time.sleep(1.0)
    assert state_of(pinned, "mnist_lstm", 2) is None  # no polling: nothing happened
    ignored = httpx.get(f"{pinned.base_url}/v1/models").json()["ignored"]
    assert "saved_model.pb" in ignored["mnist_lstm"]["5"]
    os.kill(pinned.pid, signal.SIGHUP)
    wait_until(lambda: state_of(pinned, "mnist_lstm", 2) == "available", 60, "SIGHUP", pinned)
    assert state_of(pinned, "mnist_lstm", 1) == "available"  # latest:2 keeps both
    url = f"{pinned.base_url}/predict/digit"
    for pin, want in ((None, 2), ("1", 1), ("2", 2)):
        params = {"version": pin} if pin else None
        r = httpx.post(url, json=IMAGE, params=params)
        assert r.status_code == 200 and r.json()["model"]["version"] == want
    missing = httpx.post(url, json=IMAGE, params={"version": "7"})
    assert missing.status_code == 404
    assert missing.json()["error"] == "version_not_found"
    assert "available: 1, 2" in missing.json()["detail"]
    assert httpx.post(url, json=IMAGE, params={"version": "x"}).status_code == 422
    v2 = httpx.get(f"{pinned.base_url}/v2/models/mnist_lstm").json()
    assert v2["versions"] == ["1", "2"]
    infer = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 28, 28],
                         "data": [0.0] * 784}]}  # fmt: skip
    r = httpx.post(f"{pinned.base_url}/v2/models/mnist_lstm/versions/1/infer", json=infer)
    assert r.status_code == 200 and r.json()["model_version"] == "1"
