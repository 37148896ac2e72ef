"""The import arrows of ``app/`` run one way: api → services → schemas → core (no upward import),
the gRPC transport (``app/grpc``) sits beside the HTTP one (``app/api``) over the same services
and neither imports the other, and no transport imports anything from Redis (store failures
reach them as domain errors)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "app"
RANK = {"core": 0, "schemas": 1, "services": 2, "api": 3, "grpc": 3}  # the transports on top
TRANSPORTS = ("api", "grpc")


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _layer_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "app" and parts[1] in RANK else None


@pytest.mark.parametrize("layer", list(RANK))
def test_a_layer_imports_only_itself_and_the_layers_below(layer: str) -> None:
    wrong = {
        f"{path.relative_to(APP.parent)} imports {name}"
        for path in (APP / layer).rglob("*.py")
        for name in imports(path)
        if (other := _layer_of(name)) is not None and other != layer and RANK[other] >= RANK[layer]
    }
    assert not wrong, sorted(wrong)


def test_both_transports_exist_and_rank_alike() -> None:
    assert all((APP / t).is_dir() and RANK[t] == max(RANK.values()) for t in TRANSPORTS)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_transports_import_nothing_from_redis(transport: str) -> None:
    wrong = {
        f"{path.relative_to(APP.parent)} imports {name}"
        for path in (APP / transport).rglob("*.py")
        for name in imports(path)
        if name.split(".")[0] == "redis" or "redis_sessions" in name
    }
    assert not wrong, sorted(wrong)
