"""Request and response shapes of ``POST /predict/digit``, for the OpenAPI documentation.

The route parses and validates JSON bodies itself (orjson + vectorised NumPy checks, far cheaper
than pydantic over 784 floats); these models describe the same contract for clients.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import ModelRef

IMAGE_DESCRIPTION = (
    "One 28×28 MNIST-style image: 28 rows of 28 numbers, or a flat list of 784 numbers (row by "
    "row). White ink on black, like the MNIST data set: 0 = background, `pixel_scale` = ink."
)

# A crude "1" (a vertical bar of ink), to keep the examples valid and short.
EXAMPLE_IMAGE = [[255 if 7 <= r < 21 and c == 14 else 0 for c in range(28)] for r in range(28)]


class DigitRequest(BaseModel):
    """Exactly one of ``image`` and ``images``; values in [0, ``pixel_scale``]."""

    model_config = ConfigDict(extra="forbid")

    image: list[list[float]] | list[float] | None = Field(None, description=IMAGE_DESCRIPTION)
    images: list[list[list[float]] | list[float]] | None = Field(
        None,
        description="Several images (each as for `image`) classified in one request; at most "
        "`MAX_BATCH_IMAGES` (256 by default).",
        min_length=1,
    )
    pixel_scale: float = Field(
        255,
        gt=0,
        description="The value that means full ink. 255 (default) for MNIST-style 0–255 pixels; "
        "1 for floats in [0, 1].",
        examples=[255, 1],
    )


class DigitUpload(BaseModel):
    """A picture of one digit, any size, anywhere in the frame, either polarity."""

    file: bytes = Field(
        description="PNG, JPEG, or any format Pillow reads. Dark ink on light paper and light ink "
        "on dark both work; the image is inverted, cropped, fitted into 20×20 and centred by "
        "mass in 28×28, as MNIST was.",
        json_schema_extra={"format": "binary"},
    )


class Prediction(BaseModel):
    digit: int = Field(ge=0, le=9, description="The most probable digit.", examples=[7])
    probabilities: list[float] = Field(
        min_length=10,
        max_length=10,
        description="P(digit = 0…9), summing to 1.",
        examples=[[0.0, 0.0, 0.0, 0.0001, 0.0, 0.0, 0.0, 0.9998, 0.0, 0.0001]],
    )


class DigitPrediction(Prediction):
    """The answer to one image (``image`` or an upload)."""

    model: ModelRef


class DigitBatchPrediction(BaseModel):
    """The answers to ``images``, in the order sent."""

    predictions: list[Prediction]
    model: ModelRef


def _json_examples() -> dict[str, dict[str, object]]:
    flat = [v for row in EXAMPLE_IMAGE for v in row]
    return {
        "nested": {
            "summary": "One image, 28 rows of 28 pixels (0–255)",
            "value": {"image": EXAMPLE_IMAGE},
        },
        "flat": {"summary": "One image, 784 pixels row by row", "value": {"image": flat}},
        "batch": {
            "summary": "A batch of images",
            "value": {"images": [EXAMPLE_IMAGE, flat]},
        },
        "unit_floats": {
            "summary": "Floats in [0, 1] with pixel_scale 1",
            "value": {"image": [v / 255 for v in flat], "pixel_scale": 1},
        },
    }


def openapi_request_body() -> dict[str, object]:
    """The ``requestBody`` documentation: the JSON forms and the multipart upload."""
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": DigitRequest.model_json_schema(),
                "examples": _json_examples(),
            },
            "multipart/form-data": {
                "schema": DigitUpload.model_json_schema(),
                "encoding": {"file": {"contentType": "image/*"}},
            },
        },
    }
