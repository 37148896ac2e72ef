"""v2 tensors ⇄ NumPy (``app.services.tensor_codec``) and the v2 request/response bytes
(``app.api.v2_request``), in-process: every accepted form and every refusal."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from app.api.digit_json import parse_json_images
from app.api.v2 import PROTOCOL_STATUS, v2_error
from app.api.v2_request import parse_infer, render_infer, wanted_outputs
from app.core import errors as svc
from app.services import tensor_codec as codec

MAX = 4 * 1024 * 1024


def test_json_data_flat_or_nested_decodes_to_the_shape() -> None:
    values = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 24
    flat = codec.decode("x", "FP32", (2, 3, 4), values.ravel().tolist())
    nested = codec.decode("x", "FP32", (2, 3, 4), values.tolist())
    assert flat.dtype == nested.dtype == np.float32
    np.testing.assert_array_equal(flat, values)
    np.testing.assert_array_equal(nested, values)
    ints = codec.decode("x", "INT64", (2, 2), [[1, -2], [3, 2**40]])
    assert ints.dtype == np.int64 and ints.tolist() == [[1, -2], [3, 2**40]]
    assert codec.decode("x", "BOOL", (2,), [True, False]).tolist() == [True, False]


@pytest.mark.parametrize("nested", [False, True])
def test_uint8_fast_path_equals_the_general_path(nested: bool) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    data = pixels.tolist() if nested else pixels.ravel().tolist()
    got = codec.decode("images", "UINT8", (3, 28, 28), data)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, pixels)


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "code"),
    [
        ("FP32", (3,), [0.1, "0.2", 0.3], "invalid_data"),  # NumPy would parse the string
        ("FP32", (3,), [0.1, None, 0.3], "invalid_data"),
        ("FP32", (3,), [0.0, True, 1.0], "invalid_data"),  # JSON true is not a number
        ("UINT8", (3,), [0, True, 255], "invalid_data"),  # bytes() would take it as 1
        ("UINT8", (3,), [0, 1.5, 255], "invalid_data"),
        ("UINT8", (3,), [0, 256, 255], "invalid_data"),
        ("UINT8", (3,), [0, -1, 255], "invalid_data"),
        ("INT8", (2,), [127, 128], "invalid_data"),
        ("BOOL", (2,), [1, 0], "invalid_data"),
        ("FP32", (2, 2), [[0.1, 0.2], [0.3]], "invalid_shape"),  # ragged
        ("FP32", (2, 2), [0.1, 0.2, 0.3], "invalid_shape"),  # too few
        ("UINT8", (2, 2), [1, 2, 3, 4, 5], "invalid_shape"),  # too many
        ("FP32", (1,), {"values": [0.1]}, "invalid_data"),
        ("FP32", (1,), 0.5, "invalid_data"),
        ("BYTES", (1,), ["abc"], "invalid_datatype"),
        ("FP8", (1,), [0.5], "invalid_datatype"),
    ],
)
def test_bad_json_data_is_refused_with_a_reason(
    datatype: str, shape: tuple[int, ...], data: object, code: str
) -> None:
    with pytest.raises(svc.InvalidInput) as info:
        codec.decode("x", datatype, shape, data)
    assert info.value.code == code
    assert "'x'" in info.value.detail


@given(hnp.arrays(st.sampled_from(list(codec.DTYPES.values())), hnp.array_shapes(max_dims=3)))
def test_binary_round_trip_for_every_datatype(array: np.ndarray) -> None:
    datatype = codec.datatype_of(array)
    raw = codec.encode_binary(array)
    assert len(raw) == array.size * array.itemsize
    back = codec.decode("x", datatype, array.shape, raw=raw)
    np.testing.assert_array_equal(back, array)


def test_binary_size_must_match_the_shape() -> None:
    with pytest.raises(svc.InvalidInput, match="needs 12") as info:
        codec.decode("x", "FP32", (3,), raw=b"\0" * 11)
    assert info.value.code == "invalid_binary_data"


@pytest.mark.parametrize("shape", [[1, -1], [1.0, 2], ["3"], [True], "3", None])
def test_shapes_are_lists_of_non_negative_ints(shape: object) -> None:
    with pytest.raises(svc.InvalidInput, match="shape must be"):
        codec.check_shape("x", shape, MAX)


def test_a_shape_larger_than_a_request_can_hold_is_refused_before_allocating() -> None:
    assert codec.check_shape("x", [2, 28, 28], MAX) == (2, 28, 28)
    with pytest.raises(svc.TooLarge, match="elements"):
        codec.check_shape("x", [10**9, 28, 28], MAX)


@pytest.mark.parametrize(
    ("datatype", "shape", "error", "code"),
    [
        ("INT32", (1, 28, 28), svc.InvalidInput, "invalid_datatype"),
        ("FP64", (1, 28, 28), svc.InvalidInput, "invalid_datatype"),
        ("FP32", (1, 784), svc.InvalidInput, "invalid_shape"),
        ("FP32", (28, 28), svc.InvalidInput, "invalid_shape"),
        ("UINT8", (0, 28, 28), svc.InvalidInput, "invalid_shape"),
        ("UINT8", (257, 28, 28), svc.TooLarge, "too_many_images"),
    ],
)
def test_digit_input_checks(
    datatype: str, shape: tuple[int, ...], error: type[svc.ServiceError], code: str
) -> None:
    with pytest.raises(error) as info:
        codec.check_digit_input("images", datatype, shape, 256)
    assert info.value.code == code


def test_digit_images_scale_uint8_exactly_as_predict_digit() -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    ours = codec.digit_images("images", "UINT8", pixels)
    native, _ = parse_json_images(orjson.dumps({"images": pixels.tolist()}), 256)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, native)
    unit = codec.digit_images("images", "FP32", ours)
    np.testing.assert_array_equal(unit, ours)


@pytest.mark.parametrize("bad", [1.0001, -0.01, math.nan, math.inf])
def test_fp32_pixels_must_lie_in_the_unit_interval(bad: float) -> None:
    images = np.zeros((1, 28, 28), np.float32)
    images[0, 3, 4] = bad
    with pytest.raises(svc.InvalidInput, match=r"\[0, 1\]") as info:
        codec.digit_images("images", "FP32", images)
    assert info.value.code == "invalid_pixels"


def _request(inputs: list[dict], **extra: object) -> bytes:
    return orjson.dumps({"inputs": inputs, **extra})


def test_parse_json_and_binary_inputs_in_order() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(4, dtype=np.uint8)
    header = _request(
        [
            {"name": "a", "shape": [2, 3], "datatype": "FP32",
             "parameters": {"binary_data_size": a.nbytes}},
            {"name": "j", "shape": [2], "datatype": "INT32", "data": [7, 8]},
            {"name": "b", "shape": [4], "datatype": "UINT8",
             "parameters": {"binary_data_size": b.nbytes}},
        ],
        id="r1",
    )  # fmt: skip
    body = header + codec.encode_binary(a) + codec.encode_binary(b)
    request, tensors = parse_infer(body, str(len(header)), MAX)
    assert request.id == "r1" and [t.name for t in tensors] == ["a", "j", "b"]
    np.testing.assert_array_equal(tensors[0].decode(), a)
    assert tensors[1].decode().tolist() == [7, 8]
    np.testing.assert_array_equal(tensors[2].decode(), b)


@pytest.mark.parametrize(
    ("body", "header_length", "code"),
    [
        (b"{not json", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_request"),
        (_request([]), None, "invalid_request"),
        (_request([{"name": "a", "shape": ["3"], "datatype": "FP32", "data": [1]}]), None,
         "invalid_request"),
        (_request([{"name": "a", "shape": [1], "datatype": "FP32"}]), None, "invalid_request"),
        (_request([{"name": "a", "shape": [1], "datatype": "FP32",
                    "parameters": {"binary_data_size": "4"}}]), None, "invalid_binary_data"),
        (b"{}", "-1", "invalid_binary_data"),
        (b"{}", "many", "invalid_binary_data"),
    ],
)  # fmt: skip
def test_malformed_requests_are_refused(body: bytes, header_length: str | None, code: str) -> None:
    with pytest.raises(svc.InvalidInput) as info:
        parse_infer(body, header_length, MAX)
    assert info.value.code == code


def test_binary_sizes_must_account_for_every_byte() -> None:
    header = _request(
        [{"name": "a", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]
    )
    parse_infer(header + b"\0" * 4, str(len(header)), MAX)
    for extra in (b"\0" * 3, b"\0" * 5):
        with pytest.raises(svc.InvalidInput) as info:
            parse_infer(header + extra, str(len(header)), MAX)
        assert info.value.code == "invalid_binary_data"


def test_wanted_outputs_default_binary_and_unknown_names() -> None:
    available = ("probabilities", "digit")

    def wanted(**doc: object) -> list[tuple[str, bool]]:
        request, _ = parse_infer(_request([{"name": "x", "shape": [0], "datatype": "FP32",
                                            "data": []}], **doc), None, MAX)  # fmt: skip
        return wanted_outputs(request, available)

    assert wanted() == [("probabilities", False), ("digit", False)]
    assert wanted(parameters={"binary_data_output": True}) == [
        ("probabilities", True),
        ("digit", True),
    ]
    assert wanted(outputs=[{"name": "digit", "parameters": {"binary_data": True}}]) == [
        ("digit", True)
    ]
    with pytest.raises(svc.InvalidInput, match="unknown output 'logits'"):
        wanted(outputs=[{"name": "logits"}])
    with pytest.raises(svc.InvalidInput, match="classification"):
        wanted(outputs=[{"name": "digit", "parameters": {"classification": 3}}])


def test_render_json_and_binary_outputs() -> None:
    probs = np.array([[0.25, 0.75]], np.float32)
    digit = np.array([1], np.int64)
    body, headers = render_infer("m", "1", "r", [("p", probs, False), ("d", digit, False)])
    assert headers == {"content-type": "application/json"}
    doc = orjson.loads(body)
    assert doc["model_name"] == "m" and doc["model_version"] == "1" and doc["id"] == "r"
    assert doc["outputs"] == [
        {"name": "p", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]},
        {"name": "d", "datatype": "INT64", "shape": [1], "data": [1]},
    ]
    body, headers = render_infer("m", "1", None, [("p", probs, True), ("d", digit, False)])
    n = int(headers["inference-header-content-length"])
    doc = orjson.loads(body[:n])
    assert "id" not in doc and doc["outputs"][0]["parameters"] == {"binary_data_size": 8}
    np.testing.assert_array_equal(np.frombuffer(body[n:], "<f4").reshape(1, 2), probs)


def test_v2_errors_use_the_protocols_statuses() -> None:
    cases = [
        (svc.InvalidInput("bad", "invalid_shape"), 400),
        (svc.UnsupportedMedia("bad"), 400),
        (svc.NotFound("no such model"), 404),
        (svc.TooLarge("big", "too_many_images"), 413),
        (svc.NotReady("loading"), 503),
        (svc.DeadlineExceeded("slow"), 504),
        (RuntimeError("a bug"), 500),
    ]
    for exc, status in cases:
        response = v2_error(exc)
        assert response.status_code == status
        (message,) = orjson.loads(response.body).values()
        code = getattr(exc, "code", "internal_error")
        assert message.startswith(f"{code}: ")
    assert set(PROTOCOL_STATUS.values()) == {400}
    assert v2_error(svc.Overloaded("busy", retry_after_s=2.6)).headers["retry-after"] == "3"
