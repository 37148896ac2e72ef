"""The Open Inference Protocol (KServe v2) without a transport: what its REST routes
(``app.api.v2``) and its gRPC service (``app.grpc``) both answer, in the same words.

Model lookup by name and version text (``NotFound``, ``NotReady``), model and server metadata,
and the two kinds of inference: digits, one ``images`` input through the model version's
dynamic batcher (``DigitService.predict``, the batcher of ``POST /predict/digit``) to the
``probabilities`` and ``digit`` outputs; and a step of an ``echo_rnn`` sequence (Triton's
sequence extension, ``app.services.echo_sequences``), one ``bits`` input ``[1, T]`` to
``probabilities`` and ``bits``. Every failure is a domain error of ``app.core.errors``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from app.core.errors import InvalidInput, NotFound, NotReady, clip
from app.core.params import parse_version
from app.services import tensor_codec
from app.services.digit_service import DigitService
from app.services.echo_sequences import (
    EchoSequences,
    SequenceReply,
    scope_of,
    sequence_bits,
    sequence_key,
)
from app.services.model_repository import ModelRepository
from app.services.models import ServedModel
from modelspec.contract import (
    DIGIT_INPUT,
    DIGIT_MODEL,
    DIGIT_OUTPUT,
    ECHO_BITS,
    ECHO_PROBABILITIES,
    IMAGE_SIZE,
    NUM_CLASSES,
)

SERVER_NAME = "rnn-serving"
SERVER_VERSION = "0.1.0"  # the FastAPI app's version too (app.main)
EXTENSIONS = ["binary_tensor_data", "sequence", "sequence(string_id)"]
PLATFORM = "tensorflow_savedmodel"
DIGIT_LABEL = "digit"  # INT64 [n]: the most probable digit, beside the probabilities
DIGIT_OUTPUTS = (DIGIT_OUTPUT, DIGIT_LABEL)
ECHO_OUTPUT_BITS = "bits"  # UINT8 [1, T]: the predicted bits, beside the probabilities
ECHO_OUTPUTS = (ECHO_PROBABILITIES, ECHO_OUTPUT_BITS)


class InputTensor(Protocol):
    """One input as a transport received it, not decoded yet."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def decode(self) -> np.ndarray: ...


def served_model(models: ModelRepository | None, name: str, version: str | None) -> ServedModel:
    """The served model ``name`` at ``version`` (``None`` or ``""``: its newest available one).

    ``NotFound`` for an unknown model or a version not available, ``InvalidInput`` for a version
    that is not a number, ``NotReady`` before anything is loaded.
    """
    if models is None:  # before the lifespan built the repository
        raise NotReady("the models are not loaded yet")
    if name not in models.versions:
        served = ", ".join(models.versions)
        raise NotFound(f"unknown model {clip(name)!r}; served: {served}")
    if not version:
        default = models.default(name)
        if default is None or default.model is None:
            raise NotReady(f"no version of {name} is available yet")
        return default.model
    found = models.version(name, parse_version(version)).model
    assert found is not None
    return found


def _tensor(name: str, datatype: str, *shape: int) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(shape)}


def model_metadata(models: ModelRepository, model: ServedModel) -> dict[str, Any]:
    """Name, served versions, platform and the input and output tensors (``-1``: any size)."""
    if model.name == DIGIT_MODEL:
        inputs = [_tensor(DIGIT_INPUT, "FP32", -1, IMAGE_SIZE, IMAGE_SIZE)]
        outputs = [
            _tensor(DIGIT_OUTPUT, "FP32", -1, NUM_CLASSES),
            _tensor(DIGIT_LABEL, "INT64", -1),
        ]
    else:  # echo_rnn as a sequence model: one sequence's next T bits a request
        inputs = [_tensor(ECHO_BITS, "UINT8", 1, -1)]
        outputs = [
            _tensor(ECHO_PROBABILITIES, "FP32", 1, -1),
            _tensor(ECHO_OUTPUT_BITS, "UINT8", 1, -1),
        ]
    return {
        "name": model.name,
        "versions": [str(v) for v in models.serving(model.name)],
        "platform": PLATFORM,
        "inputs": inputs,
        "outputs": outputs,
    }


def wanted_outputs(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """The outputs a request names (all of them when it names none), in its order."""
    if not requested:
        return list(available)
    for name in requested:
        if name not in available:
            raise InvalidInput(
                f"unknown output {clip(name)!r}; this model has {', '.join(available)}",
                "invalid_request",
            )
    return list(requested)


def digit_images(tensors: Sequence[InputTensor], max_images: int) -> np.ndarray:
    """The one ``images`` input (FP32 [n, 28, 28] in [0, 1] or UINT8 0–255), checked and
    decoded → float32 [n, 28, 28] in [0, 1] for the model. Before anything is looked up: a bad
    request is refused as such even while the model is not ready."""
    if len(tensors) != 1 or tensors[0].name != DIGIT_INPUT:
        names = ", ".join(repr(clip(t.name)) for t in tensors[:3])
        if len(tensors) > 3:
            names += f", … ({len(tensors)} inputs)"
        raise InvalidInput(
            f"mnist_lstm takes exactly one input, {DIGIT_INPUT!r}; got {names or 'none'}",
            "invalid_request",
        )
    (tensor,) = tensors
    tensor_codec.check_digit_input(tensor.name, tensor.datatype, tensor.shape, max_images)
    return tensor_codec.digit_images(tensor.name, tensor.datatype, tensor.decode())


async def classify_digits(service: DigitService, images: np.ndarray) -> dict[str, np.ndarray]:
    """``digit_images`` through the version's dynamic batcher → ``probabilities`` FP32 [n, 10]
    and ``digit`` INT64 [n]."""
    probs = await service.predict(images)
    return {DIGIT_OUTPUT: probs, DIGIT_LABEL: probs.argmax(axis=1).astype(np.int64)}


def sequences_for(sequences: EchoSequences | None, parameters: Mapping[str, Any]) -> EchoSequences:
    """The sequence service for a request to ``echo_rnn``, once its ``sequence_id`` is valid
    (checked first: without it nothing else matters); ``NotReady`` before the lifespan built it."""
    sequence_key(parameters.get("sequence_id"))
    if sequences is None:
        raise NotReady("the echo service is not ready")
    return sequences


def begin_sequence_step(
    sequences: EchoSequences,
    model: ServedModel,
    versioned: bool,
    tensors: Sequence[InputTensor],
    parameters: Mapping[str, Any],
    request_id: str | None,
    api_key: str | None,
    client: str | None,
) -> asyncio.Task[SequenceReply]:
    """One step of an ``echo_rnn`` sequence, input ``bits`` [1, T]: the request checked and
    its step begun (``EchoSequences.begin``: the task that runs it, to await through
    ``asyncio.shield``; a refused request raises here). :func:`sequence_outputs` turns its
    reply into the outputs ``probabilities`` FP32 and ``bits`` UINT8 [1, T].

    ``versioned``: the request named the model's version. ``api_key``: the key the client
    presented when keys are on, else ``None`` (it scopes the sequence ids). ``client``: its
    address (the per-client session limits).
    """
    if len(tensors) != 1 or tensors[0].name != ECHO_BITS:
        names = ", ".join(repr(clip(t.name)) for t in tensors[:3])
        raise InvalidInput(
            f"{model.name} takes exactly one input, {ECHO_BITS!r} [1, T]; got {names or 'none'}",
            "invalid_request",
        )
    (tensor,) = tensors
    if len(tensor.shape) != 2 or tensor.shape[0] != 1:  # before decoding anything
        raise InvalidInput(
            f"input {ECHO_BITS!r}: shape must be [1, T], one sequence's next T bits; got "
            f"{list(tensor.shape)}",
            "invalid_shape",
        )
    return sequences.begin(
        scope=scope_of(api_key),
        sequence_id=parameters.get("sequence_id"),
        start=parameters.get("sequence_start", False),
        end=parameters.get("sequence_end", False),
        request_id=request_id,
        bits=sequence_bits(ECHO_BITS, tensor.decode()),
        version=model.version if versioned else None,
        client=client,
    )


def sequence_outputs(reply: SequenceReply) -> dict[str, np.ndarray]:
    """A step's outputs: ``probabilities`` FP32 and ``bits`` UINT8, ``[1, T]``."""
    return {
        ECHO_PROBABILITIES: reply.probabilities.reshape(1, -1),
        ECHO_OUTPUT_BITS: reply.bits.reshape(1, -1),
    }
