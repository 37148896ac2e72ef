"""Request and response shapes of ``POST /predict/digit``: the contract, and its validator.

:func:`parse_request` validates a JSON body (parsed by orjson) with :class:`DigitRequest`
(pydantic-core, in Rust) and is the one definition of what is accepted and of every refusal's
code; whatever the body, its work is bounded (see its docstring). The route's fast path
(``app.api.digit_json``) only accelerates bodies this accepts; everything it does not take goes
through :func:`parse_request`, and a property test checks that both agree.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from app.core.errors import InvalidInput, TooLarge, clip
from app.schemas.common import ModelRef
from app.schemas.json_budget import check_json_budget

IMAGE_SIZE = 28
PIXELS = IMAGE_SIZE * IMAGE_SIZE
IMAGE_DESCRIPTION = (
    "One 28×28 MNIST-style image: 28 rows of 28 numbers, or a flat list of 784 numbers (row by "
    "row). White ink on black, like the MNIST data set: 0 = background, `pixel_scale` = ink."
)
# pixel_scale must be a normal float32: 1e-50 would round to 0 and divide into infinities.
SCALE_MIN, SCALE_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)

# A crude "1" (a vertical bar of ink), to keep the examples valid and short.
EXAMPLE_IMAGE = [[255 if 7 <= r < 21 and c == 14 else 0 for c in range(28)] for r in range(28)]

FIELDS = frozenset({"image", "images", "pixel_scale"})

# A JSON number (not true/false, not a string), finite.
Pixel = Annotated[float, Field(strict=True, allow_inf_nan=False)]


def _form(value: Any) -> str:
    return "rows" if type(value) is list and value and type(value[0]) is list else "flat"


# Every list stops at its first bad item (FailFast) and at one item past its longest valid
# length: a refusal costs a few errors, not one per value sent (1M errors took 2 s and 1 GB).
Row = Annotated[list[Pixel], Field(max_length=IMAGE_SIZE, fail_fast=True)]
Image = Annotated[
    Annotated[list[Row], Field(max_length=IMAGE_SIZE, fail_fast=True), Tag("rows")]
    | Annotated[list[Pixel], Field(max_length=PIXELS, fail_fast=True), Tag("flat")],
    Discriminator(_form),
]


class DigitRequest(BaseModel):
    """Exactly one of ``image`` and ``images``; values in [0, ``pixel_scale``]."""

    model_config = ConfigDict(extra="forbid")  # refused by ``_no_unknown_fields`` first

    image: Image | None = Field(None, description=IMAGE_DESCRIPTION)
    images: Annotated[list[Image], Field(fail_fast=True)] | None = Field(
        None,
        description="Several images (each as for `image`, all in the same form) classified in "
        "one request; at most `MAX_BATCH_IMAGES` (256 by default).",
        min_length=1,
    )
    pixel_scale: Annotated[float, Field(strict=True, allow_inf_nan=False)] = Field(
        255,
        ge=SCALE_MIN,
        le=SCALE_MAX,
        description="The value that means full ink. 255 (default) for MNIST-style 0–255 pixels; "
        "1 for floats in [0, 1].",
        examples=[255, 1],
    )

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_fields(cls, data: Any) -> Any:
        """One error for unknown fields, before the fields are validated: ``extra="forbid"``
        makes one per field, and 250,000 of them fit in a body."""
        if type(data) is dict and not FIELDS.issuperset(data):
            unknown = next(key for key in data if key not in FIELDS)
            raise PydanticCustomError(
                "extra_forbidden",
                "{field}: Extra inputs are not permitted",
                {"field": clip(str(unknown))},
            )
        return data

    @model_validator(mode="after")
    def _one_of_image_and_images(self) -> DigitRequest:
        if (self.image is None) == (self.images is None):
            raise PydanticCustomError(
                "invalid_request", 'send exactly one of "image" (one image) and "images" (a list)'
            )
        return self

    def pixels(self) -> np.ndarray:
        """The images as [n, 28, 28] in pixel units, shape and range checked."""
        one = self.image is not None
        value = [self.image] if one else self.images
        try:
            arr = np.asarray(value, np.float64)
        except ValueError:
            arr = None
        if arr is None or arr.shape[1:] not in ((IMAGE_SIZE, IMAGE_SIZE), (PIXELS,)):
            each = "image must" if one else "each image must (all in the same form)"
            raise InvalidInput(
                f"{each} be {IMAGE_SIZE} rows of {IMAGE_SIZE} numbers or a flat list of "
                f"{PIXELS} numbers",
                "invalid_shape",
            )
        lo, hi, scale = arr.min(), arr.max(), self.pixel_scale
        if not (lo >= 0 and hi <= scale):
            raise InvalidInput(
                f"pixel values must lie in [0, {scale:g}] (pixel_scale {scale:g}); got values "
                f"from {lo:g} to {hi:g}",
                "invalid_pixels",
            )
        return arr.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)


# Refusal codes, most important first: the answer names the first kind that applies.
CODES = ("invalid_json", "invalid_request", "invalid_shape", "invalid_pixels")


def _code(error: Any) -> str:
    """The refusal code of one pydantic error."""
    kind, loc = error["type"], error["loc"]
    if kind in ("json_invalid", "finite_number"):  # NaN, Infinity, 1e999 are not JSON numbers
        return "invalid_json"
    inside_an_image = len(loc) > 1 and loc[0] in ("image", "images")
    if not inside_an_image or loc == ("images",):
        return "invalid_request"  # the body's frame: fields, pixel_scale, the images list
    if kind == "float_type" and type(error["input"]) is not list:
        return "invalid_pixels"  # a string, null, object or true/false where a number belongs
    return "invalid_shape"


_UNPARSED: Any = object()


def parse_request(body: bytes, max_images: int, doc: Any = _UNPARSED) -> tuple[np.ndarray, bool]:
    """A JSON body → (float32 [n, 28, 28] in [0, 1], whether it was a single ``image``).

    Raises ``InvalidInput`` (422, code from :data:`CODES`) or ``TooLarge`` (413
    ``too_many_images``, checked before shapes and pixel values). ``doc``: the body as
    ``orjson.loads`` parsed it, if the caller has it.

    The work is bounded whatever the body. ``check_json_budget`` bounds the parse; orjson's
    objects are validated in Python mode, where a list's length is checked before its items
    (in JSON mode pydantic converts 2M numbers to refuse a list of more than 784); the images
    are counted before any is validated; every list stops at its first bad item, so a refusal
    builds a handful of pydantic errors, not one per value sent.
    """
    if doc is _UNPARSED:
        check_json_budget(body)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:  # also NaN, Infinity and 1e999
            raise InvalidInput(f"Invalid JSON: {clip(str(exc), 200)}", "invalid_json") from None
    if type(doc) is not dict:
        raise InvalidInput(
            'the body must be a JSON object: {"image": …} or {"images": […]}', "invalid_request"
        )
    images = doc.get("images")
    if type(images) is list and len(images) > max_images:
        try:  # the request's frame (fields, pixel_scale) outranks the count: checked on 1 image
            DigitRequest.model_validate({**doc, "images": images[:1]})
        except ValidationError as exc:
            refusal = _refusal(exc)
            if refusal.code in ("invalid_json", "invalid_request"):
                raise refusal from None
        _too_many(len(images), max_images)
    try:
        request = DigitRequest.model_validate(doc)
    except ValidationError as exc:
        raise _refusal(exc) from None
    pixels = request.pixels()
    scaled = np.divide(pixels, np.float32(request.pixel_scale), dtype=np.float32)
    return scaled, request.image is not None


def _refusal(exc: ValidationError) -> InvalidInput:
    """The refusal of the most important kind among a few pydantic errors (lists fail fast)."""
    codes = {_code(e): e for e in exc.errors(include_url=False)}
    code = next(c for c in CODES if c in codes)
    first = codes[code]
    where = ".".join(clip(str(p)) for p in first["loc"] if p not in ("rows", "flat"))
    msg = clip(first["msg"], 200)
    return InvalidInput(f"{where}: {msg}" if where else msg, code)


def _too_many(n: int, max_images: int) -> None:
    raise TooLarge(
        f"{n} images in one request; the limit is {max_images} (send several requests)",
        "too_many_images",
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
