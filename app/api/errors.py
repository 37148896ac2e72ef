"""One JSON error shape for every failure: ``{"error": "<code>", "detail": "<what is wrong>"}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from app.api.responses import OrjsonResponse
from app.core import errors as svc

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A client-facing error with an HTTP status, a stable code and a readable detail."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


# The one table from domain errors to HTTP statuses and WebSocket close codes (RFC 6455 §7.4.1).
# The first matching class wins, so subclasses come before their bases.
ERROR_MAP: tuple[tuple[type[svc.ServiceError], int, int], ...] = (
    (svc.InvalidInput, 422, 1008),
    (svc.Malformed, 400, 1008),
    (svc.TooLarge, 413, 1009),
    (svc.UnsupportedMedia, 415, 1003),
    (svc.Unauthorized, 401, 1008),
    (svc.Forbidden, 403, 1008),
    (svc.NotFound, 404, 1008),
    (svc.Conflict, 409, 1013),
    (svc.NotReady, 503, 1013),
    (svc.Overloaded, 503, 1013),
    (svc.GoingAway, 503, 1001),
    (svc.IdleTimeout, 408, 1001),
    (svc.DeadlineExceeded, 504, 1011),
    (svc.ModelFailed, 500, 1011),
)


def http_status(exc: svc.ServiceError) -> int:
    """The HTTP status of a domain error (500 for an unmapped one)."""
    return next((status for cls, status, _ in ERROR_MAP if isinstance(exc, cls)), 500)


def close_code(exc: svc.ServiceError) -> int:
    """The WebSocket close code of a domain error (1011 for an unmapped one)."""
    return next((code for cls, _, code in ERROR_MAP if isinstance(exc, cls)), 1011)


def close_reason(exc: svc.ServiceError) -> str:
    """A WebSocket close reason ``"<code>: <detail>"``, cut to the 123 bytes a close frame holds."""
    reason = f"{exc.code}: {exc.detail}"
    if len(reason.encode()) > 123:
        reason = reason.encode()[:123].decode(errors="ignore")
    return reason


def error_response(
    status: int, code: str, detail: object, headers: dict[str, str] | None = None
) -> OrjsonResponse:
    return OrjsonResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def service_error_response(exc: svc.ServiceError) -> OrjsonResponse:
    """The JSON error answer of a domain error, with ``Retry-After`` when it has one."""
    headers = None
    if isinstance(exc, svc.Overloaded):
        headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
    return error_response(http_status(exc), exc.code, exc.detail, headers)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> OrjsonResponse:
        return error_response(exc.status, exc.code, exc.detail)

    @app.exception_handler(svc.ServiceError)
    async def _service_error(_: Request, exc: svc.ServiceError) -> OrjsonResponse:
        return service_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> OrjsonResponse:
        return error_response(422, "invalid_request", _validation_detail(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> OrjsonResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, exc.detail)

    @app.exception_handler(ClientDisconnect)
    async def _gone(_: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nobody reads it; the access log counts a 499

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> OrjsonResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return error_response(500, "internal_error", "internal server error")
