"""Real MNIST test images for the benchmark, read without numpy (the load generator skips it)."""

from __future__ import annotations

import gzip
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist"
IMAGES = "t10k-images-idx3-ubyte.gz"
LABELS = "t10k-labels-idx1-ubyte.gz"
PIXELS = 28 * 28


def load(count: int, data_dir: Path = MNIST_DIR) -> tuple[list[bytes], list[int]]:
    """The first ``count`` test images (784 raw uint8 bytes each) and their labels."""
    with gzip.open(Path(data_dir) / IMAGES, "rb") as f:
        head = f.read(16)
        if int.from_bytes(head[:4], "big") != 2051:
            raise ValueError(f"{data_dir / IMAGES} is not an IDX image file")
        raw = f.read(count * PIXELS)
    with gzip.open(Path(data_dir) / LABELS, "rb") as f:
        f.read(8)
        labels = list(f.read(count))
    if len(raw) < count * PIXELS or len(labels) < count:
        raise ValueError(f"fewer than {count} images in {data_dir}")
    return [raw[i * PIXELS : (i + 1) * PIXELS] for i in range(count)], labels


def as_rows(image: bytes) -> list[list[int]]:
    """One image as the 28×28 nested list of 0-255 ints the API takes."""
    return [list(image[r * 28 : (r + 1) * 28]) for r in range(28)]
