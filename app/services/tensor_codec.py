"""Open Inference Protocol (KServe v2) tensors ⇄ NumPy, with every check a bad request needs.

A v2 tensor is a name, a ``datatype`` (``FP32``, ``UINT8`` …), a ``shape`` and its elements,
either as JSON ``data`` (flat or nested, row-major) or as raw little-endian bytes (the binary
tensor data extension). Decoding checks the shape before allocating anything and the element
count against the data; :func:`digit_images` then turns a tensor into what the digit model takes.
Errors are the domain errors of :mod:`app.core.errors` (the API maps them to statuses).
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Any

import numpy as np

from app.core.errors import InvalidInput, TooLarge, clip
from app.schemas.v2 import MAX_DIMS
from modelspec.contract import IMAGE_SIZE

# v2 datatype → little-endian NumPy dtype (BYTES, strings, is not a numeric tensor: not served).
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code).newbyteorder("<")
    for name, code in {
        "BOOL": "?",
        "UINT8": "u1",
        "UINT16": "u2",
        "UINT32": "u4",
        "UINT64": "u8",
        "INT8": "i1",
        "INT16": "i2",
        "INT32": "i4",
        "INT64": "i8",
        "FP16": "f2",
        "FP32": "f4",
        "FP64": "f8",
    }.items()
}
DATATYPES: dict[np.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
DIGIT_DATATYPES = ("FP32", "UINT8")  # FP32 in [0, 1] or UINT8 0–255
NUMBER_TYPES = frozenset({int, float, bool})  # what JSON data may hold (bool: checked later)


def datatype_of(array: np.ndarray) -> str:
    """The v2 datatype name of a NumPy array."""
    try:
        return DATATYPES[array.dtype.newbyteorder("<")]
    except KeyError:
        raise InvalidInput(f"no v2 datatype for NumPy dtype {array.dtype}") from None


MAX_DIM = 2**31 - 1  # one dimension's size (Triton's int32 sizes): products stay small numbers


def check_shape(name: str, shape: Any, max_elements: int) -> tuple[int, ...]:
    """A valid shape (at most ``MAX_DIMS`` ints in ``[0, MAX_DIM]``) whose element count is at
    most ``max_elements``. The dims are bounded before they are multiplied: the product of
    400,000 dims would be a number of 4,300 digits (seconds of CPU to compute and to print)."""
    if (
        type(shape) is not list
        or len(shape) > MAX_DIMS
        or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)
    ):
        raise InvalidInput(
            f"input {clip(name)!r}: shape must be a list of at most {MAX_DIMS} integers from 0 to "
            f"{MAX_DIM}; got {describe(shape)}",
            "invalid_shape",
        )
    count = math.prod(shape)  # < 2**248: at most 75 digits
    if count > max_elements:
        raise TooLarge(
            f"input {clip(name)!r}: shape {shape} holds {count} elements; at most {max_elements} "
            "fit in one request",
        )
    return tuple(shape)


def describe(value: Any) -> str:
    """A short ``repr`` of a client value for an error detail: never the whole of a big one (a
    list shows its first items and its length; nested lists and objects only their sizes)."""
    if type(value) is list:
        head = ", ".join(_brief(v) for v in value[:MAX_DIMS])
        return f"[{head}, …] ({len(value)} items)" if len(value) > MAX_DIMS else f"[{head}]"
    return _brief(value, 64)


def _brief(value: Any, limit: int = 16) -> str:
    if type(value) is list:
        return f"[…{len(value)} items]"
    if type(value) is dict:
        return f"{{…{len(value)} keys}}"
    if type(value) is str:
        return repr(clip(value, limit))
    return clip(repr(value), limit)  # a number, true/false or null: short (orjson has no bigints)


def decode(
    name: str, datatype: str, shape: tuple[int, ...], data: Any = None, raw: bytes | None = None
) -> np.ndarray:
    """One input tensor → a NumPy array of ``shape``: from JSON ``data``, or ``raw`` bytes."""
    dtype = DTYPES.get(datatype)
    if dtype is None:
        known = ", ".join(DTYPES)
        raise InvalidInput(
            f"input {clip(name)!r}: datatype {clip(datatype)!r} is not served; use one of {known}",
            "invalid_datatype",
        )
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"input {clip(name)!r}: {len(raw)} bytes of binary data, but shape {list(shape)} "
                f"of {datatype} needs {count * dtype.itemsize}",
                "invalid_binary_data",
            )
        return np.frombuffer(raw, dtype).reshape(shape)
    if type(data) is list:
        # The values actually sent are counted (C-speed flattening) before NumPy reads them: a
        # short shape over millions of numbers is refused without converting any of them.
        flat = _flatten(data)
        if flat is not None and len(flat) != count:
            raise InvalidInput(
                f"input {clip(name)!r}: {len(flat)} data elements, but shape {list(shape)} needs "
                f"{count}",
                "invalid_shape",
            )
        if dtype == np.uint8 and flat is not None:
            fast = _uint8_fast(flat)
            if fast is not None:
                return fast.reshape(shape)
        if flat is not None:
            types = set(map(type, flat))
            if not NUMBER_TYPES.issuperset(types):
                raise InvalidInput(  # before NumPy: it makes every element as wide as the
                    f"input {clip(name)!r}: data must hold numbers (or true/false for BOOL) "
                    "only; got strings, null or objects",  # longest string (3 MB: 9.4 GB)
                    "invalid_data",
                )
            return _from_json(name, datatype, dtype, shape, count, data, bool in types)
    return _from_json(name, datatype, dtype, shape, count, data)


def _flatten(data: list[Any]) -> list[Any] | None:
    """Nested lists → the flat list of their values, row-major; ``None`` if some level mixes
    lists with other values (NumPy then says what is wrong)."""
    flat = data
    try:
        while flat and type(flat[0]) is list:
            flat = list(chain.from_iterable(flat))
    except TypeError:  # a number among the lists
        return None
    return flat


def _uint8_fast(flat: list[Any]) -> np.ndarray | None:
    """Ints 0–255 via ``bytes()`` (~3× ``np.asarray``); else ``None``."""
    try:
        buffer = bytes(flat)  # refuses floats, negatives, > 255, strings, None, lists
    except (TypeError, ValueError):
        return None
    if bool in set(map(type, flat)):  # bytes() takes true/false as 1/0: not numbers here
        return None
    return np.frombuffer(buffer, np.uint8)


def _from_json(
    name: str,
    datatype: str,
    dtype: np.dtype,
    shape: tuple[int, ...],
    count: int,
    data: Any,
    holds_bools: bool | None = None,  # known already from the flattened values
) -> np.ndarray:
    if type(data) is not list:
        raise InvalidInput(
            f"input {clip(name)!r}: data must be a list of numbers (flat or nested, row-major), "
            "or send the tensor as binary data",
            "invalid_data",
        )
    try:
        array = np.asarray(data)  # no dtype: strings, null and objects show up in the dtype
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(
            f"input {clip(name)!r}: data is ragged (nested lists of different lengths)",
            "invalid_shape",
        ) from None
    if array.size != count:
        raise InvalidInput(
            f"input {clip(name)!r}: {array.size} data elements, but shape {list(shape)} needs "
            f"{count}",
            "invalid_shape",
        )
    kinds = "b" if datatype == "BOOL" else "iu" if dtype.kind in "iu" else "iuf"
    if holds_bools is None and datatype != "BOOL":
        holds_bools = _holds_bools(data)
    if array.dtype.kind not in kinds or (datatype != "BOOL" and holds_bools):
        what = {"b": "true/false", "iu": "integers", "iuf": "numbers"}[kinds]
        raise InvalidInput(
            f"input {clip(name)!r}: {datatype} data must hold {what} only; got {array.dtype.name} "
            "values (or the lists are ragged)",
            "invalid_data",
        )
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = array.min(initial=0), array.max(initial=0)
        if lo < info.min or hi > info.max:
            raise InvalidInput(
                f"input {clip(name)!r}: {datatype} values must lie in [{info.min}, {info.max}]; "
                f"got values from {lo} to {hi}",
                "invalid_data",
            )
    return array.astype(dtype, copy=False).reshape(shape)


def _holds_bools(data: list[Any]) -> bool:
    """Whether nested lists hold JSON true/false among numbers (NumPy reads them as 0/1)."""
    while data and type(data[0]) is list:
        data = list(chain.from_iterable(data))
    return bool in set(map(type, data))


def check_digit_input(name: str, datatype: str, shape: tuple[int, ...], max_images: int) -> None:
    """The digit model's ``images`` input before decoding: FP32 or UINT8, [n, 28, 28], n bounded."""
    if datatype not in DIGIT_DATATYPES:
        raise InvalidInput(
            f"input {clip(name)!r}: datatype {clip(datatype)} is not accepted; send FP32 in "
            "[0, 1] or UINT8 0–255",
            "invalid_datatype",
        )
    if len(shape) != 3 or shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or not shape[0]:
        raise InvalidInput(
            f"input {clip(name)!r}: shape must be [n, {IMAGE_SIZE}, {IMAGE_SIZE}] with n ≥ 1; "
            f"got {list(shape)}",
            "invalid_shape",
        )
    if shape[0] > max_images:
        raise TooLarge(
            f"{shape[0]} images in one request; the limit is {max_images} (send several requests)",
            "too_many_images",
        )


def digit_images(name: str, datatype: str, array: np.ndarray) -> np.ndarray:
    """A decoded, checked ``images`` tensor → float32 [n, 28, 28] in [0, 1] for the model.

    FP32 must already lie in [0, 1]; UINT8 0–255 is scaled as ``/predict/digit`` scales it.
    """
    if datatype == "UINT8":
        return np.divide(array, np.float32(255), dtype=np.float32)
    lo, hi = array.min(), array.max()
    if not (lo >= 0 and hi <= 1):  # also catches NaN and ±infinity
        raise InvalidInput(
            f"input {clip(name)!r}: FP32 pixel values must lie in [0, 1] (or send UINT8 0–255); "
            f"got values from {lo:g} to {hi:g}",
            "invalid_pixels",
        )
    return array.astype(np.float32, copy=False)


def encode_json(array: np.ndarray) -> np.ndarray:
    """Output data for a JSON response: the flat array (orjson writes NumPy arrays itself)."""
    return np.ascontiguousarray(array).reshape(-1)


def encode_binary(array: np.ndarray) -> bytes:
    """Output data for the binary extension: the raw little-endian, row-major bytes."""
    return np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
