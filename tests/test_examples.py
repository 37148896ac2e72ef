"""The examples in ``examples/`` run as documented against the real server.

They use the Python client (clients/python); here it is imported from its source tree, with the
repository's venv (which has its dependencies). tests/test_client_python.py tests the installed
wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.live_server import REPO, LiveServer

pytestmark = pytest.mark.slow

CLIENT_ENV = {**os.environ, "PYTHONPATH": str(REPO / "clients" / "python" / "src")}


def run_example(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=CLIENT_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("server", ["live_server", "live_redis_server"])
def test_echo_client_streams_resumes_and_checks_the_echo(
    server: str, request: pytest.FixtureRequest
) -> None:
    live: LiveServer = request.getfixturevalue(server)
    run = run_example("examples/echo_client.py", f"{live.ws_url}/echo")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "echoed 1000 bits, 3 steps late, over 2 connections"


def test_digits_client(live_server: LiveServer) -> None:
    run = run_example("examples/digits_client.py", live_server.base_url)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[1].startswith("one image: predicted 1 "), run.stdout
    assert lines[2] == "a batch: predicted [1, 7]", run.stdout
    assert lines[3] == "refused: invalid_shape (422)"
