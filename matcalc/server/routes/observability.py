"""Observability endpoints: live log streams (SSE), alerts, Prometheus metrics.

* ``GET /tasks/{id}/logs/stream``: ``text/event-stream``; every stored log record of the task (the
  backlog first, then new ones as they are written) as one event with ``id: <log id>`` and one
  ``data:`` line of JSON (the fields of ``GET /tasks/{id}/logs`` plus ``task_id``); the stream ends
  with ``event: end`` once the task reached a terminal status and its last records were sent.
  ``after`` (or the ``Last-Event-ID`` header) resumes after a log id; ``level`` is a minimum.
* ``GET /system/logs/stream`` (admin): the server's structured log records, live (after a replay of
  the last ``backlog`` records), until the client disconnects.
* ``GET /system/alerts/rules|active|history``.
* ``GET /metrics`` (and ``/api/v1/metrics``): Prometheus text format.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from matcalc.server.app import ok
from matcalc.server.auth import api_key_scheme, require_admin, require_api_key
from matcalc.server.errors import ApiError, ErrorCode
from matcalc.server.logs import HEARTBEAT, LEVELS, level_at_least, sse
from matcalc.server.metrics import CONTENT_TYPE
from matcalc.server.routes import COMMON_ERRORS, error_responses, store
from matcalc.server.schemas import Envelope
from matcalc.store import NotFoundError

router = APIRouter(responses=COMMON_ERRORS)
metrics_router = APIRouter(tags=["system"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DOC = {"content": {"text/event-stream": {"schema": {"type": "string"}}},
           "description": "Server-Sent Events, one JSON log record per `data:` line"}
LevelQ = Annotated[str | None, Query(pattern="^(?i:debug|info|warning|error|critical)$", description="minimum level")]
PAGE = 500


def _obs(request: Request) -> Any:
    return request.app.state.observability


def _record(row: Any) -> dict[str, Any]:
    return {"id": row.id, "task_id": row.task_id, "timestamp": row.timestamp.isoformat().replace("+00:00", "Z"),
            "level": row.level, "event": row.event, "message": row.message, "data": row.data}


async def _next_event(queue: asyncio.Queue[Any], timeout_s: float) -> tuple[bool, bool]:
    """Wait for bus traffic: ``(woken, ended)``; drains whatever else is queued."""
    ended = False
    try:
        item = await asyncio.wait_for(queue.get(), timeout_s)
    except TimeoutError:
        return False, False
    ended = item is None
    while not queue.empty():  # drain everything: a short-circuited get would spin here forever
        if queue.get_nowait() is None:
            ended = True
    return True, ended


@router.get("/tasks/{task_id}/logs/stream", tags=["tasks"], response_class=StreamingResponse,
            responses={200: SSE_DOC, **error_responses(404)}, summary="Live log of a task (Server-Sent Events)",
            dependencies=[Depends(require_api_key)])
async def stream_task_logs(
    request: Request,
    task_id: Annotated[str, Path(min_length=1, max_length=64, description="task id")],
    level: LevelQ = None,
    after: Annotated[int | None, Query(ge=0, le=2**62, description="continue after this log id")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", include_in_schema=False)] = None,
) -> StreamingResponse:
    """Replays the stored log of the task, then follows it until the task ends (then ``event: end``)."""
    st = store(request)
    try:
        await run_in_threadpool(st.get_task, task_id)
    except NotFoundError as exc:
        raise ApiError(ErrorCode.TASK_NOT_FOUND, f"task {task_id!r} not found") from exc
    if after is None and last_event_id and last_event_id.strip().isdigit():
        after = int(last_event_id.strip())
    settings = request.app.state.settings
    bus = request.app.state.bus
    metrics = _obs(request).metrics

    def fetch(cursor: int | None) -> tuple[list[dict[str, Any]], bool, int | None]:
        """New records after ``cursor`` (all of them) and whether the task had ended before reading."""
        ended = st.get_task(task_id).status in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
        out: list[dict[str, Any]] = []
        while True:
            rows = st.get_logs(task_id, limit=PAGE, after=cursor)
            for r in rows:
                cursor = r.id
                if level_at_least(r.level, level):
                    out.append(_record(r))
            if len(rows) < PAGE:
                return out, ended, cursor

    async def events() -> AsyncIterator[bytes]:
        metrics.sse_open("task", +1)
        try:
            with bus.subscribe(task_id) as sub:  # before the backlog read: nothing falls in between
                cursor = after
                loop = asyncio.get_running_loop()
                last_sent = loop.time()
                while True:
                    records, ended, cursor = await run_in_threadpool(fetch, cursor)
                    for rec in records:
                        yield sse(rec, id=rec["id"])
                    if records:
                        last_sent = loop.time()
                    if ended:
                        yield sse(event="end")
                        return
                    wait = min(settings.sse_poll_s, max(0.0, last_sent + settings.sse_heartbeat_s - loop.time()))
                    woken, _ = await _next_event(sub.queue, wait)
                    if not woken and loop.time() - last_sent >= settings.sse_heartbeat_s:
                        yield HEARTBEAT
                        last_sent = loop.time()
        finally:
            metrics.sse_open("task", -1)

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/system/logs/stream", tags=["system"], response_class=StreamingResponse,
            responses={200: SSE_DOC, **error_responses(403)}, summary="Live server log (admin; Server-Sent Events)",
            dependencies=[Depends(require_admin)])
async def stream_system_logs(
    request: Request,
    level: LevelQ = None,
    kind: Annotated[str | None, Query(pattern="^(system|task|access|audit)$")] = None,
    backlog: Annotated[int, Query(ge=0, le=100_000, description="recent records replayed first")] = 100,
) -> StreamingResponse:
    """Every structured log record of the server (JSON, see :mod:`matcalc.server.logs`) until the
    client disconnects; filter by minimum ``level`` and ``kind``."""
    obs = _obs(request)
    hub = obs.log_hub
    heartbeat_s = request.app.state.settings.sse_heartbeat_s

    def wanted(rec: dict[str, Any]) -> bool:
        return level_at_least(rec["level"], level) and (kind is None or rec.get("kind") == kind)

    async def events() -> AsyncIterator[bytes]:
        obs.metrics.sse_open("system", +1)
        try:
            with hub.bus.subscribe(hub.CHANNEL) as sub:
                recent = hub.snapshot()
                last_seq = 0
                for rec in recent[max(0, len(recent) - backlog):] if backlog else []:
                    last_seq = rec["seq"]
                    if wanted(rec):
                        yield sse(rec, id=rec["seq"])
                while True:
                    try:
                        rec = await asyncio.wait_for(sub.queue.get(), heartbeat_s)
                    except TimeoutError:
                        yield HEARTBEAT
                        continue
                    if rec is None or rec["seq"] <= last_seq:
                        continue
                    if wanted(rec):
                        yield sse({k: v for k, v in rec.items() if k != "task_id" or v is not None}, id=rec["seq"])
        finally:
            obs.metrics.sse_open("system", -1)

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


# ----------------------------------------------------------------------------- alerts
class AlertRuleOut(BaseModel):
    name: str
    description: str
    severity: str
    threshold: float | None
    unit: str
    enabled: bool


class AlertOut(BaseModel):
    id: int
    rule: str
    key: str | None
    severity: str
    message: str
    status: str
    opened_at: Any
    resolved_at: Any | None
    data: dict[str, Any]


class AlertPage(BaseModel):
    items: list[AlertOut]
    total: int
    page: int
    page_size: int


def _engine(request: Request) -> Any:
    engine = _obs(request).alerts
    if engine is None:
        raise ApiError(ErrorCode.EXECUTOR_UNAVAILABLE, "alerts are not running")
    return engine


@router.get("/system/alerts/rules", tags=["system"], response_model=Envelope[list[AlertRuleOut]],
            dependencies=[Depends(require_api_key)], summary="Alert rules with their thresholds")
def alert_rules(request: Request) -> dict[str, Any]:
    engine = _engine(request)
    return ok([r.info() for r in engine.rules.values()])


@router.get("/system/alerts/active", tags=["system"], response_model=Envelope[list[AlertOut]],
            dependencies=[Depends(require_api_key)], summary="Open alerts")
def alerts_active(request: Request) -> dict[str, Any]:
    return ok(_engine(request).open_alerts())


@router.get("/system/alerts/history", tags=["system"], response_model=Envelope[AlertPage],
            dependencies=[Depends(require_api_key)], summary="All alerts, newest first (paged)")
def alerts_history(
    request: Request,
    rule: Annotated[str | None, Query(max_length=64)] = None,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    page_size: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    items, total = _engine(request).history(page=page, page_size=page_size, rule=rule)
    return ok(AlertPage(items=items, total=total, page=page, page_size=page_size))


# ----------------------------------------------------------------------------- metrics
async def metrics_guard(request: Request, key: str | None = Security(api_key_scheme)) -> None:
    """The API key unless ``metrics_public``."""
    if not request.app.state.settings.metrics_public:
        await require_api_key(request, key)


METRICS_DOC: dict[int | str, dict[str, Any]] = {200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
                     "description": "Prometheus text exposition format"}}


async def _render(request: Request) -> Response:
    body = await run_in_threadpool(_obs(request).metrics.render)
    return Response(body, media_type=CONTENT_TYPE)


@metrics_router.get("/metrics", response_class=Response, responses={**METRICS_DOC, **COMMON_ERRORS},
                    dependencies=[Depends(metrics_guard)], summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    return await _render(request)


@router.get("/metrics", tags=["system"], response_class=Response, responses=METRICS_DOC,
            dependencies=[Depends(metrics_guard)], summary="Prometheus metrics (same as /metrics)")
async def api_metrics(request: Request) -> Response:
    return await _render(request)
