"""Operations endpoints: liveness, readiness, model listing and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.responses import OrjsonResponse
from app.schemas.common import HealthResponse, ModelsResponse
from app.services.errors import NotReady
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
    responses={503: {"model": HealthResponse}},
)
async def readyz(request: Request) -> OrjsonResponse:
    lifecycle = app_state(request).lifecycle
    body = {"status": lifecycle.status}
    if lifecycle.error:
        body["detail"] = lifecycle.error
    return OrjsonResponse(body, status_code=200 if lifecycle.status == "ready" else 503)


@router.get("/v1/models", response_model=ModelsResponse, summary="Served models and their metrics")
async def list_models(request: Request) -> dict:
    registry = app_state(request).registry
    if registry is None:
        raise NotReady("the models are not resolved yet")
    return registry.describe()


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
