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
    """One version of a model."""

    state: str = Field(
        description="`loading`, `available`, `draining`, `unloaded` or `failed`.",
        examples=["available"],
    )
    default: bool = Field(description="Requests that name no version go to this one.")
    reason: str | None = Field(None, description="Why it failed to load.")
    in_flight: int = Field(0, description="Digit requests in progress on this version.")
    sessions: int | None = Field(None, description="echo_rnn: sessions on this version.")
    path: str
    loaded: bool
    signatures: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: str | None = None


class StoreInfo(BaseModel):
    kind: str = Field(description="`memory` or `redis` (ECHO_STORE_URL).", examples=["redis"])
    status: str = Field(
        description="`ok`, or `unavailable: <why>`.", examples=["unavailable: ConnectionError"]
    )


class ModelsResponse(BaseModel):
    device: str = Field(description="What TensorFlow computes on.", examples=["CPU"])
    models: list[ModelInfo]
    echo_store: StoreInfo = Field(description="Where echo sessions live, and whether it answers.")
    ignored: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="Per model, folders in MODEL_DIR that are not versions, and why (a publish "
        "in progress or abandoned, an incomplete SavedModel, a name that is not an integer).",
    )
