"""The Open Inference Protocol (KServe v2) routes on a real server, driven by the official
client, ``tritonclient[http]``, with real MNIST test digits.

Health, metadata and readiness; inference single and batched, JSON and binary, FP32 and UINT8,
requested outputs; every kind of bad request answered with the protocol's error; and the
answers equal ``POST /predict/digit``'s for the same images.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.live_server import LiveServer
from tests.metrics import label_sets, sample_value
from training.mnist_data import MnistData

pytestmark = pytest.mark.slow
MODEL = "mnist_lstm"
BATCH = 64


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    url = live_server.base_url.removeprefix("http://")
    c = triton.InferenceServerClient(url, network_timeout=60.0, connection_timeout=10.0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.base_url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def version(http: httpx.Client) -> str:
    (digit,) = [m for m in http.get("/v1/models").json()["models"] if m["name"] == MODEL]
    return str(digit["version"])


@pytest.fixture(scope="module")
def sample(mnist: MnistData) -> tuple[np.ndarray, np.ndarray]:
    idx = np.random.default_rng(13).choice(len(mnist.x_test), BATCH, replace=False)
    return mnist.x_test[idx], mnist.y_test[idx]


@pytest.fixture(scope="module")
def native(http: httpx.Client, sample: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``/predict/digit``'s probabilities for the sample, as the reference."""
    body = orjson.dumps({"images": sample[0].tolist()})
    response = http.post("/predict/digit", content=body)
    assert response.status_code == 200
    return np.array([p["probabilities"] for p in response.json()["predictions"]], np.float32)


def images_input(images: np.ndarray, binary: bool, datatype: str = "") -> triton.InferInput:
    datatype = datatype or ("UINT8" if images.dtype == np.uint8 else "FP32")
    tensor = triton.InferInput("images", list(images.shape), datatype)
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


def error_of(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


def test_server_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "rnn-serving" and "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_readiness(client: triton.InferenceServerClient, version: str) -> None:
    for meta in (client.get_model_metadata(MODEL), client.get_model_metadata(MODEL, version)):
        assert meta["name"] == MODEL and meta["versions"] == [version]
        assert meta["platform"] == "tensorflow_savedmodel"
        assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 28, 28]}]
        assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
            "probabilities": ("FP32", [-1, 10]),
            "digit": ("INT64", [-1]),
        }
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, version)
    echo = client.get_model_metadata("echo_rnn")  # a sequence model (tests/test_v2_sequences.py)
    assert echo["inputs"] == [{"name": "bits", "datatype": "UINT8", "shape": [1, -1]}]
    assert client.is_model_ready("echo_rnn")


def test_unknown_models_and_versions_are_404(
    client: triton.InferenceServerClient, version: str
) -> None:
    err = error_of(client.get_model_metadata, "resnet50")
    assert err.status() == "404" and "mnist_lstm" in err.message()
    err = error_of(client.get_model_metadata, MODEL, "999")
    assert err.status() == "404" and f"available: {version}" in err.message()
    assert not client.is_model_ready("resnet50") and not client.is_model_ready(MODEL, "999")
    tensor = images_input(np.zeros((1, 28, 28), np.uint8), True)
    assert error_of(client.infer, "resnet50", [tensor]).status() == "404"
    assert error_of(client.infer, MODEL, [tensor], model_version="999").status() == "404"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("as_uint8", [True, False], ids=["uint8", "fp32"])
def test_batch_answers_equal_predict_digit(
    client: triton.InferenceServerClient,
    sample: tuple[np.ndarray, np.ndarray],
    native: np.ndarray,
    binary: bool,
    as_uint8: bool,
) -> None:
    images, labels = sample
    sent = images if as_uint8 else images.astype(np.float32) / np.float32(255)
    outputs = [
        triton.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "digit")
    ]
    result = client.infer(MODEL, [images_input(sent, binary)], outputs=outputs, request_id="b1")
    probs, digits = result.as_numpy("probabilities"), result.as_numpy("digit")
    assert probs.dtype == np.float32 and probs.shape == (BATCH, 10)
    assert digits.dtype == np.int64 and digits.tolist() == native.argmax(axis=1).tolist()
    np.testing.assert_allclose(probs, native, atol=1e-5)
    assert np.mean(digits == labels) >= 0.95
    response = result.get_response()
    assert response["id"] == "b1" and response["model_name"] == MODEL


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_single_images_equal_predict_digit(
    client: triton.InferenceServerClient,
    sample: tuple[np.ndarray, np.ndarray],
    native: np.ndarray,
    version: str,
    binary: bool,
) -> None:
    images, _ = sample
    for i in range(8):
        result = client.infer(
            MODEL,
            [images_input(images[i : i + 1], binary)],
            model_version=version if i % 2 else "",
            outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary)],
        )
        np.testing.assert_allclose(result.as_numpy("probabilities")[0], native[i], atol=1e-5)
        assert result.as_numpy("digit") is None  # not requested, not sent


def test_default_outputs_are_all_binary_and_requested_outputs_are_honoured(
    client: triton.InferenceServerClient, live_server: LiveServer, sample: tuple
) -> None:
    images = sample[0][:3]
    result = client.infer(MODEL, [images_input(images, False)])  # no outputs: all, binary
    outputs = result.get_response()["outputs"]
    assert {o["name"] for o in outputs} == {"probabilities", "digit"}
    assert all("binary_data_size" in o["parameters"] for o in outputs)
    only = client.infer(
        MODEL, [images_input(images, True)], outputs=[triton.InferRequestedOutput("digit", False)]
    )
    (out,) = only.get_response()["outputs"]
    assert out["name"] == "digit" and out["data"] == result.as_numpy("digit").tolist()
    doc = {
        "inputs": [{"name": "images", "shape": [3, 28, 28], "datatype": "UINT8",
                    "data": images.tolist()}],  # nested data, as the protocol allows
        "outputs": [{"name": "digit"}],
    }  # fmt: skip
    raw = httpx.post(f"{live_server.base_url}/v2/models/{MODEL}/infer", content=orjson.dumps(doc))
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/json"
    assert raw.json()["outputs"][0]["data"] == out["data"]


@pytest.mark.parametrize(
    ("shape", "datatype", "values", "status", "code"),
    [
        ([1, 28, 28], "INT32", np.zeros((1, 28, 28), np.int32), "400", "invalid_datatype"),
        ([1, 784], "UINT8", np.zeros((1, 784), np.uint8), "400", "invalid_shape"),
        ([28, 28], "UINT8", np.zeros((28, 28), np.uint8), "400", "invalid_shape"),
        ([1, 28, 28], "FP32", np.full((1, 28, 28), 255, np.float32), "400", "invalid_pixels"),
        ([257, 28, 28], "UINT8", np.zeros((257, 28, 28), np.uint8), "413", "too_many_images"),
    ],
)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_bad_tensors_get_protocol_errors(
    client: triton.InferenceServerClient,
    shape: list[int],
    datatype: str,
    values: np.ndarray,
    status: str,
    code: str,
    binary: bool,
) -> None:
    tensor = triton.InferInput("images", shape, datatype)
    tensor.set_data_from_numpy(values, binary_data=binary)
    err = error_of(client.infer, MODEL, [tensor])
    assert err.status() == status and err.message().startswith(f"{code}: ")


def test_bad_requests_get_protocol_errors_and_the_server_keeps_serving(
    client: triton.InferenceServerClient, live_server: LiveServer
) -> None:
    wrong_name = triton.InferInput("pixels", [1, 28, 28], "UINT8")
    wrong_name.set_data_from_numpy(np.zeros((1, 28, 28), np.uint8))
    assert "'images'" in error_of(client.infer, MODEL, [wrong_name]).message()
    good = images_input(np.zeros((1, 28, 28), np.uint8), True)
    err = error_of(client.infer, MODEL, [good], outputs=[triton.InferRequestedOutput("logits")])
    assert err.status() == "400" and "unknown output 'logits'" in err.message()
    err = error_of(client.infer, "echo_rnn", [good])  # no sequence_id
    assert err.status() == "400" and err.message().startswith("missing_sequence_id: ")

    url = f"{live_server.base_url}/v2/models/{MODEL}/infer"
    header = orjson.dumps(
        {"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8",
                     "parameters": {"binary_data_size": 784}}]}
    )  # fmt: skip
    cases = {
        "invalid_json": (b'{"inputs": [', {}),
        "invalid_request": (b'{"inputs": "images"}', {}),
        "invalid_binary_data": (  # one byte short of the declared size
            header + bytes(783),
            {"Inference-Header-Content-Length": str(len(header))},
        ),
    }
    for code, (body, headers) in cases.items():
        response = httpx.post(url, content=body, headers=headers)
        assert response.status_code == 400, response.text
        (message,) = response.json().values()
        assert message.startswith(f"{code}: "), message
    ok = httpx.post(
        url,
        content=header + bytes(784),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
    assert client.infer(MODEL, [good]).as_numpy("probabilities").shape == (1, 10)


def test_v2_shares_the_batchers_metrics_and_is_documented(
    client: triton.InferenceServerClient, http: httpx.Client
) -> None:
    def calls() -> float:
        text = http.get("/metrics").text
        return sample_value(text, "model_inference_calls_total", model="mnist_lstm") or 0.0

    before = calls()
    client.infer(MODEL, [images_input(np.zeros((2, 28, 28), np.uint8), True)])
    assert calls() > before
    routes = {s.get("route") for s in label_sets(http.get("/metrics").text, "http_requests_total")}
    assert "/v2/models/{model_name}/infer" in routes
    paths = http.get("/openapi.json").json()["paths"]
    infer = paths["/v2/models/{model_name}/infer"]["post"]
    body = infer["requestBody"]["content"]
    assert body["application/json"]["examples"] and "application/octet-stream" in body
    assert {"/v2", "/v2/health/ready", "/v2/models/{model_name}/versions/{model_version}"} <= set(
        paths
    )
