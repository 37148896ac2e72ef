"""The real server (``python -m app``) in a subprocess on a free 127.0.0.1 port, for the tests.

Loaded as a pytest plugin (see ``addopts`` in pyproject.toml): the session-wide ``live_server``
fixture serves the shipped models; ``start_server(...)`` starts extra ones with other settings.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
SERVER_COMMAND = [sys.executable, "-m", "app"]  # settings from the environment (HOST, PORT, ...)


@dataclass
class LiveServer:
    base_url: str
    ws_url: str
    process: subprocess.Popen
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, server: LiveServer | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.process.poll() is not None:
            raise RuntimeError(f"server exited ({server.process.returncode}):\n{server.log_text()}")
        try:
            if predicate():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    tail = server.log_text()[-4000:] if server else ""
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{tail}")


@contextmanager
def start_server(
    log_dir: Path,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    timeout: float = 90,
    port: int | None = None,
) -> Iterator[LiveServer]:
    """Run ``python -m app`` with ``env`` added to the environment; stop it afterwards.

    ``port``: listen there (e.g. to restart a server where clients expect it), else a free one.
    """
    port = port or free_port()
    log_path = Path(log_dir) / f"server-{port}.log"
    full_env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "TIMEOUT_GRACEFUL_SHUTDOWN_S": "5",
        **(env or {}),
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            SERVER_COMMAND,
            cwd=REPO,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", proc, log_path)
    try:
        wait_until(
            lambda: httpx.get(f"{server.base_url}/livez").status_code == 200,
            timeout,
            "/livez",
            server,
        )
        if wait_ready:
            wait_until(
                lambda: httpx.get(f"{server.base_url}/readyz").status_code == 200,
                timeout,
                "/readyz",
                server,
            )
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The service with default settings and the shipped models, shared by the whole session."""
    with start_server(tmp_path_factory.mktemp("live_server")) as server:
        yield server
