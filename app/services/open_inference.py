"""The Open Inference Protocol (KServe v2) without a transport: what its gRPC service
(``app.grpc``) answers, in the same words as its REST routes (``app.api.v2``).

Model lookup by name and version text (``NotFound``, ``NotReady``), model and server metadata,
readiness, and digit inference: one decoded ``images`` input through the model version's dynamic
batcher (``DigitService.predict``, the batcher of ``POST /predict/digit``) to the
``probabilities`` and ``digit`` outputs. Every failure is a domain error of ``app.core.errors``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from app.core.errors import InvalidInput, NotFound, NotReady, clip
from app.core.params import parse_version
from app.services import tensor_codec
from app.services.digit_service import DigitService
from app.services.model_repository import ModelRepository
from app.services.models import ServedModel
from modelspec.contract import (
    DIGIT_INPUT,
    DIGIT_MODEL,
    DIGIT_OUTPUT,
    ECHO_BITS,
    ECHO_LENGTHS,
    ECHO_PROBABILITIES,
    ECHO_STATE,
    IMAGE_SIZE,
    NUM_CLASSES,
)

SERVER_NAME = "rnn-serving"
SERVER_VERSION = "0.1.0"  # the FastAPI app's version too (app.main)
EXTENSIONS = ["binary_tensor_data"]
PLATFORM = "tensorflow_savedmodel"
DIGIT_LABEL = "digit"  # INT64 [n]: the most probable digit, beside the probabilities
DIGIT_OUTPUTS = (DIGIT_OUTPUT, DIGIT_LABEL)


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
    else:  # echo_rnn's step signature
        dim = model.state_dim  # type: ignore[attr-defined]
        inputs = [
            _tensor(ECHO_BITS, "FP32", -1, -1),
            _tensor(ECHO_STATE, "FP32", -1, dim),
            _tensor(ECHO_LENGTHS, "INT32", -1),
        ]
        outputs = [
            _tensor(ECHO_PROBABILITIES, "FP32", -1, -1),
            _tensor(ECHO_STATE, "FP32", -1, dim),
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


async def classify_digits(
    service: DigitService, tensors: Sequence[InputTensor], max_images: int
) -> dict[str, np.ndarray]:
    """``images`` (FP32 [n, 28, 28] in [0, 1] or UINT8 0–255) → ``probabilities`` FP32 [n, 10]
    and ``digit`` INT64 [n], through the version's dynamic batcher."""
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
    images = tensor_codec.digit_images(tensor.name, tensor.datatype, tensor.decode())
    probs = await service.predict(images)
    return {DIGIT_OUTPUT: probs, DIGIT_LABEL: probs.argmax(axis=1).astype(np.int64)}
