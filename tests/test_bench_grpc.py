"""The gRPC benchmark's own parts, in-process: its minimal HTTP/2 client (``bench.grpc_wire``)
against a real ``grpc.aio`` server (unary calls, a stream, messages larger than a frame and than
the server's flow-control window), the floor's gRPC server, and the report's ratios and
verdicts."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb

from bench import grpc as bench_grpc
from bench.floor import grpc_floor
from bench.grpc_wire import GrpcConn, _hpack_int, request_headers
from tests.servers import free_port

SERVICE = "inference.GRPCInferenceService"


def test_hpack_integers_with_a_seven_bit_prefix() -> None:
    assert _hpack_int(10) == b"\x0a"
    assert _hpack_int(126) == b"\x7e"
    assert _hpack_int(127) == b"\x7f\x00"
    assert _hpack_int(1337) == b"\x7f\xba\x09"  # RFC 7541 C.1.2 with a 7-bit prefix: 1337-127


async def sizes_server(port: int) -> grpc.aio.Server:
    """Answers each request with the size of its one raw input, as the reply's id."""

    async def infer(request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return pb.ModelInferResponse(id=str(len(request.raw_input_contents[0])))

    async def stream(requests: Any, context: Any) -> None:
        async for request in requests:
            reply = pb.ModelInferResponse(id=f"{request.id}:{len(request.raw_input_contents[0])}")
            await context.write(pb.ModelStreamInferResponse(infer_response=reply))

    handlers = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            infer, pb.ModelInferRequest.FromString, pb.ModelInferResponse.SerializeToString
        ),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            stream, pb.ModelInferRequest.FromString, pb.ModelStreamInferResponse.SerializeToString
        ),
    }
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 1 << 22)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


def request(size: int, request_id: str = "") -> bytes:
    message = pb.ModelInferRequest(model_name="m", id=request_id)
    message.raw_input_contents.append(bytes(size))
    return message.SerializeToString()


def test_the_client_makes_unary_and_stream_calls_within_the_windows() -> None:
    async def go() -> tuple[list[str], list[tuple[int, int, bool]], list[str]]:
        port = free_port()
        server = await sizes_server(port)
        unary: list[str] = []
        ends: list[tuple[int, int, bool]] = []
        streamed: list[str] = []
        done = asyncio.get_running_loop().create_future()

        def on_message(stream: int, data: bytes) -> None:
            if stream == 1:
                unary.append(pb.ModelInferResponse.FromString(data).id)
            else:
                streamed.append(pb.ModelStreamInferResponse.FromString(data).infer_response.id)
                if len(streamed) == 3 and not done.done():
                    done.set_result(None)

        def on_end(stream: int, messages: int, reset: bool) -> None:
            ends.append((stream, messages, reset))

        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: GrpcConn(on_message, on_end), "127.0.0.1", port
        )
        await asyncio.wait_for(conn.ready, 10)
        authority = f"127.0.0.1:{port}"
        big = 300_000  # > the 16 kB frame and the 64 kB window: split and held back
        conn.open(request_headers(f"/{SERVICE}/ModelInfer", authority), request(big), end=True)
        stream = conn.open(request_headers(f"/{SERVICE}/ModelStreamInfer", authority))
        for i, size in enumerate((1, big, 5)):
            conn.send(stream, request(size, f"s{i}"))
        await asyncio.wait_for(done, 10)
        for _ in range(100):
            if ends:
                break
            await asyncio.sleep(0.05)
        conn.close()
        await server.stop(0)
        return unary, ends, streamed

    unary, ends, streamed = asyncio.run(go())
    assert unary == ["300000"]
    assert ends[0] == (1, 1, False)  # the unary call ended (trailers) after its one message
    assert streamed == ["s0:1", "s1:300000", "s2:5"]


def test_the_floor_answers_every_stream_request_with_its_id() -> None:
    async def go() -> list[str]:
        port = free_port()
        server = await grpc_floor(port)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.stream_stream(
                    f"/{SERVICE}/ModelStreamInfer",
                    request_serializer=pb.ModelInferRequest.SerializeToString,
                    response_deserializer=pb.ModelStreamInferResponse.FromString,
                )()
                for i in range(3):
                    await call.write(pb.ModelInferRequest(id=f"f{i}"))
                await call.done_writing()
                return [reply.infer_response.id async for reply in call]
        finally:
            await server.stop(0)

    assert asyncio.run(go()) == ["f0", "f1", "f2"]


def row(kind: str, protocol: str, rnd: int, rate: float, **extra: Any) -> dict[str, Any]:
    key = {"digits": "items_per_s", "echo": "msgs_per_s", "open": "achieved_per_s"}[kind]
    base = {"server": "service", "round": rnd, "kind": kind, "protocol": protocol, key: rate}
    return {**base, "errors": 0, "verify": {}, **extra}


def test_ratios_are_taken_within_a_round_and_the_targets_judged() -> None:
    rows = [
        row("digits", "grpc", 0, 110.0, images_per_request=128),
        row("digits", "v2-binary", 0, 100.0, images_per_request=128),
        row("digits", "grpc", 1, 50.0, images_per_request=128),
        row("digits", "v2-binary", 1, 50.0, images_per_request=128),
        row("echo", "grpc", 0, 70.0, sessions=100),
        row("echo", "ws", 0, 100.0, sessions=100),
        row("echo", "grpc", 0, 50.0, sessions=100, server="floor"),
        row("echo", "ws", 0, 100.0, sessions=100, server="floor"),
    ]
    summary = bench_grpc.summarize(rows)
    (digits,) = [s for s in summary if s["kind"] == "digits" and s["protocol"] == "grpc"]
    assert digits["vs_baseline"] == pytest.approx(1.05)  # median of 1.1 and 1.0, not 160/150
    assert digits["vs_baseline_range"] == [1.0, pytest.approx(1.1)]
    echo = {s["server"]: s for s in summary if s["kind"] == "echo" and s["protocol"] == "grpc"}
    assert echo["service"]["vs_baseline"] == 0.7 and echo["floor"]["vs_baseline"] == 0.5
    meta = {"command": "python -m bench.grpc", "commit": "abc", "started": "now",
            "cpu_count": 2, "loadavg_before": (1.0,), "loadavg_after": (1.0,),
            "warmup_s": 1, "duration_s": 2, "rounds": 2}  # fmt: skip
    text = bench_grpc.markdown(meta, summary, rows)
    assert "binary: 1.05× (✅ met)" in text
    assert "100 sessions: 0.70× (❌ missed)" in text  # the service's ratio, not the floor's
    assert "load average 1.0 before, 1.0 after" in text  # how busy the machine was
