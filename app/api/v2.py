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

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from starlette.types import Scope

from app.api.access import bearer_key, split_list
from app.api.errors import ApiError, http_status
from app.api.params import parse_version
from app.api.responses import OrjsonResponse
from app.api.v2_request import HEADER_LENGTH, parse_infer, render_infer, wanted_outputs
from app.core import errors as svc
from app.schemas import v2 as schema
from app.services import tensor_codec
from app.services.echo_sequences import scope_of, sequence_bits, sequence_key
from app.services.models import ServedModel
from app.state import AppState, app_state
from modelspec.contract import (
    DIGIT_INPUT,
    DIGIT_MODEL,
    DIGIT_OUTPUT,
    ECHO_BITS,
    ECHO_PROBABILITIES,
    IMAGE_SIZE,
    NUM_CLASSES,
)

log = logging.getLogger(__name__)

PLATFORM = "tensorflow_savedmodel"
EXTENSIONS = ["binary_tensor_data", "sequence", "sequence(string_id)"]
DIGIT_LABEL = "digit"  # INT64 [n]: the most probable digit, beside the probabilities
DIGIT_OUTPUTS = (DIGIT_OUTPUT, DIGIT_LABEL)
ECHO_OUTPUT_BITS = "bits"  # UINT8 [1, T]: the predicted bits, beside the probabilities
ECHO_OUTPUTS = (ECHO_PROBABILITIES, ECHO_OUTPUT_BITS)

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
    models = state.models
    if models is None:  # before the lifespan built the repository
        raise svc.NotReady("the models are not loaded yet")
    if name not in models.versions:
        served = ", ".join(models.versions)
        raise svc.NotFound(f"unknown model {svc.clip(name)!r}; served: {served}")
    if version is None:
        default = models.default(name)
        if default is None or default.model is None:
            raise svc.NotReady(f"no version of {name} is available yet")
        return default.model
    found = models.version(name, parse_version(version)).model
    assert found is not None
    return found


def _tensor(name: str, datatype: str, *shape: int) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(shape)}


def _metadata(state: AppState, model: ServedModel) -> dict[str, Any]:
    if model.name == DIGIT_MODEL:
        inputs = [_tensor(DIGIT_INPUT, "FP32", -1, IMAGE_SIZE, IMAGE_SIZE)]
        outputs = [
            _tensor(DIGIT_OUTPUT, "FP32", -1, NUM_CLASSES),
            _tensor(DIGIT_LABEL, "INT64", -1),
        ]
    else:  # echo_rnn as a sequence model: one sequence's next T bits a request
        inputs = [_tensor(ECHO_BITS, "UINT8", 1, -1)]
        outputs = [
            _tensor(ECHO_PROBABILITIES, "FP32", 1, -1),
            _tensor(ECHO_OUTPUT_BITS, "UINT8", 1, -1),
        ]
    return {
        "name": model.name,
        "versions": [str(v) for v in state.models.serving(model.name)] if state.models else [],
        "platform": PLATFORM,
        "inputs": inputs,
        "outputs": outputs,
    }


def _model_ready(state: AppState, model: ServedModel) -> bool:
    """Loaded and serving (``_model`` only returns available versions) while the server is."""
    return state.lifecycle.status == "ready"


@router.get("", response_model=schema.ServerMetadata, summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": "rnn-serving", "version": request.app.version, "extensions": EXTENSIONS}


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
    if len(tensors) != 1 or tensors[0].name != DIGIT_INPUT:
        names = ", ".join(repr(svc.clip(t.name)) for t in tensors[:3])
        if len(tensors) > 3:
            names += f", … ({len(tensors)} inputs)"
        raise svc.InvalidInput(
            f"mnist_lstm takes exactly one input, {DIGIT_INPUT!r}; got {names}", "invalid_request"
        )
    (tensor,) = tensors
    tensor_codec.check_digit_input(
        tensor.name, tensor.datatype, tensor.shape, settings.max_batch_images
    )
    images = tensor_codec.digit_images(tensor.name, tensor.datatype, tensor.decode())
    probs = await state.digit_service(model.version).predict(images)  # /predict/digit's batcher
    arrays = {DIGIT_OUTPUT: probs, DIGIT_LABEL: probs.argmax(axis=1).astype(np.int64)}
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
    parsed, tensors = parse_infer(body, header_length, state.settings.max_request_bytes)
    params = parsed.parameters or {}
    sequence_key(params.get("sequence_id"))  # first: without it nothing else matters
    sequences = state.sequences
    if sequences is None:
        raise svc.NotReady("the echo service is not ready")
    outputs = wanted_outputs(parsed, ECHO_OUTPUTS)
    if len(tensors) != 1 or tensors[0].name != ECHO_BITS:
        names = ", ".join(repr(svc.clip(t.name)) for t in tensors[:3])
        raise svc.InvalidInput(
            f"{model.name} takes exactly one input, {ECHO_BITS!r} [1, T]; got {names}",
            "invalid_request",
        )
    (tensor,) = tensors
    if len(tensor.shape) != 2 or tensor.shape[0] != 1:  # before decoding anything
        raise svc.InvalidInput(
            f"input {ECHO_BITS!r}: shape must be [1, T], one sequence's next T bits; got "
            f"{list(tensor.shape)}",
            "invalid_shape",
        )
    keys_on = bool(split_list(state.settings.api_keys.get_secret_value()))
    client = scope.get("client")
    reply = await sequences.step(
        scope=scope_of(bearer_key(scope) if keys_on else None),
        sequence_id=params.get("sequence_id"),
        start=params.get("sequence_start", False),
        end=params.get("sequence_end", False),
        request_id=parsed.id,
        bits=sequence_bits(ECHO_BITS, tensor.decode()),
        version=model.version if versioned else None,
        client=client[0] if client else None,
    )
    arrays = {
        ECHO_PROBABILITIES: reply.probabilities.reshape(1, -1),
        ECHO_OUTPUT_BITS: reply.bits.reshape(1, -1),
    }
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
