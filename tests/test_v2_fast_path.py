"""``V2InferRoute`` (raw ASGI) and the documented FastAPI infer routes answer alike (in-process,
with a stand-in digit service: the live-server tests in ``test_api_v2`` cover the real model)."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import orjson
import pytest
from fastapi import FastAPI

from app.api import v2
from app.api.errors import install_error_handlers
from app.api.v2_fast import V2InferRoute
from app.core.config import Settings
from app.state import AppState, Lifecycle
from tests.stub_models import StubModels


class StubService:
    def __init__(self, ready: bool) -> None:
        self.ready = ready
        self.calls = 0

    async def predict(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.tile(np.linspace(0, 0.2, 10, dtype=np.float32), (len(images), 1))


def _json(doc: object) -> bytes:
    return orjson.dumps(doc)


IMAGES = {"name": "images", "shape": [2, 28, 28], "datatype": "UINT8"}
HEADER = _json({"inputs": [{**IMAGES, "parameters": {"binary_data_size": 2 * 784}}],
                "parameters": {"binary_data_output": True}})  # fmt: skip
BINARY = {"Inference-Header-Content-Length": str(len(HEADER))}
SEQUENCE_BITS = {"name": "bits", "shape": [1, 3], "datatype": "UINT8", "data": [1, 0, 1]}
CASES: list[tuple[str, bytes, dict[str, str]]] = [
    ("mnist_lstm", _json({"id": "a", "inputs": [{**IMAGES, "data": [7] * 2 * 784}]}), {}),
    ("mnist_lstm/versions/1", HEADER + bytes(2 * 784), BINARY),
    ("mnist_lstm/versions/2", HEADER + bytes(2 * 784), BINARY),
    ("mnist_lstm", HEADER + bytes(784), BINARY),
    ("mnist_lstm", b"{", {}),
    ("mnist_lstm", _json({"inputs": [{**IMAGES, "shape": [2, 784], "data": [0] * 1568}]}), {}),
    ("echo_rnn", _json({"inputs": [{**IMAGES, "data": [0] * 1568}]}), {}),
    ("echo_rnn", _json({"parameters": {"sequence_id": 1}, "inputs": [SEQUENCE_BITS]}), {}),
    ("resnet", b"{}", {}),
]


class CountingRoute(V2InferRoute):
    """The raw route, counting what it answered (so the comparison cannot pass by its absence)."""

    answered = 0

    async def answer(self, scope, params, body):  # type: ignore[no-untyped-def]
        CountingRoute.answered += 1
        return await super().answer(scope, params, body)


def answers(fast: bool, ready: bool) -> tuple[list[tuple[int, str, bytes]], int]:
    app = FastAPI()
    install_error_handlers(app)
    if fast:
        app.router.routes.append(CountingRoute())
    app.include_router(v2.router)
    service = StubService(ready)
    app.state = AppState(  # type: ignore[assignment]
        Settings(),
        Lifecycle("ready" if ready else "loading"),
        models=StubModels(service),  # type: ignore[arg-type]
    )

    async def post_all() -> list[tuple[int, str, bytes]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            posts = [
                client.post(f"/v2/models/{m}/infer", content=b, headers=h) for m, b, h in CASES
            ]
            return [
                (r.status_code, r.headers.get("inference-header-content-length", ""), r.content)
                for r in await asyncio.gather(*posts)
            ]

    return asyncio.run(post_all()), service.calls


@pytest.mark.parametrize("ready", [True, False])
def test_fast_path_and_route_answer_alike(ready: bool) -> None:
    CountingRoute.answered = 0
    (fast, fast_calls), (route, route_calls) = answers(True, ready), answers(False, ready)
    assert CountingRoute.answered == len(CASES)
    assert fast == route
    assert fast_calls == route_calls == (2 if ready else 0)
    statuses = [status for status, _, _ in fast]
    ok = 200 if ready else 503
    # echo_rnn: no sequence_id (400); a sequence step with no echo service here (503)
    assert statuses == [ok, ok, 404, 400, 400, 400, 400, 503, 404]
    if ready:
        assert orjson.loads(fast[0][2])["id"] == "a"
        n = int(fast[1][1])
        assert len(fast[1][2]) == n + 2 * 10 * 4 + 2 * 8  # FP32 [2, 10] and INT64 [2]
