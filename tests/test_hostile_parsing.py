"""Hostile URL values and request bodies (#21), in-process: each gets a clear 4xx in the error
shape of its route, and costs bounded work.

The costs are counted, not timed: pydantic errors built, Python memory allocated (tracemalloc),
whether NumPy was ever handed the data. Times appear only as generous bounds on what took
seconds before (e.g. < 1 s for 5 s).
"""

from __future__ import annotations

import asyncio
import os
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
import numpy as np
import orjson
import pytest
from fastapi import FastAPI

from app.api import digit_json, v2
from app.api.digit_json import parse_json_images
from app.api.digits import json_route
from app.api.digits import router as digits_router
from app.api.errors import install_error_handlers
from app.api.v2_fast import V2InferRoute
from app.api.v2_request import parse_infer
from app.core import errors as svc
from app.core.config import Settings
from app.schemas.digits import DigitRequest, parse_request
from app.schemas.json_budget import BYTES_PER_NODE, FREE_BYTES, check_json_budget
from app.schemas.v2 import InferRequest
from app.services import tensor_codec as codec
from app.state import AppState, Lifecycle
from tests.live_server import LiveServer
from tests.stub_models import StubModels

MAX_BYTES = Settings().max_request_bytes  # 4 MiB
MAX_IMAGES = Settings().max_batch_images  # 256
DIGIT = "/predict/digit"
V2 = "/v2/models/mnist_lstm"
JSON = {"content-type": "application/json"}
IMAGE = {"image": [0] * 784}
MB = 1_000_000


def _input(**fields: Any) -> dict[str, Any]:
    return {"name": "images", "shape": [1, 28, 28], "datatype": "UINT8", **fields}


INFER = {"inputs": [_input(data=[0] * 784)]}


class StubService:
    ready = True
    model_ref: ClassVar[dict[str, Any]] = {"name": "mnist_lstm", "version": 1}

    async def predict(self, images: np.ndarray) -> np.ndarray:
        return np.tile(np.linspace(0, 0.2, 10, dtype=np.float32), (len(images), 1))


@pytest.fixture(scope="module")
def app() -> FastAPI:
    """The digit and v2 routes as the service lists them (raw routes first), a stub model."""
    app = FastAPI()
    install_error_handlers(app)
    app.router.routes += [json_route(), V2InferRoute()]
    app.include_router(digits_router)
    app.include_router(v2.router)
    app.state = AppState(  # type: ignore[assignment]
        Settings(), Lifecycle("ready"), models=StubModels(StubService())
    )
    return app


Request = tuple[str, str, bytes | None, dict[str, Any]]  # method, path, body, headers


def send(app: FastAPI, *requests: Request) -> list[tuple[int, Any]]:
    """Each request's (status, JSON answer)."""

    async def run() -> list[tuple[int, Any]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            out = []
            for method, path, body, headers in requests:
                reply = await client.request(method, path, content=body, headers=headers)
                out.append((reply.status_code, reply.json()))
            return out

    return asyncio.run(run())


def digit_error(answer: tuple[int, Any]) -> tuple[int, str]:
    status, doc = answer
    assert set(doc) == {"error", "detail"} and doc["detail"], doc
    return status, doc["error"]


def v2_error(answer: tuple[int, Any]) -> tuple[int, str]:
    """The Open Inference Protocol's shape: {"error": "<code>: <detail>"}."""
    status, doc = answer
    assert set(doc) == {"error"} and ": " in doc["error"], doc
    return status, doc["error"].split(":", 1)[0]


def cost(fn: Callable[[], Any]) -> tuple[float, float, BaseException | None]:
    """(peak Python memory in MB, seconds, what ``fn`` raised)."""
    tracemalloc.start()
    start = time.perf_counter()
    raised = None
    try:
        fn()
    except Exception as exc:
        raised = exc
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / MB
    tracemalloc.stop()
    return peak, elapsed, raised


# --- URL values: one strict parser ----------------------------------------------------------

# str.isdigit() takes the first three, int() raises on them (it was a 500); int() takes the next
# ones, which are not ASCII digits; then values out of bounds.
BAD_VERSIONS = ["²", "①", "١", " 1", "1_0", "+1", "-1", "1.0", "1e3", "0", "9" * 10, "9" * 5000]


@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_a_version_that_is_not_ascii_digits_in_bounds_is_a_clear_4xx(
    app: FastAPI, version: str
) -> None:
    q = quote(version, safe="")
    digit, meta, ready, infer, fast_infer = send(
        app,
        ("POST", f"{DIGIT}?version={q}", orjson.dumps(IMAGE), JSON),
        ("GET", f"{V2}/versions/{q}", None, {}),
        ("GET", f"{V2}/versions/{q}/ready", None, {}),
        ("POST", f"{V2}/versions/{q}/infer", orjson.dumps(INFER), JSON),
        ("POST", f"{V2}/versions/{q}/infer", orjson.dumps(INFER), {}),  # V2InferRoute
    )
    assert digit_error(digit) == (422, "invalid_version")
    for answer in (meta, ready, infer, fast_infer):
        assert v2_error(answer) == (400, "invalid_version")
        assert len(answer[1]["error"]) < 200  # never the raw value


def test_good_and_unknown_versions_still_answer_as_before(app: FastAPI) -> None:
    answers = send(
        app,
        ("POST", f"{DIGIT}?version=1", orjson.dumps(IMAGE), JSON),
        ("POST", f"{DIGIT}?version=01", orjson.dumps(IMAGE), JSON),
        ("POST", f"{V2}/versions/1/infer", orjson.dumps(INFER), JSON),
        ("GET", f"{V2}/versions/1", None, {}),
        ("POST", f"{DIGIT}?version=2", orjson.dumps(IMAGE), JSON),
        ("GET", f"{V2}/versions/2", None, {}),
        ("GET", f"/v2/models/{'m' * 5000}", None, {}),
    )
    assert [status for status, _ in answers] == [200, 200, 200, 200, 404, 404, 404]
    assert len(answers[-1][1]["error"]) < 200  # the unknown name is cut short


@pytest.mark.parametrize("spoil", [" {}", "{} ", "+{}", "{}_0", "{}".join("١٢"), "٣"])
def test_the_binary_header_length_is_ascii_digits(app: FastAPI, spoil: str) -> None:
    """``int()`` took `` 123``, ``123 ``, ``+123`` and ``1_2_3``; Arabic-Indic digits reach the
    app as latin-1 mojibake (refused before too, kept as a regression case)."""
    header = orjson.dumps({"inputs": [_input(parameters={"binary_data_size": 784})]})
    length = spoil.format(len(header)) if "{}" in spoil else spoil
    if "_" in length:  # "1_2_3" style: what int() reads as the right length
        length = "_".join(str(len(header)))
    ((status, doc),) = send(
        app,
        ("POST", f"{V2}/infer", header + bytes(784),
         {"Inference-Header-Content-Length": length.encode()}),
    )  # fmt: skip
    assert v2_error((status, doc)) == (400, "invalid_binary_data")
    good = send(app, ("POST", f"{V2}/infer", header + bytes(784),
                      {"Inference-Header-Content-Length": str(len(header))}))  # fmt: skip
    assert good[0][0] == 200


# --- v2 shapes: bounded before they are multiplied ------------------------------------------


@pytest.mark.parametrize("dims", [400_000, 1_000_000])
def test_a_shape_of_a_million_dims_is_refused_at_once(app: FastAPI, dims: int) -> None:
    """It stalled the event loop 5.2 s (400k dims) and 32 s (1M) before a 500."""
    body = orjson.dumps({"inputs": [_input(shape=[2] * dims, data=[0])]})
    start = time.perf_counter()
    ((status, doc),) = send(app, ("POST", f"{V2}/infer", body, JSON))
    assert time.perf_counter() - start < 1
    assert v2_error((status, doc)) == (400, "invalid_request")
    assert "at most 8" in doc["error"] and len(doc["error"]) < 300


@pytest.mark.parametrize(
    ("shape", "error", "code"),
    [
        ([2] * 9, svc.InvalidInput, "invalid_shape"),
        ([2**31], svc.InvalidInput, "invalid_shape"),
        ([1, -1], svc.InvalidInput, "invalid_shape"),
        ([True, 2], svc.InvalidInput, "invalid_shape"),
        ([2**31 - 1] * 8, svc.TooLarge, "payload_too_large"),  # the product: 75 digits at most
        (list(range(1, 1_000_000)), svc.InvalidInput, "invalid_shape"),
        ("x" * 1_000_000, svc.InvalidInput, "invalid_shape"),
    ],
)
def test_shapes_are_bounded_before_their_product(
    shape: Any, error: type[svc.ServiceError], code: str
) -> None:
    with pytest.raises(error) as info:
        codec.check_shape("x" * 10_000, shape, MAX_BYTES)
    assert info.value.code == code
    assert len(info.value.detail) < 400  # the name, the shape: shown cut short


def test_data_is_counted_before_numpy_reads_it() -> None:
    """A [1, 28, 28] shape over 2M numbers: refused without converting them (NumPy would
    allocate 16 MB for them)."""
    data = [1] * 2_000_000
    peak, _, raised = cost(lambda: codec.decode("x", "FP32", (1, 28, 28), data))
    assert isinstance(raised, svc.InvalidInput) and raised.code == "invalid_shape"
    assert "2000000 data elements" in raised.detail
    assert peak < 2


# --- pydantic errors: a few, whatever was sent ----------------------------------------------


def error_count(model: Any, doc: Any, **kwargs: Any) -> int:
    try:
        model.model_validate(doc, **kwargs)
    except Exception as exc:
        return exc.error_count()  # type: ignore[attr-defined, no-any-return]
    return 0


@pytest.mark.parametrize(
    "doc",
    [
        {"inputs": [{}] * 1_300_000},  # 3.9M errors, 10.4 s, +4 GB before
        {"inputs": [{}] * 64},
        {"inputs": [_input(shape=["x"] * 8, data=[0])] * 64},
        {"inputs": [_input(data=[0])], "outputs": [{}] * 1_000_000},
        {"inputs": [_input(data=[0])], "parameters": {str(i): i for i in range(100_000)}},
        {"inputs": [_input(data=[0], parameters={str(i): i for i in range(100_000)})]},
    ],
)
def test_a_bad_inference_request_builds_a_few_errors(doc: dict[str, Any]) -> None:
    assert 0 < error_count(InferRequest, doc, strict=True) <= 3


@pytest.mark.parametrize(
    "doc",
    [
        {"image": ["a"] * 1_000_000},  # 1M errors, 1.9 s, +0.93 GB before
        {"image": [["a"] * 28] * 28},
        {"image": [[0] * 1_000_000] * 28},
        {"image": [0] * 1_000_000},
        {"images": [["a"] * 784] * MAX_IMAGES},
        {"images": [[["a"] * 28] * 28] * MAX_IMAGES, "pixel_scale": "x"},
        {f"k{i}": 0 for i in range(250_000)},  # one error per unknown field before
        {"image": [0] * 784, **{f"k{i}": 0 for i in range(250_000)}},
    ],
)
def test_a_bad_digit_request_builds_a_few_errors(doc: dict[str, Any]) -> None:
    assert 0 < error_count(DigitRequest, doc) <= 2


# --- bodies: bounded parse work -------------------------------------------------------------


def _dense(unit: bytes) -> bytes:
    """An array of ``unit`` as long as the size limit allows."""
    return b"[" + b",".join([unit] * ((MAX_BYTES - 100) // (len(unit) + 1))) + b"]"


# Bodies whose parse alone cost 100–400 ms and ~140 MB (a Python object per 3 bytes).
DENSE = {
    "lists": _dense(b"[]"),
    "objects": _dense(b"{}"),
    "strings": _dense(b'"ab"'),
    "keys": b"{" + b",".join(b'"k%d":0' % i for i in range(400_000)) + b"}",
    "nesting": b"[" * 200_000 + b"]" * 200_000,
}


def _wrap_digit(array: bytes) -> bytes:
    return b'{"images":' + array + b"}"


def _wrap_v2(array: bytes) -> bytes:
    return b'{"inputs":[{"name":"images","shape":[1,28,28],"datatype":"FP32","data":' + (
        array + b"}]}"
    )


@pytest.mark.parametrize("kind", list(DENSE))
def test_bodies_dense_in_lists_objects_or_strings_are_refused_unparsed(
    app: FastAPI, kind: str
) -> None:
    digit_body, v2_body = _wrap_digit(DENSE[kind]), _wrap_v2(DENSE[kind])
    for parse, body in ((lambda b: parse_json_images(b, MAX_IMAGES), digit_body),
                        (lambda b: parse_infer(b, None, MAX_BYTES), v2_body)):  # fmt: skip
        peak, elapsed, raised = cost(lambda: parse(body))  # noqa: B023
        assert isinstance(raised, svc.InvalidInput) and raised.code == "invalid_request"
        assert "per 16 bytes" in raised.detail
        # Nothing was parsed: the count's one temporary array of a byte per body byte, no more.
        assert peak < len(body) / MB + 1 and elapsed < 1
    digit, infer = send(
        app, ("POST", DIGIT, digit_body, JSON), ("POST", f"{V2}/infer", v2_body, JSON)
    )
    assert digit_error(digit) == (422, "invalid_request")
    assert v2_error(infer) == (400, "invalid_request")


# Bodies the budget lets through: refused after one parse, with bounded work after it.
NUMBERS = {
    "2M ints as one image": ({"image": [1] * 2_000_000}, "invalid_shape", 422),
    "2M ints as rows": ({"image": [[1] * 70_000] * 28}, "invalid_shape", 422),
    "2,600 valid images": ({"images": [[0] * 784] * 2_600}, "too_many_images", 413),
    "2,600 images, bad scale": (
        {"images": [[0] * 784] * 2_600, "pixel_scale": 0},
        "invalid_request",
        422,
    ),
    "1,600 bad images": ({"images": [[-1] * 784] * 1_600}, "too_many_images", 413),
    "an unknown field over 3 MB": ({"k" * 3_000_000: 0, **IMAGE}, "invalid_request", 422),
    "a 3 MB string pixel": ({"image": ["a" * 3_000_000] + [0] * 783}, "invalid_pixels", 422),
}


@pytest.mark.parametrize("case", list(NUMBERS))
def test_large_digit_bodies_cost_one_parse_and_bounded_work(app: FastAPI, case: str) -> None:
    doc, code, status = NUMBERS[case]
    body = orjson.dumps(doc)
    assert FREE_BYTES < len(body) <= MAX_BYTES
    parse_peak, _, _ = cost(lambda: orjson.loads(body))
    peak, elapsed, raised = cost(lambda: parse_json_images(body, MAX_IMAGES))
    assert isinstance(raised, svc.ServiceError) and raised.code == code
    # orjson's objects and a bounded rest (pydantic errors, at most 256 validated images):
    # never a second copy of the data, nor a NumPy array of it.
    assert peak < parse_peak + 15, (peak, parse_peak)
    assert elapsed < 1
    assert len(raised.detail) < 300
    assert digit_error(send(app, ("POST", DIGIT, body, JSON))[0]) == (status, code)


def test_the_fast_path_never_hands_numpy_a_list_of_the_wrong_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[int] = []
    general = digit_json._general_images

    def spy(rows: list[Any], n: int) -> Any:
        asked.append(len(rows))
        return general(rows, n)

    monkeypatch.setattr(digit_json, "_general_images", spy)
    for doc in ({"image": [0.5] * 2_000_000}, {"image": [[0.5] * 70_000] * 28},
                {"images": [[0.5] * 784, [0.5] * 2_000]}):  # fmt: skip
        with pytest.raises(svc.InvalidInput):
            parse_json_images(orjson.dumps(doc), MAX_IMAGES)
    assert asked == []
    parse_json_images(orjson.dumps({"image": [0.5] * 784}), MAX_IMAGES)  # still fast
    assert asked == [1]


@pytest.mark.parametrize("value", [True, False, "x"])
def test_a_large_batch_with_one_boolean_or_string_is_refused_as_a_small_one(value: Any) -> None:
    """Large bodies are scanned for them with NumPy (``bytes.find`` was 5× slower)."""
    good = [[0] * 28] * 28
    bad = [[0.5, value, *[0] * 26], *good[1:]]  # 0.5: not the uint8 fast path either
    for images in ([good] * 100, [good] * 2):
        images = [*images[:-1], bad]
        body = orjson.dumps({"images": images})
        with pytest.raises(svc.InvalidInput) as info:
            parse_json_images(body, MAX_IMAGES)
        assert info.value.code == "invalid_pixels"
    assert len(orjson.dumps({"images": [good] * 100})) > 65_536


@pytest.mark.parametrize(
    ("data", "datatype", "code"),
    [
        ([1] * 2_000_000, "UINT8", "invalid_shape"),
        ([[1] * 70_000] * 28, "FP32", "invalid_shape"),
        # NumPy makes every element as wide as the longest string: this was 9.4 GB.
        (["a" * 3_000_000] + [0] * 783, "FP32", "invalid_data"),
        ([["a" * 3_000_000] + [0] * 27] + [[0] * 28] * 27, "UINT8", "invalid_data"),
    ],
)
def test_large_v2_bodies_cost_one_parse_and_bounded_work(
    data: list[Any], datatype: str, code: str
) -> None:
    body = orjson.dumps({"inputs": [_input(data=data, datatype=datatype)]})
    assert FREE_BYTES < len(body) <= MAX_BYTES
    parse_peak, _, _ = cost(lambda: orjson.loads(body))
    peak, elapsed, raised = cost(lambda: parse_infer(body, None, MAX_BYTES)[1][0].decode())
    assert isinstance(raised, svc.InvalidInput) and raised.code == code
    assert peak < parse_peak + 5 and elapsed < 1


def test_valid_requests_are_never_over_the_budget() -> None:
    """The densest valid bodies: 256 images of 28 rows of 28 zeros, on both routes."""
    rows = [[[0] * 28] * 28] * MAX_IMAGES
    digit = orjson.dumps({"images": rows})
    infer = orjson.dumps({"inputs": [_input(shape=[MAX_IMAGES, 28, 28], data=rows)]})
    for body in (digit, infer):
        assert len(body) > FREE_BYTES
        check_json_budget(body)
        nodes = body.count(b"[") + body.count(b"{") + body.count(b'"') // 2
        assert nodes * BYTES_PER_NODE * 3 < len(body)  # a wide margin
    assert parse_json_images(digit, MAX_IMAGES)[0].shape == (MAX_IMAGES, 28, 28)
    _, tensors = parse_infer(infer, None, MAX_BYTES)
    assert tensors[0].decode().shape == (MAX_IMAGES, 28, 28)


# --- what JSON cannot say -------------------------------------------------------------------

NOT_JSON = {
    "1e999999": b"1e999999",
    "-1e999": b"-1e999",
    "a 100,000-digit integer": b"9" * 100_000,  # orjson has no big ints: past 1e308, refused
    "NaN": b"NaN",
    "Infinity": b"Infinity",
    "nesting past 1,024": b"[" * 2_000 + b"]" * 2_000,
}


@pytest.mark.parametrize("case", list(NOT_JSON))
def test_numbers_and_nesting_json_cannot_hold_are_invalid_json(app: FastAPI, case: str) -> None:
    value = NOT_JSON[case]
    digit, infer = send(
        app,
        ("POST", DIGIT, b'{"image":[' + value + b"]}", JSON),
        ("POST", f"{V2}/infer", _wrap_v2(b"[" + value + b"]"), JSON),
    )
    assert digit_error(digit) == (422, "invalid_json")
    assert v2_error(infer) == (400, "invalid_json")
    assert len(digit[1]["detail"]) < 300 and len(infer[1]["error"]) < 300


def test_an_integer_past_64_bits_is_a_number_not_a_crash(app: FastAPI) -> None:
    """orjson reads 2**64 and up as a float; a shape of one is refused as not an integer."""
    digit, infer = send(
        app,
        ("POST", DIGIT, b'{"image":[' + b"1" * 300 + b"," + b"0," * 782 + b"0]}", JSON),
        ("POST", f"{V2}/infer", orjson.dumps(INFER).replace(b"[1,28,28]", b"[1" + b"0" * 30 + b"]"),
         JSON),
    )  # fmt: skip
    assert digit_error(digit) == (422, "invalid_pixels")
    assert v2_error(infer) == (400, "invalid_request")


# --- error details: short, whatever the client sent -----------------------------------------

LONG = "x" * 1_000_000


def _long_cases() -> Iterator[tuple[str, bytes, dict[str, str]]]:
    yield DIGIT, orjson.dumps({LONG: 1}), JSON
    yield DIGIT, orjson.dumps({"image": [LONG] + [0] * 783}), JSON
    yield DIGIT, orjson.dumps({"image": IMAGE["image"], "pixel_scale": LONG}), JSON
    yield DIGIT, b'{"image": [' + LONG.encode() + b"]}", JSON
    yield f"{V2}/infer", orjson.dumps({"inputs": [_input(name=LONG, data=[0] * 784)]}), JSON
    yield f"{V2}/infer", orjson.dumps({"inputs": [_input(datatype=LONG, data=[0] * 784)]}), JSON
    yield f"{V2}/infer", orjson.dumps({"inputs": [_input(shape=LONG, data=[0])]}), JSON
    yield f"{V2}/infer", orjson.dumps({"inputs": [_input(shape=[LONG], data=[0])]}), JSON
    yield f"{V2}/infer", orjson.dumps({**INFER, "outputs": [{"name": LONG}]}), JSON
    yield f"{V2}/infer", orjson.dumps({"inputs": [_input(name=LONG)]}), JSON
    yield f"{V2}/infer", orjson.dumps({"inputs": [_input(data=[LONG])]}), JSON
    yield f"{V2}/infer", b'{"inputs": ' + LONG.encode() + b"}", JSON
    yield f"{V2}/infer", orjson.dumps({"inputs": [_input(name=LONG, data=[0])] * 64}), JSON


def test_error_details_never_echo_a_long_value(app: FastAPI) -> None:
    cases = list(_long_cases())
    answers = send(app, *(("POST", path, body, headers) for path, body, headers in cases))
    for (path, _, _), (status, doc) in zip(cases, answers, strict=True):
        assert 400 <= status < 500, (path, doc)
        text = doc["error"] + str(doc.get("detail", ""))
        assert len(text) < 500, (path, text[:200])


def test_the_schema_alone_answers_alike_without_the_route() -> None:
    """``parse_request`` (the contract) refuses the hostile bodies with the route's codes."""
    for body in (_wrap_digit(DENSE["lists"]), orjson.dumps({"image": [1] * 2_000_000})):
        with pytest.raises(svc.InvalidInput) as via_schema:
            parse_request(body, MAX_IMAGES)
        with pytest.raises(svc.InvalidInput) as via_route:
            parse_json_images(body, MAX_IMAGES)
        assert via_schema.value.code == via_route.value.code


# --- against the real server ----------------------------------------------------------------

ATTACKS: dict[str, tuple[str, bytes, int]] = {  # issue #21's cases, then the worst ones above
    "400,000 dims": (f"{V2}/infer", orjson.dumps({"inputs": [_input(shape=[1] * 400_000)]}), 400),
    "1.3M empty inputs": (f"{V2}/infer", orjson.dumps({"inputs": [{}] * 1_300_000}), 400),
    "1M string pixels": (DIGIT, orjson.dumps({"image": ["a"] * 1_000_000}), 422),
    "?version=²": (f"{DIGIT}?version=%C2%B2", orjson.dumps(IMAGE), 422),
    "/versions/①": (f"{V2}/versions/%E2%91%A0/infer", orjson.dumps(INFER), 400),
    "2M ints": (DIGIT, orjson.dumps({"image": [1] * 2_000_000}), 422),
    "a 3 MB string pixel": (DIGIT, orjson.dumps({"image": ["a" * 3_000_000] + [0] * 783}), 422),
    "a 3 MB string in v2 data": (
        f"{V2}/infer",
        orjson.dumps({"inputs": [_input(data=["a" * 3_000_000] + [0] * 783)]}),
        400,
    ),
}


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.slow
def test_each_attack_costs_the_real_server_little(live_server: LiveServer) -> None:
    """Server CPU (all threads) and peak RSS around each request (``clear_refs`` resets VmHWM):
    before, these took 5.2 s, 10.4 s (+4 GB), 1.9 s (+0.93 GB) of the event loop, or a 500."""
    pid = live_server.process.pid
    with httpx.Client(base_url=live_server.base_url, timeout=60) as client:
        assert client.post(DIGIT, json=IMAGE).status_code == 200  # warm
        for name, (path, body, status) in ATTACKS.items():
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
            rss, cpu = _status(pid, "VmRSS"), _cpu_s(pid)
            reply = client.post(path, content=body, headers=JSON)
            peak, used = _status(pid, "VmHWM") - rss, _cpu_s(pid) - cpu
            print(f"{name}: {reply.status_code} {used:.2f} s CPU, +{peak / MB:.0f} MB")
            assert reply.status_code == status, (name, reply.text[:300])
            assert len(reply.text) < 500
            assert used < 0.5, (name, used)
            assert peak < 100 * MB + 3 * len(body), (name, peak)
        assert client.post(DIGIT, json=IMAGE).status_code == 200  # still serving
