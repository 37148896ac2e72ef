"""Pure-ASGI middleware: request-size limit, one JSON access-log line and metrics per request.

A request whose client went away before the answer (``http.disconnect`` while the body was read)
is logged and counted with status 499 (nginx's "client closed request"), never as a 5xx; one the
edge (``app.core.edge``) answered itself, e.g. 408 for a stalled body, with that status.
"""

from __future__ import annotations

import time
from functools import lru_cache

import orjson
from prometheus_client import Counter, Histogram
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.edge import EDGE_STATUS
from app.core.errors import TooLarge
from app.core.logging import AccessLog
from app.core.metrics import HTTP_LATENCY, HTTP_REQUESTS

ROUTE_PATH = "route_path"  # scope key: the path template a raw-ASGI route answers for
CLIENT_CLOSED = 499

access_log = AccessLog()


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
        gone = [False]  # the client disconnected before the answer

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
                await self.app(scope, self._counting(receive, gone), send_wrapper)
        finally:
            if gone[0] and status >= 500:  # the app saw a disconnect: a 408 from the edge?
                status = scope.get(EDGE_STATUS, CLIENT_CLOSED)
            path = scope.get(ROUTE_PATH) or getattr(scope.get("route"), "path", None)
            path = path or "unmatched"
            elapsed = time.perf_counter() - start
            method = scope["method"]
            _requests(path, method, status).inc()
            _latency(path, method).observe(elapsed)
            access_log.write(
                {
                    "method": method,
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "client": (scope.get("client") or ("-",))[0],
                }
            )

    def _counting(self, receive: Receive, gone: list[bool]) -> Receive:
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise TooLarge(_limit_text(self.max_body))
            elif message["type"] == "http.disconnect":
                gone[0] = True
            return message

        return wrapped


@lru_cache(maxsize=1024)
def _requests(path: str, method: str, status: int) -> Counter:
    """The labelled counter child, cached: ``labels()`` costs a lock and a dict lookup."""
    return HTTP_REQUESTS.labels(path, method, str(status))


@lru_cache(maxsize=1024)
def _latency(path: str, method: str) -> Histogram:
    return HTTP_LATENCY.labels(path, method)


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
    body = {"error": TooLarge.code, "detail": _limit_text(limit)}
    return Response(orjson.dumps(body), status_code=413, media_type="application/json")
