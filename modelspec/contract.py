"""The export contract shared by training and serving.

Model names, the TF-Serving style directory layout (``<base>/<name>/<integer version>/``),
signature and tensor names, and the ``metadata.json`` schema live here and nowhere else.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# --- model names -----------------------------------------------------------------------------
DIGIT_MODEL = "mnist_lstm"
ECHO_MODEL = "echo_rnn"

# --- mnist_lstm signature ----------------------------------------------------------------------
IMAGE_SIZE = 28  # images are read as IMAGE_SIZE time steps of IMAGE_SIZE pixels
NUM_CLASSES = 10
DIGIT_SIGNATURE = "serving_default"
DIGIT_INPUT = "images"  # float32 [batch, 28, 28] in [0, 1]
DIGIT_OUTPUT = "probabilities"  # float32 [batch, 10]

# --- echo_rnn signatures -----------------------------------------------------------------------
ECHO_STEP_SIGNATURE = "step"
ECHO_BITS = "bits"  # float32 [batch, time]
ECHO_STATE = "state"  # float32 [batch, state_dim]; all layers' (h[, c]) packed side by side
ECHO_LENGTHS = "lengths"  # int32 [batch]; the valid prefix of each row
ECHO_PROBABILITIES = "probabilities"  # float32 [batch, time]; P(echoed bit == 1)
ECHO_INITIAL_STATE_SIGNATURE = "initial_state"
ECHO_BATCH_SIZE = "batch_size"  # int32 scalar

METADATA_FILE = "metadata.json"


class ModelNotFoundError(RuntimeError):
    """No usable model version exists where one was expected."""


def list_versions(model_root: Path) -> list[int]:
    """Integer version folders under ``model_root`` that hold a SavedModel, ascending."""
    if not model_root.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_root.iterdir()
        if p.is_dir() and p.name.isdigit() and (p / "saved_model.pb").is_file()
    )


def resolve_version_dir(base_dir: Path, name: str, version: int | None = None) -> Path:
    """The folder of ``name`` at ``version``, or at its highest version when none is pinned."""
    model_root = Path(base_dir) / name
    versions = list_versions(model_root)
    if version is None:
        if not versions:
            raise ModelNotFoundError(
                f"no SavedModel version of {name!r} under {model_root} "
                "(expected <model_dir>/<name>/<integer version>/saved_model.pb)"
            )
        version = versions[-1]
    path = model_root / str(version)
    if version not in versions:
        raise ModelNotFoundError(f"model {name!r} version {version} not found: {path}")
    return path


def next_version(base_dir: Path, name: str) -> int:
    """One more than the highest existing version of ``name`` (1 for a new model)."""
    versions = list_versions(Path(base_dir) / name)
    return versions[-1] + 1 if versions else 1


class ModelMetadata(BaseModel):
    """What ``metadata.json`` beside every exported SavedModel records."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str
    version: int
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    tensorflow_version: str
    keras_version: str
    training_command: str
    hyperparameters: dict[str, Any]
    data: dict[str, Any]
    metrics: dict[str, Any]
    training_seconds: float
    signatures: dict[str, Any] = Field(default_factory=dict)

    def write(self, version_dir: Path) -> Path:
        path = Path(version_dir) / METADATA_FILE
        path.write_text(json.dumps(self.model_dump(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def read(cls, version_dir: Path) -> ModelMetadata:
        path = Path(version_dir) / METADATA_FILE
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError as exc:
            raise ModelNotFoundError(f"missing {path}") from exc
