"""MNIST from the four original IDX files, checksum-verified, plus a seeded validation split.

``load_mnist(data_dir)`` reads ``data_dir`` (or ``$MNIST_DIR``); with neither it falls back to
``keras.datasets.mnist.load_data()``, which downloads the data set. ``find_mnist()`` finds the
four files for the tests and ``make train``: ``$MNIST_DIR``, else ``../shared/data/mnist`` beside
the checkout, else a cache (``~/.cache/rnn-serving/mnist``) that :func:`download_mnist` fills from
the standard mirror, every file md5-checked before it is kept.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modelspec.contract import IMAGE_SIZE, NUM_CLASSES

ENV_VAR = "MNIST_DIR"

# The published md5 of each original .gz file.
FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
}
IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one MNIST uses
# Where TensorFlow's and Keras's own MNIST loaders download the original files from.
MIRROR = "https://storage.googleapis.com/cvdf-datasets/mnist/"
REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rnn-serving/mnist"


class MnistDataError(RuntimeError):
    """An MNIST file is missing, fails its checksum, or is not the IDX data expected."""


@dataclass(frozen=True)
class MnistData:
    """uint8 images ``(N, 28, 28)`` and labels ``(N,)``, and where they came from."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    checksums: dict[str, str] = field(default_factory=dict)


def md5sum(path: Path) -> str:
    """The hex md5 of the file at ``path``."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: Path, expected: str) -> str:
    """Raise ``MnistDataError`` unless ``path`` exists and has md5 ``expected``; return it."""
    if not path.is_file():
        raise MnistDataError(f"MNIST file missing: {path}")
    actual = md5sum(path)
    if actual != expected:
        raise MnistDataError(
            f"MNIST file {path} is corrupt: md5 {actual}, expected {expected} "
            "(download it again from the original source)"
        )
    return actual


def has_mnist(folder: Path) -> bool:
    return all((folder / name).is_file() for name, _ in FILES.values())


def download_mnist(folder: Path = CACHE_DIR, mirror: str = MIRROR, timeout_s: float = 60) -> Path:
    """The four files in ``folder``, downloaded from ``mirror`` where missing; each is written
    only once its md5 matches the published one (``MnistDataError`` otherwise)."""
    folder.mkdir(parents=True, exist_ok=True)
    for filename, expected in FILES.values():
        target = folder / filename
        if target.is_file():
            verify_md5(target, expected)
            continue
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{filename}.", delete=False) as tmp:
            partial = Path(tmp.name)
            try:
                with urllib.request.urlopen(mirror + filename, timeout=timeout_s) as answer:
                    shutil.copyfileobj(answer, tmp)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        try:
            verify_md5(partial, expected)
        except MnistDataError:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(target)
    return folder


def find_mnist(download: bool = True) -> Path:
    """The folder holding the four MNIST files: ``$MNIST_DIR``, else ``../shared/data/mnist``,
    else the cache, downloaded into it if ``download``.

    Raises ``MnistDataError`` saying where to put the files if none has them and the download
    fails (offline).
    """
    named = os.environ.get(ENV_VAR)
    if named:
        return Path(named)
    for folder in (SHARED_DIR, CACHE_DIR):
        if has_mnist(folder):
            return folder
    if download:
        try:
            return download_mnist(CACHE_DIR, mirror=MIRROR)
        except (OSError, MnistDataError) as exc:
            reason = f"the download from {MIRROR} failed ({exc})"
    else:
        reason = "downloading was not allowed"
    raise MnistDataError(
        f"MNIST not found: no ${ENV_VAR}, no files in {SHARED_DIR} or {CACHE_DIR}, and {reason}. "
        f"Put the four original files ({', '.join(n for n, _ in FILES.values())}) in one of "
        f"those folders, or point ${ENV_VAR} at a folder that holds them."
    )


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse a gzipped IDX file of unsigned bytes with ``ndim`` dimensions into a uint8 array.

    The header is two zero bytes, the type code (0x08), the number of dimensions, then one
    big-endian uint32 per dimension; the data follow in C order.
    """
    try:
        raw = gzip.decompress(Path(path).read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise MnistDataError(f"{path} is not a readable gzip file: {exc}") from exc
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise MnistDataError(f"{path}: bad IDX header: file is only {len(raw)} bytes")
    zeros, type_code, file_ndim = struct.unpack(">HBB", raw[:4])
    if zeros != 0 or type_code != IDX_UBYTE or file_ndim != ndim:
        raise MnistDataError(
            f"{path}: bad IDX header: magic number {raw[:4].hex()}, "
            f"expected 0000{IDX_UBYTE:02x}{ndim:02x}"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected_size = header_size + int(np.prod(dims))
    if len(raw) != expected_size:
        raise MnistDataError(
            f"{path}: bad IDX header: dimensions {dims} need {expected_size} bytes, "
            f"file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)


def _check_pair(name: str, x: np.ndarray, y: np.ndarray) -> None:
    if x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise MnistDataError(f"{name} images are {x.shape[1:]}, expected 28×28")
    if len(x) != len(y):
        raise MnistDataError(f"{name}: {len(x)} images but {len(y)} labels")
    if y.size and int(y.max()) >= NUM_CLASSES:
        raise MnistDataError(f"{name} labels hold {int(y.max())}, expected 0–9")


def load_mnist(data_dir: str | Path | None = None) -> MnistData:
    """MNIST from ``data_dir`` or ``$MNIST_DIR``; with neither, ``keras.datasets.mnist``.

    Every file's md5 is checked against the published one before it is parsed.
    """
    data_dir = data_dir or os.environ.get(ENV_VAR) or None
    if data_dir is None:
        return _load_from_keras()
    data_dir = Path(data_dir)
    checksums = {}
    arrays = {}
    for key, (filename, expected_md5) in FILES.items():
        path = data_dir / filename
        checksums[filename] = verify_md5(path, expected_md5)
        arrays[key] = read_idx(path, ndim=3 if key.endswith("images") else 1)
    for split in ("train", "test"):
        _check_pair(split, arrays[f"{split}_images"], arrays[f"{split}_labels"])
    return MnistData(
        x_train=arrays["train_images"],
        y_train=arrays["train_labels"],
        x_test=arrays["test_images"],
        y_test=arrays["test_labels"],
        source=str(data_dir.resolve()),
        checksums=checksums,
    )


def _load_from_keras() -> MnistData:
    import keras  # deferred: importing Keras costs seconds and only this path needs it

    (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    return MnistData(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        source="keras.datasets.mnist.load_data() (mnist.npz, hash checked by Keras)",
    )


def split_validation(
    x: np.ndarray, y: np.ndarray, size: int = 5000, seed: int = 0, stratify: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_val, y_val)``: ``size`` seeded random examples held out.

    With ``stratify`` every class keeps its share of the validation set (up to rounding).
    """
    if not 0 < size < len(x):
        raise ValueError(f"validation size must be in 1..{len(x) - 1}, got {size}")
    rng = np.random.default_rng(seed)
    if stratify:
        classes, counts = np.unique(y, return_counts=True)
        quotas = _largest_remainder(counts * size / len(y))
        val_idx = np.concatenate(
            [
                rng.choice(np.flatnonzero(y == c), quota, replace=False)
                for c, quota in zip(classes, quotas, strict=True)
            ]
        )
    else:
        val_idx = rng.choice(len(x), size, replace=False)
    val_mask = np.zeros(len(x), dtype=bool)
    val_mask[val_idx] = True
    return x[~val_mask], y[~val_mask], x[val_mask], y[val_mask]


def _largest_remainder(shares: np.ndarray) -> np.ndarray:
    """Round non-negative ``shares`` to integers that keep their (integer) sum."""
    quotas = np.floor(shares).astype(int)
    leftover = round(shares.sum()) - quotas.sum()
    quotas[np.argsort(quotas - shares)[:leftover]] += 1
    return quotas
