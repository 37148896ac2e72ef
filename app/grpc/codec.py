"""``ModelInferRequest`` tensors → NumPy, NumPy outputs → ``ModelInferResponse``.

An input's elements come either in ``raw_input_contents`` (one little-endian, row-major blob per
input, in input order: what ``tritonclient`` sends) or in the input's typed ``contents``
(``fp32_contents``, ``uint_contents`` …); a request uses one form for all of its inputs, as
Triton requires. Shapes are checked (``tensor_codec.check_shape``) before anything is
allocated, element counts and value ranges against the datatype, and every refusal is an
``InvalidInput`` or ``TooLarge`` naming the input. Outputs always go back as
``raw_output_contents``, as Triton answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.core.errors import InvalidInput, clip
from app.grpc.proto import pb
from app.services import tensor_codec

# datatype → the InferTensorContents field holding it, and that field's NumPy type.
CONTENTS: dict[str, tuple[str, type[np.generic]]] = {
    "BOOL": ("bool_contents", np.bool_),
    "INT8": ("int_contents", np.int32),
    "INT16": ("int_contents", np.int32),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint32),
    "UINT16": ("uint_contents", np.uint32),
    "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
}


@dataclass
class Tensor:
    """One input as received: its elements are ``raw`` bytes or typed ``contents``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | None = None
    contents: pb.InferTensorContents | None = None

    def decode(self) -> np.ndarray:
        if self.raw is not None:
            return tensor_codec.decode(self.name, self.datatype, self.shape, raw=self.raw)
        return _typed(self)


def input_tensors(request: pb.ModelInferRequest, max_elements: int) -> list[Tensor]:
    """The request's inputs, shapes checked, not decoded yet."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs; send "
            "one per input, in input order, or none",
            "invalid_binary_data",
        )
    tensors = []
    for i, item in enumerate(request.inputs):
        shape = tensor_codec.check_shape(item.name, list(item.shape), max_elements)
        has_contents = item.HasField("contents")
        if raw:
            if has_contents:
                raise InvalidInput(
                    f"input {clip(item.name)!r}: contents and raw_input_contents in one request; "
                    "use one of them for every input",
                    "invalid_request",
                )
            tensors.append(Tensor(item.name, item.datatype, shape, raw=raw[i]))
        else:
            tensors.append(Tensor(item.name, item.datatype, shape, contents=item.contents))
    return tensors


def requested_outputs(request: pb.ModelInferRequest) -> list[str]:
    """The names of the outputs asked for (none: all of them)."""
    names = []
    for out in request.outputs:
        if "classification" in out.parameters:
            raise InvalidInput("the classification extension is not served", "invalid_request")
        names.append(out.name)
    return names


def _typed(tensor: Tensor) -> np.ndarray:
    """Elements from the typed ``contents`` field of the datatype, range-checked."""
    name, datatype = clip(tensor.name), tensor.datatype
    dtype = tensor_codec.DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(
            f"input {name!r}: datatype {clip(datatype)!r} is not served; use one of "
            f"{', '.join(tensor_codec.DTYPES)}",
            "invalid_datatype",
        )
    if datatype not in CONTENTS:  # FP16 has no typed field
        raise InvalidInput(
            f"input {name!r}: {datatype} travels only in raw_input_contents", "invalid_data"
        )
    field, wide = CONTENTS[datatype]
    values = getattr(tensor.contents, field) if tensor.contents is not None else ()
    count = math.prod(tensor.shape)
    if len(values) != count:
        raise InvalidInput(
            f"input {name!r}: {len(values)} elements in contents.{field}, but shape "
            f"{list(tensor.shape)} needs {count}",
            "invalid_shape",
        )
    array = np.array(values, dtype=wide)
    if dtype.kind in "iu" and dtype.itemsize < array.dtype.itemsize and array.size:
        info = np.iinfo(dtype)
        lo, hi = array.min(), array.max()
        if lo < info.min or hi > info.max:
            raise InvalidInput(
                f"input {name!r}: {datatype} values must lie in [{info.min}, {info.max}]; got "
                f"values from {lo} to {hi}",
                "invalid_data",
            )
    return array.astype(dtype, copy=False).reshape(tensor.shape)


def infer_response(
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: Sequence[tuple[str, np.ndarray]],
) -> pb.ModelInferResponse:
    """A response carrying every output as raw little-endian bytes."""
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request_id
    )
    for name, array in outputs:
        datatype = tensor_codec.DATATYPES.get(array.dtype)
        if datatype is not None:  # little-endian (or one byte) already: its bytes as they are
            data = array.tobytes()
        else:
            datatype, data = tensor_codec.datatype_of(array), tensor_codec.encode_binary(array)
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(data)
    return response
