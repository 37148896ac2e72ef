"""Domain errors, raised by every layer; ``app.api.errors`` maps them to HTTP and WebSocket.

Services, schemas and the core never know about HTTP statuses or close codes: they raise one of
these with a stable ``code`` (the ``"error"`` field clients see) and a readable ``detail``. The
API layer owns the one table that turns each class into an HTTP status and a WebSocket close
code. They live in ``app.core`` so that no layer imports upwards to raise them.
"""

from __future__ import annotations


def clip(text: str, limit: int = 64) -> str:
    """``text`` cut to ``limit`` characters, ``…`` marking a cut: client values echoed in a
    detail stay short whatever the client sent."""
    return text if len(text) <= limit else text[:limit] + "…"


class ServiceError(Exception):
    """Base class: a request the service could not serve, with a stable code and a detail."""

    code = "service_error"

    def __init__(self, detail: str, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code


class InvalidInput(ServiceError):
    """The client sent something malformed or out of range (HTTP 422, WebSocket 1008)."""

    code = "invalid_request"


class Malformed(ServiceError):
    """The input's framing is broken, e.g. a malformed multipart body (HTTP 400, WS 1008)."""

    code = "bad_request"


class TooLarge(ServiceError):
    """The input exceeds a size limit (HTTP 413, WebSocket 1009)."""

    code = "payload_too_large"


class UnsupportedMedia(ServiceError):
    """The input's format is not one the service reads (HTTP 415, WebSocket 1003)."""

    code = "unsupported_media_type"


class Unauthorized(ServiceError):
    """No or a wrong credential (HTTP 401, WebSocket 1008)."""

    code = "unauthorized"


class Forbidden(ServiceError):
    """A credential or origin that is not allowed this (HTTP 403, WebSocket 1008)."""

    code = "forbidden"


class NotFound(ServiceError):
    """An unknown model, version or session (HTTP 404, WebSocket 1008)."""

    code = "not_found"


class Conflict(ServiceError):
    """The resource is busy, e.g. a session attached elsewhere (HTTP 409, WebSocket 1013)."""

    code = "conflict"


class SequenceError(InvalidInput):
    """A sequence request (v2 ``sequence_id``) its sequence cannot take: no or a bad
    ``sequence_id``, a step of an unknown or ended sequence without ``sequence_start``, an ``id``
    answered before with other bits (HTTP 400 on v2, like Triton; gRPC ``INVALID_ARGUMENT``)."""

    code = "sequence_error"


class SequenceBusy(Conflict):
    """Another request of the same sequence held it for too long (HTTP 409, gRPC ``ABORTED``)."""

    code = "sequence_busy"


class NotReady(ServiceError):
    """Loading or stopping (HTTP 503, WebSocket 1013)."""

    code = "not_ready"


class Overloaded(ServiceError):
    """A capacity bound was hit; retry after ``retry_after_s`` (HTTP 503 + Retry-After, 1013)."""

    code = "overloaded"

    def __init__(self, detail: str, code: str | None = None, retry_after_s: float = 1.0) -> None:
        super().__init__(detail, code)
        self.retry_after_s = retry_after_s


class GoingAway(ServiceError):
    """The server ends a connection: it is shutting down (HTTP 503, WebSocket 1001)."""

    code = "going_away"


class IdleTimeout(ServiceError):
    """A connection sent nothing for too long and is closed (HTTP 408, WebSocket 1001)."""

    code = "idle_timeout"


class DeadlineExceeded(ServiceError):
    """The work did not finish within its deadline (HTTP 504, WebSocket 1011)."""

    code = "timeout"


class ModelFailed(ServiceError):
    """The model call itself raised (HTTP 500, WebSocket 1011); the cause is in the log."""

    code = "internal_error"


class StoreUnavailable(Overloaded):
    """The session store (Redis) could not be reached in time (HTTP 503, WebSocket 1013)."""

    code = "store_unavailable"


class LeaseLost(Conflict):
    """Another connection attached the session meanwhile: this one's fence is stale."""

    code = "lease_lost"

    def __init__(self, detail: str = "another connection attached the session") -> None:
        super().__init__(detail)
