"""Pure-ASGI middleware: request-size limit, one JSON access-log line and metrics per request."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import ApiError, error_response
from app.core.metrics import HTTP_LATENCY, HTTP_REQUESTS

log = logging.getLogger("app.access")


class RequestGuard:
    """Refuse bodies over ``max_body`` bytes (413) before reading them; log and count requests.

    A declared ``Content-Length`` over the limit is refused at once; a chunked body is counted as
    it streams in and refused as soon as it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        declared = _content_length(scope)
        try:
            if declared is not None and declared > self.max_body:
                await _too_large(self.max_body)(scope, receive, send_wrapper)
            else:
                await self.app(scope, self._counting(receive), send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - start
            HTTP_REQUESTS.labels(path, scope["method"], str(status)).inc()
            HTTP_LATENCY.labels(path, scope["method"]).observe(elapsed)
            log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "client": (scope.get("client") or ("-",))[0],
                },
            )

    def _counting(self, receive: Receive) -> Receive:
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise ApiError(413, "payload_too_large", _limit_text(self.max_body))
            return message

        return wrapped


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _limit_text(limit: int) -> str:
    return f"request body is larger than the limit of {limit} bytes"


def _too_large(limit: int) -> ASGIApp:
    return error_response(413, "payload_too_large", _limit_text(limit))
