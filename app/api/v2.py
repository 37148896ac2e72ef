"""The Open Inference Protocol (KServe v2) REST routes, beside the native ones.

Triton's, KServe's and MLServer's clients and tools work unchanged: server and model metadata,
health, model readiness, and ``infer`` on ``mnist_lstm`` through the same dynamic batcher,
limits and metrics as ``POST /predict/digit`` (JSON or the binary tensor data extension).
``echo_rnn`` is served through Triton's sequence extension (``parameters.sequence_id``,
``sequence_start``, ``sequence_end``; ``app.services.echo_sequences``, docs/sequences.md): its
sequences are ``/echo`` sessions. Every failure is ``{"error": "<code>: <detail>"}`` with the
protocol's status (``V2Route``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from starlette.types import Scope

from app.api.access import bearer_key
from app.api.errors import ApiError, http_status
from app.api.responses import OrjsonResponse
from app.api.v2_request import HEADER_LENGTH, parse_infer, render_infer, wanted_outputs
from app.core import errors as svc
from app.core.api_keys import split_list
from app.schemas import v2 as schema
from app.services import open_inference
from app.services.models import ServedModel
from app.services.open_inference import (
    DIGIT_OUTPUTS,
    ECHO_OUTPUTS,
    EXTENSIONS,
    SERVER_NAME,
    begin_sequence_step,
    classify_digits,
    digit_images,
    sequence_outputs,
    sequences_for,
    served_model,
)
from app.state import AppState, app_state
from modelspec.contract import DIGIT_MODEL

log = logging.getLogger(__name__)

# The protocol answers a bad request with 400 where the native routes say 422 or 415; every
# other status is the one app.api.errors maps the domain error to.
PROTOCOL_STATUS = {422: 400, 415: 400}


def v2_error(exc: Exception, path: str = "") -> OrjsonResponse:
    """Any failure → ``{"error": "<code>: <detail>"}`` with the protocol's status."""
    headers = None
    if isinstance(exc, svc.ServiceError):
        status, code, detail = http_status(exc), exc.code, exc.detail
        if isinstance(exc, svc.Overloaded):
            headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
    elif isinstance(exc, ApiError):
        status, code, detail = exc.status, exc.code, exc.detail
    else:
        log.exception("unhandled error", extra={"path": path})
        status, code, detail = 500, "internal_error", "internal server error"
    body = {"error": f"{code}: {detail}"}
    return OrjsonResponse(body, status_code=PROTOCOL_STATUS.get(status, status), headers=headers)


class V2Route(APIRoute):
    """A route whose every failure is answered in the protocol's error shape."""

    def inner_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return super().get_route_handler()

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = self.inner_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return v2_error(exc, request.url.path)

        return guarded


class _RequestOnlyV2Route(V2Route):
    """The endpoint takes only the ``Request`` and is called directly (no dependency solving)."""

    def inner_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return self.endpoint


router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"], route_class=V2Route)
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schema.V2Error, "description": text}
    for status, text in {
        400: "Malformed request: JSON, datatype, shape, data, binary sizes, outputs.",
        404: "Unknown model or version.",
        409: "Another request of the same sequence holds it (sequence_busy).",
        413: "Body over MAX_REQUEST_BYTES or more images than MAX_BATCH_IMAGES.",
        503: "Not ready (loading or stopping).",
        504: "Inference did not finish within REQUEST_TIMEOUT_S.",
    }.items()
}


def _model(state: AppState, name: str, version: str | None) -> ServedModel:
    """The served model ``name`` at ``version`` (default: its newest available), else 404."""
    return served_model(state.models, name, version)


def _metadata(state: AppState, model: ServedModel) -> dict[str, Any]:
    assert state.models is not None
    return open_inference.model_metadata(state.models, model)


def _model_ready(state: AppState, model: ServedModel) -> bool:
    """Loaded and serving (``_model`` only returns available versions) while the server is."""
    return state.lifecycle.status == "ready"


@router.get("", response_model=schema.ServerMetadata, summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": request.app.version, "extensions": EXTENSIONS}


@router.get("/health/live", response_model=schema.ServerLive, summary="The server is live")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    "/health/ready",
    response_model=schema.ServerReady,
    summary="Every model is ready (503 while loading or stopping)",
    responses={503: {"model": schema.ServerReady}},
)
async def server_ready(request: Request) -> OrjsonResponse:
    ready = app_state(request).lifecycle.status == "ready"
    return OrjsonResponse({"ready": ready}, status_code=200 if ready else 503)


METADATA = {
    "response_model": schema.ModelMetadata,
    "summary": "Model metadata: versions, platform, input and output tensors",
    "responses": {404: ERRORS[404]},
}
READY = {
    "response_model": schema.ModelReady,
    "summary": "The model is ready for inference (503 while loading or stopping)",
    "responses": {404: ERRORS[404], 503: {"model": schema.ModelReady}},
}


@router.get("/models/{model_name}", **METADATA)
async def model_metadata(request: Request, model_name: str) -> dict[str, Any]:
    state = app_state(request)
    return _metadata(state, _model(state, model_name, None))


@router.get("/models/{model_name}/versions/{model_version}", **METADATA)
async def model_version_metadata(
    request: Request, model_name: str, model_version: str
) -> dict[str, Any]:
    state = app_state(request)
    return _metadata(state, _model(state, model_name, model_version))


@router.get("/models/{model_name}/ready", **READY)
async def model_ready(request: Request, model_name: str) -> OrjsonResponse:
    return _ready_response(app_state(request), model_name, None)


@router.get("/models/{model_name}/versions/{model_version}/ready", **READY)
async def model_version_ready(
    request: Request, model_name: str, model_version: str
) -> OrjsonResponse:
    return _ready_response(app_state(request), model_name, model_version)


def _ready_response(state: AppState, name: str, version: str | None) -> OrjsonResponse:
    ready = _model_ready(state, _model(state, name, version))
    return OrjsonResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


async def infer(request: Request) -> Response:
    """Classify digits (``mnist_lstm``), or advance a sequence (``echo_rnn``)."""
    params = request.path_params
    body = await request.body()
    content, headers = await infer_body(
        app_state(request),
        params["model_name"],
        params.get("model_version"),
        body,
        request.headers.get(HEADER_LENGTH),
        request.scope,
    )
    return Response(content, headers=headers)


async def infer_body(
    state: AppState,
    name: str,
    version: str | None,
    body: bytes,
    header_length: str | None,
    scope: Scope,
) -> tuple[bytes, dict[str, str]]:
    """An infer request's body → the response body and headers (``V2InferRoute`` too); the
    request's ASGI ``scope`` gives a sequence's API key and client address."""
    model = _model(state, name, version)
    if model.name != DIGIT_MODEL:
        return await _sequence_step(state, model, version is not None, body, header_length, scope)
    settings = state.settings
    parsed, tensors = parse_infer(body, header_length, settings.max_request_bytes)
    outputs = wanted_outputs(parsed, DIGIT_OUTPUTS)
    images = digit_images(tensors, settings.max_batch_images)
    service = state.digit_service(model.version)  # /predict/digit's batcher
    arrays = await classify_digits(service, images)
    return render_infer(
        model.name, str(model.version), parsed.id, [(n, arrays[n], b) for n, b in outputs]
    )


async def _sequence_step(
    state: AppState,
    model: ServedModel,
    versioned: bool,
    body: bytes,
    header_length: str | None,
    scope: Scope,
) -> tuple[bytes, dict[str, str]]:
    """One step of an ``echo_rnn`` sequence: input ``bits`` [1, T] → ``probabilities`` and
    ``bits`` [1, T]; ``parameters.replayed`` when a retried ``id`` got its stored answer."""
    settings = state.settings
    parsed, tensors = parse_infer(body, header_length, settings.max_request_bytes)
    params = parsed.parameters or {}
    sequences = sequences_for(state.sequences, params)
    outputs = wanted_outputs(parsed, ECHO_OUTPUTS)
    keys_on = bool(split_list(settings.api_keys.get_secret_value()))
    client = scope.get("client")
    step = begin_sequence_step(
        sequences,
        model,
        versioned,
        tensors,
        params,
        parsed.id,
        bearer_key(scope) if keys_on else None,
        client[0] if client else None,
    )
    reply = await asyncio.shield(step)
    arrays = sequence_outputs(reply)
    return render_infer(
        model.name,
        str(reply.version),
        parsed.id,
        [(n, arrays[n], b) for n, b in outputs],
        {"replayed": True} if reply.replayed else None,
    )


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


INFER_PATHS = ("/models/{model_name}/infer", "/models/{model_name}/versions/{model_version}/infer")
for _path in INFER_PATHS:
    router.add_api_route(
        _path,
        infer,
        methods=["POST"],
        route_class_override=_RequestOnlyV2Route,
        response_model=schema.InferResponse,
        summary="Run inference (JSON or the binary tensor data extension)",
        description=(
            "`mnist_lstm`: input `images` FP32 `[n, 28, 28]` in [0, 1] or UINT8 0–255 (n ≤ "
            "`MAX_BATCH_IMAGES`); outputs `probabilities` FP32 `[n, 10]` and `digit` INT64 "
            "`[n]`. Through the same dynamic batcher as `POST /predict/digit`. `echo_rnn`: "
            "Triton's sequence extension, `parameters.sequence_id` (uint64 or string), "
            "`sequence_start`, `sequence_end`; input `bits` `[1, T]` of 0/1; outputs "
            "`probabilities` FP32 and `bits` UINT8 `[1, T]`; a retried `id` gets its stored "
            "answer (`parameters.replayed`). See docs/sequences.md."
        ),
        responses={
            200: {"content": {"application/json": {"example": schema.INFER_RESPONSE_EXAMPLE}}},
            **ERRORS,
        },
        openapi_extra={
            "requestBody": schema.infer_request_body(),
            "parameters": [_path_param(p) for p in ("model_name", "model_version") if p in _path],
        },
    )
INFER_ROUTES = tuple(r for r in router.routes if getattr(r, "endpoint", None) is infer)
