"""Domain errors → gRPC status codes, with Triton's codes wherever Triton has one.

Triton's gRPC server maps its errors onto ``INVALID_ARGUMENT`` (a bad request), ``NOT_FOUND``,
``UNAVAILABLE`` (not ready, overloaded), ``INTERNAL`` and ``UNIMPLEMENTED``; this table keeps
those and adds the codes gRPC has for what Triton does not do (API keys, deadlines, conflicts).
The message is the REST error's text, ``"<code>: <detail>"`` (``app.api.v2``), so that a client
reads the same words over both protocols. ``Overloaded`` adds a ``retry-after`` trailer
(seconds), as HTTP adds ``Retry-After``.
"""

from __future__ import annotations

import logging

import grpc

from app.core import errors as svc

log = logging.getLogger(__name__)

# The first matching class wins, so subclasses come before their bases.
STATUS_MAP: tuple[tuple[type[svc.ServiceError], grpc.StatusCode], ...] = (
    (svc.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (svc.Malformed, grpc.StatusCode.INVALID_ARGUMENT),
    (svc.TooLarge, grpc.StatusCode.INVALID_ARGUMENT),  # Triton: a batch over max is a bad arg
    (svc.UnsupportedMedia, grpc.StatusCode.INVALID_ARGUMENT),
    (svc.Unauthorized, grpc.StatusCode.UNAUTHENTICATED),
    (svc.Forbidden, grpc.StatusCode.PERMISSION_DENIED),
    (svc.NotFound, grpc.StatusCode.NOT_FOUND),
    (svc.Conflict, grpc.StatusCode.ABORTED),
    (svc.NotReady, grpc.StatusCode.UNAVAILABLE),
    (svc.Overloaded, grpc.StatusCode.UNAVAILABLE),
    (svc.GoingAway, grpc.StatusCode.UNAVAILABLE),
    (svc.IdleTimeout, grpc.StatusCode.UNAVAILABLE),
    (svc.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (svc.ModelFailed, grpc.StatusCode.INTERNAL),
)
INTERNAL_MESSAGE = "internal_error: internal server error"

Trailers = tuple[tuple[str, str], ...]


def grpc_status(exc: BaseException, where: str = "") -> tuple[grpc.StatusCode, str, Trailers]:
    """The status code, message and trailing metadata of any failure; an unexpected one is
    logged with its traceback and answered ``INTERNAL`` without details."""
    if isinstance(exc, svc.ServiceError):
        code = next((c for cls, c in STATUS_MAP if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)
        trailers: Trailers = ()
        if isinstance(exc, svc.Overloaded):
            trailers = (("retry-after", str(max(1, round(exc.retry_after_s)))),)
        return code, f"{exc.code}: {exc.detail}", trailers
    log.error("unhandled error", exc_info=exc, extra={"rpc": where})
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, ()
