"""Publish a model version atomically, so that a server polling the model folder never sees half.

A training run writes everything (SavedModel, ``metadata.json``, plots) into a temporary folder
beside the versions, ``<model_dir>/<name>/.tmp-<version>-<random>`` (not an integer, so
:func:`modelspec.contract.scan_versions` never serves it), flushes it to disk, and renames it to
``<model_dir>/<name>/<version>`` in one step (a rename within one file system is atomic). A
version that already exists is never replaced; the temporary folder is removed when anything
fails (a killed process leaves it behind; ``scan_versions`` reports it).

    target = plan_version(model_dir, "echo_rnn", None)  # next free version; fails now if taken
    ...train...
    with publish(target) as out:  # out: the temporary folder
        export(model, out)
        write_metadata(out, name=target.name, version=target.version, ...)
    # here target.path exists, complete
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelspec.contract import STAGING_PREFIX, next_version


@dataclass(frozen=True)
class VersionTarget:
    """Where a run will publish: ``<model_root>/<version>`` of model ``name``."""

    model_root: Path
    name: str
    version: int

    @property
    def path(self) -> Path:
        return self.model_root / str(self.version)

    def check_free(self) -> None:
        """Raise :class:`FileExistsError` if anything (even an empty folder) holds the name."""
        if os.path.lexists(self.path):
            raise FileExistsError(f"{_exists(self.path)} (pass another --version)")


def plan_version(model_dir: Path, name: str, version: int | None) -> VersionTarget:
    """The version a run will publish: ``version``, or the next free one. Fails now if taken."""
    if version is None:
        version = next_version(model_dir, name)
    elif version < 0:
        raise ValueError(f"a version is a non-negative integer, got {version}")
    target = VersionTarget(Path(model_dir) / name, name, int(version))
    target.check_free()
    return target


@contextmanager
def publish(target: VersionTarget) -> Iterator[Path]:
    """Yield a fresh temporary folder; when the block succeeds, move it to ``target.path``.

    On any error (in the block, or ``target.path`` appearing meanwhile) the temporary folder is
    removed and the error propagates; nothing is left under the model folder.
    """
    target.model_root.mkdir(parents=True, exist_ok=True)
    target.check_free()
    staging = target.model_root / f"{STAGING_PREFIX}{target.version}-{secrets.token_hex(4)}"
    staging.mkdir()  # mode 0o777 & ~umask, like any folder the user creates
    try:
        yield staging
        sync_tree(staging)
        rename_no_replace(staging, target.path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(target.model_root)  # make the rename itself durable


def sync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every folder (bottom-up), so the data is on disk
    before the rename makes it visible."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. folders cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync folders
        pass
    finally:
        os.close(fd)


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` atomically, raising :class:`FileExistsError` if ``dst`` exists.

    ``os.rename`` would silently replace an empty folder ``dst``; Linux's ``renameat2`` with
    ``RENAME_NOREPLACE`` refuses in the same atomic step. Where that is unavailable this checks
    first (a folder created between the check and the rename is replaced only if empty; a
    non-empty one makes the rename fail).
    """
    renameat2 = _renameat2()
    if renameat2 is not None:
        rc = renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(_exists(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(_exists(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(_exists(dst)) from exc
        raise


def _exists(path: Path) -> str:
    return f"{path} already exists; a published version is never replaced"


def _renameat2() -> Any:  # a ctypes function, or None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not glibc >= 2.28 / not Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    function.argtypes += [ctypes.c_uint]
    function.restype = ctypes.c_int
    return function
