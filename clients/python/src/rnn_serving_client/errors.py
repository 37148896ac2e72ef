"""Typed errors, built from the service's ``{"error": code, "detail": ...}`` bodies and from the
``"<code>: <detail>"`` reasons of its WebSocket closes (the service's one table of codes is
``ERROR_MAP`` in ``app/api/errors.py``)."""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "Conflict",
    "ConnectionFailed",
    "InvalidInput",
    "NotFound",
    "Overloaded",
    "ReconnectDeadlineExceeded",
    "RnnServingError",
    "ServerError",
    "SessionLost",
    "Timeout",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "error_from_close",
    "error_from_response",
]


class RnnServingError(Exception):
    """Base of every error this client raises.

    ``code``: the service's stable code (``"invalid_shape"``, ``"session_in_use"`` …, or one of
    this client's own: ``"connection_failed"``, ``"reconnect_deadline"``); ``detail``: what is
    wrong, for a person; ``status``: the HTTP status, or the WebSocket close code for a close,
    or None.
    """

    def __init__(self, code: str, detail: Any = "", status: int | None = None) -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code, self.detail, self.status = code, detail, status


class InvalidInput(RnnServingError):
    """What was sent is malformed or out of range (HTTP 400/415/422, an echo ``error`` frame)."""


class TooLarge(InvalidInput):
    """A size limit (HTTP 413, WebSocket 1009)."""


class Unauthorized(RnnServingError):
    """No or a wrong API key, a wrong session token, a refused origin (HTTP 401/403)."""


class NotFound(RnnServingError):
    """Unknown route, model or model version (HTTP 404)."""


class SessionLost(NotFound):
    """The echo session cannot be resumed: expired, evicted, unknown, or its replies after the
    last one received are no longer kept (``replay_unavailable``), so exactly once is impossible."""


class Conflict(RnnServingError):
    """The resource is busy (HTTP 409)."""


class Unavailable(RnnServingError):
    """Not ready, stopping, the session store unreachable (HTTP 503, WebSocket 1013/1001/1012):
    try again later. ``retry_after`` (seconds) when the service said when."""

    def __init__(
        self,
        code: str,
        detail: Any = "",
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(code, detail, status)
        self.retry_after = retry_after


class Overloaded(Unavailable):
    """A capacity bound was hit (HTTP 503 with ``Retry-After``); retry after ``retry_after`` s."""


class Timeout(RnnServingError):
    """The service did not answer in time (HTTP 504), or this client's own timeout passed."""


class ServerError(RnnServingError):
    """The service failed (HTTP 500, WebSocket 1011)."""


class ConnectionFailed(RnnServingError):
    """The service could not be reached, or the connection broke (code ``connection_failed``)."""


class ReconnectDeadlineExceeded(Unavailable):
    """An echo stream could not resume within its ``reconnect_deadline``; ``last_error`` is why
    the last try failed. The session may still be resumable later (its state is in the store)."""

    def __init__(self, detail: str, last_error: BaseException | None) -> None:
        super().__init__("reconnect_deadline", detail)
        self.last_error = last_error


_BY_STATUS: dict[int, type[RnnServingError]] = {
    400: InvalidInput,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    408: Timeout,
    409: Conflict,
    413: TooLarge,
    414: TooLarge,
    415: InvalidInput,
    422: InvalidInput,
    431: TooLarge,
    500: ServerError,
    503: Unavailable,
    504: Timeout,
}

# WebSocket refusal codes whose class is not the close code's (close reasons "<code>: <detail>").
_BY_CODE: dict[str, type[RnnServingError]] = {
    "unauthorized": Unauthorized,
    "origin_not_allowed": Unauthorized,
    "invalid_token": Unauthorized,
    "session_not_found": SessionLost,
    "session_evicted": SessionLost,
    "replay_unavailable": SessionLost,
    "session_version_unavailable": SessionLost,
    "invalid_last_seq": SessionLost,
    "invalid_resume": InvalidInput,
    "too_many_sessions": Overloaded,
    "too_many_sessions_from_client": Overloaded,
    "session_rate_limited": Overloaded,
    "too_many_connections": Overloaded,
    "internal_error": ServerError,
    "timeout": Timeout,
}

_BY_CLOSE: dict[int, type[RnnServingError]] = {
    1001: Unavailable,
    1003: InvalidInput,
    1006: ConnectionFailed,
    1008: InvalidInput,
    1009: TooLarge,
    1011: ServerError,
    1012: Unavailable,
    1013: Unavailable,
}

_RETRY_IN = re.compile(r"retry in ([0-9.]+) ?s")


def _retry_after_header(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def error_from_response(status: int, body: Any, headers: Any = None) -> RnnServingError:
    """The typed error of an HTTP error answer (``body``: its parsed JSON, or its text)."""
    code, detail = f"http_{status}", body
    if isinstance(body, dict) and "error" in body:
        code, detail = str(body["error"]), body.get("detail", "")
        if "detail" not in body and ": " in code:  # Open Inference Protocol: "code: detail"
            code, detail = code.split(": ", 1)
    retry_after = _retry_after_header(headers.get("retry-after") if headers is not None else None)
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else InvalidInput
    if status == 503 and retry_after is not None:
        cls = Overloaded
    if issubclass(cls, Unavailable):
        return cls(code, detail, status, retry_after=retry_after)
    return cls(code, detail, status)


def parse_reason(reason: str) -> tuple[str, str]:
    """A close reason ``"<code>: <detail>"`` → (code, detail); ("", reason) without a code."""
    code, sep, detail = reason.partition(": ")
    if sep and code.replace("_", "").isalnum() and code.islower():
        return code, detail
    return ("", reason) if reason else ("", "")


def error_from_close(close_code: int | None, reason: str) -> RnnServingError:
    """The typed error of a WebSocket close (or a refusal right after the handshake)."""
    code, detail = parse_reason(reason)
    status = close_code if close_code is not None else 1006
    cls = _BY_CODE.get(code) or _BY_CLOSE.get(status)
    if cls is None:
        cls = ConnectionFailed
    if not code:
        code = "connection_closed" if status in (1000, 1001, 1005, 1006, 1012) else f"ws_{status}"
        detail = detail or f"the connection closed ({status})"
    if issubclass(cls, Unavailable):
        match = _RETRY_IN.search(detail)
        retry_after = float(match.group(1)) if match else None
        return cls(code, detail, status, retry_after=retry_after)
    return cls(code, detail, status)
