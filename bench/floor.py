"""The floor: a bare ASGI app that answers ``POST /predict/digit`` with a fixed, real-sized body,
and ``/echo`` WebSocket messages with a fixed, real-sized echo frame.

It reads the request body like the service does and does nothing else, so the load generator
against ``uvicorn bench.floor:app`` measures what uvicorn (HTTP parsing, ASGI, socket I/O) costs
per request before any service code runs. ``/livez``, ``/readyz`` and ``/metrics`` answer too, so
``bench.ab`` and ``bench.loadgen`` can drive it like the real server:

    python -m bench.ab digits:64:1 --config service= --config floor=@bench.floor:app
"""

from __future__ import annotations

from typing import Any

import orjson

ANSWER = orjson.dumps(
    {"digit": 7, "probabilities": [0.1] * 10, "model": {"name": "mnist_lstm", "version": 1}}
)
HEADERS = [(b"content-type", b"application/json")]
SESSION = '{"type":"session","session_id":"floor","token":"floor","echo_step":3,"seq":0}'
ECHO = '{"type":"echo","seq":1,"probabilities":[0.0012],"bits":[0]}'


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
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
