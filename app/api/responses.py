"""The service's JSON response class: orjson, which also serialises NumPy arrays directly."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class OrjsonResponse(Response):
    """``application/json`` rendered by orjson (FastAPI's own ``ORJSONResponse`` is deprecated)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
