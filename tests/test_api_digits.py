"""``POST /predict/digit`` on a real uvicorn server with real MNIST test digits.

JSON in every accepted form, pictures in several disguises (inverted, rescaled, off-centre,
JPEG), and every kind of bad input: always a clear 4xx JSON error, never a 500.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import httpx
import numpy as np
import orjson
import pytest
from fastapi import FastAPI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import Route

from app.api.digit_json import DigitJsonRoute
from app.api.digits import json_route
from app.api.digits import router as digits_router
from app.api.errors import install_error_handlers
from app.api.v2_fast import V2InferRoute
from app.core.config import Settings
from app.core.errors import ModelFailed
from app.main import create_app
from app.schemas.digits import DigitBatchPrediction, DigitPrediction
from app.state import AppState, Lifecycle
from tests.live_server import LiveServer, wait_until
from tests.metrics import label_sets, sample_value
from tests.stub_models import StubModels
from tests.test_imaging import bomb_png
from training.mnist_data import MnistData

pytestmark = pytest.mark.slow
PATH = "/predict/digit"
SAMPLE = 200  # digits checked per JSON form (the shipped model is ≥ 99 % accurate)
PICTURES = 30  # digits per picture variant


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.base_url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def sample(mnist: MnistData) -> tuple[np.ndarray, np.ndarray]:
    idx = np.random.default_rng(7).choice(len(mnist.x_test), SAMPLE, replace=False)
    return mnist.x_test[idx], mnist.y_test[idx]


def post_json(client: httpx.Client, doc: object) -> httpx.Response:
    return client.post(
        PATH, content=orjson.dumps(doc), headers={"content-type": "application/json"}
    )


def check_single(doc: dict, model_name: str = "mnist_lstm") -> int:
    assert set(doc) == {"digit", "probabilities", "model"}
    DigitPrediction.model_validate(doc)
    probs = doc["probabilities"]
    assert len(probs) == 10 and math.isclose(sum(probs), 1.0, abs_tol=1e-3)
    assert doc["digit"] == int(np.argmax(probs))
    assert doc["model"]["name"] == model_name and isinstance(doc["model"]["version"], int)
    return doc["digit"]


def test_json_forms_are_predicted_correctly(
    client: httpx.Client, sample: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = sample
    nested = [check_single(post_json(client, {"image": im.tolist()}).json()) for im in images]
    flat = [check_single(post_json(client, {"image": im.ravel().tolist()}).json()) for im in images]
    assert np.mean(np.array(nested) == labels) >= 0.98
    assert nested == flat
    batch = post_json(client, {"images": images[:64].tolist()})
    assert batch.status_code == 200 and batch.headers["content-type"] == "application/json"
    doc = batch.json()
    assert set(doc) == {"predictions", "model"} and len(doc["predictions"]) == 64
    DigitBatchPrediction.model_validate(doc)
    assert [p["digit"] for p in doc["predictions"]] == nested[:64]
    unit = post_json(client, {"images": (images[64:128] / 255).tolist(), "pixel_scale": 1})
    assert [p["digit"] for p in unit.json()["predictions"]] == nested[64:128]


def test_single_and_batch_probabilities_agree(
    client: httpx.Client, sample: tuple[np.ndarray, np.ndarray]
) -> None:
    images = sample[0][:8]
    singles = [post_json(client, {"image": im.tolist()}).json()["probabilities"] for im in images]
    batch = post_json(client, {"images": images.tolist()}).json()["predictions"]
    assert np.allclose(singles, [p["probabilities"] for p in batch], atol=1e-5)


def test_model_ref_matches_the_served_model(client: httpx.Client) -> None:
    served = {m["name"]: m["version"] for m in client.get("/v1/models").json()["models"]}
    doc = post_json(client, {"image": [0] * 784}).json()
    assert doc["model"] == {"name": "mnist_lstm", "version": served["mnist_lstm"]}


# --- pictures ----------------------------------------------------------------------------------


def encode(a: np.ndarray, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt, **kw)
    return buf.getvalue()


def resized(a: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((width, height), Image.Resampling.BICUBIC))


def off_centre(a: np.ndarray, k: int) -> np.ndarray:
    canvas = np.zeros((300, 400), np.uint8)
    top, left = 10 + (k * 37) % 220, 10 + (k * 53) % 320
    canvas[top : top + 64, left : left + 64] = resized(a, 64, 64)
    return canvas


def on_paper_jpeg(a: np.ndarray, k: int) -> bytes:
    """Dark ink on grey, unevenly lit, noisy paper, somewhere in a 480×640 JPEG."""
    rng = np.random.default_rng(k)
    paper = 185 + 8 * rng.standard_normal((480, 640)) + np.linspace(-25, 25, 640)
    ink = np.zeros_like(paper)
    top, left = 40 + (k * 41) % 200, 40 + (k * 67) % 360
    ink[top : top + 196, left : left + 196] = resized(a, 196, 196) / 255
    return encode(np.clip(paper * (1 - ink) + 35 * ink, 0, 255).astype(np.uint8), "JPEG")


VARIANTS: dict[str, tuple[Callable[[np.ndarray, int], bytes], float]] = {
    "png": (lambda a, k: encode(a), 0.95),
    "inverted": (lambda a, k: encode(255 - a), 0.95),
    "200x200": (lambda a, k: encode(resized(a, 200, 200)), 0.9),
    # 50×90 stretches the digit 1.8× vertically; the aspect ratio is kept, so it stays narrow.
    "50x90": (lambda a, k: encode(resized(a, 50, 90)), 0.8),
    "off_centre": (lambda a, k: encode(off_centre(a, k)), 0.9),
    "jpeg": (lambda a, k: encode(255 - resized(a, 84, 84), "JPEG", quality=85), 0.9),
    "photo_jpeg": (on_paper_jpeg, 0.9),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_uploaded_pictures_are_predicted_correctly(
    client: httpx.Client, sample: tuple[np.ndarray, np.ndarray], variant: str
) -> None:
    make, required = VARIANTS[variant]
    images, labels = sample[0][:PICTURES], sample[1][:PICTURES]
    digits = []
    for k, image in enumerate(images):
        reply = client.post(PATH, files={"file": (f"{k}.img", make(image, k), "image/png")})
        assert reply.status_code == 200, reply.text
        digits.append(check_single(reply.json()))
    assert np.mean(np.array(digits) == labels) >= required


# --- bad input ---------------------------------------------------------------------------------

GOOD = [[0] * 28 for _ in range(28)]
FLAT = [0] * 784
JSON = "application/json"


def _json(doc: object) -> bytes:
    return json.dumps(doc).encode()  # Python's json: NaN and Infinity become bare literals


BAD_JSON: dict[str, tuple[bytes, str, int, str]] = {
    "truncated": (b'{"image": [1, 2', JSON, 422, "invalid_json"),
    "empty body": (b"", JSON, 422, "invalid_json"),
    "nan literal": (_json({"image": [math.nan] * 784}), JSON, 422, "invalid_json"),
    "infinity literal": (_json({"image": [math.inf] * 784}), JSON, 422, "invalid_json"),
    "1e999": (b'{"image": [' + b"1e999," * 783 + b"0]}", JSON, 422, "invalid_json"),
    "-1e999": (b'{"image": [' + b"0," * 783 + b"-1e999]}", JSON, 422, "invalid_json"),
    "array body": (b"[1, 2, 3]", JSON, 422, "invalid_request"),
    "neither": (b"{}", JSON, 422, "invalid_request"),
    "both": (_json({"image": GOOD, "images": [GOOD]}), JSON, 422, "invalid_request"),
    "unknown field": (_json({"img": GOOD}), JSON, 422, "invalid_request"),
    "images not a list": (_json({"images": 5}), JSON, 422, "invalid_request"),
    "images empty": (_json({"images": []}), JSON, 422, "invalid_request"),
    "pixel_scale 0": (_json({"image": GOOD, "pixel_scale": 0}), JSON, 422, "invalid_request"),
    "pixel_scale text": (_json({"image": GOOD, "pixel_scale": "1"}), JSON, 422, "invalid_request"),
    "pixel_scale underflow": (
        _json({"image": GOOD, "pixel_scale": 1e-50}),  # float32(1e-50) == 0: would divide by 0
        JSON,
        422,
        "invalid_request",
    ),
    "27 rows": (_json({"image": GOOD[:27]}), JSON, 422, "invalid_shape"),
    "783 pixels": (_json({"image": FLAT[:783]}), JSON, 422, "invalid_shape"),
    "scalar": (_json({"image": 7}), JSON, 422, "invalid_shape"),
    "3-d image": (_json({"image": [GOOD]}), JSON, 422, "invalid_shape"),
    "ragged": (_json({"image": [*GOOD[:27], [0] * 27]}), JSON, 422, "invalid_shape"),
    "mixed forms": (_json({"images": [GOOD, FLAT]}), JSON, 422, "invalid_shape"),
    "strings": (_json({"image": ["0"] * 784}), JSON, 422, "invalid_pixels"),
    "null": (_json({"image": [None, *FLAT[1:]]}), JSON, 422, "invalid_pixels"),
    "booleans": (_json({"image": [True] * 784}), JSON, 422, "invalid_pixels"),
    "a boolean among numbers": (_json({"image": [True, *FLAT[1:]]}), JSON, 422, "invalid_pixels"),
    "object": (_json({"image": [{"v": 1}, *FLAT[1:]]}), JSON, 422, "invalid_pixels"),
    "256": (_json({"image": [256, *FLAT[1:]]}), JSON, 422, "invalid_pixels"),
    "negative": (_json({"image": [-1, *FLAT[1:]]}), JSON, 422, "invalid_pixels"),
    "2 with scale 1": (
        _json({"image": [2, *FLAT[1:]], "pixel_scale": 1}),
        JSON,
        422,
        "invalid_pixels",
    ),
    "huge number": (_json({"image": [1e300, *FLAT[1:]]}), JSON, 422, "invalid_pixels"),
    "too many images": (_json({"images": [FLAT] * 257}), JSON, 413, "too_many_images"),
    "text/plain": (b"hello", "text/plain", 415, "unsupported_media_type"),
    "form-urlencoded": (
        b"image=1",
        "application/x-www-form-urlencoded",
        415,
        "unsupported_media_type",
    ),
    "multipart without boundary": (b"x", "multipart/form-data", 400, "invalid_multipart"),
}


@pytest.mark.parametrize("case", list(BAD_JSON))
def test_bad_json_gets_a_clear_4xx(client: httpx.Client, case: str) -> None:
    body, ctype, status, code = BAD_JSON[case]
    reply = client.post(PATH, content=body, headers={"content-type": ctype})
    assert (reply.status_code, reply.json()["error"]) == (status, code), reply.text
    assert reply.json()["detail"]


BLANK = encode(np.full((40, 40), 255, np.uint8))
PNG = encode(np.zeros((40, 40), np.uint8) + np.eye(40, dtype=np.uint8) * 255)
BAD_UPLOADS: dict[str, tuple[dict, int, str]] = {
    "not an image": ({"file": ("a.png", b"hello", "image/png")}, 415, "unsupported_image"),
    "pdf": ({"file": ("a.pdf", b"%PDF-1.4\n%%EOF", "application/pdf")}, 415, "unsupported_image"),
    "empty file": ({"file": ("a.png", b"", "image/png")}, 422, "invalid_image"),
    "truncated png": ({"file": ("a.png", PNG[:60], "image/png")}, 422, "invalid_image"),
    "blank picture": ({"file": ("a.png", BLANK, "image/png")}, 422, "blank_image"),
    "bomb": ({"file": ("a.png", bomb_png(100_000, 100_000), "image/png")}, 413, "image_too_large"),
    "bomb under pillow's limit": (
        {"file": ("a.png", bomb_png(6_000, 5_000), "image/png")},
        413,
        "image_too_large",
    ),
    "wrong field": ({"picture": ("a.png", PNG, "image/png")}, 422, "invalid_request"),
    "text field": ({"file": (None, "not a file")}, 422, "invalid_request"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_get_a_clear_4xx(client: httpx.Client, case: str) -> None:
    files, status, code = BAD_UPLOADS[case]
    reply = client.post(PATH, files=files)
    assert (reply.status_code, reply.json()["error"]) == (status, code), reply.text


def test_declared_body_over_the_limit_is_refused_unread(live_server: LiveServer) -> None:
    host, port = live_server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(  # declares 1 GB, sends 1 kB: the answer must come without the rest
            b"POST /predict/digit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n" + b"{" * 1000
        )
        reply = b""
        while b"payload_too_large" not in reply and (chunk := sock.recv(65536)):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b"payload_too_large" in reply


def test_a_client_aborting_mid_body_is_counted_as_499_not_5xx(live_server: LiveServer) -> None:
    def count(status: str) -> float:
        text = httpx.get(f"{live_server.base_url}/metrics").text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "http_requests_total"
            and sample.labels.get("route") == PATH
            and sample.labels.get("status") == status
        )

    before = count("499")
    host, port = live_server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(  # declares 5,000 bytes, sends 100, hangs up
            b"POST /predict/digit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\n\r\n" + b'{"image": [' + b"0, " * 30
        )
    deadline = time.monotonic() + 20
    while count("499") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count("499") == before + 1
    assert not any(count(str(s)) for s in range(500, 600))


def test_streamed_body_over_the_limit_is_refused(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(80):  # 5 MiB in 64 KiB chunks, no Content-Length
            yield b" " * 65536

    reply = client.post(PATH, content=chunks(), headers={"content-type": JSON})
    assert (reply.status_code, reply.json()["error"]) == (413, "payload_too_large")


def test_server_still_serves_and_never_answered_500(
    client: httpx.Client, live_server: LiveServer, sample: tuple[np.ndarray, np.ndarray]
) -> None:
    reply = post_json(client, {"image": sample[0][0].tolist()})
    assert reply.status_code == 200 and reply.json()["digit"] == sample[1][0]
    metrics = client.get("/metrics").text
    statuses = {s["status"] for s in label_sets(metrics, "http_requests_total")
                if s["route"] == PATH}  # fmt: skip
    assert "200" in statuses and "500" not in statuses
    assert "unhandled error" not in live_server.log_text()


def test_each_request_is_one_json_log_line_without_the_body(
    client: httpx.Client, live_server: LiveServer, sample: tuple[np.ndarray, np.ndarray]
) -> None:
    assert post_json(client, {"image": sample[0][0].tolist()}).status_code == 200
    assert post_json(client, {"image": [[1]]}).status_code == 422

    def access_lines() -> list[dict[str, Any]]:  # written once the answer is sent: poll for them
        lines = [
            json.loads(line) for line in live_server.log_text().splitlines() if line[:1] == "{"
        ]
        return [e for e in lines if e.get("logger") == "app.access" and e["path"] == PATH]

    wait_until(lambda: [e["status"] for e in access_lines()[-2:]] == [200, 422], 10, "log lines")
    access = access_lines()
    fields = {"ts", "level", "logger", "pid", "msg"}
    fields |= {"method", "path", "status", "duration_ms", "client"}
    assert all(set(e) == fields for e in access)  # nothing from the body, ever
    assert all(not isinstance(v, list | dict) for e in access for v in e.values())
    assert [e["status"] for e in access[-2:]] == [200, 422]
    metrics = client.get("/metrics").text
    assert sample_value(metrics, "http_requests_total", method="POST", route=PATH, status="422")


def test_openapi_documents_both_json_forms_and_the_upload(client: httpx.Client) -> None:
    op = client.get("/openapi.json").json()["paths"][PATH]["post"]
    content = op["requestBody"]["content"]
    assert {"nested", "flat", "batch", "unit_floats"} <= set(
        content["application/json"]["examples"]
    )
    assert content["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"
    assert {"200", "413", "415", "422", "503"} <= set(op["responses"])


# --- the JSON route in-process, with a stand-in model ---------------------------------------


class StubService:
    model_ref: ClassVar[dict[str, Any]] = {"name": "mnist_lstm", "version": 1}

    def __init__(self, ready: bool, probs: np.ndarray | None = None) -> None:
        self.ready = ready
        self.probs = np.linspace(0, 0.2, 10, dtype=np.float32) if probs is None else probs

    async def predict(self, images: np.ndarray) -> np.ndarray:
        return np.tile(self.probs, (len(images), 1))


class CountingRoute(DigitJsonRoute):
    """The raw JSON route, counting what it answered (a comparison must not pass without it)."""

    answered = 0

    async def answer(self, scope, params, body):  # type: ignore[no-untyped-def]
        CountingRoute.answered += 1
        return await super().answer(scope, params, body)


def answers(
    service: Any, bodies: list[tuple[bytes, str]], raw: bool = True
) -> list[tuple[int, bytes]]:
    """Each body's (status, body) from the digit routes, with or without the raw JSON route."""
    app = FastAPI()
    install_error_handlers(app)
    if raw:
        app.router.routes.append(CountingRoute(json_route().documented({})))
    app.include_router(digits_router)
    app.state = AppState(  # type: ignore[assignment]
        Settings(),
        Lifecycle("ready"),
        models=StubModels(service),  # type: ignore[arg-type]
    )

    async def post_all() -> list[tuple[int, bytes]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            posts = [client.post(PATH, content=b, headers={"content-type": t}) for b, t in bodies]
            return [(r.status_code, r.content) for r in await asyncio.gather(*posts)]

    return asyncio.run(post_all())


def test_the_raw_routes_come_first_in_the_apps_routing() -> None:
    """After FastAPI's own (/openapi.json, /docs), before every included router's routes."""
    routes = create_app().router.routes
    kinds = [type(route) for route in routes]
    first_included = min(i for i, kind in enumerate(kinds) if kind is not Route and kind not in
                         (DigitJsonRoute, V2InferRoute))  # fmt: skip
    assert kinds.index(DigitJsonRoute) < first_included
    assert kinds.index(V2InferRoute) < first_included
    assert routes[kinds.index(DigitJsonRoute)].documented({}) in digits_router.routes


@pytest.mark.parametrize("ready", [True, False])
def test_the_raw_json_route_answers_as_the_documented_route(ready: bool) -> None:
    bodies = [(_json({"image": GOOD}), JSON), (_json({"images": [FLAT, FLAT]}), JSON)]
    bodies += [(body, ctype) for body, ctype, _, _ in BAD_JSON.values()]
    bodies += [(_json({"image": GOOD}), "application/vnd.api+json"), (_json({"image": GOOD}), "")]
    CountingRoute.answered = 0
    with_raw = answers(StubService(ready), bodies, raw=True)
    json_bodies = sum(1 for _, ctype in bodies if ctype == "" or "json" in ctype)
    assert CountingRoute.answered == json_bodies > 10
    assert with_raw == answers(StubService(ready), bodies, raw=False)


@pytest.mark.parametrize("ready", [True, False])
def test_in_process_answers_match_the_documented_codes(ready: bool) -> None:
    bodies = [(_json({"image": GOOD}), JSON), (_json({"images": [FLAT, FLAT]}), JSON)]
    bodies += [
        (body, ctype) for body, ctype, _, _ in BAD_JSON.values() if ctype != "multipart/form-data"
    ]
    got = answers(StubService(ready), bodies)
    if ready:
        assert [status for status, _ in got[:2]] == [200, 200]
        DigitPrediction.model_validate_json(got[0][1])
        DigitBatchPrediction.model_validate_json(got[1][1])
        cases = [c for c in BAD_JSON.values() if c[1] != "multipart/form-data"]
        for (status, body), (_, _, want_status, code) in zip(got[2:], cases, strict=True):
            assert (status, orjson.loads(body)["error"]) == (want_status, code)
    else:
        assert {status for status, _ in got if status != 415} == {503}


def test_a_failed_model_call_is_a_500_with_the_error_shape() -> None:
    """E.g. non-finite probabilities: the service raises ModelFailed rather than answer NaN."""

    class Failing(StubService):
        async def predict(self, images: np.ndarray) -> np.ndarray:
            raise ModelFailed("the digit model returned non-finite probabilities")

    ((status, body),) = answers(Failing(True), [(_json({"image": GOOD}), JSON)])
    assert (status, orjson.loads(body)["error"]) == (500, "internal_error")
