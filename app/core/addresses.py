"""Client addresses as the limits see them: one key per host, one per network.

A *client* is its address, or the /64 network for IPv6 (the block one host usually gets); a
*network* is the IPv4 /24 or IPv6 /48 it belongs to (one site or one provider's customer), so
that caps per network make filling the server take many networks, not a handful of hosts.
IPv4-mapped IPv6 addresses count as their IPv4 address. Both functions are cached: the
admission path calls them on every connection.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

CLIENT_PREFIX = {4: 32, 6: 64}
NETWORK_PREFIX = {4: 24, 6: 48}


@lru_cache(maxsize=8192)
def client_key(host: str | None) -> str:
    """The limits' key of a client address: itself, or its /64 network for IPv6."""
    return _key(host, CLIENT_PREFIX)


@lru_cache(maxsize=8192)
def network_key(host: str | None) -> str:
    """The network a client address belongs to: its IPv4 /24 or IPv6 /48."""
    return _key(host, NETWORK_PREFIX)


def _key(host: str | None, prefixes: dict[int, int]) -> str:
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # a unix socket path or a name: itself
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = prefixes[address.version]
    if prefix == address.max_prefixlen:
        return str(address)
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
