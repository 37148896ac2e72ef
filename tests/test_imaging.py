"""Unit tests of the MNIST-style preprocessing of uploaded pictures (``modelspec.imaging``)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from modelspec import image_decode, imaging
from modelspec.imaging import (
    BlankImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
    preprocess_digit,
)
from training.mnist_data import MnistData


def encode(a: np.ndarray | Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    img = a if isinstance(a, Image.Image) else Image.fromarray(a)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def center_of_mass(a: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(a.shape)
    return float((a * ys).sum() / a.sum()), float((a * xs).sum() / a.sum())


def extent(a: np.ndarray, level: float = 0.3) -> tuple[int, int]:
    """(height, width) of the box holding the pixels above ``level``."""
    rows, cols = np.flatnonzero((a > level).any(1)), np.flatnonzero((a > level).any(0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def bomb_png(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose header declares ``width``×``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_output_is_an_mnist_frame() -> None:
    a = np.zeros((100, 60), np.uint8)
    a[10:90, 25:35] = 255
    out = preprocess_digit(encode(a))
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() == pytest.approx(1.0)


@pytest.mark.parametrize(("top", "left"), [(0, 0), (150, 20), (300, 330), (10, 340)])
def test_centred_by_mass_wherever_the_digit_is(top: int, left: int) -> None:
    canvas = np.zeros((400, 400), np.uint8)
    canvas[top : top + 60, left : left + 20] = 255  # a bar, top-heavy with an extra blob
    canvas[top : top + 15, left : left + 50] = 255
    out = preprocess_digit(encode(canvas))
    cy, cx = center_of_mass(out)
    assert abs(cy - imaging.CENTER) <= 0.6 and abs(cx - imaging.CENTER) <= 0.6


@pytest.mark.parametrize(("h", "w"), [(80, 20), (20, 80), (60, 60), (300, 150)])
def test_fits_20x20_keeping_aspect(h: int, w: int) -> None:
    canvas = np.zeros((h + 100, w + 100), np.uint8)
    canvas[50 : 50 + h, 50 : 50 + w] = 255
    out_h, out_w = extent(preprocess_digit(encode(canvas)))
    assert max(out_h, out_w) == 20
    assert out_w / out_h == pytest.approx(w / h, rel=0.15)


def test_dark_ink_on_light_paper_is_inverted(mnist: MnistData) -> None:
    digit = mnist.x_test[3]
    plain = preprocess_digit(encode(digit))
    inverted = preprocess_digit(encode(255 - digit))
    assert np.abs(plain - inverted).max() < 0.02
    gray_paper = (200 - digit.astype(np.int32) * 150 // 255).astype(np.uint8)  # ink 50 on 200
    assert np.abs(plain - preprocess_digit(encode(gray_paper))).mean() < 0.03


def test_an_mnist_digit_comes_back_nearly_unchanged(mnist: MnistData) -> None:
    diffs = []
    for digit in mnist.x_test[:50]:
        original = digit.astype(np.float32) / 255
        out = preprocess_digit(encode(digit))
        assert np.allclose(center_of_mass(out), center_of_mass(original), atol=1.0)
        diffs.append(np.abs(out - original).mean())
    assert np.median(diffs) < 0.005 and np.percentile(diffs, 90) < 0.02


def test_upscaled_and_off_centre_digit_matches_the_original(mnist: MnistData) -> None:
    digit = mnist.x_test[7]
    big = np.asarray(Image.fromarray(digit).resize((168, 168), Image.Resampling.BICUBIC))
    canvas = np.zeros((500, 700), np.uint8)
    canvas[300:468, 40:208] = big
    out = preprocess_digit(encode(canvas, "JPEG", quality=90))
    assert np.abs(out - digit / 255).mean() < 0.06


def test_transparent_background_is_flattened() -> None:
    img = Image.new("RGBA", (120, 120), (0, 0, 0, 0))
    ImageDraw.Draw(img).line([(60, 15), (60, 105)], fill=(0, 0, 0, 255), width=12)
    out = preprocess_digit(encode(img))
    assert extent(out) == (20, pytest.approx(3, abs=2))


def test_sixteen_bit_grayscale() -> None:
    a = np.zeros((64, 64), np.uint16)
    a[8:56, 28:36] = 60_000
    out = preprocess_digit(encode(Image.fromarray(a)))
    assert extent(out)[0] == 20


def test_thin_strokes_in_a_big_picture_are_thickened() -> None:
    img = Image.new("L", (1200, 1200), 255)
    ImageDraw.Draw(img).ellipse([(300, 200), (900, 1000)], outline=0, width=3)  # a fine-pen 0
    out = preprocess_digit(encode(img))
    assert imaging.stroke_width(out > 0.5) >= 1.4
    assert out[14, 14] < 0.2  # the hole stays open


def test_isolated_specks_do_not_stretch_the_box() -> None:
    canvas = np.full((300, 300), 255, np.uint8)
    canvas[100:200, 140:160] = 0  # a "1"
    canvas[5, 5] = canvas[290, 280] = 0  # dust
    assert extent(preprocess_digit(encode(canvas))) == (20, pytest.approx(4, abs=1))


@pytest.mark.parametrize("value", [0, 128, 255])
def test_blank_picture_is_a_clear_error(value: int) -> None:
    with pytest.raises(BlankImageError, match="no digit"):
        preprocess_digit(encode(np.full((50, 50), value, np.uint8)))


def test_faint_noise_is_blank() -> None:
    noise = np.random.default_rng(0).integers(120, 135, (64, 64)).astype(np.uint8)
    with pytest.raises(BlankImageError):
        preprocess_digit(encode(noise))


@pytest.mark.parametrize("data", [b"", b"not an image", b"%PDF-1.4\n", b"\x89PNG\r\n\x1a\n"])
def test_not_an_image_is_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedImageError) as info:
        preprocess_digit(data)
    assert info.value.status == 415


def test_truncated_image_is_invalid() -> None:
    data = encode(np.random.default_rng(1).integers(0, 255, (64, 64)).astype(np.uint8))
    with pytest.raises(ImageError) as info:
        preprocess_digit(data[: len(data) // 2])
    assert info.value.status == 422 and info.value.code == "invalid_image"


@pytest.mark.parametrize(("width", "height"), [(100_000, 100_000), (6_000, 5_000)])
def test_decompression_bomb_is_refused_before_decoding(width: int, height: int) -> None:
    with pytest.raises(ImageTooLargeError, match=r"too large|over the limit") as info:
        preprocess_digit(bomb_png(width, height))
    assert info.value.status == 413


def test_pixel_limit_is_configurable() -> None:
    data = encode(np.zeros((100, 100), np.uint8))
    with pytest.raises(ImageTooLargeError):
        preprocess_digit(data, max_pixels=9_999)


@pytest.mark.parametrize(("width", "height"), [(1_000_000, 1), (1, 1_000_000), (8193, 500)])
def test_strips_and_long_sides_are_refused_before_decoding(width: int, height: int) -> None:
    with pytest.raises(ImageTooLargeError) as info:
        preprocess_digit(bomb_png(width, height))
    assert info.value.status == 413


def test_a_picture_thinner_than_the_aspect_limit_is_refused() -> None:
    with pytest.raises(ImageError, match="20 times") as info:
        preprocess_digit(bomb_png(2100, 100))
    assert (info.value.status, info.value.code) == (422, "invalid_image")


def test_exif_rotation_is_applied_after_reducing() -> None:
    upright = np.zeros((2400, 1600), np.uint8)
    upright[300:2100, 700:900] = 255  # a tall "1" with a foot
    upright[1900:2100, 400:1200] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90° anticlockwise: show it turned 90° clockwise
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    expected = preprocess_digit(encode(upright))
    assert np.abs(preprocess_digit(encode(stored, exif=exif)) - expected).mean() < 0.02


def test_only_the_first_frame_of_an_animation_counts() -> None:
    tall, wide = (np.zeros((300, 300), np.uint8) for _ in range(2))
    tall[50:250, 140:160] = 255
    wide[140:160, 50:250] = 255
    frames = [Image.fromarray(a) for a in (tall, wide)]
    for fmt in ("GIF", "PNG", "TIFF"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
        assert extent(preprocess_digit(data)) == (20, pytest.approx(2, abs=1)), fmt


def test_big_palette_picture_with_transparency() -> None:
    img = Image.new("P", (3000, 3000), 0)
    img.putpalette([0, 0, 0, 20, 20, 20])
    ImageDraw.Draw(img).line([(1500, 300), (1500, 2700)], fill=1, width=150)
    out = preprocess_digit(encode(img, transparency=0))  # dark strokes on a transparent page
    assert extent(out) == (20, pytest.approx(2, abs=1))


def test_progressive_jpeg_over_the_memory_budget_is_refused() -> None:
    img = Image.new("RGB", (1000, 1000), "white")
    ImageDraw.Draw(img).line([(500, 200), (500, 800)], fill="black", width=60)
    data = encode(img, "JPEG", progressive=True, subsampling=0)  # 3 M coefficients (6 MB)
    assert extent(preprocess_digit(data, max_pixels=1_500_000))[0] == 20  # budget 6 MB
    with pytest.raises(ImageTooLargeError, match="progressive"):
        preprocess_digit(data, max_pixels=1_400_000)


@pytest.mark.parametrize("kw", [{"lossless": True}, {"quality": 80}, {"save_all": True}])
def test_webp_size_is_read_before_pillow_opens_it(kw: dict) -> None:
    data = encode(Image.new("RGB", (4100, 1000)), "WEBP", **kw)
    assert image_decode._webp_size(data) == (4100, 1000)
    with pytest.raises(ImageTooLargeError):  # a quarter of the budget: its decoder keeps copies
        preprocess_digit(data, max_pixels=16_000_000)


@pytest.mark.parametrize(("subsampling", "mode"), [(0, "RGB"), (1, "RGB"), (2, "RGB"), (2, "L")])
def test_jpeg_sampling_factors_are_read_from_the_frame_header(subsampling: int, mode: str) -> None:
    from modelspec.image_decode import _jpeg_sampling

    buffer = io.BytesIO()
    Image.new(mode, (64, 48)).save(buffer, "JPEG", subsampling=subsampling, progressive=True)
    decoded = Image.open(io.BytesIO(buffer.getvalue()))
    pillow = [h * v for _, h, v, _ in decoded.layer]  # type: ignore[attr-defined]  # Pillow's view
    assert _jpeg_sampling(buffer.getvalue()) == pillow
    assert _jpeg_sampling(b"\xff\xd8") == []  # no frame header: the caller assumes [1]
