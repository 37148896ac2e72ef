"""Routes answered as raw ASGI, listed in ``app.routes`` ahead of the documented FastAPI route.

FastAPI's per-request machinery (``Request``, dependency solving, exception wrapping, two exit
stacks, the included-router dispatch) costs ~60 µs of event-loop CPU per request, a fifth of a
one-image ``POST /predict/digit`` at 64 connections (``python -m bench.ab``; see
docs/performance-notes.md). A :class:`RawRoute` is an ordinary Starlette route, visible in the
app's routing (no path-sniffing middleware), that takes only the requests :meth:`~RawRoute.accepts`
says it answers exactly as the documented route does; every other request goes on to that route.
Removing it changes no answer: each subclass has a test comparing the two.

The app's middleware (``RequestGuard``'s size limit, access log and metrics, ``AccessGuard``)
and exception handlers apply as to any route; metrics and logs carry the documented route.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.responses import Response
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

from app.core.middleware import ROUTE_PATH


class RawRoute(BaseRoute):
    """A ``POST`` route whose path matches ``pattern``; subclasses say what they take and answer.

    ``matches`` sets ``scope["route"]`` to this route, ``scope["path_params"]`` to the pattern's
    groups and ``scope[ROUTE_PATH]`` to the path template of :meth:`documented`, under which the
    access log and metrics count the request (as they would count the documented route's).
    """

    pattern: re.Pattern[str]

    def accepts(self, scope: Scope) -> bool:
        """Whether this route answers the request (headers only); ``False``: the documented
        route does."""
        return True

    def documented(self, params: dict[str, Any]) -> BaseRoute:
        """The documented route this one stands in front of."""
        raise NotImplementedError

    async def answer(self, scope: Scope, params: dict[str, Any], body: bytes) -> Response:
        """The whole body → the response (errors included, as the documented route answers)."""
        raise NotImplementedError

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or scope["method"] != "POST":
            return Match.NONE, {}
        found = self.pattern.fullmatch(scope["path"])
        if found is None or not self.accepts(scope):
            return Match.NONE, {}
        params = {k: v for k, v in found.groupdict().items() if v is not None}
        path = self.documented(params).path  # type: ignore[attr-defined]
        return Match.FULL, {"route": self, "path_params": params, ROUTE_PATH: path}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks = []
        while True:
            message = await receive()  # RequestGuard's receive enforces the body size limit
            if message["type"] == "http.disconnect":  # gone: RequestGuard counts a 499
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        response = await self.answer(scope, scope["path_params"], b"".join(chunks))
        await response(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        raise NoMatchFound(name, path_params)  # reverse routing names the documented route
