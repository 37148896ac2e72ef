"""Optional access control: API keys and browser origins (threat model: docs/security.md).

- ``API_KEYS`` (comma-separated; empty, the default: no key needed). When set, every route
  except ``PUBLIC_PATHS`` (health probes, the API docs, the demo page) needs one of the keys:
  ``Authorization: Bearer <key>``, or for a WebSocket, which a browser cannot give headers,
  ``?access_token=<key>`` (redacted from the logs like every credential). A missing or wrong key
  gets 401 ``unauthorized`` with ``WWW-Authenticate: Bearer``; on ``/echo``, a close with 1008.
  A key is compared with every configured key in constant time (SHA-256 digests, so not even
  its length shows in the timing).
- ``CORS_ALLOW_ORIGINS`` (comma-separated origins, ``*`` for any; empty, the default: none).
  Browsers on those origins may call the HTTP API (Starlette's ``CORSMiddleware``) and open
  ``/echo``. A WebSocket handshake with an ``Origin`` that is neither listed nor the service's own
  (its ``Host``) is closed with 1008 ``origin_not_allowed``: browsers do not apply CORS to
  WebSockets, so without this any web page could drive ``/echo`` from its visitors' browsers.
  Clients that send no ``Origin`` (anything but a browser) are not affected.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.datastructures import Headers, QueryParams
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import close_code, close_reason, service_error_response
from app.core.config import Settings
from app.core.errors import Forbidden, ServiceError, Unauthorized

PUBLIC_PATHS = frozenset(
    {
        "/livez",
        "/readyz",
        "/v2/health/live",
        "/v2/health/ready",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
        "/",
        "/favicon.ico",
    }
)
PUBLIC_PREFIXES = ("/static/",)


def split_list(value: str) -> list[str]:
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


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class AccessGuard:
    """Pure ASGI: API keys for every non-public route, the ``Origin`` allow-list for WebSockets."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, origins: list[str]) -> None:
        self.app, self.keys = app, keys
        self.any_origin = "*" in origins
        self.origins = frozenset(origin.lower().rstrip("/") for origin in origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if (
                self.keys
                and not is_public(scope["path"])
                and not self.keys.check(bearer_key(scope))
            ):
                response = service_error_response(_unauthorized())
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        elif kind == "websocket":
            refusal = self._websocket_refusal(scope)
            if refusal is not None:
                await _refuse_websocket(refusal, receive, send)
                return
        await self.app(scope, receive, send)

    def _websocket_refusal(self, scope: Scope) -> ServiceError | None:
        origin = _header(scope, b"origin")
        if origin is not None and not self._origin_allowed(origin, _header(scope, b"host")):
            return Forbidden(
                f"browser pages from {origin[:60]} may not open this WebSocket "
                "(CORS_ALLOW_ORIGINS)",
                code="origin_not_allowed",
            )
        if self.keys and not is_public(scope["path"]):
            query = QueryParams(scope.get("query_string", b""))
            presented = bearer_key(scope) or query.get("access_token")
            if not self.keys.check(presented):
                return _unauthorized()
        return None

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        origin = origin.lower().rstrip("/")
        if self.any_origin or origin in self.origins:
            return True
        return host is not None and urlsplit(origin).netloc == host.lower()


def add_access_control(app: FastAPI, settings: Settings) -> None:
    """Add the guard, and CORS outside it (so preflights and refusals carry its headers). With
    the defaults only the WebSocket origin check is active."""
    origins = split_list(settings.cors_allow_origins)
    keys = ApiKeys(split_list(settings.api_keys.get_secret_value()))
    app.add_middleware(AccessGuard, keys=keys, origins=origins)
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After"],
            max_age=600,
        )


def _unauthorized() -> Unauthorized:
    return Unauthorized(
        "this service needs an API key: send Authorization: Bearer <key> "
        "(a WebSocket may pass ?access_token=<key>)"
    )


def _header(scope: Scope, name: bytes) -> str | None:
    return Headers(scope=scope).get(name.decode("latin-1"))


def bearer_key(scope: Scope) -> str | None:
    """The credential of an ``Authorization: Bearer`` header, if the request has one."""
    value = _header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, credential = value.partition(" ")
    return credential.strip() if scheme.lower() == "bearer" else None


async def _refuse_websocket(error: ServiceError, receive: Receive, send: Send) -> None:
    """Accept the handshake and close at once with the error's code and reason (as ``/echo``
    does for its own refusals), so that every client, browsers included, can read why."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send(
        {"type": "websocket.close", "code": close_code(error), "reason": close_reason(error)}
    )
