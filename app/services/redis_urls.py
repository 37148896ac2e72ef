"""``ECHO_STORE_URL`` forms that name Redis through its Sentinels (issue 24).

``redis+sentinel://[user:password@]host1:port1,host2:port2/<master-name>[/<db>]`` (and
``rediss+sentinel://`` for TLS to the Sentinels and to the Redis servers they name): the service
asks the Sentinels which server is the primary of ``<master-name>`` and asks again after a
failover. The credentials are those of the Redis servers (primary and replicas); the Sentinels
are reached without them. A port left out is Sentinel's own, 26379.

The parser is strict (no query, no fragment, no empty host, a port in 1–65535, a database
number 0 or more) and its errors never quote the URL: it carries the password.
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


@dataclass(frozen=True)
class SentinelUrl:
    """What a ``redis+sentinel://`` URL names; ``repr`` leaves the password out."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse a ``redis+sentinel://`` / ``rediss+sentinel://`` URL; ``ValueError`` (which never
    quotes the URL) if it is not one or is malformed."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError("a Sentinel URL starts with redis+sentinel:// or rediss+sentinel://")
    if "?" in rest or "#" in rest:
        raise ValueError("a Sentinel URL takes no query or fragment")
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
        tls=SENTINEL_SCHEMES[scheme.lower()],
    )


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
