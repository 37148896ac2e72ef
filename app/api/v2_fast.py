"""Pure-ASGI shortcut for ``POST /v2/models/{name}[/versions/{v}]/infer``.

Like ``DigitFastPath``, it skips FastAPI's exception, routing and endpoint layers (most of the
app-side CPU of a one-image request) and answers exactly as the documented route does, through
the same ``infer_body``; every other request goes on to the app unchanged.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.v2 import INFER_ROUTES, infer_body, router, v2_error
from app.api.v2_request import HEADER_LENGTH

_INFER = re.compile(re.escape(router.prefix) + r"/models/([^/]+)(?:/versions/([^/]+))?/infer")
_HEADER = HEADER_LENGTH.encode()


class V2InferFastPath:
    """Serve v2 infer requests directly; add it inside ``RequestGuard``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = None
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER.fullmatch(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        name, version = match.groups()
        scope["route"] = INFER_ROUTES[version is not None]  # for the access log and metrics
        header_length = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == _HEADER), None
        )
        chunks = []
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
            body = b"".join(chunks)
            content, headers = await infer_body(scope["app"], name, version, body, header_length)
        except Exception as exc:
            await v2_error(exc, scope["path"])(scope, receive, send)
            return
        raw = [(k.encode(), v.encode()) for k, v in headers.items()]
        raw.append((b"content-length", b"%d" % len(content)))
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        await send({"type": "http.response.body", "body": content})
