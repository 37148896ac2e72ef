"""Operations endpoints of the real server: /livez, /v1/models, /metrics, and a broken model."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import orjson
import pytest
from websockets.sync.client import connect

from modelspec.contract import (
    DIGIT_INPUT,
    DIGIT_OUTPUT,
    DIGIT_SIGNATURE,
    ECHO_INITIAL_STATE_SIGNATURE,
    ECHO_STEP_SIGNATURE,
)
from tests.live_server import REPO, SERVER_COMMAND, LiveServer, free_port
from tests.metrics import sample_value

pytestmark = pytest.mark.slow  # every test here starts or uses a server


def metric(text: str, name: str, **labels: str) -> float:
    """The value of sample ``name`` with ``labels`` (0 when absent)."""
    return sample_value(text, name, **labels) or 0.0


def test_livez(live_server: LiveServer) -> None:
    assert httpx.get(f"{live_server.base_url}/livez").json() == {"status": "alive"}


def test_models_lists_versions_signatures_metrics_and_the_device(live_server: LiveServer) -> None:
    doc = httpx.get(f"{live_server.base_url}/v1/models").json()
    # The image may run on a CPU or a GPU: only the form is the same everywhere.
    assert re.fullmatch(r"CPU|GPU \(.+\)", doc["device"]), doc["device"]
    models = {m["name"]: m for m in doc["models"]}
    digit, echo = models["mnist_lstm"], models["echo_rnn"]
    assert digit["version"] >= 1 and echo["version"] >= 1 and digit["loaded"] and echo["loaded"]
    sig = digit["signatures"][DIGIT_SIGNATURE]
    assert sig["inputs"][DIGIT_INPUT] == {"dtype": "float32", "shape": [None, 28, 28]}
    assert sig["outputs"][DIGIT_OUTPUT] == {"dtype": "float32", "shape": [None, 10]}
    assert {ECHO_STEP_SIGNATURE, ECHO_INITIAL_STATE_SIGNATURE} <= set(echo["signatures"])
    assert digit["metrics"]["test_accuracy"] >= 0.99  # straight from metadata.json
    assert len(digit["metrics"]["test_per_class_accuracy"]) == 10
    shipped = orjson.loads((REPO / digit["path"] / "metadata.json").read_bytes())
    assert digit["metrics"]["test_accuracy"] == shipped["metrics"]["test_accuracy"]


def test_metrics_count_requests_model_calls_batches_and_sessions(live_server: LiveServer) -> None:
    url = live_server.base_url
    before = httpx.get(f"{url}/metrics").text
    ok = ("http_requests_total", {"method": "POST", "route": "/predict/digit", "status": "200"})
    calls = ("model_inference_calls_total", {"model": "mnist_lstm"})
    rows = ("model_batch_size_sum", {"model": "mnist_lstm"})
    reply = httpx.post(f"{url}/predict/digit", json={"images": [[0] * 784] * 3})
    assert reply.status_code == 200
    with connect(f"{live_server.ws_url}/echo") as ws:
        ws.recv()
        during = httpx.get(f"{url}/metrics").text
        assert metric(during, "echo_active_sessions") >= 1
        ws.send('{"bits": [1, 0, 1]}')
        ws.recv()
    after = httpx.get(f"{url}/metrics").text
    assert metric(after, ok[0], **ok[1]) == metric(before, ok[0], **ok[1]) + 1
    assert metric(after, calls[0], **calls[1]) >= metric(before, calls[0], **calls[1]) + 1
    assert metric(after, rows[0], **rows[1]) >= metric(before, rows[0], **rows[1]) + 3
    for name, labels in (
        ("http_request_duration_seconds_count", {"method": "POST", "route": "/predict/digit"}),
        ("model_queue_wait_seconds_count", {"model": "mnist_lstm"}),
        ("model_compute_seconds_count", {"model": "echo_rnn"}),
        ("echo_messages_total", {}),
    ):
        assert metric(after, name, **labels) > 0, name


@pytest.mark.parametrize("damage", ["saved_model.pb", "metadata.json"])
def test_a_broken_model_stops_the_server_naming_its_path(tmp_path: Path, damage: str) -> None:
    models = tmp_path / "models"
    shutil.copytree(REPO / "models", models)
    version = models / "echo_rnn" / "1"  # the version the shipped settings serve
    (version / damage).write_bytes(b"this is not a model")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "MODEL_DIR": str(models)}
    env["PORT"] = str(free_port())
    env["GRPC_PORT"] = "0"  # not the default 8001, which a running stack may hold
    cmd = SERVER_COMMAND
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert str(version) in done.stdout + done.stderr
