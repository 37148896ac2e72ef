"""Shared fixtures: the repository root, the real MNIST files, and a subprocess environment."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from training.mnist_data import MnistData, MnistDataError, find_mnist, load_mnist

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding ``pyproject.toml``)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The four real MNIST files: ``$MNIST_DIR``, else ``<repo>/../shared/data/mnist``, else the
    checksum-verified download into ``~/.cache/rnn-serving/mnist`` (``find_mnist``).

    Never skipped: with no copy and no network the tests that need it fail, saying where to put
    the files.
    """
    try:
        return find_mnist()
    except MnistDataError as exc:
        pytest.fail(str(exc), pytrace=False)


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


# Tiers: `make test-fast` runs `pytest -m "not slow"`. A test that starts a process (a server, a
# browser, a training run) must be marked slow; these two checks keep the fast tier honest.
PROCESS_FIXTURES = frozenset(
    {
        "live_server",
        "live_redis_server",
        "redis",
        "own_redis",
        "server",
        "edge",
        "unbatched_server",
        "cluster",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    unmarked = [
        item.nodeid
        for item in items
        if item.get_closest_marker("slow") is None
        and PROCESS_FIXTURES & set(getattr(item, "fixturenames", ()))
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests that use a server fixture must be marked @pytest.mark.slow: "
            + ", ".join(unmarked[:10])
        )


@pytest.fixture(autouse=True)
def _fast_tests_start_no_process(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a test not marked slow, starting Python, a server or a browser fails and says to mark
    it (small tools such as ``awk`` or ``git`` may run)."""
    if request.node.get_closest_marker("slow") is not None:
        return
    start = subprocess.Popen.__init__

    def guarded(self: subprocess.Popen[bytes], args: object, *rest: object, **kw: object) -> None:
        first = args if isinstance(args, str | bytes | os.PathLike) else next(iter(args))  # type: ignore[call-overload]
        program = Path(os.fsdecode(first)).name.split()[0]
        if program.startswith("python") or program in HEAVY_PROGRAMS:
            raise RuntimeError(f"{request.node.nodeid} starts {program}: mark it slow")
        start(self, args, *rest, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)


HEAVY_PROGRAMS = frozenset({"redis-server", "chromium", "chrome", "uvicorn", "docker", "nginx"})
