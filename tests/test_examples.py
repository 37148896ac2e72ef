"""The examples in ``examples/`` run as documented against the real server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.live_server import REPO, LiveServer

pytestmark = pytest.mark.slow


def test_echo_client_streams_resumes_and_checks_the_echo(live_server: LiveServer) -> None:
    run = subprocess.run(
        [sys.executable, "examples/echo_client.py", f"{live_server.ws_url}/echo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("echoed 1000 bits, 3 steps late")
