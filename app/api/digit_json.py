"""The JSON body of ``POST /predict/digit``: its parser, and :class:`DigitJsonRoute`.

:func:`predict_json` answers a JSON request from its raw body; the documented route
(``app.api.digits``) calls it, and so does :class:`DigitJsonRoute`, a raw-ASGI route
(``app.api.raw_route``) listed ahead of it that takes JSON requests without FastAPI's
per-request machinery. The answer is serialised by orjson straight from float32.

The contract is ``app.schemas.digits.parse_request``: the parser here only takes the bodies it
can prove valid with orjson, one NumPy array and a few vectorised checks (cheaper than pydantic
over 784 numbers) and hands every other body, all refusals included, to the schema;
``tests/test_digit_contract.py`` checks that whatever it takes, the schema takes alike.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import orjson
from starlette.datastructures import Headers, QueryParams
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import Scope

from app.api.errors import service_error_response
from app.api.raw_route import RawRoute
from app.core.errors import ServiceError
from app.core.params import parse_version
from app.schemas.digits import FIELDS, SCALE_MAX, SCALE_MIN, parse_request
from app.schemas.json_budget import check_json_budget
from app.state import AppState, app_state
from modelspec.contract import IMAGE_SIZE

PATH = "/predict/digit"
PIXELS = IMAGE_SIZE * IMAGE_SIZE
JSON_TYPE = "application/json"


class DigitJsonRoute(RawRoute):
    """``POST /predict/digit`` with a JSON body (or none declared), ahead of the documented route
    (``documented``), which serves uploads and refuses other content types."""

    pattern = re.compile(re.escape(PATH))

    def __init__(self, documented: BaseRoute) -> None:
        self._documented = documented

    def accepts(self, scope: Scope) -> bool:
        return is_json(content_type(scope))

    def documented(self, params: dict[str, Any]) -> BaseRoute:
        return self._documented

    async def answer(self, scope: Scope, params: dict[str, Any], body: bytes) -> Response:
        return await json_response(app_state(HTTPConnection(scope)), body, scope)


async def json_response(state: AppState, body: bytes, scope: Scope) -> Response:
    """A JSON request body → the answer, a domain error as its JSON error response."""
    try:
        content = await predict_json(state, body, requested_version(scope))
    except ServiceError as exc:
        return service_error_response(exc)
    return Response(content, media_type=JSON_TYPE)


async def predict_json(state: AppState, body: bytes, version: int | None = None) -> bytes:
    """A JSON request body → the JSON answer; a ``ServiceError`` for anything wrong."""
    service = state.digit_service(version)
    images, single = parse_json_images(body, state.settings.max_batch_images)
    return answer(await service.predict(images), single, service.model_ref)


def requested_version(scope: Scope) -> int | None:
    """``?version=N`` of the request (None: the default version); 422 ``invalid_version`` unless
    it is 1 to 999,999,999 in ASCII digits (``parse_version``)."""
    query = scope.get("query_string", b"")
    if b"version" not in query:
        return None
    values = QueryParams(query).getlist("version")
    if not values:
        return None
    return parse_version(values[-1])


def content_type(scope: Scope) -> bytes:
    """The request's media type (no parameters), lower case; empty if none was sent."""
    value = Headers(scope=scope).get("content-type", "")
    return value.split(";", 1)[0].strip().lower().encode("latin-1")


def is_json(ctype: bytes) -> bool:
    """No content type counts as JSON; so do ``application/json`` and ``*/*+json``."""
    return not ctype or ctype == b"application/json" or ctype.endswith(b"+json")


def answer(probs: np.ndarray, single: bool, model: dict[str, Any]) -> bytes:
    """``DigitPrediction`` (one image) or ``DigitBatchPrediction`` as JSON bytes."""
    digits = probs.argmax(axis=1).tolist()
    if single:
        doc: dict[str, Any] = {"digit": digits[0], "probabilities": probs[0], "model": model}
    else:
        predictions = [{"digit": d, "probabilities": p} for d, p in zip(digits, probs, strict=True)]
        doc = {"predictions": predictions, "model": model}
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def parse_json_images(body: bytes, max_images: int) -> tuple[np.ndarray, bool]:
    """A JSON body → (float32 [n, 28, 28] in [0, 1], whether it was a single ``image``).

    The fast path takes the bodies it can prove valid cheaply; every other body (all refusals
    included) is decided by the schema's :func:`~app.schemas.digits.parse_request`, which is
    handed the parsed body so as not to parse it again. ``check_json_budget`` first bounds what
    parsing a large body can cost.
    """
    check_json_budget(body)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:  # also NaN, Infinity and 1e999, which orjson refuses
        return parse_request(body, max_images)  # refuses it, with the reason
    fast = _fast_doc(doc, body, max_images)
    return fast if fast is not None else parse_request(body, max_images, doc)


def _fast_parse(body: bytes, max_images: int) -> tuple[np.ndarray, bool] | None:
    """orjson, one NumPy array, a few vectorised checks; ``None``: ask the schema."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return _fast_doc(doc, body, max_images)


def _fast_doc(doc: Any, body: bytes, max_images: int) -> tuple[np.ndarray, bool] | None:
    if type(doc) is not dict or not FIELDS.issuperset(doc):
        return None
    scale = doc.get("pixel_scale", 255)
    if type(scale) not in (int, float) or not SCALE_MIN <= scale <= SCALE_MAX:
        return None
    one, many = doc.get("image"), doc.get("images")
    if (one is None) == (many is None):
        return None
    if one is None and (type(many) is not list or not 0 < len(many) <= max_images):
        return None
    images = [one] if one is not None else many
    rows = _rows(images)  # the structure first: NumPy never reads a list of the wrong shape
    if rows is None:
        return None
    arr = _uint8_images(rows, len(images))
    if arr is None:  # not plain 0–255 integers: any numbers
        if _quotes(body) != 2 * len(doc):  # a string value: NumPy would make every pixel as
            return None  # wide as the longest string (one of 3 MB among 784: 9.4 GB)
        arr = _general_images(rows, len(images))
        if arr is None:
            return None
    if _holds_booleans(body):  # JSON true/false pass as 1/0 in bytes() and NumPy
        return None
    in_range = arr.dtype == np.uint8 and scale >= 255
    if not in_range and not (arr.min() >= 0 and arr.max() <= scale):  # also NaN
        return None
    # As modelspec.digits.scale_pixels: float32(pixels) / float32(scale), in one pass.
    images = np.divide(arr, np.float32(scale), dtype=np.float32)
    return images, one is not None


LARGE = 65_536  # bodies scanned with NumPy (bytes.count and .find: ~5× slower over 1 MB)


def _quotes(body: bytes) -> int:
    """How many ``"`` the body holds."""
    if len(body) < LARGE:
        return body.count(b'"')
    return int(np.count_nonzero(np.frombuffer(body, np.uint8) == ord('"')))


def _holds_booleans(body: bytes) -> bool:
    """Whether the body holds a JSON true or false: a body that got here has keys in
    ``FIELDS`` and numbers only, none of which has a ``t`` or an ``f``."""
    if len(body) < LARGE:
        return body.find(b"true") >= 0 or body.find(b"false") >= 0
    raw = np.frombuffer(body, np.uint8)
    return bool(np.count_nonzero(raw == ord("t")) or np.count_nonzero(raw == ord("f")))


def _rows(images: list[Any]) -> list[Any] | None:
    """The images' rows if they are all of one form with the right lengths (flat: one row of
    784 per image; nested: 28 rows of 28), else ``None``; the values are not looked at."""
    first = images[0]
    if type(first) is not list:
        return None
    if len(first) == PIXELS:
        for image in images:
            if type(image) is not list or len(image) != PIXELS:
                return None
        return images
    rows: list[Any] = []
    for image in images:
        if type(image) is not list or len(image) != IMAGE_SIZE:
            return None
        for row in image:
            if type(row) is not list or len(row) != IMAGE_SIZE:
                return None
        rows += image
    return rows


def _uint8_images(rows: list[Any], n: int) -> np.ndarray | None:
    """The common case fast (~3× ``np.asarray``): pixels that are all ints 0–255 → uint8
    [n, 28, 28]; ``None`` for anything else (``bytes()`` checks the values)."""
    try:
        data = b"".join(map(bytes, rows))
    except (TypeError, ValueError):  # floats, values outside 0–255, nested lists, strings …
        return None
    return np.frombuffer(data, np.uint8).reshape(n, IMAGE_SIZE, IMAGE_SIZE)


def _general_images(rows: list[Any], n: int) -> np.ndarray | None:
    """Any numbers via ``np.asarray``: [n, 28, 28] ints or floats, or ``None`` if not that."""
    try:
        arr = np.asarray(rows)  # no dtype: "1" stays a string
    except (ValueError, TypeError, OverflowError):  # ragged: a pixel that is a list
        return None
    if arr.dtype.kind not in "iuf" or arr.ndim != 2:  # strings, null, objects, true/false
        return None
    return arr.reshape(n, IMAGE_SIZE, IMAGE_SIZE)
