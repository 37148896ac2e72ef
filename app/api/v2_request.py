"""The bytes of a v2 inference request and response, with the binary tensor data extension.

A request body is JSON, or (header ``Inference-Header-Content-Length: N``) N bytes of JSON then
the raw bytes of every input whose ``parameters.binary_data_size`` says how many, in input
order. A response carries an output as raw bytes after its JSON header when the output asks
``"binary_data": true`` or the request ``"binary_data_output": true``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import ValidationError

from app.api.params import parse_uint
from app.core.errors import InvalidInput, clip
from app.schemas.json_budget import check_json_budget
from app.schemas.v2 import InferRequest
from app.services import tensor_codec

HEADER_LENGTH = "inference-header-content-length"


@dataclass
class Tensor:
    """One input as sent: its data are JSON ``data`` or ``raw`` bytes (binary extension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any = None
    raw: bytes | None = None

    def decode(self) -> np.ndarray:
        return tensor_codec.decode(self.name, self.datatype, self.shape, self.data, self.raw)


def parse_infer(
    body: bytes, header_length: str | None, max_elements: int
) -> tuple[InferRequest, list[Tensor]]:
    """A request body → the validated JSON request and its input tensors (not decoded yet)."""
    header, binary = _split(body, header_length)
    check_json_budget(header)
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        hint = "" if header_length else " (binary data needs Inference-Header-Content-Length)"
        raise InvalidInput(
            f"the request is not valid JSON{hint}: {clip(str(exc), 200)}", "invalid_json"
        ) from None
    try:
        request = InferRequest.model_validate(doc, strict=True)
    except ValidationError as exc:
        raise InvalidInput(_validation_text(exc), "invalid_request") from None
    tensors, offset = [], 0
    for item in request.inputs:
        shape = tensor_codec.check_shape(item.name, item.shape, max_elements)
        size = (item.parameters or {}).get("binary_data_size")
        if size is None:
            if item.data is None:
                raise InvalidInput(
                    f"input {clip(item.name)!r} has neither data nor a binary_data_size parameter",
                    "invalid_request",
                )
            tensors.append(Tensor(item.name, item.datatype, shape, data=item.data))
            continue
        if type(size) is not int or size < 0 or item.data is not None:
            raise InvalidInput(
                f"input {clip(item.name)!r}: binary_data_size must be a byte count, without data",
                "invalid_binary_data",
            )
        if offset + size > len(binary):
            raise InvalidInput(
                f"input {clip(item.name)!r}: binary_data_size {size} runs past the "
                f"{len(binary)} bytes after the JSON header",
                "invalid_binary_data",
            )
        raw = binary[offset : offset + size]
        tensors.append(Tensor(item.name, item.datatype, shape, raw=raw))
        offset += size
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes after the JSON header belong to no input "
            "(binary_data_size parameters add up to less)",
            "invalid_binary_data",
        )
    return request, tensors


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:  # ASCII digits only: int() would take " 12", "1_2" and "١٢" too
        n = parse_uint(header_length, HEADER_LENGTH, "invalid_binary_data", high=len(body))
    except InvalidInput:
        raise InvalidInput(
            f"Inference-Header-Content-Length {clip(header_length)!r} is not a byte count "
            f"within the {len(body)}-byte body",
            "invalid_binary_data",
        ) from None
    return body[:n], body[n:]


def _validation_text(exc: ValidationError) -> str:
    """The first errors, short: the schema's lists fail fast, so there are only a few."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(clip(str(p)) for p in err["loc"])
        msg = clip(err["msg"], 200)
        parts.append(f"{where}: {msg}" if where else msg)
    return "invalid inference request: " + "; ".join(parts)


def wanted_outputs(request: InferRequest, available: tuple[str, ...]) -> list[tuple[str, bool]]:
    """(output name, as binary) for every output the request wants, all of them by default."""
    binary_default = (request.parameters or {}).get("binary_data_output", False) is True
    if request.outputs is None:
        return [(name, binary_default) for name in available]
    wanted = []
    for out in request.outputs:
        if out.name not in available:
            raise InvalidInput(
                f"unknown output {clip(out.name)!r}; this model has {', '.join(available)}",
                "invalid_request",
            )
        params = out.parameters or {}
        if "classification" in params:
            raise InvalidInput("the classification extension is not served", "invalid_request")
        binary = params.get("binary_data", binary_default)
        if type(binary) is not bool:
            raise InvalidInput(f"output {clip(out.name)!r}: binary_data must be true or false")
        wanted.append((out.name, binary))
    return wanted


def render_infer(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: list[tuple[str, np.ndarray, bool]],
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers; binary outputs follow the JSON header as raw bytes."""
    docs, blobs = [], []
    for name, array, binary in outputs:
        doc: dict[str, Any] = {
            "name": name,
            "datatype": tensor_codec.datatype_of(array),
            "shape": list(array.shape),
        }
        if binary:
            blob = tensor_codec.encode_binary(array)
            doc["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            doc["data"] = tensor_codec.encode_json(array)
        docs.append(doc)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        response["id"] = request_id
    if parameters:
        response["parameters"] = parameters
    response["outputs"] = docs
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"content-type": "application/json"}
    headers = {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }
    return b"".join([header, *blobs]), headers
