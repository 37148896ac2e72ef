"""Triton's sequence extension on ``echo_rnn`` over v2 HTTP, driven by the official client,
``tritonclient[http]`` (``infer(..., sequence_id=, sequence_start=, sequence_end=)``), on real
servers: the memory store, two servers sharing a real Redis, and a server with API keys.

Interleaved sequences with integer and string ids, JSON and binary tensors, answer exactly as
``WS /echo`` sessions fed the same bits; every refusal has the protocol's error shape and
status and the server serves on; a retried request ``id`` is answered once, also after a
dropped connection and on another replica; a sequence continues on a second server through
Redis; sequence ids are scoped per API key.
"""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.live_server import LiveServer, RedisServer, start_server
from tests.metrics import sample_value
from tests.test_api_echo import send_bits, session

pytestmark = pytest.mark.slow
MODEL = "echo_rnn"
OUTPUTS = ("probabilities", "bits")


def client_of(server: LiveServer) -> triton.InferenceServerClient:
    url = server.base_url.removeprefix("http://")
    return triton.InferenceServerClient(url, network_timeout=60.0, connection_timeout=10.0)


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    c = client_of(live_server)
    yield c
    c.close()


def chunks_of(seed: int, sizes: list[int]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 2, n).astype(np.uint8) for n in sizes]


def bits_input(bits: np.ndarray, binary: bool, datatype: str = "UINT8") -> triton.InferInput:
    dtype = {"UINT8": np.uint8, "FP32": np.float32, "INT32": np.int32, "BOOL": np.bool_}
    tensor = triton.InferInput("bits", [1, len(bits)], datatype)
    tensor.set_data_from_numpy(bits.reshape(1, -1).astype(dtype[datatype]), binary_data=binary)
    return tensor


def infer(
    client: triton.InferenceServerClient,
    sequence_id: int | str,
    bits: np.ndarray,
    *,
    start: bool = False,
    end: bool = False,
    request_id: str = "",
    binary: bool = True,
    binary_out: bool | None = None,
    datatype: str = "UINT8",
    version: str = "",
    headers: dict[str, str] | None = None,
) -> triton.InferResult:
    outputs = None
    if binary_out is not None:
        outputs = [triton.InferRequestedOutput(n, binary_data=binary_out) for n in OUTPUTS]
    return client.infer(
        MODEL,
        [bits_input(bits, binary, datatype)],
        model_version=version,
        outputs=outputs,
        request_id=request_id,
        sequence_id=sequence_id,
        sequence_start=start,
        sequence_end=end,
        headers=headers,
    )


def answer(result: triton.InferResult, n: int) -> tuple[np.ndarray, np.ndarray]:
    probs, bits = result.as_numpy("probabilities"), result.as_numpy("bits")
    assert probs.shape == bits.shape == (1, n), (probs.shape, bits.shape)
    assert probs.dtype == np.float32 and bits.dtype == np.uint8
    return probs[0], bits[0]


def echo_reference(server: LiveServer, chunks: list[np.ndarray]) -> list[np.ndarray]:
    """The probabilities an ``/echo`` session answers to the same messages."""
    with session(server) as (ws, _):
        return [np.array(send_bits(ws, c.tolist())["probabilities"], np.float32) for c in chunks]


def error_of(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


def refused(err: InferenceServerException, status: str, code: str) -> None:
    assert err.status() == status and err.message().startswith(f"{code}: "), (
        err.status(),
        err.message(),
    )


def test_metadata_declares_the_sequence_model_and_the_extension(
    client: triton.InferenceServerClient,
) -> None:
    assert {"sequence", "sequence(string_id)"} <= set(client.get_server_metadata()["extensions"])
    meta = client.get_model_metadata(MODEL)
    assert meta["inputs"] == [{"name": "bits", "datatype": "UINT8", "shape": [1, -1]}]
    assert meta["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [1, -1]},
        {"name": "bits", "datatype": "UINT8", "shape": [1, -1]},
    ]


def test_interleaved_sequences_answer_as_echo_sessions(
    client: triton.InferenceServerClient, live_server: LiveServer
) -> None:
    """Integer and string ids, JSON and binary inputs and outputs, several datatypes, steps of
    four sequences interleaved: each answers as an ``/echo`` session fed the same bits."""
    ids: list[int | str] = [11, "11", 2**64 - 1, "séquence-β"]
    plans = {
        k: chunks_of(i, [1 + (17 * i + 29 * j) % 70 for j in range(6)]) for i, k in enumerate(ids)
    }
    modes = [  # (binary input, binary outputs, datatype)
        (False, False, "UINT8"),
        (True, True, "UINT8"),
        (False, None, "FP32"),
        (True, False, "INT32"),
    ]
    got: dict[int | str, list[np.ndarray]] = {k: [] for k in ids}
    for j in range(6):
        for i, k in enumerate(ids):
            binary, binary_out, datatype = modes[(i + j) % len(modes)]
            chunk = plans[k][j]
            result = infer(
                client,
                k,
                chunk,
                start=j == 0,
                end=j == 5,
                binary=binary,
                binary_out=binary_out,
                datatype=datatype,
                request_id=f"{k}-{j}",
            )
            probs, bits = answer(result, len(chunk))
            response = result.get_response()
            assert response["model_name"] == MODEL and response["model_version"] == "1"
            assert response["id"] == f"{k}-{j}" and "parameters" not in response
            assert np.array_equal(bits, (probs > 0.5).astype(np.uint8))
            got[k].append(probs)
    for k in ids:
        want = echo_reference(live_server, plans[k])
        for probs, reference in zip(got[k], want, strict=True):
            np.testing.assert_allclose(probs, reference, atol=1e-5)
        sent = np.concatenate(plans[k])
        echoed = (np.concatenate(got[k]) > 0.5).astype(np.uint8)
        assert np.array_equal(echoed[3:], sent[:-3])  # the shipped model echoes 3 bits late


def test_a_versioned_path_serves_the_same_sequence(
    client: triton.InferenceServerClient, live_server: LiveServer
) -> None:
    chunks = chunks_of(5, [8, 9])
    first = answer(infer(client, "pinned", chunks[0], start=True, version="1"), 8)[0]
    second = answer(infer(client, "pinned", chunks[1]), 9)[0]  # no version: the sequence's
    want = echo_reference(live_server, chunks)
    np.testing.assert_allclose(first, want[0], atol=1e-5)
    np.testing.assert_allclose(second, want[1], atol=1e-5)
    assert error_of(infer, client, "pinned", chunks[0], version="9").status() == "404"


def test_every_refusal_has_the_protocols_shape_and_the_server_serves_on(
    client: triton.InferenceServerClient, live_server: LiveServer
) -> None:
    one = np.ones(3, np.uint8)
    refused(error_of(infer, client, "never-started", one), "400", "sequence_not_found")
    refused(error_of(infer, client, 0, one, start=True), "400", "missing_sequence_id")
    refused(error_of(infer, client, "", one, start=True), "400", "missing_sequence_id")
    infer(client, "ended", one, start=True)
    infer(client, "ended", one, end=True)
    refused(error_of(infer, client, "ended", one), "400", "sequence_ended")

    def shaped(shape: list[int], data: np.ndarray) -> InferenceServerException:
        tensor = triton.InferInput("bits", shape, "UINT8")
        tensor.set_data_from_numpy(data, binary_data=True)
        return error_of(client.infer, MODEL, [tensor], sequence_id="shape", sequence_start=True)

    refused(shaped([2, 3], np.ones((2, 3), np.uint8)), "400", "invalid_shape")
    refused(shaped([3], np.ones(3, np.uint8)), "400", "invalid_shape")
    refused(shaped([1, 0], np.ones((1, 0), np.uint8)), "400", "invalid_shape")
    refused(shaped([1, 2], np.array([[0, 2]], np.uint8)), "400", "invalid_bits")
    refused(shaped([1, 4097], np.ones((1, 4097), np.uint8)), "413", "too_many_bits")
    wrong = triton.InferInput("images", [1, 3], "UINT8")
    wrong.set_data_from_numpy(np.ones((1, 3), np.uint8))
    refused(
        error_of(client.infer, MODEL, [wrong], sequence_id=4, sequence_start=True),
        "400",
        "invalid_request",
    )
    infer(client, "reused", one, start=True, request_id="a")
    refused(
        error_of(infer, client, "reused", np.zeros(3, np.uint8), request_id="a"),
        "400",
        "request_id_reused",
    )

    # What tritonclient cannot send: bad ids and flags, as raw JSON.
    url = f"{live_server.base_url}/v2/models/{MODEL}/infer"
    bits = {"name": "bits", "shape": [1, 2], "datatype": "UINT8", "data": [1, 0]}
    cases = {
        "invalid_sequence_id": [-1, 1.5, True, 2**64, "x" * 257, [1], {"a": 1}],
        "invalid_sequence_flag": ["yes", 1, None],
    }
    for code, values in cases.items():
        for value in values:
            if code == "invalid_sequence_id":
                params = {"sequence_id": value, "sequence_start": True}
            else:
                params = {"sequence_id": 1, "sequence_start": value}
            body = json.dumps({"parameters": params, "inputs": [bits]})  # 2**64 too
            response = httpx.post(url, content=body, timeout=30)
            assert response.status_code == 400, (value, response.text)
            assert response.json()["error"].startswith(f"{code}: "), (value, response.text)
            assert len(response.text) < 600  # a long id is not echoed whole
    good = chunks_of(9, [12])
    got = answer(infer(client, "after-refusals", good[0], start=True), 12)[0]
    np.testing.assert_allclose(got, echo_reference(live_server, good)[0], atol=1e-5)


def raw_request(server: LiveServer, body: bytes) -> bytes:
    header = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return header.encode() + body


def step_body(sequence_id: str, request_id: str, bits: np.ndarray) -> bytes:
    tensor = {"name": "bits", "shape": [1, len(bits)], "datatype": "UINT8", "data": bits.tolist()}
    params = {"sequence_id": sequence_id, "sequence_start": False, "sequence_end": False}
    return orjson.dumps({"id": request_id, "parameters": params, "inputs": [tensor]})


def test_a_retried_id_is_answered_once(
    client: triton.InferenceServerClient, live_server: LiveServer
) -> None:
    """A retried ``id`` gets the stored answer (``parameters.replayed``) and the state advances
    once: also when the first request's connection dropped with its answer unread, or right
    after the request was sent (then the server may never have taken it: the retry is the step,
    or its replay; either way the sequence advances once)."""
    chunks = chunks_of(21, [10, 11, 12, 13, 14])
    want = echo_reference(live_server, chunks)
    replayed_before = replayed(live_server)
    first = infer(client, "retry", chunks[0], start=True, request_id="r0")
    again = infer(client, "retry", chunks[0], start=True, request_id="r0")
    assert again.get_response()["parameters"] == {"replayed": True}
    assert "parameters" not in first.get_response()
    assert np.array_equal(answer(again, 10)[0], answer(first, 10)[0])
    np.testing.assert_allclose(answer(first, 10)[0], want[0], atol=1e-5)

    # Step r1 is answered, but the connection drops before the client reads the answer.
    address = ("127.0.0.1", live_server.port)
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(raw_request(live_server, step_body("retry", "r1", chunks[1])))
        readable, _, _ = select.select([sock], [], [], 30)
        assert readable  # the answer is there, unread
    retried = infer(client, "retry", chunks[1], request_id="r1", binary=False)  # blind retry
    assert retried.get_response()["parameters"] == {"replayed": True}
    np.testing.assert_allclose(answer(retried, 11)[0], want[1], atol=1e-5)

    # Step r2's connection drops as soon as it is sent.
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(raw_request(live_server, step_body("retry", "r2", chunks[2])))
    retried = infer(client, "retry", chunks[2], request_id="r2")
    np.testing.assert_allclose(answer(retried, 12)[0], want[2], atol=1e-5)
    for k in (3, 4):
        got = answer(infer(client, "retry", chunks[k], request_id=f"r{k}"), len(chunks[k]))[0]
        np.testing.assert_allclose(got, want[k], atol=1e-5)  # each step counted once
    assert replayed(live_server) - replayed_before in (2, 3)  # r0, r1 (r2: maybe)


def replayed(server: LiveServer) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return sample_value(text, "echo_sequence_steps_total", outcome="replayed") or 0.0


def test_a_sequence_continues_on_a_second_server_through_redis(
    tmp_path: Path, redis: RedisServer, live_redis_server: LiveServer
) -> None:
    chunks = chunks_of(31, [9, 14, 3, 20, 7, 11])
    with start_server(tmp_path, {"ECHO_STORE_URL": redis.url}) as second:
        servers = [client_of(live_redis_server), client_of(second)]
        try:
            got = []
            for j, chunk in enumerate(chunks):  # A, B, A, B, ...: every step on the other one
                sid, first, last = 2**63 + 7, j == 0, j == 5
                result = infer(
                    servers[j % 2], sid, chunk, start=first, end=last, request_id=f"s{j}"
                )
                got.append(answer(result, len(chunk))[0])
            replay = infer(servers[0], 2**63 + 7, chunks[5], end=True, request_id="s5")
            assert replay.get_response()["parameters"] == {"replayed": True}  # answered by B
            assert np.array_equal(answer(replay, 11)[0], got[5])
            refused(error_of(infer, servers[1], 2**63 + 7, chunks[0]), "400", "sequence_ended")
        finally:
            for c in servers:
                c.close()
    for probs, reference in zip(got, echo_reference(live_redis_server, chunks), strict=True):
        np.testing.assert_allclose(probs, reference, atol=1e-5)


def test_sequence_ids_are_scoped_per_api_key(tmp_path: Path) -> None:
    chunks = chunks_of(41, [6, 6])
    with start_server(tmp_path, {"API_KEYS": "key-alpha,key-beta"}) as server:
        c = client_of(server)
        try:
            alpha = {"Authorization": "Bearer key-alpha"}
            beta = {"Authorization": "Bearer key-beta"}
            a0 = answer(infer(c, 1, chunks[0], start=True, headers=alpha), 6)[0]
            refused(error_of(infer, c, 1, chunks[1], headers=beta), "400", "sequence_not_found")
            b0 = answer(infer(c, 1, chunks[1], start=True, headers=beta), 6)[0]  # its own "1"
            a1 = answer(infer(c, 1, chunks[1], headers=alpha), 6)[0]
            assert error_of(infer, c, 1, chunks[1]).status() == "401"  # no key
            with session(server, "?access_token=key-alpha") as (ws, _):
                want = [np.array(send_bits(ws, x.tolist())["probabilities"]) for x in chunks]
            with session(server, "?access_token=key-beta") as (ws, _):
                fresh = np.array(send_bits(ws, chunks[1].tolist())["probabilities"])
            np.testing.assert_allclose(a0, want[0], atol=1e-5)
            np.testing.assert_allclose(a1, want[1], atol=1e-5)  # beta's steps did not touch it
            np.testing.assert_allclose(b0, fresh, atol=1e-5)  # beta's "1" started from scratch
        finally:
            c.close()
