"""The FastAPI application: ``uvicorn app.main:app``.

Start-up checks that both models have a version the policies serve (a missing one stops the
process with the path in the error), then loads and warms them in the background while
``/livez`` already answers and ``/readyz`` says 503; only then does ``/readyz`` turn 200. The gRPC
service (``app.grpc``, ``GRPC_PORT``) starts and stops with the app, in the same event loop. From
then on ``MODEL_DIR`` is rescanned every ``MODEL_POLL_S`` and on SIGHUP
(``app.services.model_repository``): new versions load beside the running ones.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import orjson
from fastapi import FastAPI, Request, Response
from starlette.routing import Route

from app.api import digits, echo, health, pages, v2, v2_fast
from app.api.access import add_access_control
from app.api.errors import install_error_handlers
from app.api.responses import OrjsonResponse
from app.core.config import Settings, get_settings
from app.core.logging import configure_logging
from app.core.middleware import RequestGuard
from app.core.runtime import start_pacer, tune_runtime
from app.grpc.server import GrpcServer
from app.services.echo_sequences import EchoSequences
from app.services.echo_service import EchoService
from app.services.model_repository import ModelRepository, Version
from app.services.open_inference import SERVER_VERSION
from app.services.uploads import UploadLimiter
from app.state import AppState, Lifecycle

log = logging.getLogger(__name__)


async def _load(state: AppState) -> None:
    assert state.models and state.echo
    try:
        await state.echo.start()
        await state.models.sync()
        for name in state.models.versions:
            if state.models.default(name) is None:
                failed = [v for v in state.models.versions[name].values() if v.state == "failed"]
                raise RuntimeError(_why(name, failed))
        tune_runtime()
        start_pacer()
    except Exception as exc:
        state.lifecycle.status, state.lifecycle.error = "failed", str(exc)
        log.exception("model start-up failed; exiting", extra={"error": str(exc)})
        # Exit non-zero (3, as uvicorn does for a failed lifespan start-up) so that supervisors
        # see a failure; nothing is in flight yet that a graceful shutdown would drain.
        sys.stdout.flush()
        os._exit(3)
    if state.lifecycle.status == "loading":
        state.lifecycle.status = "ready"
        log.info("ready", extra={"device": state.models.device})
    _rescan_on_sighup(state.models)
    if state.settings.model_poll_s > 0:
        await state.models.poll()


def _why(name: str, failed: list[Version]) -> str:
    reasons = "; ".join(f"version {v.number}: {v.reason}" for v in failed)
    return f"no version of {name} could be loaded" + (f" ({reasons})" if reasons else "")


def _rescan_on_sighup(models: ModelRepository) -> None:
    """``kill -HUP``: rescan ``MODEL_DIR`` now (as the poll would)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def rescan() -> None:
        log.info("SIGHUP: rescanning the model directory")
        task = loop.create_task(models.sync(), name="model-rescan")
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    with suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
        loop.add_signal_handler(signal.SIGHUP, rescan)


def _report_stopping_on_sigterm(lifecycle: Lifecycle) -> None:
    """Chain uvicorn's SIGTERM/SIGINT handlers so /readyz turns 503 as soon as draining starts."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: object, previous=previous) -> None:
            if lifecycle.status != "failed":
                lifecycle.status = "stopping"
            previous(signum, frame)

        with suppress(ValueError):  # not in the main thread (e.g. under a test client)
            signal.signal(sig, handler)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state
    settings = state.settings
    state.lifecycle = lifecycle = Lifecycle()
    state.echo = echo_service = EchoService(settings)
    state.sequences = EchoSequences(echo_service)
    state.models = models = ModelRepository(settings, echo_service)  # fails fast: no model
    _report_stopping_on_sigterm(lifecycle)
    grpc_server = GrpcServer(state) if settings.grpc_port else None
    if grpc_server is not None:
        await grpc_server.start()  # in this event loop: its calls share the batchers
    loader = asyncio.create_task(_load(state))
    try:
        yield
    finally:
        if lifecycle.status != "failed":
            lifecycle.status = "stopping"
        loader.cancel()
        with suppress(asyncio.CancelledError):
            await loader
        if grpc_server is not None:
            await grpc_server.stop()
        await echo_service.stop()
        await models.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    app = FastAPI(
        title="RNN serving",
        version=SERVER_VERSION,
        summary="MNIST LSTM digit classifier and a stateful echo RNN over WebSocket.",
        lifespan=lifespan,
        default_response_class=OrjsonResponse,
    )
    uploads = UploadLimiter(
        settings.max_concurrent_uploads, settings.max_image_pixels, settings.max_image_side
    )
    app.state = AppState(settings, uploads=uploads)  # type: ignore[assignment]
    install_error_handlers(app)
    add_access_control(app, settings)  # API keys, browser origins (app.api.access)
    app.add_middleware(RequestGuard, max_body=settings.max_request_bytes)  # outermost
    # Raw-ASGI routes (app.api.raw_route) first: they take only what they answer as the
    # documented routes below do, without FastAPI's per-request machinery.
    app.router.routes += [digits.json_route(), v2_fast.V2InferRoute()]
    app.include_router(health.router)
    app.include_router(digits.router)
    app.include_router(echo.router)
    app.include_router(pages.router)
    app.include_router(v2.router)
    _serve_openapi_from_bytes(app)
    return app


def _serve_openapi_from_bytes(app: FastAPI) -> None:
    """``GET /openapi.json`` from bytes encoded once, instead of FastAPI's route, which encodes
    the whole schema again on every request (measured: ~1 ms of event-loop time each, so 200
    connections asking for it at once held another client's ``/livez`` for ~0.9 s in
    ``bench.attacks_round2``'s ``pipeline_openapi`` row). Same document, same path."""
    encoded: list[bytes] = []

    async def openapi(request: Request) -> Response:
        if not encoded:  # after every router is in: the first request
            encoded.append(orjson.dumps(app.openapi()))
        return Response(encoded[0], media_type="application/json")

    path = app.openapi_url
    app.router.routes = [
        Route(path, openapi, include_in_schema=False) if getattr(r, "path", None) == path else r
        for r in app.router.routes
    ]


app = create_app()
