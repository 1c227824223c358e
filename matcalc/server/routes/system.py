"""System endpoints: health (liveness + readiness), GPUs, queue statistics, config, error codes."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import matcalc
from matcalc.server.envelope import envelope, ok
from matcalc.server.auth import require_api_key
from matcalc.server.errors import ErrorCode
from matcalc.server.routes import COMMON_ERRORS, error_responses, service, store
from matcalc.server.schemas import Envelope, HealthOut, QueueOut

router = APIRouter(tags=["system"], responses=COMMON_ERRORS)
guarded = [Depends(require_api_key)]


class ErrorCodeOut(BaseModel):
    code: int
    name: str
    http_status: int
    description: str


@router.get("/health", response_model=Envelope[HealthOut], responses=error_responses(503),
            summary="Liveness and readiness (database, executor); no API key needed")
def health(request: Request) -> Any:
    checks: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    try:
        store(request).ping()
        checks["database"] = {"ok": True, "latency_ms": round((time.perf_counter() - t0) * 1e3, 2)}
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        checks["database"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    svc = service(request)
    ready_ex, detail = svc.executor.health()
    checks["executor"] = {"ok": ready_ex, "kind": svc.executor.name, "detail": detail}
    checks["accepting"] = {"ok": svc.accepting}
    ready = all(c["ok"] for c in checks.values())
    from matcalc.models.plugins import plugin_errors

    warnings = [f"model plugin {e}" for e in plugin_errors()]  # reported, not fatal
    data = HealthOut(status="ok" if ready else "degraded", live=True, ready=ready, checks=checks,
                     version=matcalc.__version__, uptime_s=round(time.time() - svc.started_at, 3), warnings=warnings)
    if ready:
        return ok(data)
    code = ErrorCode.DATABASE_UNAVAILABLE if not checks["database"]["ok"] else (
        ErrorCode.SHUTTING_DOWN if not checks["accepting"]["ok"] else ErrorCode.EXECUTOR_UNAVAILABLE)

    return JSONResponse(jsonable_encoder(envelope(code, "not ready", data)), status_code=503)


@router.get("/system/gpus", response_model=Envelope[list[dict[str, Any]]], dependencies=guarded,
            summary="GPUs seen through NVML (empty without a GPU)")
def gpus() -> dict[str, Any]:
    try:
        from matcalc.cluster import gpus as list_gpus
    except ImportError:
        return ok([])
    try:
        found = list_gpus()
    except Exception:  # noqa: BLE001 - NVML trouble means no usable GPU
        found = []
    return ok([dict(g) for g in found])


@router.get("/system/queue", response_model=Envelope[QueueOut], dependencies=guarded,
            summary="Task counts per priority and status, and the executor's state")
def queue(request: Request) -> dict[str, Any]:
    by_priority = store(request).queue_stats()
    by_status: dict[str, int] = {}
    for counts in by_priority.values():
        for s, n in counts.items():
            by_status[s] = by_status.get(s, 0) + n
    return ok(QueueOut(by_priority=by_priority, by_status=by_status, executor=service(request).executor.info()))


@router.get("/system/config", response_model=Envelope[dict[str, Any]], dependencies=guarded,
            summary="The server's effective configuration (secrets redacted)")
def config(request: Request) -> dict[str, Any]:
    """``plugins``: each model plugin (``MATCALC_PLUGINS``, entry points) and whether it imported;
    ``executor``: where tasks run (for a dask cluster: its kind, scheduler, ``dashboard`` link and the
    workers' ``batching`` page)."""
    from matcalc.models import plugin_status

    executor = service(request).executor.info()
    return ok({**request.app.state.settings.redacted(), "plugins": [p.to_dict() for p in plugin_status()],
               "executor": executor, "dashboard": executor.get("dashboard")})


@router.get("/system/error-codes", response_model=Envelope[list[ErrorCodeOut]], responses=error_responses(),
            summary="Every error code with its HTTP status and meaning")
def error_codes(request: Request) -> dict[str, Any]:
    return ok(request.app.state.error_codes)
