"""Small pieces every training script shares: seeding, the export folder, metadata."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from modelspec.contract import ModelMetadata, next_version

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models"


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow (Keras does all three)."""
    keras.utils.set_random_seed(seed)


def training_command() -> str:
    """The exact command line that is running, as one could paste it into a shell."""
    module = sys.modules["__main__"].__spec__
    head = ["python", "-m", module.name] if module is not None else ["python", sys.argv[0]]
    return shlex.join([*head, *sys.argv[1:]])


def version_dir(model_dir: Path, name: str, version: int | None) -> Path:
    """``<model_dir>/<name>/<version>`` (the next free version when none is given), created."""
    version = version if version is not None else next_version(model_dir, name)
    path = Path(model_dir) / name / str(version)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} already exists; pass another --version")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_metadata(
    path: Path,
    *,
    hyperparameters: dict[str, Any],
    data: dict[str, Any],
    metrics: dict[str, Any],
    started: float,
    signatures: dict[str, Any],
    **extra: Any,
) -> ModelMetadata:
    """Write ``metadata.json`` into the version folder ``path`` and return it."""
    meta = ModelMetadata(
        name=path.parent.name,
        version=int(path.name),
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
