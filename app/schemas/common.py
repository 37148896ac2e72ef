"""Response shapes shared by several routes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    error: str = Field(description="Stable machine-readable code.", examples=["invalid_image"])
    detail: Any = Field(description="What is wrong, for a person.")


class ModelRef(BaseModel):
    name: str = Field(examples=["mnist_lstm"])
    version: int = Field(examples=[1])


class HealthResponse(BaseModel):
    status: str = Field(examples=["ready"])
    detail: str | None = None


class ModelInfo(ModelRef):
    path: str
    loaded: bool
    signatures: dict[str, Any]
    metrics: dict[str, Any]
    created_at: str


class StoreInfo(BaseModel):
    kind: str = Field(description="`memory` or `redis` (ECHO_STORE_URL).", examples=["redis"])
    status: str = Field(
        description="`ok`, or `unavailable: <why>`.", examples=["unavailable: ConnectionError"]
    )


class ModelsResponse(BaseModel):
    device: str = Field(description="What TensorFlow computes on.", examples=["CPU"])
    models: list[ModelInfo]
    echo_store: StoreInfo = Field(description="Where echo sessions live, and whether it answers.")
