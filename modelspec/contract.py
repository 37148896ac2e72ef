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


SAVED_MODEL_FILE = "saved_model.pb"
VARIABLES_INDEX = "variables/variables.index"
VARIABLES_DATA_GLOB = "variables.data-*-of-*"  # in variables/, e.g. variables.data-00000-of-00001
# Training publishes a version by writing it into ``<name>/<STAGING_PREFIX><version>-<random>``
# and renaming that folder to ``<name>/<version>`` once everything is written (atomic).
STAGING_PREFIX = ".tmp-"


def version_problem(version_dir: Path) -> str | None:
    """Why ``version_dir`` is not a complete export, or ``None`` when it is.

    Complete means present (not loadable: a truncated file still counts; the server checks that
    when it loads): a non-empty ``saved_model.pb``, ``variables/variables.index``, every shard
    ``variables/variables.data-NNNNN-of-MMMMM`` named by the shard count, and ``metadata.json``.
    """
    try:
        return _version_problem(Path(version_dir))
    except OSError as exc:  # unreadable, or removed while we looked
        return f"unreadable: {exc}"


def _version_problem(version_dir: Path) -> str | None:
    if not version_dir.is_dir():
        return "not a directory"
    saved_model = version_dir / SAVED_MODEL_FILE
    if not saved_model.is_file():
        return f"missing {SAVED_MODEL_FILE}"
    if saved_model.stat().st_size == 0:
        return f"empty {SAVED_MODEL_FILE}"
    if not (version_dir / VARIABLES_INDEX).is_file():
        return f"missing {VARIABLES_INDEX}"
    shards = {p.name for p in (version_dir / "variables").glob(VARIABLES_DATA_GLOB) if p.is_file()}
    if not shards:
        return "missing variables/variables.data-* shards"
    counts = {name.rsplit("-of-", 1)[1] for name in shards}
    if len(counts) != 1 or not all(c.isascii() and c.isdigit() for c in counts):
        return f"inconsistent variables shards: {sorted(shards)}"
    count = counts.pop()
    expected = {f"variables.data-{i:05d}-of-{count}" for i in range(int(count))}
    if missing := sorted(expected - shards):
        return f"missing variables shard(s) {', '.join(missing)}"
    if not (version_dir / METADATA_FILE).is_file():
        return f"missing {METADATA_FILE}"
    return None


def _version_number(name: str) -> int | None:
    """The version an entry name stands for: a plain decimal integer (``"7"``, not ``"07"``)."""
    if name.isascii() and name.isdigit() and str(int(name)) == name:
        return int(name)
    return None


def scan_versions(model_root: Path) -> tuple[list[int], dict[str, str]]:
    """The complete versions under ``model_root`` (ascending) and the ignored folders.

    The second item maps the name of every entry that is not served (an incomplete integer
    folder, a publish in progress or abandoned, a non-integer folder) to the reason; plain
    files with non-integer names (a README, ``.DS_Store``) are not listed. A missing
    ``model_root`` gives ``([], {})``.
    """
    if not Path(model_root).is_dir():
        return [], {}
    complete: list[int] = []
    incomplete: dict[str, str] = {}
    for entry in Path(model_root).iterdir():
        number = _version_number(entry.name)
        if number is not None:
            problem = version_problem(entry)
            if problem is None:
                complete.append(number)
            else:
                incomplete[entry.name] = problem
        elif not entry.is_dir():
            continue
        elif entry.name.startswith(STAGING_PREFIX):
            incomplete[entry.name] = "temporary folder of a publish in progress (or interrupted)"
        elif entry.name.isascii() and entry.name.isdigit():
            incomplete[entry.name] = f"not a canonical version number (use {int(entry.name)})"
        else:
            incomplete[entry.name] = "name is not an integer version"
    return sorted(complete), dict(sorted(incomplete.items()))


def list_versions(model_root: Path) -> list[int]:
    """The complete versions under ``model_root`` (see :func:`version_problem`), ascending."""
    return scan_versions(model_root)[0]


def resolve_version_dir(base_dir: Path, name: str, version: int | None = None) -> Path:
    """The folder of ``name`` at ``version``, or at its highest complete version when none is
    pinned. Incomplete folders (a publish in progress, a partial copy) are never resolved."""
    model_root = Path(base_dir) / name
    versions, incomplete = scan_versions(model_root)
    if version is None:
        if not versions:
            ignored = "".join(f"; ignored {k}/: {v}" for k, v in incomplete.items())
            raise ModelNotFoundError(
                f"no complete SavedModel version of {name!r} under {model_root} "
                "(expected <model_dir>/<name>/<integer version>/ with saved_model.pb, "
                f"variables/ and metadata.json){ignored}"
            )
        version = versions[-1]
    path = model_root / str(version)
    if version not in versions:
        problem = incomplete.get(str(version))
        detail = f"is incomplete ({problem})" if problem else "not found"
        raise ModelNotFoundError(f"model {name!r} version {version} {detail}: {path}")
    return path


def next_version(base_dir: Path, name: str) -> int:
    """One more than the highest version of ``name`` (1 for a new model).

    Incomplete integer folders are not served, but their names are taken: they count here, so
    that a new export never collides with a partial copy sitting in the model folder.
    """
    complete, incomplete = scan_versions(Path(base_dir) / name)
    taken = complete + [n for k in incomplete if (n := _version_number(k)) is not None]
    return max(taken) + 1 if taken else 1


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
