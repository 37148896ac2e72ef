"""The ``grpc.aio`` server on ``GRPC_PORT``: its limits, its handlers, its start and stop.

Started by ``app.main``'s lifespan on the running event loop (uvicorn's uvloop: grpc.aio runs on
any asyncio loop; the measurements behind that choice are in docs/grpc.md), before the models
load, so ``ServerLive`` answers at once and ``ServerReady`` turns true with ``/readyz``. Stopped
before the services it uses: streams answer what they have read and end with ``UNAVAILABLE``
``shutting_down``, unary calls get ``TIMEOUT_GRACEFUL_SHUTDOWN_S`` to finish.

Limits (channel arguments of grpc core):

- ``grpc.max_receive_message_length``: ``MAX_REQUEST_BYTES``, as for an HTTP body (larger:
  ``RESOURCE_EXHAUSTED``, answered by grpc before the message is handed over);
  ``grpc.max_metadata_size``: ``MAX_HEADER_BYTES``;
- ``grpc.max_allowed_incoming_connections``: ``GRPC_MAX_CONNECTIONS`` (more are closed before
  their handshake); ``grpc.server_handshake_timeout_ms``: ``TIMEOUT_HEADER_S``;
- ``grpc.max_concurrent_streams``: ``MAX_CONNECTIONS_PER_CLIENT`` calls at once on one
  connection (the guard caps them per client and network across connections too);
- ``grpc.max_connection_idle_ms``: ``GRPC_MAX_CONNECTION_IDLE_S``; keepalive pings every 60 s
  find dead peers (20 s to answer);
- ``maximum_concurrent_rpcs``: ``MAX_CONNECTIONS`` calls in the whole server.

With ``WEB_CONCURRENCY`` > 1 every worker serves ``GRPC_PORT`` with ``SO_REUSEPORT`` (the kernel
spreads connections over them); with one process the port is its own, and a port in use fails
the start as HTTP's does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from app.core.config import Settings
from app.grpc.guard import Guard
from app.grpc.proto import SERVICE, pb
from app.grpc.servicer import InferenceServicer
from app.state import AppState

log = logging.getLogger(__name__)

KEEPALIVE_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000
STREAM_DRAIN_S = 5.0  # how long stop() waits for streams to answer what they have read


def channel_options(settings: Settings) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.max_send_message_length", settings.max_request_bytes),
        ("grpc.max_metadata_size", settings.max_header_bytes),
        ("grpc.max_allowed_incoming_connections", settings.grpc_max_connections),
        ("grpc.server_handshake_timeout_ms", int(settings.timeout_header_s * 1000)),
        ("grpc.max_concurrent_streams", settings.max_connections_per_client),
        ("grpc.max_connection_idle_ms", int(settings.grpc_max_connection_idle_s * 1000)),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.so_reuseport", 1 if settings.web_concurrency > 1 else 0),
    ]


def method_handlers(servicer: InferenceServicer, guard: Guard) -> dict[str, grpc.RpcMethodHandler]:
    def unary(name: str, behaviour: Any, request: Any, response: Any, public: bool = False) -> Any:
        return grpc.unary_unary_rpc_method_handler(
            guard.unary(name, behaviour, public),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )

    s = servicer
    return {
        "ServerLive": unary(
            "ServerLive", s.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse, True
        ),
        "ServerReady": unary(
            "ServerReady", s.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse, True
        ),
        "ServerMetadata": unary(
            "ServerMetadata", s.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse
        ),
        "ModelReady": unary(
            "ModelReady", s.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse
        ),
        "ModelMetadata": unary(
            "ModelMetadata", s.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse
        ),
        "ModelInfer": unary(
            "ModelInfer", s.model_infer, pb.ModelInferRequest, pb.ModelInferResponse
        ),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            guard.stream("ModelStreamInfer", s.model_stream_infer),
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelStreamInferResponse.SerializeToString,
        ),
    }


class GrpcServer:
    """``await start()`` binds and serves; ``await stop()`` drains and closes."""

    def __init__(self, state: AppState) -> None:
        self.settings = settings = state.settings
        self.servicer = InferenceServicer(state)
        self.server = grpc.aio.server(
            options=channel_options(settings), maximum_concurrent_rpcs=settings.max_connections
        )
        handlers = method_handlers(self.servicer, Guard(settings))
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        self.server.add_registered_method_handlers(SERVICE, handlers)
        host = settings.host
        self.address = (
            f"[{host}]:{settings.grpc_port}" if ":" in host else f"{host}:{settings.grpc_port}"
        )

    async def start(self) -> None:
        try:
            self.port = self.server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise RuntimeError(f"gRPC cannot listen on {self.address}: {exc}") from None
        await self.server.start()
        log.info("gRPC serving", extra={"address": self.address})

    async def stop(self) -> None:
        stopping = asyncio.ensure_future(
            self.server.stop(self.settings.timeout_graceful_shutdown_s)
        )
        await self.servicer.close_streams(STREAM_DRAIN_S)  # no new calls: stop() refuses them
        await stopping
        log.info("gRPC stopped")
