"""The examples in ``examples/`` run as documented against the real server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.live_server import REPO, LiveServer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("server", ["live_server", "live_redis_server"])
def test_echo_client_streams_resumes_and_checks_the_echo(
    server: str, request: pytest.FixtureRequest
) -> None:
    live: LiveServer = request.getfixturevalue(server)
    run = subprocess.run(
        [sys.executable, "examples/echo_client.py", f"{live.ws_url}/echo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "echoed 1000 bits, 3 steps late, over 2 connections"
