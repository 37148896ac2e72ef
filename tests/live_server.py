"""The real server (``python -m app``) in a subprocess on a free 127.0.0.1 port, for the tests.

Loaded as a pytest plugin (see ``addopts`` in pyproject.toml): the session-wide ``live_server``
fixture serves the shipped models; ``start_server(...)`` starts extra ones with other settings.
Starting, waiting for /livez and /readyz and stopping belong to ``tests/servers.py``, which the
benchmarks use too; this module adds the tests' defaults, the fixture and ``wait_until``.

``redis`` is a real ``redis-server`` (``tests/redis_server.py``) for the whole session, and
``live_redis_server`` the service with its echo sessions in it (``ECHO_STORE_URL``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.redis_server import RedisServer, running_redis
from tests.servers import REPO, SERVER_COMMAND, free_port, running
from tests.servers import Server as LiveServer

__all__ = [
    "REPO",
    "SERVER_COMMAND",
    "LiveServer",
    "RedisServer",
    "free_port",
    "start_server",
    "wait_until",
]

TEST_ENV = {"TIMEOUT_GRACEFUL_SHUTDOWN_S": "5"}  # a stopped server is gone within seconds


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
    nofile: int | None = None,
) -> Iterator[LiveServer]:
    """Run ``python -m app`` with the service's defaults and ``env`` added to the environment;
    stop it afterwards (``tests.servers.running`` with ``bench=False``).

    ``port``: listen there (e.g. to restart a server where clients expect it), else a free one.
    """
    port = port or free_port()
    with running(
        {**TEST_ENV, **(env or {})},
        Path(log_dir) / f"server-{port}.log",
        timeout=timeout,
        port=port,
        wait_ready=wait_ready,
        bench=False,
        nofile=nofile,
    ) as server:
        yield server


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The service with default settings and the shipped models, shared by the whole session."""
    with start_server(tmp_path_factory.mktemp("live_server")) as server:
        yield server


@pytest.fixture(scope="session")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the session (never skipped: a missing binary fails loudly)."""
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def live_redis_server(
    tmp_path_factory: pytest.TempPathFactory, redis: RedisServer
) -> Iterator[LiveServer]:
    """The service with default settings, its echo sessions in ``redis``."""
    with start_server(
        tmp_path_factory.mktemp("live_redis_server"), {"ECHO_STORE_URL": redis.url}
    ) as server:
        yield server
