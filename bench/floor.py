"""The floor: a bare ASGI app that answers ``POST /predict/digit`` with a fixed, real-sized body,
and ``/echo`` WebSocket messages with a fixed, real-sized echo frame; with ``GRPC_PORT`` set, a
bare ``grpc.aio`` server in the same event loop answers ``ModelInfer`` and every
``ModelStreamInfer`` request with a fixed, real-sized echo reply carrying the request's ``id``.

It reads the request body like the service does and does nothing else, so the load generator
against ``uvicorn bench.floor:app`` measures what uvicorn (HTTP parsing, ASGI, socket I/O), or
grpc.aio, costs per request before any service code runs. ``/livez``, ``/readyz`` and
``/metrics`` answer too, so ``bench.ab``, ``bench.loadgen`` and ``bench.grpc`` can drive it like
the real server:

    python -m bench.ab digits:64:1 --config service= --config floor=@bench.floor:app
"""

from __future__ import annotations

import os
from typing import Any

import orjson

ANSWER = orjson.dumps(
    {"digit": 7, "probabilities": [0.1] * 10, "model": {"name": "mnist_lstm", "version": 1}}
)
HEADERS = [(b"content-type", b"application/json")]
SESSION = '{"type":"session","session_id":"floor","token":"floor","echo_step":3,"seq":0}'
ECHO = '{"type":"echo","seq":1,"probabilities":[0.0012],"bits":[0]}'


async def grpc_floor(port: int) -> Any:
    """A started grpc.aio server answering the echo and infer calls with a fixed reply."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    reply = pb.ModelInferResponse(model_name="echo_rnn", model_version="1")
    reply.outputs.add(name="probabilities", datatype="FP32", shape=[1, 1])
    reply.outputs.add(name="bits", datatype="UINT8", shape=[1, 1])
    reply.raw_output_contents.extend([b"\x00\x00\x80\x3f", b"\x01"])

    async def infer(request: Any, context: Any) -> Any:
        answer = pb.ModelInferResponse()
        answer.CopyFrom(reply)
        answer.id = request.id
        return answer

    async def stream(requests: Any, context: Any) -> None:
        while (request := await context.read()) is not grpc.aio.EOF:
            answer = pb.ModelStreamInferResponse()
            answer.infer_response.CopyFrom(reply)
            answer.infer_response.id = request.id
            await context.write(answer)

    handlers = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            infer, pb.ModelInferRequest.FromString, pb.ModelInferResponse.SerializeToString
        ),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            stream, pb.ModelInferRequest.FromString, pb.ModelStreamInferResponse.SerializeToString
        ),
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        grpc_server = None
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                port = int(os.environ.get("GRPC_PORT", "0"))
                grpc_server = await grpc_floor(port) if port else None
                await send({"type": "lifespan.startup.complete"})
            else:
                if grpc_server is not None:
                    await grpc_server.stop(0)
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": SESSION})
        while (await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": ECHO})
        return
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    body = b"" if scope["path"] == "/metrics" else ANSWER
    headers = [*HEADERS, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
