"""The import arrows of ``app/`` run one way: api → services → schemas → core (no upward import),
and the API imports nothing from Redis (store failures reach it as domain errors)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "app"
LAYERS = ["core", "schemas", "services", "api"]  # each may import only those before it


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_no_layer_imports_one_above_it(layer: str) -> None:
    above = LAYERS[LAYERS.index(layer) + 1 :]
    wrong = {
        f"{path.relative_to(APP.parent)} imports {name}"
        for path in (APP / layer).rglob("*.py")
        for name in imports(path)
        if any(name == f"app.{up}" or name.startswith(f"app.{up}.") for up in above)
    }
    assert not wrong, sorted(wrong)


def test_the_api_imports_nothing_from_redis() -> None:
    wrong = {
        f"{path.relative_to(APP.parent)} imports {name}"
        for path in (APP / "api").rglob("*.py")
        for name in imports(path)
        if name.split(".")[0] == "redis" or "redis_sessions" in name
    }
    assert not wrong, sorted(wrong)
