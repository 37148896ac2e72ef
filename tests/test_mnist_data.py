"""The MNIST loader on the real IDX files, on corrupted and missing copies, and the val split."""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import re
import shutil
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from training import mnist_data
from training.mnist_data import (
    FILES,
    MnistData,
    MnistDataError,
    download_mnist,
    has_mnist,
    load_mnist,
    read_idx,
    split_validation,
)

# Class counts of the original MNIST training and test sets.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def copy_of(mnist_dir: Path, dest: Path, *, skip: str | None = None) -> Path:
    """``dest`` holding links to the real files (real copies need not be made to read them)."""
    dest.mkdir()
    for name, _ in FILES.values():
        if name != skip:
            (dest / name).symlink_to(mnist_dir / name)
    return dest


def test_real_files_parse(mnist: MnistData, mnist_dir: Path) -> None:
    assert mnist.x_train.shape == (60000, 28, 28)
    assert mnist.y_train.shape == (60000,)
    assert mnist.x_test.shape == (10000, 28, 28)
    assert mnist.y_test.shape == (10000,)
    for array in (mnist.x_train, mnist.y_train, mnist.x_test, mnist.y_test):
        assert array.dtype == np.uint8
    assert mnist.x_train.min() == 0 and mnist.x_train.max() == 255
    assert np.bincount(mnist.y_train, minlength=10).tolist() == TRAIN_COUNTS
    assert np.bincount(mnist.y_test, minlength=10).tolist() == TEST_COUNTS
    assert mnist.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert mnist.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert mnist.checksums == dict(FILES.values())
    assert mnist.source == str(mnist_dir.resolve())


def test_env_var_names_the_folder(
    mnist_dir: Path, mnist: MnistData, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir))
    data = load_mnist()
    assert data.source == mnist.source
    assert np.array_equal(data.y_test, mnist.y_test)


def test_corrupted_file_names_file_and_both_checksums(mnist_dir: Path, tmp_path: Path) -> None:
    name, expected_md5 = FILES["train_labels"]
    folder = copy_of(mnist_dir, tmp_path / "mnist", skip=name)
    corrupt = folder / name
    shutil.copyfile(mnist_dir / name, corrupt)
    raw = bytearray(corrupt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(raw))
    actual_md5 = hashlib.md5(raw).hexdigest()

    with pytest.raises(MnistDataError) as caught:
        load_mnist(folder)
    message = str(caught.value)
    assert name in message
    assert expected_md5 in message
    assert actual_md5 in message


def test_missing_file_is_named(mnist_dir: Path, tmp_path: Path) -> None:
    name, _ = FILES["test_images"]
    folder = copy_of(mnist_dir, tmp_path / "mnist", skip=name)
    with pytest.raises(MnistDataError, match=re.escape(str(folder / name))):
        load_mnist(folder)


@pytest.mark.parametrize(
    ("payload", "complaint"),
    [
        (struct.pack(">HBBI", 0, 0x08, 3, 2) + b"\0\0", "magic number 00000803"),  # ndim 3
        (struct.pack(">HBBI", 0, 0x0D, 1, 2) + b"\0\0", "magic number 00000d01"),  # float
        (struct.pack(">HBBI", 0, 0x08, 1, 5) + b"\0\0", "need 13 bytes, file has 10"),
        (b"\0\0", "only 2 bytes"),
    ],
)
def test_bad_idx_header(tmp_path: Path, payload: bytes, complaint: str) -> None:
    path = tmp_path / "labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(payload))
    with pytest.raises(MnistDataError, match=f"bad IDX header.*{complaint}"):
        read_idx(path, ndim=1)


def test_good_idx_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "images-idx3-ubyte.gz"
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path.write_bytes(gzip.compress(struct.pack(">HBB3I", 0, 0x08, 3, 2, 3, 4) + data.tobytes()))
    assert np.array_equal(read_idx(path, ndim=3), data)


def test_not_gzip_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(MnistDataError, match=r"broken\.gz is not a readable gzip file"):
        read_idx(path, ndim=1)


@pytest.mark.parametrize("stratify", [False, True])
def test_split_validation(mnist: MnistData, stratify: bool) -> None:
    index = np.arange(len(mnist.y_train))
    x_tr, y_tr, x_val, y_val = split_validation(
        index, mnist.y_train, 5000, seed=3, stratify=stratify
    )
    assert len(x_val) == len(y_val) == 5000
    assert len(x_tr) == len(y_tr) == 55000
    assert np.array_equal(np.sort(np.concatenate([x_tr, x_val])), index)  # a partition
    assert np.array_equal(mnist.y_train[x_val], y_val)  # labels stay with their images
    again = split_validation(index, mnist.y_train, 5000, seed=3, stratify=stratify)[2]
    assert np.array_equal(again, x_val)  # seeded
    other = split_validation(index, mnist.y_train, 5000, seed=4, stratify=stratify)[2]
    assert not np.array_equal(other, x_val)
    if stratify:
        expected = np.array(TRAIN_COUNTS) * 5000 / 60000
        assert np.abs(np.bincount(y_val, minlength=10) - expected).max() < 1


def test_split_validation_rejects_bad_size(mnist: MnistData) -> None:
    with pytest.raises(ValueError, match="validation size"):
        split_validation(mnist.x_train, mnist.y_train, 60000)


@contextlib.contextmanager
def mirror_of(folder: Path) -> Iterator[str]:
    """A real HTTP server on loopback serving ``folder``, as the download's mirror."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_the_download_fetches_and_checks_every_file(mnist_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with mirror_of(mnist_dir) as url:
        assert download_mnist(cache, mirror=url) == cache
        assert has_mnist(cache)
        assert download_mnist(cache, mirror="http://127.0.0.1:9/") == cache  # all there: no fetch
    assert load_mnist(cache).y_test[:3].tolist() == [7, 2, 1]


def test_a_download_that_fails_its_checksum_is_not_kept(mnist_dir: Path, tmp_path: Path) -> None:
    bad = copy_of(mnist_dir, tmp_path / "bad", skip=FILES["test_labels"][0])
    (bad / FILES["test_labels"][0]).write_bytes(b"not mnist")
    cache = tmp_path / "cache"
    with mirror_of(bad) as url, pytest.raises(MnistDataError, match="corrupt"):
        download_mnist(cache, mirror=url)
    assert not (cache / FILES["test_labels"][0]).exists()
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no partial file


def test_offline_with_no_copy_says_where_to_put_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MNIST_DIR", raising=False)
    monkeypatch.setattr(mnist_data, "SHARED_DIR", tmp_path / "shared")
    monkeypatch.setattr(mnist_data, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(mnist_data, "MIRROR", "http://127.0.0.1:9/")  # nothing listens there
    with pytest.raises(MnistDataError) as info:
        mnist_data.find_mnist()
    message = str(info.value)
    assert str(tmp_path / "shared") in message and "MNIST_DIR" in message
    assert "train-images-idx3-ubyte.gz" in message
