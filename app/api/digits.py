"""``POST /predict/digit``: classify MNIST-style pixels sent as JSON, or an uploaded picture.

The JSON hot path is lean on purpose (issue #4): the raw body is parsed by orjson, turned into
one NumPy array (bytes() for the usual 0–255 integers) and validated with a few vectorised checks
instead of pydantic over 784 numbers; the answer is serialised by orjson straight from float32.
``DigitFastPath`` serves JSON requests without FastAPI's routing layers; the FastAPI route serves
everything else (uploads, refusals) and documents the contract (``app.schemas.digits``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import ApiError, service_error_response
from app.schemas.common import ErrorResponse
from app.schemas.digits import DigitBatchPrediction, DigitPrediction, openapi_request_body
from app.services.digit_service import DigitService
from app.services.errors import ServiceError
from modelspec.contract import IMAGE_SIZE

log = logging.getLogger(__name__)

PATH = "/predict/digit"
PIXELS = IMAGE_SIZE * IMAGE_SIZE
FIELDS = frozenset({"image", "images", "pixel_scale"})
JSON_HEADERS = [(b"content-type", b"application/json")]


class _RequestOnlyRoute(APIRoute):
    """An ``APIRoute`` (documented in OpenAPI) whose endpoint takes only the ``Request``, called
    directly: no per-request dependency solving."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return self.endpoint


router = APIRouter(tags=["digits"], route_class=_RequestOnlyRoute)


@router.post(
    PATH,
    summary="Classify a handwritten digit (JSON pixels or an uploaded picture)",
    description=(
        'Send JSON — `{"image": …}` for one 28×28 image or `{"images": [...]}` for a batch; '
        "MNIST-style pixels 0–255, white ink on black (or floats in [0, 1] with "
        '`"pixel_scale": 1`) — or upload a picture as `multipart/form-data` field `file`: any '
        "size, dark-on-light or light-on-dark, which is cropped, fitted and centred like MNIST. "
        'Errors are `{"error": code, "detail": text}`.'
    ),
    response_model=DigitPrediction | DigitBatchPrediction,
    responses={
        status: {"model": ErrorResponse, "description": text}
        for status, text in {
            400: "Malformed multipart body.",
            413: "Body over the size limit, too many images, or a picture over a pixel limit.",
            415: "Neither JSON nor multipart, or an upload that is not a readable image.",
            422: "Invalid JSON, wrong shape, values out of range, a thin strip, or no digit found.",
            503: "The model is not ready (loading or stopping), or too many uploads at once.",
            504: "Inference did not finish within the request timeout.",
        }.items()
    },
    openapi_extra={"requestBody": openapi_request_body()},
)
async def predict_digit(request: Request) -> Response:
    state = request.app.state
    ctype = _content_type(request.scope)
    if _is_json(ctype):
        content = await predict_json(state, await request.body())
    elif ctype == b"multipart/form-data":
        service = _service(state)
        image = await _read_upload(request)
        content = _answer(await service.predict(image), True, service.model_ref)
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            'send application/json ({"image": ...} or {"images": [...]}) or '
            'multipart/form-data with the picture in field "file"',
        )
    return Response(content, media_type="application/json")


_ROUTE = router.routes[-1]


class DigitFastPath:
    """Pure-ASGI shortcut for JSON ``POST /predict/digit``; add it inside ``RequestGuard``.

    It skips FastAPI's exception, routing and endpoint layers (about half of the app-side CPU of
    a one-image request) and answers exactly as the route does; every other request goes on to
    the app unchanged, so the service behaves the same with or without it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != PATH
            or scope["method"] != "POST"
            or not _is_json(_content_type(scope))
        ):
            await self.app(scope, receive, send)
            return
        scope["route"] = _ROUTE  # for the access log and metrics labels
        chunks = []
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
            status, content = 200, await predict_json(scope["app"].state, b"".join(chunks))
        except ApiError as exc:
            status, content = exc.status, orjson.dumps({"error": exc.code, "detail": exc.detail})
        except ServiceError as exc:
            response = service_error_response(exc)
            await response(scope, receive, send)
            return
        headers = [*JSON_HEADERS, (b"content-length", b"%d" % len(content))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})


async def predict_json(state: Any, body: bytes) -> bytes:
    """A JSON request body → the JSON answer; ``ApiError`` for anything wrong."""
    service = _service(state)
    images, single = parse_json_images(body, state.settings.max_batch_images)
    return _answer(await service.predict(images), single, service.model_ref)


def _service(state: Any) -> DigitService:
    service: DigitService | None = getattr(state, "digits", None)
    if service is None or not service.ready:
        raise ApiError(503, "not_ready", "the digit model is not ready (loading or stopping)")
    return service


def _content_type(scope: Scope) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower()
    return b""


def _is_json(ctype: bytes) -> bool:
    """No content type counts as JSON; so do ``application/json`` and ``*/*+json``."""
    return not ctype or ctype == b"application/json" or ctype.endswith(b"+json")


def _answer(probs: np.ndarray, single: bool, model: dict[str, Any]) -> bytes:
    digits = probs.argmax(axis=1).tolist()
    if single:
        doc: dict[str, Any] = {"digit": digits[0], "probabilities": probs[0], "model": model}
    else:
        predictions = [{"digit": d, "probabilities": p} for d, p in zip(digits, probs, strict=True)]
        doc = {"predictions": predictions, "model": model}
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def _invalid(code: str, detail: str) -> ApiError:
    return ApiError(422, code, detail)


def parse_json_images(body: bytes, max_images: int) -> tuple[np.ndarray, bool]:
    """A JSON body → (float32 [n, 28, 28] in [0, 1], whether it was a single ``image``)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:  # also NaN, Infinity and 1e999, which orjson refuses
        raise _invalid("invalid_json", f"the body is not valid JSON: {exc}") from None
    if type(doc) is not dict:
        raise _invalid(
            "invalid_request", 'the body must be an object: {"image": ...} or {"images": [...]}'
        )
    if not FIELDS.issuperset(doc):
        unknown = ", ".join(sorted(repr(k) for k in doc.keys() - FIELDS))
        raise _invalid(
            "invalid_request",
            f"unknown field(s) {unknown}; expected "
            '"image" or "images", and optionally "pixel_scale"',
        )
    scale = doc.get("pixel_scale", 255)
    if type(scale) not in (int, float) or not 0 < scale < math.inf:
        raise _invalid(
            "invalid_request",
            "pixel_scale must be a positive number (255 for 0–255 pixels, 1 for floats in [0, 1])",
        )
    one, many = doc.get("image"), doc.get("images")
    if (one is None) == (many is None):
        raise _invalid(
            "invalid_request",
            'send exactly one of "image" (one image) and "images" (a list of images)',
        )
    if one is None and (type(many) is not list or not many):
        raise _invalid("invalid_request", "images must be a non-empty list of images")
    if one is None and len(many) > max_images:
        raise ApiError(
            413,
            "too_many_images",
            f"{len(many)} images in one request; the limit is {max_images} (send several requests)",
        )
    arr = _uint8_images([one] if one is not None else many)
    if arr is None:  # not plain 0–255 integers in well-formed lists: the general path
        arr = _general_images(one, many)
    if body.find(b"true") >= 0 or body.find(b"false") >= 0:  # JSON booleans pass as 0/1 in NumPy
        raise _invalid("invalid_pixels", "pixel values must be numbers, not true/false")
    if arr.dtype != np.uint8 or scale < 255:
        lo, hi = arr.min(), arr.max()
        if not (lo >= 0 and hi <= scale):  # also catches NaN and ±infinity
            raise _invalid(
                "invalid_pixels",
                f"pixel values must lie in [0, {scale:g}] "
                f"(pixel_scale {scale:g}); got values from {lo:g} to {hi:g}",
            )
    # As modelspec.digits.scale_pixels: float32(pixels) / float32(scale), in one pass.
    images = np.divide(arr, np.float32(scale), dtype=np.float32) if scale != 1 else arr
    return images.astype(np.float32, copy=False), one is not None


def _uint8_images(images: list[Any]) -> np.ndarray | None:
    """The common case fast (~3× ``np.asarray``): images all of one form whose pixels are ints
    0–255 → uint8 [n, 28, 28]; ``None`` for anything else (``bytes()`` checks the values)."""
    first = images[0]
    if type(first) is not list:
        return None
    rows: list[Any] = []
    if len(first) == PIXELS:
        for image in images:
            if type(image) is not list or len(image) != PIXELS:
                return None
        rows = images
    else:
        for image in images:
            if type(image) is not list or len(image) != IMAGE_SIZE:
                return None
            for row in image:
                if type(row) is not list or len(row) != IMAGE_SIZE:
                    return None
            rows += image
    try:
        data = b"".join(map(bytes, rows))
    except (TypeError, ValueError):  # floats, values outside 0–255, nested lists, strings …
        return None
    return np.frombuffer(data, np.uint8).reshape(len(images), IMAGE_SIZE, IMAGE_SIZE)


def _general_images(one: Any, many: Any) -> np.ndarray:
    """Any numbers via ``np.asarray``, with a precise error for every malformed body."""
    field, value = ("image", one) if one is not None else ("images", many)
    try:
        arr = np.asarray(value)  # no dtype: strings, null and objects show up in the dtype
    except (ValueError, TypeError, OverflowError):
        raise _invalid(
            "invalid_shape",
            f"{field} is ragged: every row must have the same length and hold numbers only",
        ) from None
    if arr.dtype.kind not in "iuf":
        what = "true/false" if arr.dtype.kind == "b" else "non-numbers (strings, null, objects)"
        raise _invalid(
            "invalid_pixels",
            f"{field} holds {what}; pixel values must be numbers (or the lists are ragged)",
        )
    shape = arr.shape if one is not None else arr.shape[1:]
    if shape not in ((IMAGE_SIZE, IMAGE_SIZE), (PIXELS,)):
        each = "image must" if one is not None else "each image must (all in the same form)"
        raise _invalid(
            "invalid_shape",
            f"{each} be {IMAGE_SIZE} rows of {IMAGE_SIZE} "
            f"numbers or a flat list of {PIXELS} numbers; got shape {shape}",
        )
    return arr.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)


async def _read_upload(request: Request) -> np.ndarray:
    """The multipart field ``file`` → float32 [1, 28, 28] through the MNIST preprocessing."""
    try:
        form = await request.form(max_files=1, max_fields=8)
    except HTTPException as exc:
        raise ApiError(
            400, "invalid_multipart", f"malformed multipart body: {exc.detail}"
        ) from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise _invalid(
                "invalid_request", 'send the picture as a file in the multipart field "file"'
            )
        data = await upload.read()
    finally:
        await form.close()
    if not data:
        raise _invalid("invalid_image", "the uploaded file is empty")
    image = await request.app.state.uploads.preprocess(data)  # app.services.uploads
    return image[None]
