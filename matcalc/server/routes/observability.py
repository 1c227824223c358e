"""Observability endpoints: live log streams (SSE), alerts, Prometheus metrics.

* ``GET /tasks/{id}/logs/stream``: ``text/event-stream``; every stored log record of the task (the
  backlog first, then new ones as they are written) as one event with ``id: <log id>`` and one
  ``data:`` line of JSON (the fields of ``GET /tasks/{id}/logs`` plus ``task_id``); the stream ends
  with ``event: end`` once the task reached a terminal status and its last records were sent.
  ``after`` (or the ``Last-Event-ID`` header) resumes after a log id; ``level`` is a minimum.
* ``GET /system/logs/stream`` (admin): the server's structured log records, live (after a replay of
  the last ``backlog`` records), until the client disconnects.
* ``GET /tasks/{id}/webhooks`` and ``GET /system/webhooks`` (admin): webhook deliveries with every attempt.
* ``GET /system/alerts/rules|active|history``.
* ``GET /metrics`` (and ``/api/v1/metrics``): Prometheus text format.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from matcalc.server.envelope import ok
from matcalc.server.auth import api_key_scheme, require_admin, require_api_key
from matcalc.server.errors import ApiError, ErrorCode
from matcalc.server.logs import (
    END_OF_LOG,
    HEARTBEAT,
    MAX_LOG_ID,
    TaskLogFeeds,
    level_at_least,
    parse_last_event_id,
    sse,
)
from matcalc.server.metrics import CONTENT_TYPE
from matcalc.server.routes import COMMON_ERRORS, error_responses, store
from matcalc.server.schemas import Envelope
from matcalc.store import NotFoundError
from matcalc.tasks import TERMINAL

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


def _rows_after(st: Any, task_id: str, cursor: int | None) -> list[dict[str, Any]]:
    """Every stored log record of the task after ``cursor`` (paged reads of ``PAGE`` rows)."""
    out: list[dict[str, Any]] = []
    while True:
        rows = st.get_logs(task_id, limit=PAGE, after=cursor)
        out.extend(_record(r) for r in rows)
        if rows:
            cursor = rows[-1].id
        if len(rows) < PAGE:
            return out


def _feeds(request: Request) -> TaskLogFeeds:
    """The app's shared task log feeds (one store read per new batch of lines, for every stream)."""
    feeds = getattr(request.app.state, "log_feeds", None)
    if feeds is None:
        st = store(request)
        metrics = _obs(request).metrics

        def start(task_id: str) -> tuple[int | None, bool]:
            from sqlalchemy import func, select

            from matcalc.store.models import TaskLog

            ended = st.get_task(task_id).status in TERMINAL
            with st.read() as s:
                return s.scalar(select(func.max(TaskLog.id)).where(TaskLog.task_id == task_id)), ended

        def read(task_id: str, cursor: int | None, check_status: bool) -> tuple[list[dict[str, Any]], bool]:
            ended = check_status and st.get_task(task_id).status in TERMINAL
            return _rows_after(st, task_id, cursor), ended

        feeds = TaskLogFeeds(request.app.state.bus, start, read, poll_s=request.app.state.settings.sse_poll_s,
                             on_read=metrics.log_stream_reads.inc)
        request.app.state.log_feeds = feeds
    return feeds


@router.get("/tasks/{task_id}/logs/stream", tags=["tasks"], response_class=StreamingResponse,
            responses={200: SSE_DOC, **error_responses(400, 404)}, summary="Live log of a task (Server-Sent Events)",
            dependencies=[Depends(require_api_key)])
async def stream_task_logs(
    request: Request,
    task_id: Annotated[str, Path(min_length=1, max_length=64, description="task id")],
    level: LevelQ = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_LOG_ID, description="continue after this log id")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", include_in_schema=False)] = None,
) -> StreamingResponse:
    """Replays the stored log of the task, then follows it until the task ends (then ``event: end``).

    Resumes after the larger of ``after`` and the ``Last-Event-ID`` header (which must be a log id,
    a plain integer 0..2^63-1, else 400 with code 40016)."""
    try:
        resume = parse_last_event_id(last_event_id)
    except ValueError as exc:
        raise ApiError(ErrorCode.INVALID_HEADER, str(exc)) from exc
    st = store(request)
    try:
        await run_in_threadpool(st.get_task, task_id)
    except NotFoundError as exc:
        raise ApiError(ErrorCode.TASK_NOT_FOUND, f"task {task_id!r} not found") from exc
    given = [c for c in (after, resume) if c is not None]
    start_after = max(given) if given else None
    heartbeat_s = request.app.state.settings.sse_heartbeat_s
    metrics = _obs(request).metrics
    feeds = _feeds(request)

    async def events() -> AsyncIterator[bytes]:
        metrics.sse_open("task", +1)
        joined = None
        try:
            joined = _feed, stream = await feeds.join(task_id)  # before the backlog read: nothing falls between
            last = start_after

            def send(records: list[dict[str, Any]]) -> Iterator[bytes]:
                nonlocal last
                for rec in records:
                    if last is not None and rec["id"] <= last:
                        continue  # already sent (the backlog and the feed overlap)
                    last = rec["id"]
                    if level_at_least(rec["level"], level):
                        yield sse(rec, id=rec["id"])

            for chunk in send(await run_in_threadpool(_rows_after, st, task_id, last)):
                yield chunk
            while True:
                if stream.lagged:  # fell behind the feed: catch up from the store
                    stream.lagged = False
                    for chunk in send(await run_in_threadpool(_rows_after, st, task_id, last)):
                        yield chunk
                try:
                    batch = await asyncio.wait_for(stream.queue.get(), heartbeat_s)
                except TimeoutError:
                    yield HEARTBEAT
                    continue
                if batch is END_OF_LOG:
                    if stream.lagged:
                        for chunk in send(await run_in_threadpool(_rows_after, st, task_id, last)):
                            yield chunk
                    yield sse(event="end")
                    return
                for chunk in send(batch):
                    yield chunk
        finally:
            if joined is not None:
                feeds.leave(*joined)
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
    """Every structured log record of the server (JSON, see `matcalc.server.logs`) until the
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


# ----------------------------------------------------------------------------- webhook deliveries
DeliveryStatus = Literal["PENDING", "DELIVERED", "FAILED"]


class DeliveryAttemptOut(BaseModel):
    attempt: int
    at: str
    """When the attempt started (UTC, ISO 8601)."""
    status_code: int | None
    """The receiver's HTTP status (``None``: no answer: refused, timed out...)."""
    success: bool
    error: str | None
    duration_s: float | None


class DeliveryOut(BaseModel):
    id: str
    """The delivery id (the ``X-Matcalc-Delivery`` header of every attempt)."""
    task_id: str | None
    event: str
    url: str
    status: DeliveryStatus
    created_at: str
    finished_at: str | None
    next_attempt_at: str | None
    """When the next attempt is due (PENDING only)."""
    last_status_code: int | None
    last_error: str | None
    payload: dict[str, Any]
    attempts: list[DeliveryAttemptOut]


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    total: int
    page: int
    page_size: int


def _outbox(request: Request) -> Any:
    from matcalc.store.outbox import Outbox

    return Outbox(store(request))


PageQ = Annotated[int, Query(ge=1, le=1_000_000)]
PageSizeQ = Annotated[int, Query(ge=1, le=500)]


@router.get("/tasks/{task_id}/webhooks", tags=["tasks"], response_model=Envelope[DeliveryPage],
            responses=error_responses(404), dependencies=[Depends(require_api_key)],
            summary="Webhook deliveries of a task, every attempt with its status code and time")
def task_webhooks(
    request: Request,
    task_id: Annotated[str, Path(min_length=1, max_length=64, description="task id")],
    page: PageQ = 1,
    page_size: PageSizeQ = 100,
) -> dict[str, Any]:
    """The task's deliveries in the order their events happened."""
    try:
        store(request).get_task(task_id)
    except NotFoundError as exc:
        raise ApiError(ErrorCode.TASK_NOT_FOUND, f"task {task_id!r} not found") from exc
    items, total = _outbox(request).list(task_id=task_id, page=page, page_size=page_size)
    return ok(DeliveryPage(items=items, total=total, page=page, page_size=page_size))


@router.get("/system/webhooks", tags=["system"], response_model=Envelope[DeliveryPage],
            responses=error_responses(403), dependencies=[Depends(require_admin)],
            summary="All webhook deliveries, newest first (admin)")
def system_webhooks(
    request: Request,
    status: DeliveryStatus | None = None,
    event: Annotated[str | None, Query(max_length=32)] = None,
    page: PageQ = 1,
    page_size: PageSizeQ = 50,
) -> dict[str, Any]:
    """Task and alert deliveries (alerts have ``task_id`` null); filter by ``status`` and ``event``."""
    items, total = _outbox(request).list(status=status, event=event, page=page, page_size=page_size)
    return ok(DeliveryPage(items=items, total=total, page=page, page_size=page_size))


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
