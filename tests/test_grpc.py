"""The KServe v2 / Triton gRPC service on a real server, driven by the official client,
``tritonclient[grpc]`` (and ``grpc.aio`` with the same generated messages where a test needs a
misbehaving client), with real MNIST test digits.

Health, server and model metadata; ``ModelInfer`` for digits single and batched, raw and typed
contents, answers equal to ``/predict/digit``'s and v2 REST's; every refusal with its gRPC
status and the REST error's ``"<code>: <detail>"``; API keys in the ``authorization`` metadata;
per-client call caps; streams (ids carried, errors in place, timeouts); the shared batcher's
metrics, the gRPC metrics and access lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from tests.live_server import LiveServer, start_server
from tests.metrics import sample_value
from training.mnist_data import MnistData

pytestmark = pytest.mark.slow
MODEL = "mnist_lstm"
BATCH = 64
KEY = "grpc-test-key-0123456789"


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(live_server.grpc_url)
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
    idx = np.random.default_rng(29).choice(len(mnist.x_test), BATCH, replace=False)
    return mnist.x_test[idx], mnist.y_test[idx]


@pytest.fixture(scope="module")
def native(http: httpx.Client, sample: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``/predict/digit``'s probabilities for the sample, as the reference."""
    response = http.post("/predict/digit", content=orjson.dumps({"images": sample[0].tolist()}))
    assert response.status_code == 200
    return np.array([p["probabilities"] for p in response.json()["predictions"]], np.float32)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server with API keys, tight per-client caps and short stream timeouts."""
    env = {
        "API_KEYS": f"{KEY},another-key",
        "MAX_CONNECTIONS_PER_CLIENT": "3",
        "ECHO_IDLE_TIMEOUT_S": "3",
        "ECHO_SEND_TIMEOUT_S": "1",
        "MAX_REQUEST_BYTES": "300000",
    }
    with start_server(tmp_path_factory.mktemp("grpc_guarded"), env) as server:
        yield server


def images_input(images: np.ndarray, datatype: str = "") -> triton.InferInput:
    datatype = datatype or ("UINT8" if images.dtype == np.uint8 else "FP32")
    tensor = triton.InferInput("images", list(images.shape), datatype)
    tensor.set_data_from_numpy(images)
    return tensor


def error_of(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


def raw_request(images: np.ndarray, **fields) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL, **fields)
    request.inputs.add(name="images", datatype="UINT8", shape=images.shape)
    request.raw_input_contents.append(images.tobytes())
    return request


def test_health_and_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "rnn-serving" and meta["version"] == "0.1.0"
    assert {"binary_tensor_data", "sequence", "sequence(string_id)"} <= set(meta["extensions"])


def test_model_metadata_and_readiness_equal_rest(
    client: triton.InferenceServerClient, live_server: LiveServer, version: str
) -> None:
    rest = triton_http.InferenceServerClient(live_server.base_url.removeprefix("http://"))
    try:
        for name, v in ((MODEL, ""), (MODEL, version), ("echo_rnn", "")):
            meta = client.get_model_metadata(name, v, as_json=True)
            want = rest.get_model_metadata(name, v)
            for tensor in meta["inputs"] + meta["outputs"]:
                tensor["shape"] = [int(d) for d in tensor["shape"]]  # int64 in JSON: strings
            assert meta == want
        assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, version)
        assert client.is_model_ready("echo_rnn")
        assert not client.is_model_ready("resnet50") and not client.is_model_ready(MODEL, "999")
        assert not client.is_model_ready(MODEL, "latest")
    finally:
        rest.close()


def test_batched_digits_equal_predict_digit_and_rest(
    client: triton.InferenceServerClient,
    live_server: LiveServer,
    sample: tuple[np.ndarray, np.ndarray],
    native: np.ndarray,
) -> None:
    images, labels = sample
    rest = triton_http.InferenceServerClient(live_server.base_url.removeprefix("http://"))
    tensor = triton_http.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=True)
    over_rest = rest.infer(MODEL, [tensor]).as_numpy("probabilities")
    rest.close()
    for sent in (images, images.astype(np.float32) / np.float32(255)):
        result = client.infer(MODEL, [images_input(sent)], request_id="g1")
        probs, digits = result.as_numpy("probabilities"), result.as_numpy("digit")
        assert probs.dtype == np.float32 and probs.shape == (BATCH, 10)
        assert digits.dtype == np.int64 and digits.tolist() == native.argmax(axis=1).tolist()
        np.testing.assert_allclose(probs, native, atol=1e-5)
        np.testing.assert_allclose(probs, over_rest, atol=1e-5)
        assert np.mean(digits == labels) >= 0.95
        response = result.get_response()
        assert response.id == "g1" and response.model_name == MODEL
        assert len(response.raw_output_contents) == 2  # raw, as Triton answers


def test_single_images_typed_contents_and_requested_outputs(
    client: triton.InferenceServerClient,
    live_server: LiveServer,
    sample: tuple[np.ndarray, np.ndarray],
    native: np.ndarray,
    version: str,
) -> None:
    images, _ = sample
    for i in range(6):
        result = client.infer(
            MODEL,
            [images_input(images[i : i + 1])],
            model_version=version if i % 2 else "",
            outputs=[triton.InferRequestedOutput("probabilities")],
        )
        np.testing.assert_allclose(result.as_numpy("probabilities")[0], native[i], atol=1e-5)
        assert result.as_numpy("digit") is None  # not requested, not sent
    typed = pb.ModelInferRequest(model_name=MODEL, id="typed")
    typed.inputs.add(name="images", datatype="UINT8", shape=[2, 28, 28])
    typed.inputs[0].contents.uint_contents.extend(images[:2].reshape(-1).tolist())
    with grpc.insecure_channel(live_server.grpc_url) as channel:
        answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(typed)
    assert answer.id == "typed" and [o.name for o in answer.outputs] == ["probabilities", "digit"]
    probs = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(2, 10)
    np.testing.assert_allclose(probs, native[:2], atol=1e-5)


REFUSALS = [  # (shape, datatype, values, the REST error code): all INVALID_ARGUMENT over gRPC
    ([1, 28, 28], "INT32", np.zeros((1, 28, 28), np.int32), "invalid_datatype"),
    ([1, 784], "UINT8", np.zeros((1, 784), np.uint8), "invalid_shape"),
    ([28, 28], "UINT8", np.zeros((28, 28), np.uint8), "invalid_shape"),
    ([1, 28, 28], "FP32", np.full((1, 28, 28), 255, np.float32), "invalid_pixels"),
    ([257, 28, 28], "UINT8", np.zeros((257, 28, 28), np.uint8), "too_many_images"),
]


@pytest.mark.parametrize(("shape", "datatype", "values", "code"), REFUSALS)
def test_bad_tensors_get_invalid_argument_with_the_rest_error(
    client: triton.InferenceServerClient,
    live_server: LiveServer,
    shape: list[int],
    datatype: str,
    values: np.ndarray,
    code: str,
) -> None:
    tensor = triton.InferInput("images", shape, datatype)
    tensor.set_data_from_numpy(values)
    err = error_of(client.infer, MODEL, [tensor])
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert err.message().startswith(f"{code}: ")
    rest_tensor = triton_http.InferInput("images", shape, datatype)
    rest_tensor.set_data_from_numpy(values, binary_data=True)
    rest = triton_http.InferenceServerClient(live_server.base_url.removeprefix("http://"))
    try:
        with pytest.raises(InferenceServerException) as info:
            rest.infer(MODEL, [rest_tensor])
    finally:
        rest.close()
    assert info.value.message() == err.message()  # the same words over both protocols


def test_every_other_refusal_has_its_status_and_the_server_keeps_serving(
    client: triton.InferenceServerClient, live_server: LiveServer, version: str
) -> None:
    good = images_input(np.zeros((1, 28, 28), np.uint8))
    cases = [
        (error_of(client.infer, "resnet50", [good]), "NOT_FOUND", "not_found: unknown model"),
        (error_of(client.get_model_metadata, "resnet50"), "NOT_FOUND", "not_found: "),
        (
            error_of(client.infer, MODEL, [good], model_version="999"),
            "NOT_FOUND",
            f"version_not_found: mnist_lstm version 999 is not available; available: {version}",
        ),
        (
            error_of(client.infer, MODEL, [good], model_version="v1"),
            "INVALID_ARGUMENT",
            "invalid_version: ",
        ),
        (
            error_of(client.infer, MODEL, [good], outputs=[triton.InferRequestedOutput("logits")]),
            "INVALID_ARGUMENT",
            "invalid_request: unknown output 'logits'",
        ),
        (error_of(client.infer, MODEL, []), "INVALID_ARGUMENT", "invalid_request: "),
    ]
    wrong_name = triton.InferInput("pixels", [1, 28, 28], "UINT8")
    wrong_name.set_data_from_numpy(np.zeros((1, 28, 28), np.uint8))
    cases.append((error_of(client.infer, MODEL, [wrong_name]), "INVALID_ARGUMENT", "invalid_"))
    for err, status, start in cases:
        assert err.status() == f"StatusCode.{status}", err
        assert err.message().startswith(start), err.message()

    with grpc.insecure_channel(live_server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        zeros = np.zeros((1, 28, 28), np.uint8)
        short = raw_request(zeros)
        short.raw_input_contents[0] = bytes(783)
        two_blobs = raw_request(zeros)
        two_blobs.raw_input_contents.append(b"")
        both = raw_request(zeros)
        both.inputs[0].contents.uint_contents.extend([0] * 784)
        typed_range = pb.ModelInferRequest(model_name=MODEL)
        typed_range.inputs.add(name="images", datatype="UINT8", shape=[1, 28, 28])
        typed_range.inputs[0].contents.uint_contents.extend([256] * 784)
        classification = raw_request(zeros)
        classification.outputs.add(name="digit").parameters["classification"].int64_param = 3
        negative = raw_request(zeros)
        negative.inputs[0].shape[0] = -1
        for request, code in [
            (short, "invalid_binary_data"),
            (two_blobs, "invalid_binary_data"),
            (both, "invalid_request"),
            (typed_range, "invalid_data"),
            (classification, "invalid_request"),
            (negative, "invalid_shape"),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
            assert info.value.details().startswith(f"{code}: "), info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # over MAX_REQUEST_BYTES (4 MiB)
            stub.ModelInfer(raw_request(np.zeros((6000, 28, 28), np.uint8)))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as info:  # not served: gRPC's own answer
            stub.RepositoryIndex(pb.RepositoryIndexRequest())
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert client.infer(MODEL, [good]).as_numpy("probabilities").shape == (1, 10)


def test_echo_without_sequence_parameters_is_refused(client: triton.InferenceServerClient) -> None:
    bits = triton.InferInput("bits", [1, 4], "UINT8")
    bits.set_data_from_numpy(np.ones((1, 4), np.uint8))
    err = error_of(client.infer, "echo_rnn", [bits])
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert err.message().startswith("missing_sequence_id: ")  # tests/test_grpc_sequences.py


def test_a_stream_answers_every_request_with_its_id_errors_in_place(
    client: triton.InferenceServerClient,
    sample: tuple[np.ndarray, np.ndarray],
    native: np.ndarray,
) -> None:
    images, _ = sample
    replies: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: replies.put((result, error)))
    try:
        for i in range(20):
            client.async_stream_infer(MODEL, [images_input(images[i : i + 1])], request_id=f"r{i}")
        client.async_stream_infer("resnet50", [images_input(images[:1])], request_id="lost")
        client.async_stream_infer(MODEL, [images_input(images[:8])], request_id="eight")
        got, errors = {}, []
        for _ in range(22):
            result, error = replies.get(timeout=30)
            if error is not None:
                errors.append(error.message())
            else:
                got[result.get_response().id] = result.as_numpy("probabilities")
    finally:
        client.stop_stream()
    assert errors == ["not_found: unknown model 'resnet50'; served: mnist_lstm, echo_rnn"]
    assert set(got) == {f"r{i}" for i in range(20)} | {"eight"}
    for i in range(20):
        np.testing.assert_allclose(got[f"r{i}"][0], native[i], atol=1e-5)
    np.testing.assert_allclose(got["eight"], native[:8], atol=1e-5)


def test_an_error_reply_on_the_stream_carries_the_request_id(live_server: LiveServer) -> None:
    async def run() -> list[pb.ModelStreamInferResponse]:
        async with grpc.aio.insecure_channel(live_server.grpc_url) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
            await call.write(pb.ModelInferRequest(model_name="nope", model_version="3", id="x1"))
            await call.write(raw_request(np.zeros((1, 28, 28), np.uint8), id="x2"))
            await call.done_writing()
            return [reply async for reply in call]

    replies = sorted(asyncio.run(run()), key=lambda r: r.infer_response.id)
    assert [r.infer_response.id for r in replies] == ["x1", "x2"]
    assert replies[0].error_message.startswith("not_found: ")
    assert replies[0].infer_response.model_name == "nope"
    assert replies[1].error_message == "" and len(replies[1].infer_response.raw_output_contents)


def test_grpc_shares_the_batcher_and_has_metrics_and_access_lines(
    client: triton.InferenceServerClient, http: httpx.Client, live_server: LiveServer
) -> None:
    def value(name: str, **labels: str) -> float:
        return sample_value(http.get("/metrics").text, name, **labels) or 0.0

    calls = value("model_inference_calls_total", model=MODEL)
    ok = value("grpc_requests_total", method="ModelInfer", code="OK")
    bad = value("grpc_requests_total", method="ModelInfer", code="NOT_FOUND")
    client.infer(MODEL, [images_input(np.zeros((2, 28, 28), np.uint8))])
    error_of(client.infer, "resnet50", [images_input(np.zeros((1, 28, 28), np.uint8))])
    assert value("model_inference_calls_total", model=MODEL) > calls
    assert value("grpc_requests_total", method="ModelInfer", code="OK") == ok + 1
    assert value("grpc_requests_total", method="ModelInfer", code="NOT_FOUND") == bad + 1
    assert value("grpc_request_duration_seconds_count", method="ModelInfer") >= ok + bad + 2
    lines = [orjson.loads(line) for line in live_server.log_text().splitlines() if '"rpc"' in line]
    assert {"rpc": "ModelInfer", "status": "NOT_FOUND", "client": "127.0.0.1"}.items() <= (
        lines[-1].items()
    )


def test_api_keys_in_the_authorization_metadata(guarded: LiveServer) -> None:
    client = triton.InferenceServerClient(guarded.grpc_url)
    good = [images_input(np.zeros((1, 28, 28), np.uint8))]
    try:
        assert client.is_server_live() and client.is_server_ready()  # public, as over HTTP
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
            err = error_of(client.infer, MODEL, good, headers=headers)
            assert err.status() == "StatusCode.UNAUTHENTICATED"
            assert err.message().startswith("unauthorized: this service needs an API key")
            err = error_of(client.get_model_metadata, MODEL, headers=headers)
            assert err.status() == "StatusCode.UNAUTHENTICATED"
        for key in (KEY, "another-key"):
            result = client.infer(MODEL, good, headers={"authorization": f"Bearer {key}"})
            assert result.as_numpy("digit").shape == (1,)
        replies: queue.Queue = queue.Queue()
        client.start_stream(
            lambda result, error: replies.put(error), headers={"authorization": "Bearer no"}
        )
        with contextlib.suppress(InferenceServerException):  # refused at once: maybe already
            client.async_stream_infer(MODEL, good)
        assert "unauthorized" in str(replies.get(timeout=10))
        client.stop_stream()
    finally:
        client.close()
    assert KEY not in guarded.log_text() and "another-key" not in guarded.log_text()


def test_calls_in_progress_are_capped_per_client(guarded: LiveServer) -> None:
    """``MAX_CONNECTIONS_PER_CLIENT`` = 3: three open streams (on three connections), the fourth
    call is refused with ``UNAVAILABLE`` and a retry-after; once one ends, calls go through
    again. On one connection the same cap is HTTP/2's ``max_concurrent_streams``: the client
    itself holds a fourth stream back."""
    metadata = (("authorization", f"Bearer {KEY}"),)
    own = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own per channel

    async def run() -> tuple[grpc.aio.AioRpcError, pb.ServerLiveResponse]:
        channels = [grpc.aio.insecure_channel(guarded.grpc_url, options=own) for _ in range(4)]
        stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in channels]
        try:
            streams = [stub.ModelStreamInfer(metadata=metadata) for stub in stubs[:3]]
            for call in streams:  # each open and answered: counted
                await call.write(raw_request(np.zeros((1, 28, 28), np.uint8), id="a"))
                assert (await call.read()).infer_response.id == "a"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stubs[3].ServerLive(pb.ServerLiveRequest())
            await streams[0].done_writing()
            assert await streams[0].code() == grpc.StatusCode.OK
            live = await stubs[3].ServerLive(pb.ServerLiveRequest())
            for call in streams[1:]:
                call.cancel()
            return info.value, live
        finally:
            for channel in channels:
                await channel.close()

    auth = {"Authorization": f"Bearer {KEY}"}

    def cancelled() -> float:
        text = httpx.get(f"{guarded.base_url}/metrics", headers=auth, timeout=10).text
        labels = {"method": "ModelStreamInfer", "code": "CANCELLED"}
        return sample_value(text, "grpc_requests_total", **labels) or 0.0

    before = cancelled()
    refused, live = asyncio.run(run())
    for _ in range(200):  # the two cancelled streams end on the server too (released) before
        if cancelled() >= before + 2:  # the next test opens its own; a cancel that races the
            break  # stream's end may be counted under another code, so this only waits
        time.sleep(0.05)
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert refused.details().startswith("too_many_calls_from_client: ")
    assert ("retry-after", "1") in tuple(refused.trailing_metadata() or ())
    assert live.live


def test_streams_that_idle_or_leave_replies_unread_are_ended(guarded: LiveServer) -> None:
    metadata = (("authorization", f"Bearer {KEY}"),)
    batch = raw_request(np.zeros((256, 28, 28), np.uint8))  # a 12 kB reply each

    async def idle() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(guarded.grpc_url) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(metadata=metadata)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(call.read(), 10)  # sends nothing
            return info.value

    async def unread() -> grpc.aio.AioRpcError:
        options = [("grpc.http2.bdp_probe", 0)]  # the 64 kB window stays: replies back up
        async with grpc.aio.insecure_channel(guarded.grpc_url, options=options) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(metadata=metadata)

            async def send() -> None:  # about 480 kB of replies to come, not read
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                    for _ in range(40):
                        await call.write(batch)

            async def drain() -> None:
                while await call.read() is not grpc.aio.EOF:
                    pass

            sender = asyncio.create_task(send())
            for _ in range(300):  # until the server has cut the stream off (not read meanwhile)
                await asyncio.sleep(0.1)
                if cut_off() > before:
                    break
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(drain(), 30)
            sender.cancel()
            return info.value

    def cut_off() -> float:
        text = httpx.get(f"{guarded.base_url}/metrics", headers=auth, timeout=10).text
        labels = {"method": "ModelStreamInfer", "code": "DEADLINE_EXCEEDED"}
        return sample_value(text, "grpc_requests_total", **labels) or 0.0

    auth = {"Authorization": f"Bearer {KEY}"}
    before = cut_off()
    err = asyncio.run(idle())
    assert err.code() == grpc.StatusCode.UNAVAILABLE and err.details().startswith("idle_timeout: ")
    err = asyncio.run(unread())
    assert cut_off() > before  # the server cut the stream off: send_timeout, DEADLINE_EXCEEDED
    # The client sees that status, or INTERNAL when one of its own pending writes fails first
    # (grpc core's "execute_batch" error, seen once on a loaded machine).
    assert err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL)
    if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        assert err.details().startswith("send_timeout: ")
    assert httpx.get(f"{guarded.base_url}/livez").status_code == 200


def test_grpc_port_zero_turns_it_off(tmp_path: Path) -> None:
    with start_server(tmp_path, {"GRPC_PORT": "0"}) as server:
        assert server.grpc_port == 0
        assert httpx.get(f"{server.base_url}/readyz").status_code == 200
        assert '"gRPC serving"' not in server.log_text()
