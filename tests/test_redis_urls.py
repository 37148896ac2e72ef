"""``redis+sentinel://`` URLs (``app.services.redis_urls``): what they name, what they refuse,
and that no error or repr quotes the password."""

from __future__ import annotations

import pytest

from app.core.config import Settings
from app.services.redis_sessions import RedisSessions
from app.services.redis_urls import SentinelUrl, is_sentinel_url, parse_sentinel_url

SECRET = "p%40ss:w0rd"  # "p@ss:w0rd" percent-encoded


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://a:1,b:2,c:3/mymaster",
            SentinelUrl((("a", 1), ("b", 2), ("c", 3)), "mymaster"),
        ),
        (
            f"redis+sentinel://bob:{SECRET}@10.0.0.1:26380,10.0.0.2/primary-1/3",
            SentinelUrl(
                (("10.0.0.1", 26380), ("10.0.0.2", 26379)), "primary-1", 3, "bob", "p@ss:w0rd"
            ),
        ),
        (
            "rediss+sentinel://:pw@[::1]:5000,sentinel.example.com:26379/m/0",
            SentinelUrl(
                (("::1", 5000), ("sentinel.example.com", 26379)), "m", 0, None, "pw", tls=True
            ),
        ),
        ("REDIS+SENTINEL://h:1/m", SentinelUrl((("h", 1),), "m")),
    ],
)
def test_sentinel_urls(url: str, expected: SentinelUrl) -> None:
    assert is_sentinel_url(url)
    assert parse_sentinel_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:1/0",
        "redis+sentinel://h:1",  # no master name
        "redis+sentinel://h:1/",
        "redis+sentinel://h:1/m/x",  # db not a number
        "redis+sentinel://h:1/m/-1",
        "redis+sentinel://h:1/m/0/extra",
        "redis+sentinel://h:1/m?db=2",  # no query
        "redis+sentinel://h:1/m#frag",
        "redis+sentinel://h:0/m",  # port out of range
        "redis+sentinel://h:65536/m",
        "redis+sentinel://h:x/m",
        "redis+sentinel://h:/m",
        "redis+sentinel://h:1,,h2:2/m",  # an empty host
        "redis+sentinel:///m",
        "redis+sentinel://::1:5000/m",  # IPv6 needs brackets
        "redis+sentinel://[::1]x/m",
        "redis+sentinel://h o:1/m",
        "redis+sentinel://h:1/m a",
        "redis+sentinel://justapassword@h:1/m",  # user:password@ or :password@
        "redis+sentinel://user:@h:1/m",
    ],
)
def test_malformed_sentinel_urls_are_refused_without_quoting_them(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_sentinel_url(url)
    assert SECRET not in str(caught.value) and "h:1" not in str(caught.value)


def test_repr_leaves_the_password_out() -> None:
    parsed = parse_sentinel_url(f"redis+sentinel://bob:{SECRET}@h:1/m")
    assert "p@ss" not in repr(parsed) and "bob" in repr(parsed)


def test_the_store_follows_sentinels_for_a_sentinel_url() -> None:
    """``from_settings`` builds a Sentinel-managed pool (no connection is made yet)."""
    url = f"redis+sentinel://:{SECRET}@127.0.0.1:1,127.0.0.1:2/mymaster/2"
    settings = Settings(echo_store_url=url, echo_store_min_replicas=1)
    store = RedisSessions.from_settings(settings)
    assert store is not None and store.sentinel is not None and store.min_replicas == 1
    pool = store.client.connection_pool
    assert pool.service_name == "mymaster" and pool.max_connections == 64
    assert pool.connection_kwargs["db"] == 2 and pool.connection_kwargs["password"] == "p@ss:w0rd"
    hosts = [s.connection_pool.connection_kwargs["port"] for s in store.sentinel.sentinels]
    assert hosts == [1, 2]


def test_other_schemes_are_refused() -> None:
    with pytest.raises(ValueError, match="redis\\+sentinel://"):
        RedisSessions.from_settings(Settings(echo_store_url="http://h:1/m"))


def test_rediss_sentinel_means_tls_to_sentinels_and_redis() -> None:
    from redis.asyncio.connection import SSLConnection
    from redis.asyncio.sentinel import SentinelManagedSSLConnection

    url = "rediss+sentinel://:pw@127.0.0.1:1/mymaster"
    store = RedisSessions.from_settings(Settings(echo_store_url=url))
    assert store is not None and store.sentinel is not None
    assert store.client.connection_pool.connection_class is SentinelManagedSSLConnection
    for sentinel in store.sentinel.sentinels:
        assert issubclass(sentinel.connection_pool.connection_class, SSLConnection)
        assert sentinel.connection_pool.connection_kwargs.get("password") is None


def test_sentinel_credentials_and_tls_options_in_the_query() -> None:
    url = (
        f"rediss+sentinel://:{SECRET}@h:1/m?sentinel_username=sen&sentinel_password=a%2Bb+c"
        "&ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=REQUIRED&ssl_check_hostname=false"
    )
    parsed = parse_sentinel_url(url)
    assert (parsed.sentinel_username, parsed.sentinel_password) == ("sen", "a+b+c")
    assert parsed.ssl == {
        "ssl_ca_certs": "/etc/ca.pem",
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": False,
    }
    assert "a+b+c" not in repr(parsed)


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("ssl_ca_certs=/ca.pem", "needs rediss"),  # redis+sentinel:// has no TLS
        ("db=2", "no option 'db'"),
        ("sentinel_password=a&sentinel_password=b", "twice"),
        ("sentinel_password=", "needs a value"),
        ("sentinel_password", "needs a value"),
        ("sentinel_username=u", "goes with sentinel_password"),
        ("Sentinel_Password=x", "name=value pairs"),
    ],
)
def test_malformed_sentinel_queries_are_refused(query: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as caught:
        parse_sentinel_url(f"redis+sentinel://:{SECRET}@h:1/m?{query}")
    assert SECRET not in str(caught.value)


def test_tls_options_and_sentinel_password_reach_the_right_connections(tmp_path) -> None:
    """``ssl_*`` options go to the Sentinel connections and the data-node connections alike;
    ``sentinel_password`` to the Sentinels only, the URL's password to the data nodes only."""
    import trustme

    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    url = (
        f"rediss+sentinel://:{SECRET}@127.0.0.1:1,127.0.0.1:2/mymaster"
        f"?sentinel_password=sent&ssl_ca_certs={tmp_path}/ca.pem"
    )
    store = RedisSessions.from_settings(Settings(echo_store_url=url))
    assert store is not None and store.sentinel is not None
    data = store.client.connection_pool.connection_kwargs
    assert data["ssl_ca_certs"] == f"{tmp_path}/ca.pem" and data["password"] == "p@ss:w0rd"
    for sentinel in store.sentinel.sentinels:
        kwargs = sentinel.connection_pool.connection_kwargs
        assert kwargs["ssl_ca_certs"] == f"{tmp_path}/ca.pem" and kwargs["password"] == "sent"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("rediss://:{secret}@127.0.0.1:1/0?ssl_ca_certs=/no/such/ca.pem", "TLS options do not"),
        ("rediss+sentinel://:{secret}@127.0.0.1:1/m?ssl_ca_certs=/no/such.pem", "TLS options"),
        ("redis://:{secret}@127.0.0.1:1/0?ssl_ca_cert=/ca.pem", "redis-py does not take"),
    ],
)
def test_options_that_cannot_work_are_a_startup_error(url: str, why: str) -> None:
    """Refused by ``from_settings`` (no connection is made), not on every command later; the
    error never quotes the password."""
    with pytest.raises(ValueError, match=why) as caught:
        RedisSessions.from_settings(Settings(echo_store_url=url.format(secret=SECRET)))
    assert SECRET not in str(caught.value) and "p@ss" not in str(caught.value)
