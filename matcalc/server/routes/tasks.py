"""Task endpoints: submit (one per type, or a batch), list, get, result, cancel, logs.

(The live log stream, ``GET /tasks/{id}/logs/stream``, belongs to the observability layer and
subscribes to ``app.state.bus``.)
"""

import hashlib
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import AwareDatetime, BeforeValidator

from matcalc.server.envelope import ok
from matcalc.server.auth import require_api_key
from matcalc.server.errors import ApiError, ErrorCode
from matcalc.server.routes import COMMON_ERRORS, error_responses, service, store
from matcalc.server.schemas import (
    REQUEST_TYPES,
    BatchOut,
    BatchRequest,
    CancelOut,
    Envelope,
    LogOut,
    PriorityName,
    StatusName,
    TaskOut,
    TaskPage,
    TaskRequestBase,
    TaskResultOut,
)
from matcalc.store import NotFoundError, TaskFilter
from matcalc.store.repository import IdempotencyClaim
from matcalc.submission import IDEMPOTENCY_HEADER, option

router = APIRouter(prefix="/tasks", tags=["tasks"], dependencies=[Depends(require_api_key)],
                   responses=COMMON_ERRORS)

TaskId = Annotated[str, Path(min_length=1, max_length=64, description="task id")]


def _iso_only(value: Any) -> Any:
    """Timestamps as ISO 8601 text only (pydantic would read a bare number as UNIX seconds)."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return value
        raise ValueError("expected an ISO 8601 date-time with a timezone, e.g. 2026-01-01T00:00:00Z")
    return value


Timestamp = Annotated[AwareDatetime, BeforeValidator(_iso_only)]


def _get(request: Request, task_id: str) -> Any:
    try:
        return store(request).get_task(task_id)
    except NotFoundError as exc:
        raise ApiError(ErrorCode.TASK_NOT_FOUND, f"task {task_id!r} not found") from exc


def _audit(request: Request, message: str, **extra: Any) -> None:
    """One audit record (who did what): the client identity is the API key's fingerprint or the address."""
    from matcalc.server.logs import audit_log

    audit_log.info(message, extra={"client": getattr(request.state, "client_id", None), **extra})


IdempotencyKeyHeader = Annotated[str | None, Header(
    alias=IDEMPOTENCY_HEADER, description="any unique string (1-255 visible ASCII characters, e.g. a UUID): a "
    "repeated submission with the same key and body returns the task(s) stored the first time instead of new "
    "ones (`Idempotent-Replayed: true`); the same key with another body or endpoint is 422/40017. Keys are kept "
    "with their tasks (across restarts), per API key.")]


def _claim(request: Request, key: str | None, body: Any) -> IdempotencyClaim | None:
    """The idempotency claim of this submission (``None`` without the header); 400/40016 for a bad key."""
    if key is None:
        return None
    try:
        option("idempotency_key").coerce(key)
    except ValueError:
        raise ApiError(ErrorCode.INVALID_HEADER, f"{IDEMPOTENCY_HEADER} must be 1-255 visible ASCII characters "
                       "(e.g. a UUID)", data={"header": IDEMPOTENCY_HEADER}) from None
    client = getattr(request.state, "client_id", None) or ""
    scope = client if client.startswith("key:") else ""  # per API key; one scope on a server without keys
    payload = json.dumps(body.model_dump(mode="json", exclude_unset=True), sort_keys=True, separators=(",", ":"))
    return IdempotencyClaim(scope=scope, key=key, endpoint=f"POST {request.url.path.removeprefix('/api/v1')}",
                            request_sha256=hashlib.sha256(payload.encode()).hexdigest())


def _replayed(response: Response, replayed: bool) -> None:
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"


def _submit_one(request: Request, response: Response, body: TaskRequestBase, key: str | None) -> dict[str, Any]:
    _, rows, replayed = service(request).submit_once([body], idempotency=_claim(request, key, body))
    _replayed(response, replayed)
    if replayed:
        return ok(TaskOut.of(rows[0]), f"{body.type} task already submitted with this {IDEMPOTENCY_HEADER}")
    _audit(request, f"task {rows[0].id} submitted ({body.type}, model {rows[0].model})", task_id=rows[0].id,
           action="submit")
    return ok(TaskOut.of(rows[0]), f"{body.type} task queued")


_TASK_ID = "$response.body#/data/id"
TASK_LINKS = {"links": {
    "GetTask": {"operationId": "get_task", "parameters": {"task_id": _TASK_ID}},
    "GetResult": {"operationId": "get_result", "parameters": {"task_id": _TASK_ID}},
    "GetLogs": {"operationId": "task_logs", "parameters": {"task_id": _TASK_ID}},
    "CancelTask": {"operationId": "cancel_task", "parameters": {"task_id": _TASK_ID}},
}}


def _make_submit(task_type: str, req_cls: type[TaskRequestBase]) -> None:
    def submit(request: Request, response: Response, body: req_cls,  # type: ignore[valid-type]
               idempotency_key: IdempotencyKeyHeader = None) -> dict[str, Any]:
        return _submit_one(request, response, body, idempotency_key)

    submit.__name__ = f"submit_{task_type.replace('-', '_')}"
    submit.__doc__ = f"Submit a {task_type} task. {req_cls.__doc__ or ''}".strip()
    router.add_api_route(f"/{task_type}", submit, methods=["POST"], status_code=status.HTTP_201_CREATED,
                         response_model=Envelope[TaskOut], summary=f"Submit a {task_type} task",
                         responses=error_responses(409), openapi_extra={"responses": {"201": TASK_LINKS}})


for _type, _cls in REQUEST_TYPES.items():
    _make_submit(_type, _cls)


@router.post("/batch", status_code=status.HTTP_201_CREATED, response_model=Envelope[BatchOut],
             summary="Submit many tasks atomically")
def submit_batch(request: Request, response: Response, body: BatchRequest,
                 idempotency_key: IdempotencyKeyHeader = None) -> dict[str, Any]:
    """Every task is validated first; if any is invalid nothing is stored and the error names its index."""
    batch_id, rows, replayed = service(request).submit_once(body.tasks, batch=True,
                                                            idempotency=_claim(request, idempotency_key, body))
    assert batch_id is not None
    _replayed(response, replayed)
    if replayed:
        return ok(BatchOut(batch_id=batch_id, tasks=[TaskOut.of(r) for r in rows]),
                  f"batch already submitted with this {IDEMPOTENCY_HEADER}")
    _audit(request, f"batch {batch_id} of {len(rows)} tasks submitted", action="submit_batch", batch_id=batch_id,
           task_ids=[r.id for r in rows])
    return ok(BatchOut(batch_id=batch_id, tasks=[TaskOut.of(r) for r in rows]), f"{len(rows)} tasks queued")


@router.get("", response_model=Envelope[TaskPage], summary="List tasks (newest first)")
def list_tasks(
    request: Request,
    status_: Annotated[list[StatusName] | None, Query(alias="status", description="repeat for several")] = None,
    type: Annotated[str | None, Query(max_length=32)] = None,  # noqa: A002 - the API's name
    model: Annotated[str | None, Query(max_length=128)] = None,
    priority: PriorityName | None = None,
    batch_id: Annotated[str | None, Query(max_length=32)] = None,
    label: Annotated[str | None, Query(max_length=256, description="exact label")] = None,
    created_after: Timestamp | None = None,
    created_before: Timestamp | None = None,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    page_size: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    f = TaskFilter(status=status_, type=type, model=model, priority=priority, batch_id=batch_id, label=label,
                   created_after=created_after, created_before=created_before)
    p = store(request).list_tasks(f, page=page, page_size=page_size)
    return ok(TaskPage(items=[TaskOut.of(t) for t in p.items], total=p.total, page=p.page, page_size=p.page_size))


@router.get("/{task_id}", response_model=Envelope[TaskOut], responses=error_responses(404), summary="Get a task")
def get_task(request: Request, task_id: TaskId) -> dict[str, Any]:
    return ok(TaskOut.of(_get(request, task_id)))


@router.get("/{task_id}/result", response_model=Envelope[TaskResultOut], responses=error_responses(404, 409),
            summary="The result of a completed task")
def get_result(request: Request, task_id: TaskId) -> dict[str, Any]:
    """``data.result`` is ``Result.to_dict()``; rebuild the dataclass with ``matcalc.Result.from_dict``."""
    row = _get(request, task_id)
    if row.status == "COMPLETED":
        return ok(TaskResultOut(task_id=row.id, type=row.type, kind=(row.result or {}).get("kind"),
                                result=row.result or {}))
    code = {"FAILED": ErrorCode.TASK_FAILED, "CANCELLED": ErrorCode.TASK_CANCELLED,
            "TIMEOUT": ErrorCode.TASK_TIMED_OUT}.get(row.status, ErrorCode.TASK_NOT_FINISHED)
    msg = f"task {row.id} is {row.status}" + (f": {row.error}" if row.error else "")
    raise ApiError(code, msg, data={"status": row.status, "error": row.error})


@router.post("/{task_id}/cancel", response_model=Envelope[CancelOut], responses=error_responses(404, 409),
             summary="Cancel a queued or running task")
def cancel_task(request: Request, task_id: TaskId) -> dict[str, Any]:
    _get(request, task_id)
    changed, status_after = service(request).cancel(task_id)
    if changed:
        _audit(request, f"task {task_id} cancelled", task_id=task_id, action="cancel")
    if not changed:
        raise ApiError(ErrorCode.TASK_ALREADY_FINISHED, f"task {task_id} already finished ({status_after})",
                       data={"status": status_after})
    return ok(CancelOut(task_id=task_id, status=status_after, cancelled=True), "task cancelled")


@router.get("/{task_id}/logs", response_model=Envelope[list[LogOut]], responses=error_responses(404),
            summary="Stored log lines of a task")
async def task_logs(
    request: Request,
    task_id: TaskId,
    level: Annotated[str | None, Query(pattern="^(?i:debug|info|warning|error|critical)$",
                                       description="minimum level")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    after: Annotated[int | None, Query(ge=0, le=2**62, description="continue after this log id")] = None,
) -> dict[str, Any]:
    def fetch() -> list[LogOut]:
        _get(request, task_id)
        rows = store(request).get_logs(task_id, level=level, limit=limit, after=after)
        return [LogOut(id=r.id, timestamp=r.timestamp, level=r.level, event=r.event, message=r.message, data=r.data)
                for r in rows]

    return ok(await run_in_threadpool(fetch))
