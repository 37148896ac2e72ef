"""MNIST-style preprocessing of a picture of one handwritten digit (Pillow + NumPy).

``preprocess_digit(data)`` turns the bytes of a PNG, JPEG, … into what the digit model reads:
float32 [28, 28] in [0, 1], white ink on black. It repeats what the MNIST authors did to the NIST
scans, after normalising the photo:

1. decode within bounds (``modelspec.image_decode``: size, side and aspect checked from the
   header, reduced decoding to about 1024 px a side), apply the EXIF rotation, flatten
   transparency, convert to grayscale;
2. detect a light background (dark ink on paper) and invert, so the ink is bright;
3. subtract the background level and the noise floor, stretch the ink to [0, 1];
4. crop to the digit's bounding box (isolated specks filtered out);
5. thicken strokes that would be thinner than MNIST's after scaling (a fine pen in a big photo);
6. fit into 20×20 keeping the aspect ratio (antialiased resize);
7. translate so the centre of mass sits where MNIST's does, in a 28×28 frame.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageFilter

from modelspec.image_decode import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    BlankImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
    load_grayscale,
)

__all__ = [
    "BlankImageError",
    "ImageError",
    "ImageTooLargeError",
    "UnsupportedImageError",
    "load_grayscale",
    "preprocess_digit",
]

FRAME = 28  # MNIST frame side
BOX = 20  # MNIST fits each digit into BOX×BOX inside the frame
CENTER = 14.0  # mean centre of mass (row and column index) of the MNIST digits
WORK_SIDE = 512  # larger pictures are pooled to about this before analysis
CROP_SIDE = 160  # larger digit crops are max-pooled to about this before resizing
MIN_CONTRAST = 24.0  # of 255: less than this between background and ink is a blank picture
MASK_LEVEL = 0.15  # ink level that counts towards the bounding box
MIN_STROKE = 1.0  # px in the 20-px box (MNIST: 99 % are wider); thinner strokes are thickened …
TARGET_STROKE = 2.0  # … to this (MNIST's median stroke width, by the same 2·area/perimeter)


def preprocess_digit(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE
) -> np.ndarray:
    """Image file bytes → float32 [28, 28] in [0, 1] (see the module docstring)."""
    return mnist_normalize(ink_image(load_grayscale(data, max_pixels, max_side)))


def ink_image(gray: np.ndarray) -> np.ndarray:
    """uint8 grayscale → float32 ink in [0, 1] on a 0 background (bright ink, ≤ ~512 px a side)."""
    lo, hi = int(gray.min()), int(gray.max())
    mid = float(np.median(_sample(gray)))
    dark_ink = mid - lo > hi - mid  # the background (the median) is nearer white: ink on paper
    factor = math.ceil(max(gray.shape) / WORK_SIDE)
    if factor > 1:  # keep the ink's extreme in each block so thin strokes survive
        gray = _pool(gray, factor, np.minimum if dark_ink else np.maximum)
    g = gray.astype(np.float32)
    if dark_ink:
        g = 255.0 - g
    sample = _sample(g)
    background = float(np.median(sample))
    peak = float(g.max())
    contrast = peak - background
    if contrast < MIN_CONTRAST:
        raise BlankImageError("no digit found: the image is blank or has almost no contrast")
    noise = 3 * 1.4826 * float(np.median(np.abs(sample - background)))
    floor = background + min(max(noise, 0.02 * contrast), 0.5 * contrast)
    return np.clip((g - floor) / (peak - floor), 0.0, 1.0)


def _sample(a: np.ndarray, size: int = 65_536) -> np.ndarray:
    """A regular sub-grid of about ``size`` pixels, enough for background statistics."""
    step = max(1, int(math.sqrt(a.size / size)))
    return a[::step, ::step]


def mnist_normalize(ink: np.ndarray) -> np.ndarray:
    """Bright ink on 0 → the 28×28 MNIST frame: crop, thicken, fit 20×20, centre by mass."""
    y0, y1, x0, x1 = _bounding_box(ink)
    crop = ink[y0:y1, x0:x1]
    factor = math.ceil(max(crop.shape) / CROP_SIDE)
    if factor > 1:
        crop = _pool(crop, factor)
    scale = BOX / max(crop.shape)
    width = stroke_width(crop > 0.5)
    if width * scale < MIN_STROKE:
        crop = _dilate(crop, 1 + round((TARGET_STROKE - width * scale) / scale))
        scale = BOX / max(crop.shape)
    h, w = crop.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    patch = Image.fromarray(np.ascontiguousarray(crop, dtype=np.float32))  # mode "F"
    fitted = np.clip(np.asarray(patch.resize(size, Image.Resampling.LANCZOS)), 0.0, 1.0)
    if fitted.max() <= 0:
        raise BlankImageError("no digit found: the marks are too small")
    fitted = fitted / fitted.max()
    return center_by_mass(fitted)


def center_by_mass(patch: np.ndarray) -> np.ndarray:
    """Place ``patch`` (≤ 28×28) in a 28×28 frame with its centre of mass at MNIST's."""
    h, w = patch.shape
    total = float(patch.sum())
    cy = float((patch.sum(axis=1) * np.arange(h)).sum()) / total
    cx = float((patch.sum(axis=0) * np.arange(w)).sum()) / total
    top = min(max(round(CENTER - cy), 0), FRAME - h)
    left = min(max(round(CENTER - cx), 0), FRAME - w)
    frame = np.zeros((FRAME, FRAME), np.float32)
    frame[top : top + h, left : left + w] = patch
    return frame


def stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width of a binary drawing: 2·area / perimeter (perimeter in pixel edges)."""
    padded = np.pad(mask, 1).astype(np.int8)
    edges = np.abs(np.diff(padded, axis=0)).sum() + np.abs(np.diff(padded, axis=1)).sum()
    return 2.0 * float(mask.sum()) / float(edges) if edges else 0.0


def _bounding_box(ink: np.ndarray) -> tuple[int, int, int, int]:
    mask = ink > MASK_LEVEL
    if min(ink.shape) >= 2 * FRAME:  # drop isolated specks (noise, dust) on larger pictures
        img = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MedianFilter(3))
        filtered = np.asarray(img) > 0
        if filtered.any():
            mask = filtered
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise BlankImageError("no digit found: no marks stand out from the background")
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _pool(a: np.ndarray, factor: int, op: np.ufunc = np.maximum) -> np.ndarray:
    """``op`` (max or min) over factor×factor blocks; thin strokes survive, unlike averaging."""
    h, w = a.shape
    if h % factor or w % factor:
        a = np.pad(a, ((0, -h % factor), (0, -w % factor)), mode="edge")
    cols = functools.reduce(op, [a[:, i::factor] for i in range(factor)])
    return functools.reduce(op, [cols[i::factor] for i in range(factor)])


def _dilate(a: np.ndarray, size: int) -> np.ndarray:
    """Grey dilation by a size×size square, growing the array by size-1 (nothing is cut off)."""
    if size <= 1:
        return a
    h, w = a.shape
    rows = np.zeros((h + size - 1, w), a.dtype)
    for s in range(size):
        np.maximum(rows[s : s + h], a, out=rows[s : s + h])
    out = np.zeros((h + size - 1, w + size - 1), a.dtype)
    for s in range(size):
        np.maximum(out[:, s : s + w], rows, out=out[:, s : s + w])
    return out
