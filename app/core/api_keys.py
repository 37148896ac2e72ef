"""API keys: the configured set, compared in constant time, and the ``Bearer`` credential.

Shared by the HTTP guard (``app.api.access``: the ``Authorization`` header, or a WebSocket's
``?access_token=``) and the gRPC service (``app.grpc.guard``: the ``authorization`` metadata).
A key is compared with every configured key in constant time (SHA-256 digests, so not even its
length shows in the timing).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable


def split_list(value: str) -> list[str]:
    """A comma-separated setting → its non-empty items, stripped."""
    return [item.strip() for item in value.split(",") if item.strip()]


class ApiKeys:
    """The configured keys, as SHA-256 digests; ``check`` compares against all of them."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys if key]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def check(self, presented: str | None) -> bool:
        digest = hashlib.sha256((presented or "").encode()).digest()
        match = False
        for key in self._digests:  # no early exit: every key is compared
            match |= hmac.compare_digest(key, digest)
        return match and presented is not None


def bearer_credential(value: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <key>`` value (scheme case-insensitive)."""
    if value is None:
        return None
    scheme, _, credential = value.partition(" ")
    return credential.strip() if scheme.lower() == "bearer" else None
