"""Small pieces every training script shares: seeding, metadata (publishing: training.publish)."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from modelspec.contract import ModelMetadata

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models"


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow (Keras does all three)."""
    keras.utils.set_random_seed(seed)


def training_command() -> str:
    """The exact command line that is running, as one could paste it into a shell."""
    module = sys.modules["__main__"].__spec__
    head = ["python", "-m", module.name] if module is not None else ["python", sys.argv[0]]
    return shlex.join([*head, *sys.argv[1:]])


def write_metadata(
    path: Path,
    *,
    name: str,
    version: int,
    hyperparameters: dict[str, Any],
    data: dict[str, Any],
    metrics: dict[str, Any],
    started: float,
    signatures: dict[str, Any],
    **extra: Any,
) -> ModelMetadata:
    """Write ``metadata.json`` of ``name`` v``version`` into ``path`` and return it.

    ``path`` is the folder being published (a temporary one, see :mod:`training.publish`), so
    the name and version are passed, not read from it.
    """
    meta = ModelMetadata(
        name=name,
        version=version,
        tensorflow_version=tf.__version__,
        keras_version=keras.__version__,
        training_command=training_command(),
        hyperparameters=hyperparameters,
        data=data,
        metrics=metrics,
        training_seconds=round(time.perf_counter() - started, 1),
        signatures=signatures,
        **extra,
    )
    meta.write(path)
    return meta
