"""A stand-in for ``app.services.model_repository.ModelRepository`` in in-process route tests:
version 1 of both models, the digit one served by a stub service."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from app.core.errors import NotFound


class StubModels:
    def __init__(self, digit_service: Any) -> None:
        self.service = digit_service
        models = {"mnist_lstm": {}, "echo_rnn": {"state_dim": 4}}
        self.versions = {
            name: {1: SimpleNamespace(model=SimpleNamespace(name=name, version=1, **extra))}
            for name, extra in models.items()
        }

    def serving(self, name: str) -> list[int]:
        return [1]

    def default(self, name: str) -> Any:
        return self.versions[name][1]

    def version(self, name: str, number: int) -> Any:
        if number != 1:
            raise NotFound(f"{name} version {number} is not available; available: 1")
        return self.versions[name][1]

    def digit_service(self, version: int | None = None) -> Any:
        self.version("mnist_lstm", version or 1)
        return self.service
