"""The real server as a subprocess on a free 127.0.0.1 port, for the benchmarks and the tests.

The one owner of "start the service, wait for /livez and /readyz, stop it (SIGTERM, then kill)":
``tests/live_server.py`` is a thin pytest plugin over ``start`` / ``running``. Also psutil-free
CPU accounting from /proc.
"""

from __future__ import annotations

import http.client
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SERVER_COMMAND = [sys.executable, "-m", "app"]  # settings from the environment (HOST, PORT, ...)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15)


def self_cpu_seconds() -> float:
    """User + system CPU seconds of this process, at microsecond resolution."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def system_cpu_seconds() -> tuple[float, float]:
    """Machine-wide (busy, total) CPU seconds summed over all cores, from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    total = sum(parts[:8])  # user nice system idle iowait irq softirq steal
    return (total - parts[3] - parts[4]) / CLK_TCK, total / CLK_TCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(port: int, path: str, timeout: float = 2.0) -> int:
    """Status code of ``GET path``, or 0 when the server does not answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


# The load generator opens thousands of echo sessions from one address: lift the per-client
# limits that would refuse it (callers' env still wins).
BENCH_ENV = {
    "ECHO_MAX_SESSIONS_PER_CLIENT": "1000000",
    "ECHO_NEW_SESSIONS_PER_S": "1000000",
    "ECHO_NEW_SESSIONS_BURST": "1000000",
    "MAX_CONNECTIONS": "1000000",
    "MAX_CONNECTIONS_PER_CLIENT": "1000000",
    "MAX_CONNECTIONS_PER_NETWORK": "1000000",
}


def _raise_fd_limit() -> None:  # runs in the child before exec: 1,000 sessions need the fds
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


def _fd_limit(nofile: int) -> Callable[[], None]:
    def limit() -> None:  # in the child before exec
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return limit


@dataclass
class Server:
    """A running server and how long it took to come up."""

    proc: subprocess.Popen[bytes]
    port: int
    env: dict[str, str]  # what ``start`` added to the environment
    log_path: Path
    live_s: float = 0.0  # Popen → first /livez 200
    ready_s: float = 0.0  # Popen → first /readyz 200 (the cold start); 0 if not waited for
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def process(self) -> subprocess.Popen[bytes]:  # the tests' name for ``proc``
        return self.proc

    @property
    def grpc_port(self) -> int:
        """The gRPC port (``GRPC_PORT``; 0: off)."""
        return int(self.env.get("GRPC_PORT", "0"))

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC service, as ``tritonclient.grpc`` takes it."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]


def start(
    env: dict[str, str],
    log_path: Path,
    cwd: Path = REPO,
    timeout: float = 120.0,
    app: str | None = None,
    *,
    port: int | None = None,
    wait_ready: bool = True,
    bench: bool = True,
    nofile: int | None = None,
) -> Server:
    """Start the service with ``python -m app`` (``uvicorn app`` for another ASGI app, and in a
    checkout older than the launcher) with ``env`` added to ours; return once /livez and (with
    ``wait_ready``) /readyz answer 200. If it exits or times out first, it is stopped and this
    raises.

    ``port``: listen there (e.g. to restart a server where clients expect it), else a free one;
    the gRPC service gets a free port too unless ``env`` names ``GRPC_PORT``.
    ``bench``: lift the per-client limits (``BENCH_ENV``) and raise the file-descriptor limit for
    the load generator; the tests pass ``False`` to run the service's defaults and inherit limits.
    ``nofile``: the server's file-descriptor limit, soft and hard (it raises its soft limit to
    the hard one itself).
    """
    port = port or free_port()
    env = {
        **(BENCH_ENV if bench else {}),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "GRPC_PORT": str(free_port()),  # never the default 8001: servers run side by side
        **env,
    }
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **env}
    if app is None and (cwd / "app" / "__main__.py").exists():
        cmd = list(SERVER_COMMAND)
    else:
        app = app or "app.main:app"
        cmd = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_fd_limit(nofile) if nofile else _raise_fd_limit if bench else None,
        )
    server = Server(proc, port, env, log_path)
    try:
        server.live_s = _wait_for_200(server, "/livez", t0, timeout)
        if wait_ready:
            server.ready_s = _wait_for_200(server, "/readyz", t0, timeout)
    except BaseException:
        stop(server)
        raise
    return server


def _wait_for_200(server: Server, path: str, t0: float, timeout: float) -> float:
    """Poll ``GET path`` until it answers 200; the seconds since ``t0`` (the Popen) by then."""
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log_tail()}")
        if http_status(server.port, path, timeout=1.0) == 200:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"{path} not 200 after {timeout}s:\n{server.log_tail()}")
        time.sleep(0.02)


@contextmanager
def running(env: dict[str, str], log_path: Path, **kwargs: Any) -> Iterator[Server]:
    """``start(env, log_path, **kwargs)``, and ``stop`` it on the way out."""
    server = start(env, log_path, **kwargs)
    try:
        yield server
    finally:
        stop(server)


def stop(server: Server, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited after ``timeout`` seconds."""
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            server.notes.append(f"did not stop within {timeout}s; killed")
            server.proc.kill()
            server.proc.wait()
