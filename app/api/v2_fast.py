""":class:`V2InferRoute`: ``POST /v2/models/{name}[/versions/{v}]/infer`` as a raw-ASGI route.

Listed ahead of the documented FastAPI infer routes (``app.api.v2``), it answers every infer
request exactly as they do, through the same ``infer_body``, without FastAPI's per-request
machinery (most of the app-side CPU of a one-image request; ``app.api.raw_route``).
"""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import Scope

from app.api.raw_route import RawRoute
from app.api.v2 import INFER_ROUTES, infer_body, router, v2_error
from app.api.v2_request import HEADER_LENGTH
from app.state import app_state


class V2InferRoute(RawRoute):
    """Every v2 infer request (both paths, any content type)."""

    pattern = re.compile(
        re.escape(router.prefix)
        + r"/models/(?P<model_name>[^/]+)(?:/versions/(?P<model_version>[^/]+))?/infer"
    )

    def documented(self, params: dict[str, Any]) -> BaseRoute:
        return INFER_ROUTES["model_version" in params]

    async def answer(self, scope: Scope, params: dict[str, Any], body: bytes) -> Response:
        conn = HTTPConnection(scope)
        name, version = params["model_name"], params.get("model_version")
        try:
            content, headers = await infer_body(
                app_state(conn), name, version, body, conn.headers.get(HEADER_LENGTH), scope
            )
        except Exception as exc:
            return v2_error(exc, scope["path"])
        return Response(content, headers=headers)
