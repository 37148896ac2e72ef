"""One contract for JSON digit requests: the route's fast path never disagrees with the schema.

``app.schemas.digits.parse_request`` (pydantic) defines what is accepted and every refusal's
code; the fast path in ``app.api.digit_json`` takes only bodies it can prove valid and hands the
rest to the schema. Hypothesis generates valid bodies and bodies broken in every documented way.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.api.digit_json import _fast_parse, parse_json_images
from app.core.errors import ServiceError
from app.schemas.digits import SCALE_MAX, SCALE_MIN, parse_request

MAX_IMAGES = 4
BAD_VALUES = st.sampled_from(["0", None, True, False, {"v": 1}, [0], -1, 256, 1e300, 2.5])


@st.composite
def images(draw: st.DrawFn, scale: float) -> Any:
    """One image: nested or flat, ints or floats in range, sometimes broken in one place."""
    flat = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))  # 784 values: from a seed
    if draw(st.booleans()):
        values: list[Any] = rng.integers(0, 256, 784).tolist()
        values[draw(st.integers(0, 783))] = draw(st.sampled_from([0, 255]))  # the edges too
    else:
        values = (rng.random(784) * min(scale, 255)).tolist()
        values[draw(st.integers(0, 783))] = draw(st.sampled_from([0.0, float(min(scale, 255))]))
    broken = draw(st.sampled_from(["no", "no", "no", "value", "length", "scalar", "deeper"]))
    if broken == "value":
        values[draw(st.integers(0, 783))] = draw(BAD_VALUES)
    elif broken == "length":
        values = values[: draw(st.integers(0, 783))] or [0]
    image: Any = values if flat else [values[i : i + 28] for i in range(0, len(values), 28)]
    if broken == "scalar":
        image = draw(st.sampled_from([7, "x", None]))
    elif broken == "deeper":
        image = [image]
    return image


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    doc: dict[str, Any] = {}
    scale = draw(
        st.sampled_from([None, None, None, 255, 1, 1.0, 100, 0.5])
        | st.sampled_from([1e-50, 0, -1, "1", True, SCALE_MAX * 2])
    )
    if scale is not None:
        doc["pixel_scale"] = scale
    size = min(scale, 255) if type(scale) in (int, float) and scale > 0 else 255
    shape = draw(st.sampled_from(["image", "image", "images", "images", "both", "neither"]))
    if shape in ("image", "both"):
        doc["image"] = draw(images(size))
    if shape in ("images", "both"):
        doc["images"] = draw(st.lists(images(size), min_size=0, max_size=MAX_IMAGES + 1))
    if draw(st.integers(0, 9)) == 0:
        doc["extra"] = 1
    body = orjson.dumps(doc)
    if draw(st.integers(0, 19)) == 0:
        body = body[: draw(st.integers(0, len(body) - 1))]  # truncated
    return body


def outcome(parse: Any, body: bytes) -> tuple[str, Any]:
    try:
        images_, single = parse(body, MAX_IMAGES)
    except ServiceError as exc:
        return exc.code, None
    return "ok", (images_, single)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies())
def test_whatever_the_fast_path_takes_the_schema_takes_alike(body: bytes) -> None:
    fast = _fast_parse(body, MAX_IMAGES)
    code, schema = outcome(parse_request, body)
    if fast is not None:
        assert code == "ok", (code, body[:200])
        assert fast[1] == schema[1] and fast[0].shape == schema[0].shape
        assert fast[0].dtype == schema[0].dtype == np.float32
        assert np.allclose(fast[0], schema[0], rtol=1e-6)
    assert outcome(parse_json_images, body)[0] == code  # the route answers as the schema does


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_common_valid_bodies_take_the_fast_path(
    seed: int, nested: bool, batch: bool, unit: bool
) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, 784).tolist()
    values: list[Any] = [p / 255 for p in pixels] if unit else pixels
    image: Any = [values[i : i + 28] for i in range(0, 784, 28)] if nested else values
    doc: dict[str, Any] = {"images": [image, image]} if batch else {"image": image}
    if unit:
        doc["pixel_scale"] = 1
    assert _fast_parse(orjson.dumps(doc), MAX_IMAGES) is not None


@pytest.mark.parametrize(
    ("doc", "code"),
    [
        ({"image": [0] * 784, "pixel_scale": 1e-50}, "invalid_request"),  # float32 underflow
        ({"image": [0] * 784, "pixel_scale": SCALE_MIN / 2}, "invalid_request"),
        ({"image": [0] * 784, "pixel_scale": SCALE_MAX * 2}, "invalid_request"),
        ({"image": [0] * 784, "pixel_scale": SCALE_MIN}, "ok"),
        ({"images": [[0] * 784] * (MAX_IMAGES + 1)}, "too_many_images"),
        ({"images": [["x"] * 784] * (MAX_IMAGES + 1)}, "too_many_images"),  # count first
    ],
)
def test_edges_of_the_contract(doc: dict[str, Any], code: str) -> None:
    body = orjson.dumps(doc)
    got, result = outcome(parse_json_images, body)
    assert got == code
    if result is not None:
        assert all(math.isfinite(v) for v in result[0].ravel().tolist())
