"""``POST /predict/digit``: classify MNIST-style pixels sent as JSON, or an uploaded picture.

The documented route: JSON bodies (``app.api.digit_json``), multipart uploads
(``app.api.digit_upload``), 415 for other content types. The contract is documented by
``app.schemas.digits``. :func:`json_route` is the raw-ASGI route the app lists ahead of this one
for JSON requests (same answers, without FastAPI's per-request machinery).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.api.digit_json import (
    JSON_TYPE,
    PATH,
    DigitJsonRoute,
    answer,
    content_type,
    is_json,
    json_response,
    requested_version,
)
from app.api.digit_upload import read_upload
from app.core.errors import UnsupportedMedia
from app.schemas.common import ErrorResponse
from app.schemas.digits import DigitBatchPrediction, DigitPrediction, openapi_request_body
from app.state import app_state

router = APIRouter(tags=["digits"])


async def predict_digit(request: Request) -> Response:
    """JSON pixels, a multipart upload, or 415."""
    ctype = content_type(request.scope)
    if is_json(ctype):
        return await json_response(app_state(request), await request.body(), request.scope)
    if ctype != b"multipart/form-data":
        raise UnsupportedMedia(
            'send application/json ({"image": ...} or {"images": [...]}) or '
            'multipart/form-data with the picture in field "file"'
        )
    version = requested_version(request.scope)
    image = await read_upload(request)
    # Looked up only now: a version swap while the upload was read must not catch it draining.
    service = app_state(request).digit_service(version)
    content = answer(await service.predict(image), True, service.model_ref)
    return Response(content, media_type=JSON_TYPE)


router.add_api_route(
    PATH,
    predict_digit,
    methods=["POST"],
    summary="Classify a handwritten digit (JSON pixels or an uploaded picture)",
    description=(
        'Send JSON — `{"image": …}` for one 28×28 image or `{"images": [...]}` for a batch; '
        "MNIST-style pixels 0–255, white ink on black (or floats in [0, 1] with "
        '`"pixel_scale": 1`) — or upload a picture as `multipart/form-data` field `file`: any '
        "size, dark-on-light or light-on-dark, which is cropped, fitted and centred like MNIST. "
        'Errors are `{"error": code, "detail": text}`. `?version=N` asks for one model '
        "version (404 with the available ones if it is not); without it the newest available "
        "serves. The answer's `model` says which version did."
    ),
    response_model=DigitPrediction | DigitBatchPrediction,
    responses={
        status: {"model": ErrorResponse, "description": text}
        for status, text in {
            400: "Malformed multipart body.",
            413: "Body over the size limit, too many images, or a picture over a pixel limit.",
            415: "Neither JSON nor multipart, or an upload that is not a readable image.",
            404: "The requested model version is not available (the available ones listed).",
            422: "Invalid JSON, wrong shape, values out of range, a thin strip, or no digit found.",
            500: "The model call failed (never a non-finite probability in an answer).",
            503: "The model is not ready (loading or stopping), or too many uploads at once.",
            504: "Inference did not finish within the request timeout.",
        }.items()
    },
    openapi_extra={
        "requestBody": openapi_request_body(),
        "parameters": [
            {
                "name": "version",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1},
                "description": "The mnist_lstm version to use (default: the newest available).",
            }
        ],
    },
)


def json_route() -> DigitJsonRoute:
    """The raw-ASGI route for JSON requests, to list ahead of this router's routes."""
    (route,) = [r for r in router.routes if getattr(r, "path", None) == PATH]
    return DigitJsonRoute(route)
