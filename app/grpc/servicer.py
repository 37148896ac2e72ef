"""The RPCs of ``inference.GRPCInferenceService`` this service answers, over ``app.services``.

- ``ServerLive``, ``ServerReady`` (ready once both models are loaded and warmed, as
  ``/v2/health/ready``), ``ServerMetadata``;
- ``ModelReady`` (``false`` for an unknown model or version, as Triton answers),
  ``ModelMetadata`` (the REST metadata, ``app.services.open_inference``);
- ``ModelInfer`` for ``mnist_lstm``: ``images`` in ``raw_input_contents`` (or typed
  ``contents``), ``probabilities`` and ``digit`` back in ``raw_output_contents``, through the
  dynamic batcher of ``POST /predict/digit``; for ``echo_rnn``: a step of a sequence (Triton's
  sequence extension: the ``sequence_id``, ``sequence_start`` and ``sequence_end`` parameters;
  ``app.services.echo_sequences``, shared with v2 REST), ``bits`` [1, T] in, ``probabilities``
  and ``bits`` out, the ``replayed`` parameter on a retried ``id``'s stored answer;
- ``ModelStreamInfer``: the same requests on a bidirectional stream (``app.grpc.stream``); the
  steps of one sequence run in the order they came.

Every other RPC of the service (model control, shared memory, statistics …) is not registered:
gRPC answers ``UNIMPLEMENTED``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Hashable
from typing import Any

from grpc.aio import ServicerContext

from app.core.config import Settings
from app.core.errors import GoingAway, ServiceError
from app.grpc import codec
from app.grpc.guard import Caller
from app.grpc.proto import pb
from app.grpc.stream import Begun, InferStream
from app.services.echo_sequences import SequenceReply, sequence_key
from app.services.models import ServedModel
from app.services.open_inference import (
    DIGIT_OUTPUTS,
    ECHO_OUTPUTS,
    EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    begin_sequence_step,
    classify_digits,
    digit_images,
    model_metadata,
    sequence_outputs,
    sequences_for,
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
            step, answer = self._begin_sequence_step(request, model, caller)
            return answer(await asyncio.shield(step))
        return await self._classify(request, model)

    def begin_infer(self, request: pb.ModelInferRequest, caller: Caller) -> Begun:
        """:meth:`model_infer` for a stream: begun now (a refused request raises here) in a
        future that nothing cancels, and the function turning its result into the response."""
        model = served_model(self.state.models, request.model_name, request.model_version)
        if model.name != DIGIT_MODEL:
            return self._begin_sequence_step(request, model, caller)
        return asyncio.ensure_future(self._classify(request, model)), _as_is

    async def _classify(
        self, request: pb.ModelInferRequest, model: ServedModel
    ) -> pb.ModelInferResponse:
        settings = self.settings
        tensors = codec.input_tensors(request, settings.max_request_bytes)
        outputs = wanted_outputs(codec.requested_outputs(request), DIGIT_OUTPUTS)
        images = digit_images(tensors, settings.max_batch_images)
        service = self.state.digit_service(model.version)
        arrays = await classify_digits(service, images)
        return codec.infer_response(
            model.name, str(model.version), request.id, [(n, arrays[n]) for n in outputs]
        )

    def _begin_sequence_step(
        self, request: pb.ModelInferRequest, model: ServedModel, caller: Caller
    ) -> Begun:
        params = sequence_parameters(request)
        sequences = sequences_for(self.state.sequences, params)
        outputs = wanted_outputs(codec.requested_outputs(request), ECHO_OUTPUTS)
        tensors = codec.input_tensors(request, self.settings.max_request_bytes)
        step = begin_sequence_step(
            sequences,
            model,
            bool(request.model_version),
            tensors,
            params,
            request.id or None,
            caller.api_key,
            caller.client,
        )

        def answer(reply: SequenceReply) -> pb.ModelInferResponse:
            arrays = sequence_outputs(reply)
            response = codec.infer_response(
                model.name, str(reply.version), request.id, [(n, arrays[n]) for n in outputs]
            )
            if reply.replayed:
                response.parameters["replayed"].bool_param = True
            return response

        return step, answer

    async def model_stream_infer(self, context: ServicerContext, caller: Caller) -> None:
        settings = self.settings
        if self.closed:
            raise GoingAway("the server is shutting down", "shutting_down")
        stream = InferStream(
            context,
            caller,
            functools.partial(self.begin_infer, caller=caller),
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
        """A stream runs the steps of one sequence in the order they came: their key is the
        sequence's (the stream has one caller, so one scope); other requests have none."""
        value = request.parameters.get("sequence_id")
        if value is None:
            return None
        try:
            return sequence_key(_value(value))
        except ServiceError:
            return None  # refused when it runs, as over ModelInfer


def _as_is(response: pb.ModelInferResponse) -> pb.ModelInferResponse:
    return response


SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


def sequence_parameters(request: pb.ModelInferRequest) -> dict[str, Any]:
    """The sequence parameters a request carries, as Python values (``sequence_id``: the
    ``int64_param``, ``uint64_param`` or ``string_param`` tritonclient sets; the flags: their
    ``bool_param``). A value of another kind reaches ``EchoSequences.begin``, which refuses it."""
    params = request.parameters
    found: dict[str, Any] = {}
    if params:
        for name in SEQUENCE_PARAMETERS:
            value = params.get(name)  # get: [] would add the parameter
            if value is not None:
                found[name] = _value(value)
    return found


def _value(parameter: pb.InferParameter) -> Any:
    """The Python value a parameter holds (``None`` when none of its fields is set)."""
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice is not None else None
