"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from dropwise.service.inference import InferenceService
from dropwise.service.metrics import CONTENT_TYPE, ServiceMetrics
from dropwise.service.schemas import Health
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get(
    "/healthz", response_model=Health, response_model_exclude_none=True, summary="Liveness: the process answers"
)
async def healthz() -> Health:
    """Always `{"status": "ok"}` while the server runs."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="Readiness: every model is loaded",
    responses={503: {"model": Health, "description": "Not ready (loading, a model failed, or no models)."}},
)
async def readyz(request: Request) -> JSONResponse:
    """200 when at least one model is served and every package found is loaded; 503 otherwise, with
    `waiting_for` saying what is missing (the model being loaded, failed packages, or no packages)."""
    service: InferenceService = request.app.state.inference
    models = {info.name: info.ready for info in service.models()}
    ready = service.ready()
    body = Health(
        status="ready" if ready else "not ready",
        models=models,
        errors=dict(service.repository.errors),
        waiting_for=None if ready else service.waiting_for(),
    )
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Request counts, latency and queue-time histograms, queue depth, batch sizes, MC sample counts."""
    registry: ServiceMetrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE)
