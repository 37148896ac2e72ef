"""Operations endpoints: liveness, readiness, model listing and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.responses import OrjsonResponse
from app.core.errors import NotReady
from app.core.metrics import exposition
from app.schemas.common import HealthResponse, ModelsResponse
from app.state import app_state

router = APIRouter(tags=["operations"])


@router.get(
    "/livez",
    response_model=HealthResponse,
    response_model_exclude_none=True,
    summary="The process is up",
)
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/readyz",
    response_model=HealthResponse,
    summary="Both models are loaded and warmed (503 while loading, after a failure, or stopping)",
    description="200 `ready`; 200 `degraded` with a detail while the echo session store (Redis) "
    "is unreachable (or fewer than ECHO_STORE_MIN_REPLICAS replicas acknowledge its writes): "
    "digits still serve, new echo sessions are refused, so the replica stays in the load "
    "balancer.",
    responses={503: {"model": HealthResponse}},
)
async def readyz(request: Request) -> OrjsonResponse:
    state = app_state(request)
    lifecycle = state.lifecycle
    body = {"status": lifecycle.status}
    if lifecycle.error:
        body["detail"] = lifecycle.error
    durable = state.echo.durable if state.echo is not None else None
    if lifecycle.status == "ready" and durable is not None and durable.status() != "ok":
        body = {
            "status": "degraded",
            "detail": f"echo session store {durable.status()}; new echo sessions are refused, "
            "digits serve",
        }
    return OrjsonResponse(body, status_code=200 if lifecycle.status == "ready" else 503)


@router.get("/v1/models", response_model=ModelsResponse, summary="Served models and their metrics")
async def list_models(request: Request) -> dict:
    state = app_state(request)
    if state.models is None:
        raise NotReady("the models are not resolved yet")
    durable = state.echo.durable if state.echo is not None else None
    store = {"kind": "memory", "status": "ok"}
    if durable is not None:
        store = {"kind": "redis", "status": durable.status()}
    return {**state.models.describe(), "echo_store": store}


@router.get(
    "/metrics",
    summary="Prometheus metrics (of every worker, summed, with WEB_CONCURRENCY > 1)",
    response_class=Response,
)
async def metrics() -> Response:
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)
