"""Shared fixtures: the repository root, the real MNIST files, and a subprocess environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from training.mnist_data import ENV_VAR, FILES, MnistData, load_mnist

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding ``pyproject.toml``)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The four real MNIST files: ``$MNIST_DIR``, else ``<repo>/../shared/data/mnist``.

    Never skipped: a missing data set fails the tests that need it, saying where it looked.
    """
    path = Path(os.environ.get(ENV_VAR) or REPO_ROOT.parent / "shared" / "data" / "mnist")
    missing = [name for name, _ in FILES.values() if not (path / name).is_file()]
    if missing:
        pytest.fail(
            f"MNIST files {missing} not found in {path}; put the four original IDX .gz files "
            f"there or point ${ENV_VAR} at a folder that holds them",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def mnist(mnist_dir: Path) -> MnistData:
    """The real MNIST arrays, parsed once per test session."""
    return load_mnist(mnist_dir)


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """The environment for child Python processes: quiet TensorFlow, the repo importable."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env
