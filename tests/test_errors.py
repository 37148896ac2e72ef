"""The one table from domain errors to HTTP statuses and WebSocket close codes."""

from __future__ import annotations

import ast
from pathlib import Path

import orjson
import pytest

from app.api.errors import ERROR_MAP, close_code, http_status, service_error_response
from app.core import errors as svc


@pytest.mark.parametrize(("cls", "status", "code"), ERROR_MAP)
def test_every_domain_error_has_its_status_and_close_code(
    cls: type[svc.ServiceError], status: int, code: int
) -> None:
    exc = cls("what is wrong")
    assert (http_status(exc), close_code(exc)) == (status, code)
    response = service_error_response(exc)
    assert response.status_code == status
    assert orjson.loads(response.body) == {"error": cls.code, "detail": "what is wrong"}


def test_every_domain_error_class_is_mapped() -> None:
    mapped = {cls for cls, _, _ in ERROR_MAP}
    assert set(svc.ServiceError.__subclasses__()) <= mapped


def test_overloaded_says_when_to_retry_and_codes_can_be_specific() -> None:
    response = service_error_response(svc.Overloaded("busy", "too_many_uploads", 2.4))
    assert response.headers["retry-after"] == "2"
    assert orjson.loads(response.body)["error"] == "too_many_uploads"


def test_services_and_core_know_nothing_of_http_routes_or_close_codes() -> None:
    """Layering: ``app.services`` and ``app.core`` never import ``app.api``; only the API layer
    maps domain errors to statuses and close codes."""
    root = Path(__file__).resolve().parents[1] / "app"
    offenders = []
    for path in [*(root / "services").rglob("*.py"), *(root / "core").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[:2] == ["app", "api"]]
    assert offenders == []
