"""``ECHO_STORE_URL`` forms that name Redis through its Sentinels (issue 24).

``redis+sentinel://[user:password@]host1:port1,host2:port2/<master-name>[/<db>][?options]`` (and
``rediss+sentinel://`` for TLS to the Sentinels and to the Redis servers they name): the service
asks the Sentinels which server is the primary of ``<master-name>`` and asks again after a
failover. The URL's credentials are those of the Redis servers (primary and replicas); Sentinels
that require a password of their own (their ``requirepass``) get ``sentinel_password`` (and
``sentinel_username`` for an ACL user) from the query. A port left out is Sentinel's own, 26379.

Query options (each at most once; values percent-encoded, ``+`` is a plus):

- ``sentinel_username``, ``sentinel_password``: the Sentinels' credentials;
- with ``rediss+sentinel://`` only, the TLS options of redis-py's ``rediss://`` URLs, for the
  Sentinel connections and the Redis connections alike: ``ssl_ca_certs`` (a CA file),
  ``ssl_ca_path``, ``ssl_certfile`` and ``ssl_keyfile`` (a client certificate),
  ``ssl_cert_reqs`` (``required``, the default, ``optional`` or ``none``) and
  ``ssl_check_hostname`` (``true``, the default, or ``false``).

The parser is strict (no fragment, no unknown option, no empty host, a port in 1–65535, a
database number 0 or more) and its errors never quote the URL: it carries passwords.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # -> TLS
SENTINEL_PORT = 26379

_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)$")
_MASTER = re.compile(r"^[A-Za-z0-9._-]+$")
_DIGITS = re.compile(r"[0-9]+")  # ASCII digits only ("²".isdigit() is true, int("²") raises)
_OPTION_NAME = re.compile(r"^[a-z_]{1,40}$")  # quoted in an error only if it looks like one
SENTINEL_AUTH_OPTIONS = ("sentinel_username", "sentinel_password")
TLS_FILE_OPTIONS = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile")
_CERT_REQS = ("required", "optional", "none")
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass(frozen=True)
class SentinelUrl:
    """What a ``redis+sentinel://`` URL names; ``repr`` leaves the password out."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    ssl: dict[str, str | bool] = field(default_factory=dict)  # redis-py's ssl_* arguments


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse a ``redis+sentinel://`` / ``rediss+sentinel://`` URL; ``ValueError`` (which never
    quotes the URL) if it is not one or is malformed."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError("a Sentinel URL starts with redis+sentinel:// or rediss+sentinel://")
    if "#" in rest:
        raise ValueError("a Sentinel URL takes no fragment")
    rest, _, query = rest.partition("?")
    tls = SENTINEL_SCHEMES[scheme.lower()]
    options = _options(query, tls)
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        if not colon or not secret:
            raise ValueError("a Sentinel URL's credentials are user:password@ or :password@")
        username, password = unquote(user) or None, unquote(secret)
    sentinels = tuple(_address(part) for part in hosts.split(","))
    segments = path.split("/") if slash else []
    if not segments or not 1 <= len(segments) <= 2 or not _MASTER.match(segments[0]):
        raise ValueError("a Sentinel URL ends with /<master-name> or /<master-name>/<db>")
    db = 0
    if len(segments) == 2:
        if not _DIGITS.fullmatch(segments[1]):
            raise ValueError("the database in a Sentinel URL is a number, 0 or more")
        db = int(segments[1])
    return SentinelUrl(
        sentinels=sentinels,
        master=segments[0],
        db=db,
        username=username,
        password=password,
        tls=tls,
        sentinel_username=options.pop("sentinel_username", None),  # type: ignore[arg-type]
        sentinel_password=options.pop("sentinel_password", None),  # type: ignore[arg-type]
        ssl=options,
    )


def _options(query: str, tls: bool) -> dict[str, str | bool]:
    """The query's options, checked; the TLS ones only with ``rediss+sentinel://``."""
    options: dict[str, str | bool] = {}
    for pair in query.split("&") if query else []:
        name, eq, raw = pair.partition("=")
        if not _OPTION_NAME.match(name):
            raise ValueError("a Sentinel URL's query is name=value pairs separated by &")
        known = name in SENTINEL_AUTH_OPTIONS or name in TLS_FILE_OPTIONS
        if not known and name not in ("ssl_cert_reqs", "ssl_check_hostname"):
            raise ValueError(f"a Sentinel URL takes no option {name!r}")
        if name.startswith("ssl_") and not tls:
            raise ValueError(f"{name!r} needs rediss+sentinel:// (TLS)")
        if name in options:
            raise ValueError(f"the option {name!r} appears twice in a Sentinel URL")
        value = unquote(raw)
        if not eq or not value:
            raise ValueError(f"the option {name!r} of a Sentinel URL needs a value")
        if name == "ssl_cert_reqs" and value.lower() not in _CERT_REQS:
            raise ValueError("ssl_cert_reqs is required, optional or none")
        if name == "ssl_check_hostname":
            if value.lower() not in _BOOLS:
                raise ValueError("ssl_check_hostname is true or false")
            options[name] = _BOOLS[value.lower()]
        else:
            options[name] = value.lower() if name == "ssl_cert_reqs" else value
    if "sentinel_username" in options and "sentinel_password" not in options:
        raise ValueError("sentinel_username goes with sentinel_password")
    return options


def _address(part: str) -> tuple[str, int]:
    if part.startswith("["):  # [IPv6]:port
        close = part.find("]")
        host, rest = part[: close + 1], part[close + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError("a Sentinel address is host:port")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = part.partition(":")
        if ":" in port_text:
            raise ValueError("an IPv6 Sentinel address goes in brackets: [::1]:26379")
    if not host or not _HOST.match(host):
        raise ValueError("a Sentinel URL lists host:port pairs separated by commas")
    port = SENTINEL_PORT
    if port_text or part.endswith(":"):
        if not _DIGITS.fullmatch(port_text) or not 0 < int(port_text) < 65536:
            raise ValueError("a Sentinel port is a number from 1 to 65535")
        port = int(port_text)
    return host.strip("[]"), port
