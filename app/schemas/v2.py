"""Open Inference Protocol (KServe v2) shapes: server and model metadata, health, infer, errors.

``InferRequest`` also validates the JSON part of an inference request (strictly: a shape of
``"3"`` or ``3.0`` is refused); tensor ``data`` is left as parsed and decoded by
``app.services.tensor_codec``, so 100k numbers never pass through pydantic one by one.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.schemas.digits import EXAMPLE_IMAGE

Parameters = dict[str, Any]
MAX_TENSORS = 64  # inputs or outputs in one request (mnist_lstm has 1 and 2)
MAX_PARAMETERS = 64  # keys of one parameters object

MAX_DIMS = 8  # dimensions of one tensor (the digit model takes 3; app.services.tensor_codec)


class V2Error(BaseModel):
    error: str = Field(
        description="`<code>: <what is wrong>`; the code is the one `/predict/digit` uses.",
        examples=["invalid_shape: input 'images': shape must be [n, 28, 28]; got [1, 784]"],
    )


class ServerMetadata(BaseModel):
    name: str = Field(examples=["rnn-serving"])
    version: str = Field(examples=["0.1.0"])
    extensions: list[str] = Field(
        examples=[["binary_tensor_data", "sequence", "sequence(string_id)"]]
    )


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str = Field(examples=["mnist_lstm"])
    ready: bool


class TensorMetadata(BaseModel):
    name: str = Field(examples=["images"])
    datatype: str = Field(examples=["FP32"])
    shape: list[int] = Field(description="-1: any size.", examples=[[-1, 28, 28]])


class ModelMetadata(BaseModel):
    name: str = Field(examples=["mnist_lstm"])
    versions: list[str] = Field(description="The loaded version.", examples=[["1"]])
    platform: str = Field(examples=["tensorflow_savedmodel"])
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    name: str = Field(examples=["images"])
    shape: list[int] = Field(
        examples=[[1, 28, 28]], max_length=MAX_DIMS, fail_fast=True, description="At most 8 dims."
    )
    datatype: str = Field(examples=["UINT8"])
    parameters: Parameters | None = Field(
        None,
        description="`binary_data_size`: the tensor's bytes follow the JSON header "
        "(binary tensor data extension) instead of `data`.",
        max_length=MAX_PARAMETERS,
    )
    data: Any = Field(None, description="The elements, flat or nested, row-major.")


class RequestOutput(BaseModel):
    name: str = Field(examples=["probabilities"])
    parameters: Parameters | None = Field(
        None,
        description="`binary_data`: true sends this output as raw bytes.",
        max_length=MAX_PARAMETERS,
    )


class InferRequest(BaseModel):
    """Lists stop at their first bad item and at their bound (``fail_fast``, ``max_length``), so
    that a refusal costs a few errors however many items were sent (1.3M inputs ``{}`` made 3.9M
    errors: 10 s and 4 GB)."""

    id: str | None = None
    parameters: Parameters | None = Field(
        None,
        description="`binary_data_output`: true sends every output as raw bytes.",
        max_length=MAX_PARAMETERS,
    )
    inputs: list[RequestInput] = Field(min_length=1, max_length=MAX_TENSORS, fail_fast=True)
    outputs: list[RequestOutput] | None = Field(
        None,
        description="The outputs wanted (default: all of them).",
        max_length=MAX_TENSORS,
        fail_fast=True,
    )


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


_PIXELS = [v for row in EXAMPLE_IMAGE for v in row]
_PROBS = [0.0, 0.9995, 0.0001, 0.0, 0.0001, 0.0, 0.0001, 0.0001, 0.0001, 0.0]


def infer_request_body() -> dict[str, Any]:
    """The ``requestBody`` documentation of ``POST .../infer``: JSON and binary forms."""
    json_examples = {
        "uint8": {
            "summary": "One image, UINT8 0–255, flat (a crude 1)",
            "value": {"inputs": [_input([1, 28, 28], "UINT8", _PIXELS)]},
        },
        "fp32_batch": {
            "summary": "Two images, FP32 in [0, 1]; only the digits, as JSON",
            "value": {
                "id": "req-1",
                "inputs": [_input([2, 28, 28], "FP32", [v / 255 for v in _PIXELS] * 2)],
                "outputs": [{"name": "digit"}],
            },
        },
    }
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": InferRequest.model_json_schema(),
                "examples": json_examples,
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "Binary tensor data extension: the JSON request (its length in "
                "the `Inference-Header-Content-Length` header; inputs carry "
                '`"parameters": {"binary_data_size": <bytes>}` instead of `data`), then each '
                "such input's raw little-endian bytes, in order.",
            },
        },
    }


def _input(shape: list[int], datatype: str, data: list[Any]) -> dict[str, Any]:
    return {"name": "images", "shape": shape, "datatype": datatype, "data": data}


INFER_RESPONSE_EXAMPLE = {
    "model_name": "mnist_lstm",
    "model_version": "1",
    "outputs": [
        {"name": "probabilities", "shape": [1, 10], "datatype": "FP32", "data": _PROBS},
        {"name": "digit", "shape": [1], "datatype": "INT64", "data": [1]},
    ],
}
