"""Triton's sequence extension on ``echo_rnn`` over gRPC, driven by ``tritonclient[grpc]``
(``infer`` and the bidirectional stream: ``start_stream`` / ``async_stream_infer``), on real
servers.

Interleaved sequences with integer and string ids, over ``ModelInfer`` and over one stream with
every step sent at once, answer exactly as ``WS /echo`` sessions fed the same bits, and as the
same sequence continued over v2 REST; stream replies carry their request's ``id``; every
refusal has its gRPC status and the REST error's words; a retried ``id`` is answered once (also
after the stream that sent it was cancelled); sequence ids are scoped per API key, the key
coming from the ``authorization`` metadata.
"""

from __future__ import annotations

import asyncio
import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from tests.live_server import LiveServer, RedisServer, start_server
from tests.metrics import sample_value
from tests.test_api_echo import send_bits, session
from tests.test_v2_sequences import chunks_of, echo_reference

pytestmark = pytest.mark.slow
MODEL = "echo_rnn"


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(live_server.grpc_url)
    yield c
    c.close()


def bits_input(bits: np.ndarray, datatype: str = "UINT8") -> triton.InferInput:
    dtype = {"UINT8": np.uint8, "FP32": np.float32, "INT32": np.int32, "BOOL": np.bool_}
    tensor = triton.InferInput("bits", [1, len(bits)], datatype)
    tensor.set_data_from_numpy(bits.reshape(1, -1).astype(dtype[datatype]))
    return tensor


def step(
    client: triton.InferenceServerClient,
    sequence_id: int | str,
    bits: np.ndarray,
    *,
    start: bool = False,
    end: bool = False,
    request_id: str = "",
    datatype: str = "UINT8",
    version: str = "",
    headers: dict[str, str] | None = None,
) -> triton.InferResult:
    return client.infer(
        MODEL,
        [bits_input(bits, datatype)],
        model_version=version,
        request_id=request_id,
        sequence_id=sequence_id,
        sequence_start=start,
        sequence_end=end,
        headers=headers,
    )


def answer(result: triton.InferResult, n: int) -> np.ndarray:
    probs, bits = result.as_numpy("probabilities"), result.as_numpy("bits")
    assert probs.shape == bits.shape == (1, n) and probs.dtype == np.float32
    assert bits.dtype == np.uint8 and np.array_equal(bits, (probs > 0.5).astype(np.uint8))
    return probs[0]


def replayed(result: triton.InferResult) -> bool:
    params = result.get_response().parameters
    return "replayed" in params and params["replayed"].bool_param


def refused(err: InferenceServerException | grpc.RpcError, status: str, code: str) -> None:
    if isinstance(err, grpc.RpcError):
        got_status, message = str(err.code()), err.details()
    else:
        got_status, message = err.status(), err.message()
    assert got_status == f"StatusCode.{status}" and message.startswith(f"{code}: "), (
        got_status,
        message,
    )


def error_of(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


def raw_step(sequence_id: object, bits: np.ndarray, **flags: object) -> pb.ModelInferRequest:
    """A request tritonclient cannot build: any kind of parameter value."""
    request = pb.ModelInferRequest(model_name=MODEL)
    for name, value in [("sequence_id", sequence_id), *flags.items()]:
        param = request.parameters[name]
        if type(value) is bool:
            param.bool_param = value
        elif type(value) is int:
            if value >= 2**63:
                param.uint64_param = value
            else:
                param.int64_param = value
        elif type(value) is float:
            param.double_param = value
        else:
            param.string_param = str(value)
    request.inputs.add(name="bits", datatype="UINT8", shape=[1, len(bits)])
    request.raw_input_contents.append(bits.astype(np.uint8).tobytes())
    return request


def test_interleaved_sequences_over_model_infer_answer_as_echo_sessions(
    client: triton.InferenceServerClient, live_server: LiveServer
) -> None:
    ids: list[int | str] = [11, "11", 2**63 - 1, "séquence-β"]
    plans = {
        k: chunks_of(50 + i, [1 + (13 * i + 31 * j) % 60 for j in range(5)])
        for i, k in enumerate(ids)
    }
    datatypes = ["UINT8", "FP32", "INT32", "BOOL"]
    got: dict[int | str, list[np.ndarray]] = {k: [] for k in ids}
    for j in range(5):
        for i, k in enumerate(ids):
            chunk = plans[k][j]
            result = step(
                client,
                k,
                chunk,
                start=j == 0,
                end=j == 4,
                request_id=f"{k}-{j}",
                datatype=datatypes[(i + j) % 4],
            )
            response = result.get_response()
            assert response.id == f"{k}-{j}" and response.model_version == "1"
            assert not replayed(result)
            got[k].append(answer(result, len(chunk)))
    for k in ids:
        for probs, want in zip(got[k], echo_reference(live_server, plans[k]), strict=True):
            np.testing.assert_allclose(probs, want, atol=1e-5)
        echoed = (np.concatenate(got[k]) > 0.5).astype(np.uint8)
        assert np.array_equal(echoed[3:], np.concatenate(plans[k])[:-3])  # 3 bits late


def test_an_unsigned_64_bit_id_and_a_sequence_shared_with_rest(
    client: triton.InferenceServerClient, live_server: LiveServer
) -> None:
    """``uint64_param`` ids up to 2**64 - 1 (tritonclient sends ``int64_param``); a sequence
    started over v2 REST continues over gRPC and back: one sequence service."""
    chunks = chunks_of(61, [7, 12, 5, 9])
    with grpc.insecure_channel(live_server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        first = stub.ModelInfer(raw_step(2**64 - 1, chunks[0], sequence_start=True))
        second = stub.ModelInfer(raw_step(2**64 - 1, chunks[1]))
    probs = [np.frombuffer(r.raw_output_contents[0], "<f4") for r in (first, second)]
    for got, want in zip(probs, echo_reference(live_server, chunks[:2]), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)

    rest = triton_http.InferenceServerClient(live_server.base_url.removeprefix("http://"))
    try:
        tensor = triton_http.InferInput("bits", [1, 7], "UINT8")
        tensor.set_data_from_numpy(chunks[0].reshape(1, -1))
        shared = [rest.infer(MODEL, [tensor], sequence_id="shared", sequence_start=True)]
        shared.append(step(client, "shared", chunks[1]))  # over gRPC
        tensor = triton_http.InferInput("bits", [1, 5], "UINT8")
        tensor.set_data_from_numpy(chunks[2].reshape(1, -1))
        shared.append(rest.infer(MODEL, [tensor], sequence_id="shared"))
    finally:
        rest.close()
    got = [r.as_numpy("probabilities")[0] for r in shared]
    for probs, want in zip(got, echo_reference(live_server, chunks[:3]), strict=True):
        np.testing.assert_allclose(probs, want, atol=1e-5)


def test_interleaved_sequences_on_one_stream_all_sent_at_once(
    client: triton.InferenceServerClient, live_server: LiveServer
) -> None:
    """Every step of four sequences written to one stream before any reply is read: each
    sequence's steps still run in the order sent (batched with the others'), each reply
    carries its request's id."""
    ids: list[int | str] = [7, "7", 2**40, "stream-β"]
    plans = {k: chunks_of(70 + i, [1 + (7 * i + 11 * j) % 40 for j in range(8)]) for i, k in
             enumerate(ids)}  # fmt: skip
    replies: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: replies.put((result, error)))
    try:
        for j in range(8):
            for k in ids:
                client.async_stream_infer(
                    MODEL,
                    [bits_input(plans[k][j])],
                    request_id=f"{k!r}|{j}",
                    sequence_id=k,
                    sequence_start=j == 0,
                    sequence_end=j == 7,
                )
        got: dict[str, np.ndarray] = {}
        for _ in range(32):
            result, error = replies.get(timeout=60)
            assert error is None, error
            got[result.get_response().id] = result.as_numpy("probabilities")[0]
    finally:
        client.stop_stream()
    for k in ids:
        want = echo_reference(live_server, plans[k])
        for j in range(8):
            np.testing.assert_allclose(got[f"{k!r}|{j}"], want[j], atol=1e-5)


def test_refusals_over_model_infer_and_the_stream(
    client: triton.InferenceServerClient, live_server: LiveServer
) -> None:
    one = np.ones(3, np.uint8)
    bad = "INVALID_ARGUMENT"
    refused(error_of(step, client, "never-started", one), bad, "sequence_not_found")
    refused(error_of(client.infer, MODEL, [bits_input(one)]), bad, "missing_sequence_id")
    step(client, "ended", one, start=True)
    step(client, "ended", one, end=True)
    refused(error_of(step, client, "ended", one), bad, "sequence_ended")
    unknown = error_of(step, client, "v", one, start=True, version="9")
    refused(unknown, "NOT_FOUND", "version_not_found")
    refused(error_of(step, client, "v", one, start=True, version="x"), bad, "invalid_version")

    def shaped(shape: list[int], data: np.ndarray, name: str = "bits") -> Exception:
        tensor = triton.InferInput(name, shape, "UINT8")
        tensor.set_data_from_numpy(data)
        return error_of(client.infer, MODEL, [tensor], sequence_id="shape", sequence_start=True)

    refused(shaped([2, 3], np.ones((2, 3), np.uint8)), bad, "invalid_shape")
    refused(shaped([3], np.ones(3, np.uint8)), bad, "invalid_shape")
    refused(shaped([1, 0], np.ones((1, 0), np.uint8)), bad, "invalid_shape")
    refused(shaped([1, 2], np.array([[0, 2]], np.uint8)), bad, "invalid_bits")
    refused(shaped([1, 4097], np.ones((1, 4097), np.uint8)), bad, "too_many_bits")
    refused(shaped([1, 3], np.ones((1, 3), np.uint8), "images"), bad, "invalid_request")
    step(client, "reused", one, start=True, request_id="a")
    refused(error_of(step, client, "reused", one * 0, request_id="a"), bad, "request_id_reused")

    with grpc.insecure_channel(live_server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        cases = {
            "invalid_sequence_id": [-1, 1.5, True, "x" * 257],
            "missing_sequence_id": [0, ""],
        }
        for code, values in cases.items():
            for value in values:
                with pytest.raises(grpc.RpcError) as info:
                    stub.ModelInfer(raw_step(value, one, sequence_start=True))
                refused(info.value, bad, code)
        for flag in (1, "yes", 1.0):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(raw_step(5, one, sequence_start=flag))
            refused(info.value, bad, "invalid_sequence_flag")

        async def on_a_stream() -> list[pb.ModelStreamInferResponse]:
            async with grpc.aio.insecure_channel(live_server.grpc_url) as aio:
                call = pb_grpc.GRPCInferenceServiceStub(aio).ModelStreamInfer()
                for i, request in enumerate(
                    [
                        raw_step("nope", one),
                        raw_step(-3, one, sequence_start=True),
                        raw_step("ok", one, sequence_start=True),
                    ]
                ):
                    request.id = f"s{i}"
                    await call.write(request)
                await call.done_writing()
                return [reply async for reply in call]

        replies = sorted(asyncio.run(on_a_stream()), key=lambda r: r.infer_response.id)
    assert [r.infer_response.id for r in replies] == ["s0", "s1", "s2"]
    assert replies[0].error_message.startswith("sequence_not_found: ")
    assert replies[1].error_message.startswith("invalid_sequence_id: ")
    assert replies[2].error_message == "" and replies[2].infer_response.model_name == MODEL
    good = chunks_of(9, [12])
    got = answer(step(client, "after-refusals", good[0], start=True), 12)
    np.testing.assert_allclose(got, echo_reference(live_server, good)[0], atol=1e-5)


def test_a_retried_id_is_answered_once(
    client: triton.InferenceServerClient, live_server: LiveServer
) -> None:
    """Over ``ModelInfer``, over a stream, and after a stream that sent a step was cancelled
    before its reply came: the retry gets the stored answer (``replayed``) or is the step, and
    the sequence advances once."""
    chunks = chunks_of(81, [10, 11, 12, 13, 14])
    want = echo_reference(live_server, chunks)
    first = step(client, "retry", chunks[0], start=True, request_id="r0")
    again = step(client, "retry", chunks[0], start=True, request_id="r0")
    assert replayed(again) and not replayed(first)
    assert np.array_equal(answer(again, 10), answer(first, 10))
    np.testing.assert_allclose(answer(first, 10), want[0], atol=1e-5)

    replies: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: replies.put((result, error)))
    try:
        for _ in range(2):  # the same request twice on the stream: a step, then its replay
            client.async_stream_infer(
                MODEL, [bits_input(chunks[1])], request_id="r1", sequence_id="retry"
            )
        results = [replies.get(timeout=30) for _ in range(2)]
    finally:
        client.stop_stream()
    assert all(error is None for _, error in results)
    assert sorted(replayed(result) for result, _ in results) == [False, True]
    for result, _ in results:
        np.testing.assert_allclose(answer(result, 11), want[1], atol=1e-5)

    async def sent_then_cancelled() -> None:
        async with grpc.aio.insecure_channel(live_server.grpc_url) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
            request = raw_step("retry", chunks[2])
            request.id = "r2"
            await call.write(request)
            call.cancel()  # the reply is never read

    asyncio.run(sent_then_cancelled())
    retried = step(client, "retry", chunks[2], request_id="r2")  # blind retry
    np.testing.assert_allclose(answer(retried, 12), want[2], atol=1e-5)
    for k in (3, 4):
        got = answer(step(client, "retry", chunks[k], request_id=f"r{k}"), len(chunks[k]))
        np.testing.assert_allclose(got, want[k], atol=1e-5)  # each step applied once


def test_sequence_ids_are_scoped_per_api_key_from_the_metadata(tmp_path: Path) -> None:
    chunks = chunks_of(91, [6, 6])
    with start_server(tmp_path, {"API_KEYS": "key-alpha,key-beta"}) as server:
        c = triton.InferenceServerClient(server.grpc_url)
        rest = triton_http.InferenceServerClient(server.base_url.removeprefix("http://"))
        try:
            alpha = {"authorization": "Bearer key-alpha"}
            beta = {"authorization": "Bearer key-beta"}
            a0 = answer(step(c, 1, chunks[0], start=True, headers=alpha), 6)
            refused(
                error_of(step, c, 1, chunks[1], headers=beta),
                "INVALID_ARGUMENT",
                "sequence_not_found",
            )
            b0 = answer(step(c, 1, chunks[1], start=True, headers=beta), 6)
            tensor = triton_http.InferInput("bits", [1, 6], "UINT8")
            tensor.set_data_from_numpy(chunks[1].reshape(1, -1))
            a1 = rest.infer(
                MODEL, [tensor], sequence_id=1, headers={"Authorization": "Bearer key-alpha"}
            ).as_numpy("probabilities")[0]  # alpha's sequence 1, continued over REST
            refused(error_of(step, c, 1, chunks[1]), "UNAUTHENTICATED", "unauthorized")
        finally:
            c.close()
            rest.close()
        want = echo_reference_keyed(server, chunks, "key-alpha")
        np.testing.assert_allclose(a0, want[0], atol=1e-5)
        np.testing.assert_allclose(a1, want[1], atol=1e-5)  # beta's steps did not touch it
        np.testing.assert_allclose(b0, echo_reference_keyed(server, chunks[1:], "key-beta")[0],
                                   atol=1e-5)  # fmt: skip


def echo_reference_keyed(server: LiveServer, chunks: list[np.ndarray], key: str) -> list:
    """The probabilities an ``/echo`` session opened with ``key`` answers to the same bits."""
    with session(server, f"?access_token={key}") as (ws, _):
        return [np.array(send_bits(ws, c.tolist())["probabilities"], np.float32) for c in chunks]


def test_two_workers_share_the_grpc_port_and_a_sequence_through_redis(
    tmp_path: Path, redis: RedisServer
) -> None:
    """``WEB_CONCURRENCY=2``: both workers serve ``GRPC_PORT`` (``SO_REUSEPORT``); a sequence
    whose every step comes on a new connection (either worker) answers as one ``/echo`` session,
    its state in Redis; ``/metrics`` counts the calls of both workers."""
    chunks = chunks_of(101, [5, 9, 3, 12, 7, 4, 8, 6])
    env = {"WEB_CONCURRENCY": "2", "ECHO_STORE_URL": redis.url}
    with start_server(tmp_path, env) as server:
        got: list[np.ndarray] = []
        for j, chunk in enumerate(chunks):
            deadline = time.monotonic() + 60
            while True:  # the server was ready when one worker was: the other may still load
                own = [("grpc.use_local_subchannel_pool", 1)]  # a new connection every step
                c = triton.InferenceServerClient(server.grpc_url, channel_args=own)
                try:
                    result = step(c, "two-workers", chunk, start=j == 0, request_id=f"w{j}")
                    break
                except InferenceServerException as exc:  # UNAVAILABLE: not applied, retry
                    if "not_ready" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
                finally:
                    c.close()
            got.append(answer(result, len(chunk)))
        text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
        calls = sample_value(text, "grpc_requests_total", method="ModelInfer", code="OK")
        want = echo_reference(server, chunks)
        lines = [json.loads(line) for line in server.log_text().splitlines()
                 if line.startswith("{") and '"gRPC serving"' in line]  # fmt: skip
    assert calls == len(chunks)  # answered OK; the refused ones counted as UNAVAILABLE
    assert len({line["pid"] for line in lines}) == 2
    assert len({line["address"] for line in lines}) == 1
    for probs, reference in zip(got, want, strict=True):
        np.testing.assert_allclose(probs, reference, atol=1e-5)
