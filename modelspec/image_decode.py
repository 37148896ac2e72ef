"""Bounded decoding of untrusted picture bytes into a small grayscale array (Pillow + NumPy).

Whatever the shape, the work an upload causes is bounded by its bytes and a pixel budget:

- the header is checked before any pixel is decoded: at most ``max_pixels`` pixels, each side at
  most ``max_side``, an aspect ratio of at most ``MAX_ASPECT`` (a 1,000,000×1 strip is refused);
  progressive JPEGs (whose decoder buffers every coefficient at full size) and multi-scan bombs
  are held to the same memory budget;
- only the first frame of an animation or multi-page file is decoded; only common formats open;
- JPEGs decode at a reduced scale (``draft``); everything else is reduced with ``Image.reduce``
  to about ``REDUCE_SIDE`` right after decoding, in the file's own mode (palettes through a
  lookup table, 16-bit through NumPy), so no full-size array beyond the decoded picture and one
  8-bit plane is ever built;
- the EXIF rotation and the transparency flattening are applied to the reduced picture.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError

# Pillow warns (and raises at 2×) above Image.MAX_IMAGE_PIXELS; make the warning an error too.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
# PNG text chunks are decompressed on open; Pillow's default allows 64 MiB of them.
PngImagePlugin.MAX_TEXT_CHUNK = 256 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 1024 * 1024

DEFAULT_MAX_PIXELS = 16_000_000
DEFAULT_MAX_SIDE = 8192
MAX_ASPECT = 20  # longest side / shortest side
REDUCE_SIDE = 1024  # decoded pictures are reduced to about this (the analysis pools to 512)
BAND_ROWS = 32  # reduced rows made at a time
MAX_JPEG_SCANS = 64  # progressive JPEGs have ~10; thousands make a CPU bomb
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
# The WebP decoder keeps about four copies of the picture: a quarter of the pixel budget.
_COPIES = {"WEBP": 4}
_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageError(ValueError):
    """An upload that cannot be turned into a digit; ``status`` and ``code`` are for the API."""

    status = 422
    code = "invalid_image"


class UnsupportedImageError(ImageError):
    status, code = 415, "unsupported_image"


class ImageTooLargeError(ImageError):
    status, code = 413, "image_too_large"


class BlankImageError(ImageError):
    status, code = 422, "blank_image"


def load_grayscale(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE
) -> np.ndarray:
    """Decode to uint8 grayscale [h, w], at most about ``REDUCE_SIDE`` a side; refuse non-images
    (415), pictures over the limits (413) and odd shapes (422) before decoding."""
    webp = _webp_size(data)
    if webp is not None:  # Pillow's WebP decoder allocates its canvases as it opens the file
        check_size(webp, max_pixels // _COPIES["WEBP"], max_side)
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedImageError(
            "not an image, or a format that cannot be read (send PNG, JPEG, GIF, BMP, TIFF, WebP)"
        ) from exc
    except Exception as exc:  # Pillow's plugins raise many types for a malformed header
        raise ImageError(f"cannot read the image header: {exc}") from exc
    with img:
        check_size(img.size, max_pixels // _COPIES.get(img.format or "", 1), max_side)
        if img.format == "BMP" and img.info.get("compression") in (1, 2):
            raise UnsupportedImageError("run-length encoded BMP: send PNG or an uncompressed BMP")
        if isinstance(img, JpegImagePlugin.JpegImageFile):
            _check_jpeg(img, data, max_pixels)
        img.draft("L", (REDUCE_SIDE // 2, REDUCE_SIDE // 2))  # JPEG: decode at a reduced scale
        try:
            img.load()
            orientation = img.getexif().get(_ORIENTATION)
            small = _reduce(img, math.ceil(max(img.size) / REDUCE_SIDE))
            if orientation in _TRANSPOSE:
                small = small.transpose(_TRANSPOSE[orientation])
            return _to_gray(small)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLargeError(f"image too large: {exc}") from exc
        except Exception as exc:
            raise ImageError(f"cannot decode the image (truncated or corrupt?): {exc}") from exc


def check_size(size: tuple[int, int], max_pixels: int, max_side: int) -> None:
    """Refuse a picture by its header: too many pixels, a side too long, or a thin strip."""
    width, height = size
    if width < 1 or height < 1:
        raise ImageError("image has no pixels")
    if width * height > max_pixels or max(width, height) > max_side:
        raise ImageTooLargeError(
            f"image is {width}×{height} pixels, over the limit of {max_pixels} pixels "
            f"and {max_side} pixels a side"
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageError(
            f"image is {width}×{height} pixels; the longer side may be at most "
            f"{MAX_ASPECT} times the shorter"
        )


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """The canvas size in a WebP file's first chunk (VP8X, lossless VP8L or lossy VP8), read
    before Pillow opens it; ``None`` if ``data`` is not a WebP file."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP" or len(data) < 30:
        return None
    kind = data[12:16]
    if kind == b"VP8X":
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if kind == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if kind == b"VP8 ":
        return (
            int.from_bytes(data[26:28], "little") & 0x3FFF,
            int.from_bytes(data[28:30], "little") & 0x3FFF,
        )
    return None


def _check_jpeg(img: JpegImagePlugin.JpegImageFile, data: bytes, max_pixels: int) -> None:
    """A progressive JPEG's decoder holds every DCT coefficient (2 bytes each) at full size, and
    re-reads them once per scan: bound both by the pixel budget of a 4-byte-per-pixel picture."""
    if data.count(b"\xff\xda") > MAX_JPEG_SCANS:  # start-of-scan markers (0xFF is escaped)
        raise ImageError(f"JPEG has more than {MAX_JPEG_SCANS} scans")
    if not (img.info.get("progressive") or img.info.get("progression")):
        return
    width, height = img.size
    sampling = _jpeg_sampling(data) or [1]
    coefficients = width * height * sum(sampling) / max(sampling)
    if 2 * coefficients > 4 * max_pixels:
        raise ImageTooLargeError(
            f"progressive JPEG of {width}×{height} pixels needs more decoding memory than a "
            f"picture of {max_pixels} pixels: send a baseline JPEG, a PNG or a smaller picture"
        )


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # not DHT, JPG, DAC


def _jpeg_sampling(data: bytes) -> list[int]:
    """Each component's horizontal × vertical sampling factor, from the JPEG's start-of-frame
    segment (ITU T.81 B.2.2); empty if none is found. Read from the bytes, not from Pillow's
    undocumented ``JpegImageFile.layer``."""
    i = 2  # after SOI
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF_MARKERS:
            count = data[i + 9] if i + 9 < len(data) else 0
            factors = data[i + 10 : i + 10 + 3 * count]
            return [(b >> 4) * (b & 0x0F) for b in factors[1::3]]
        i += 2 + length
    return []


def _reduce(img: Image.Image, factor: int) -> Image.Image:
    """The decoded picture box-reduced by ``factor``, in a mode ``_to_gray`` reads.

    The work goes band by band (``BAND_ROWS`` output rows at a time), so the only full-size
    array is the decoded picture itself: converting it whole (to premultiplied alpha for
    ``reduce``, from a palette, from 16-bit) would take up to two more of its size.
    """
    width, height = img.size
    out: Image.Image | None = None
    step = BAND_ROWS * factor
    for top in range(0, height, step):
        band = _reduce_band(img.crop((0, top, width, min(height, top + step))), factor)
        if out is None:
            out = Image.new(band.mode, (-(-width // factor), -(-height // factor)))
        out.paste(band, (0, top // factor))
    assert out is not None
    return out


def _reduce_band(band: Image.Image, factor: int) -> Image.Image:
    if band.mode == "P":
        alpha = _palette_alpha(band)
        gray = band.convert("L")
        if alpha is not None:
            gray = Image.merge("LA", (gray, band.point(alpha, "L")))
        band = gray
    elif band.mode.startswith("I;16"):
        band = Image.fromarray(np.asarray(band, dtype=np.float32))
    elif band.mode == "1":
        band = band.convert("L")
    return band.reduce(factor) if factor > 1 else band


def _palette_alpha(img: Image.Image) -> list[int] | None:
    """Alpha per palette index (tRNS or an RGBA palette), or ``None`` for an opaque palette."""
    trns = img.info.get("transparency")
    if isinstance(trns, int):
        return [0 if i == trns else 255 for i in range(256)]
    if isinstance(trns, bytes):
        return [*trns[:256], *([255] * (256 - len(trns[:256])))]
    if img.palette is not None and img.palette.mode == "RGBA":
        alphas = img.palette.tobytes()[3::4]
        return [*alphas[:256], *([255] * (256 - len(alphas[:256])))]
    return None


def _to_gray(img: Image.Image) -> np.ndarray:
    """A (reduced) picture in any mode → uint8 grayscale, transparency flattened."""
    if img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return scaled.astype(np.uint8)
    if img.mode == "RGBa":
        img = img.convert("RGBA")
    gray = img.convert("L")
    if "A" not in img.mode or img.getchannel("A").getextrema()[0] == 255:
        return np.asarray(gray, dtype=np.uint8)
    alpha = img.getchannel("A")
    # Flatten onto the tone that contrasts with the opaque strokes (dark strokes → white).
    step = max(1, int(math.sqrt(img.width * img.height / 65_536)))  # a sample is enough
    g = np.asarray(gray)[::step, ::step].astype(np.float32)
    a = np.asarray(alpha)[::step, ::step].astype(np.float32)
    opaque_tone = float((g * a).sum() / max(float(a.sum()), 1e-6))
    paper = Image.new("L", img.size, 255 if opaque_tone < 128 else 0)
    return np.asarray(Image.composite(gray, paper, alpha), dtype=np.uint8)
