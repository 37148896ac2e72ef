"""The application's typed state: what ``app.state`` holds, and one accessor for routes.

``create_app`` sets ``app.state`` to an :class:`AppState`; the lifespan fills in the services
(models resolved, services built, not yet started). Routes read it with :func:`app_state`
instead of untyped ``request.app.state`` lookups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from starlette.requests import HTTPConnection

from app.core.config import Settings
from app.core.errors import NotReady

if TYPE_CHECKING:
    from app.services.digit_service import DigitService
    from app.services.echo_sequences import EchoSequences
    from app.services.echo_service import EchoService
    from app.services.model_repository import ModelRepository
    from app.services.uploads import UploadLimiter


@dataclass
class Lifecycle:
    """``loading`` → ``ready`` → ``stopping``, or ``failed`` with an error."""

    status: str = "loading"
    error: str | None = None


@dataclass
class AppState:
    """Settings, lifecycle and the services (``None`` until the lifespan built them)."""

    settings: Settings
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    models: ModelRepository | None = None
    echo: EchoService | None = None
    sequences: EchoSequences | None = None  # v2 sequences on echo_rnn (HTTP and gRPC)
    uploads: UploadLimiter | None = None

    def digit_service(self, version: int | None = None) -> DigitService:
        """The digit service of ``version`` (default: the newest available) if it serves now;
        ``NotReady`` while loading or stopping, ``NotFound`` for a version not available."""
        if self.models is None or self.lifecycle.status not in ("ready", "stopping"):
            raise NotReady("the digit model is not ready (loading or stopping)")
        service = self.models.digit_service(version)
        if not service.ready:
            raise NotReady("the digit model is not ready (loading or stopping)")
        return service


def app_state(conn: HTTPConnection) -> AppState:
    """The typed state of the app serving ``conn`` (a ``Request`` or a ``WebSocket``)."""
    return cast(AppState, conn.app.state)
