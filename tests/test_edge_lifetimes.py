"""Connection objects are freed when their connection ends, without the garbage collector.

The service collects its oldest generation rarely (``app.core.runtime.GC_THRESHOLDS``), so an
object that a reference cycle keeps after its connection ended can wait minutes to be freed, and
the process's memory grows with the connections it has served. These run uvicorn in this process
with the service's protocol classes and a small ASGI app, with the collector off, and look for
the connection's protocol objects once the client has gone.
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
import uvloop
import websockets

from app.__main__ import SettingsEdgeHttpProtocol, websocket_protocol
from app.core.uvicorn_protocols import EdgeHttpProtocol, GuardedWebSocketProtocol

WEBSOCKETS_PROTOCOL = "websockets.server.ServerProtocol"  # uvicorn's sans-I/O ``conn``


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Accepts a WebSocket and echoes its messages; answers HTTP with ``ok``."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
    elif scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": message.get("text") or ""})
    else:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@contextmanager
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def alive(kind: type | str) -> int:
    """Instances of ``kind`` that the collector tracks: alive, or garbage it has not freed."""
    if isinstance(kind, str):  # a class's qualified name
        return sum(f"{type(o).__module__}.{type(o).__qualname__}" == kind for o in gc.get_objects())
    return sum(issubclass(type(o), kind) for o in gc.get_objects())


async def serving() -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        echo_app, http=SettingsEdgeHttpProtocol, ws=websocket_protocol(), log_level="warning"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task, sock.getsockname()[1]


async def wait_for(predicate: Any) -> bool:
    for _ in range(200):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return False


async def websocket_connections() -> None:
    server, task, port = await serving()
    try:
        with collector_off():
            kinds = (EdgeHttpProtocol, GuardedWebSocketProtocol, WEBSOCKETS_PROTOCOL)
            before = [alive(kind) for kind in kinds]
            for _ in range(3):
                async with websockets.connect(f"ws://127.0.0.1:{port}/") as ws:
                    await ws.send("hi")
                    assert await ws.recv() == "hi"
            # The upgraded HTTP protocol (whose parser held its methods), the WebSocket protocol
            # and websockets' ServerProtocol (whose parser generator held it) are all gone by
            # reference counting alone.
            gone = await wait_for(lambda: [alive(kind) for kind in kinds] == before)
            assert gone, ([alive(kind) for kind in kinds], before)
    finally:
        server.should_exit = True
        await task


async def http_connections() -> None:
    server, task, port = await serving()
    try:
        with collector_off():
            before = alive(EdgeHttpProtocol)
            for _ in range(3):
                async with httpx.AsyncClient() as client:
                    assert (await client.get(f"http://127.0.0.1:{port}/")).text == "ok"
            assert await wait_for(lambda: alive(EdgeHttpProtocol) == before), alive(
                EdgeHttpProtocol
            )
    finally:
        server.should_exit = True
        await task


def test_a_websocket_connection_leaves_no_protocol_behind() -> None:
    uvloop.run(websocket_connections())  # the service's event loop, and its transports


def test_an_http_connection_leaves_no_protocol_behind() -> None:
    uvloop.run(http_connections())
