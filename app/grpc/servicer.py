"""The RPCs of ``inference.GRPCInferenceService`` this service answers, over ``app.services``.

- ``ServerLive``, ``ServerReady`` (ready once both models are loaded and warmed, as
  ``/v2/health/ready``), ``ServerMetadata``;
- ``ModelReady`` (``false`` for an unknown model or version, as Triton answers),
  ``ModelMetadata`` (the REST metadata, ``app.services.open_inference``);
- ``ModelInfer`` for ``mnist_lstm``: ``images`` in ``raw_input_contents`` (or typed
  ``contents``), ``probabilities`` and ``digit`` back in ``raw_output_contents``, through the
  dynamic batcher of ``POST /predict/digit``;
- ``ModelStreamInfer``: the same requests on a bidirectional stream (``app.grpc.stream``).

Every other RPC of the service (model control, shared memory, statistics …) is not registered:
gRPC answers ``UNIMPLEMENTED``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

from grpc.aio import ServicerContext

from app.core.config import Settings
from app.core.errors import GoingAway, InvalidInput, ServiceError
from app.grpc import codec
from app.grpc.guard import Caller
from app.grpc.proto import pb
from app.grpc.stream import InferStream
from app.services.open_inference import (
    DIGIT_OUTPUTS,
    EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    classify_digits,
    model_metadata,
    served_model,
    wanted_outputs,
)
from app.state import AppState
from modelspec.contract import DIGIT_MODEL


class InferenceServicer:
    """The behaviours of the RPCs; ``app.grpc.server`` wraps each in the guard."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.settings: Settings = state.settings
        self.streams: set[InferStream] = set()
        self.closed = False

    async def server_live(
        self, request: pb.ServerLiveRequest, caller: Caller
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(
        self, request: pb.ServerReadyRequest, caller: Caller
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.state.lifecycle.status == "ready")

    async def server_metadata(
        self, request: pb.ServerMetadataRequest, caller: Caller
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS
        )

    async def model_ready(
        self, request: pb.ModelReadyRequest, caller: Caller
    ) -> pb.ModelReadyResponse:
        try:
            served_model(self.state.models, request.name, request.version)
        except ServiceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.state.lifecycle.status == "ready")

    async def model_metadata(
        self, request: pb.ModelMetadataRequest, caller: Caller
    ) -> pb.ModelMetadataResponse:
        models = self.state.models
        model = served_model(models, request.name, request.version)
        assert models is not None
        meta = model_metadata(models, model)
        response = pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"]
        )
        for field in ("inputs", "outputs"):
            for tensor in meta[field]:
                getattr(response, field).add(**tensor)
        return response

    async def model_infer(
        self, request: pb.ModelInferRequest, caller: Caller
    ) -> pb.ModelInferResponse:
        model = served_model(self.state.models, request.model_name, request.model_version)
        if model.name != DIGIT_MODEL:
            raise InvalidInput(
                f"{model.name} is stateful: send sequence_id, sequence_start and sequence_end "
                "parameters (Triton's sequence extension)",
                "stateful_model",
            )
        settings = self.settings
        tensors = codec.input_tensors(request, settings.max_request_bytes)
        outputs = wanted_outputs(codec.requested_outputs(request), DIGIT_OUTPUTS)
        service = self.state.digit_service(model.version)
        arrays = await classify_digits(service, tensors, settings.max_batch_images)
        return codec.infer_response(
            model.name, str(model.version), request.id, [(n, arrays[n]) for n in outputs]
        )

    async def model_stream_infer(self, context: ServicerContext, caller: Caller) -> None:
        settings = self.settings
        if self.closed:
            raise GoingAway("the server is shutting down", "shutting_down")

        async def infer(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
            return await self.model_infer(request, caller)

        stream = InferStream(
            context,
            caller,
            infer,
            self.order_key,
            settings.max_request_bytes,
            settings.echo_idle_timeout_s,
            settings.echo_send_timeout_s,
        )
        self.streams.add(stream)
        try:
            await stream.run()
        finally:
            self.streams.discard(stream)

    async def close_streams(self, wait_s: float) -> None:
        """Refuse new streams; open ones answer what they have read and end; wait for that."""
        self.closed = True
        for stream in list(self.streams):
            stream.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while self.streams and loop.time() < deadline:
            await asyncio.sleep(0.05)

    def order_key(self, request: pb.ModelInferRequest) -> Hashable | None:
        """The key whose requests must run in arrival order: none for digits."""
        return None
