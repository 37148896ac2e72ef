"""The typed results: plain frozen dataclasses, built from the service's JSON answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DigitPrediction", "EchoReply", "Health", "ModelInfo", "ModelRef", "ModelsInfo"]


@dataclass(frozen=True)
class ModelRef:
    """Which model answered: its name and version (``?version=`` pins one)."""

    name: str
    version: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelRef:
        return cls(str(data["name"]), int(data["version"]))


@dataclass(frozen=True)
class DigitPrediction:
    """One image's answer: the digit and P(digit = k) for k = 0 … 9."""

    digit: int
    probabilities: tuple[float, ...]
    model: ModelRef

    @property
    def confidence(self) -> float:
        return self.probabilities[self.digit]


@dataclass(frozen=True)
class ModelInfo:
    """One model version as ``GET /v1/models`` lists it (``raw``: the whole entry)."""

    name: str
    version: int
    state: str
    default: bool
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(
            name=str(data["name"]),
            version=int(data["version"]),
            state=str(data.get("state", "")),
            default=bool(data.get("default", False)),
            raw=data,
        )


@dataclass(frozen=True)
class ModelsInfo:
    """``GET /v1/models``: the compute device, the models, where echo sessions live."""

    device: str
    models: tuple[ModelInfo, ...]
    echo_store: dict[str, str]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelsInfo:
        return cls(
            device=str(data.get("device", "")),
            models=tuple(ModelInfo.from_json(m) for m in data.get("models", [])),
            echo_store=dict(data.get("echo_store", {})),
            raw=data,
        )

    def versions(self, name: str) -> list[int]:
        """The versions of model ``name`` listed."""
        return sorted(m.version for m in self.models if m.name == name)


@dataclass(frozen=True)
class Health:
    """``/livez`` and ``/readyz``: ``live``; ``ready`` (also true when ``degraded``: the echo
    session store is unreachable but digits serve); ``status`` and ``detail`` from ``/readyz``."""

    live: bool
    ready: bool
    status: str
    detail: str | None = None


@dataclass(frozen=True)
class EchoReply:
    """The echo model's answer to one message: ``seq`` (message k of the session is answered by
    seq k), P(echoed bit = 1) and the predicted bit for each bit sent, in order."""

    seq: int
    probabilities: tuple[float, ...]
    bits: tuple[int, ...]

    @classmethod
    def from_json(cls, frame: dict[str, Any]) -> EchoReply:
        return cls(int(frame["seq"]), tuple(frame["probabilities"]), tuple(frame["bits"]))
