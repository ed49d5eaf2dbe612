"""Liveness, readiness and the memory report."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.api.deps import (
    AdmissionDep,
    Authorized,
    EngineDep,
    MetricsAuthorized,
    MetricsDep,
    is_admin_key,
)
from server.api.memory_view import for_viewer
from server.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is alive and its event loop answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(engine: EngineDep) -> JSONResponse:
    """The model is loaded and the device known (503 until then, or if loading failed)."""
    body: dict[str, Any] = {
        "ready": engine.ready,
        "device": engine.device,
        "devices": engine.places,
        "device_reason": engine.device_reason,
        "model": engine.served.id if engine.served else None,
        "error": engine.load_error,
    }
    return JSONResponse(body, status_code=200 if engine.ready else 503)


@router.get("/v1/memory", dependencies=[Authorized])
async def memory(request: Request, engine: EngineDep, admission: AdmissionDep) -> dict[str, Any]:
    """Devices, free/total memory, resident models, reservations and recent plan decisions;
    with API keys, the caller's own requests only, unless its key is an admin key."""
    key_id = getattr(request.state, "api_key_id", None)
    report = engine.memory_report(in_flight=admission.depth)
    return for_viewer(report, key_id, sees_all=is_admin_key(key_id))


@router.get("/metrics", response_class=Response, dependencies=[MetricsAuthorized])
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics: requests, audio seconds, real-time factor, queue depth, batch sizes,
    degradations, OOM recoveries and memory per device. Needs the API key when keys are set,
    unless WHISPER_METRICS_PUBLIC."""
    return Response(metrics.render(), media_type=CONTENT_TYPE)
