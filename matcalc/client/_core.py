"""The one client core: every endpoint of `Client` and
`AsyncClient`, and the state logic of their task handles, written once.

Each endpoint is an operation (`matcalc.client._io`): it builds its `ApiRequest`,
hands it to `ClientCore._exchange` (the one place where requests are built with their
headers and retried) and turns the envelope's ``data`` into the typed answer. The sync and async
clients only perform the effects. The per-property methods (``bulk_modulus``, ``optimization``...)
are generated from the property declarations, so a new property gets them with no client code.
"""

from __future__ import annotations

import builtins
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

import httpx

from matcalc.calculations import properties
from matcalc.calculations.contract import Property
from matcalc.client._base import (
    ApiRequest,
    RetryPolicy,
    SSEDecoder,
    StructureLike,
    check_id,
    default_headers,
    model_upload,
    normalize_base_url,
    parse_response,
    route_missing,
    statuses,
    transport_error,
    upload_body,
)
from matcalc.client._errors import MatcalcError, ServerError, TaskFailed, TaskStateError
from matcalc.client._errors import TimeoutError as ClientTimeout
from matcalc.client._io import Close, Emit, Endpoint, Lines, NextLine, Op, ReadBody, Sleep, Transmit, endpoint, stream
from matcalc.client._models import CustomModelInfo, LogRecord, ModelInfo, Page, StructureInfo, TaskInfo
from matcalc.client._submit import (
    batch_entry,
    method_doc,
    method_names,
    method_signature,
    property_for,
    submission,
    task_type,
)
from matcalc.tasks import TaskSnapshot

if TYPE_CHECKING:
    from matcalc.calculations.results import Result

log = logging.getLogger("matcalc.client")

H = TypeVar("H")
"""The task handle of a surface (``RemoteTask`` / ``AsyncRemoteTask``)."""
C = TypeVar("C", bound="ClientCore[Any]")

EVENT_STREAM = "text/event-stream"


def _load_result(data: Any) -> Result:
    from matcalc.calculations import load_all
    from matcalc.calculations.results import Result

    load_all()  # registers every result kind for Result.from_dict
    if not isinstance(data, dict) or not isinstance(data.get("result"), dict):
        raise ServerError(f"unexpected result payload: {str(data)[:200]}")
    result: Result = Result.from_dict(data["result"])
    return result


def _page(data: Any, item: Any) -> Page[Any]:
    return Page([item(x) for x in data["items"]], int(data["total"]), int(data["page"]), int(data["page_size"]))


class ClientCore(Generic[H]):
    """Configuration and every endpoint of both clients (see `Client`).

    Args:
        base_url: the server (``http://host:port``; ``/api/v1`` is appended when missing).
        api_key: sent as ``X-API-Key``.
        timeout: seconds per HTTP request (not per task: see ``RemoteTask.wait``).
        retries: retries of idempotent calls (GET, cancel, and task submissions, which always carry an
            ``Idempotency-Key``) on connection errors, HTTP 503 and 429, with exponential backoff from
            ``backoff_s`` (at most ``max_backoff_s``); uploads and model loads are never retried.
        poll_interval: seconds between polls of the callback poller (sync client).
        headers: extra headers sent with every request.
        transport: an httpx transport (``httpx.BaseTransport`` for ``Client``, ``httpx.AsyncBaseTransport``
            for ``AsyncClient``; tests: ``httpx.MockTransport``, which is both).
    """

    handle_name: ClassVar[str] = "H"
    """Name of the surface's task handle class (signatures of the generated methods)."""
    _http: Any

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0, retries: int = 3, *,
                 backoff_s: float = 0.5, max_backoff_s: float = 8.0, poll_interval: float = 1.0,
                 headers: Mapping[str, str] | None = None, transport: Any = None) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0 seconds, got {poll_interval!r}")
        self.base_url = normalize_base_url(base_url)
        self.api_key = api_key
        self.timeout = float(timeout)
        self.retry = RetryPolicy(retries=retries, backoff_s=backoff_s, max_backoff_s=max_backoff_s)
        self.poll_interval = float(poll_interval)
        self._http = self._connect({"base_url": self.base_url + "/", "headers": default_headers(api_key, headers),
                                    "timeout": self.timeout, "transport": transport})

    def _connect(self, options: dict[str, Any]) -> Any:
        """The surface's httpx client, made with ``options``."""
        raise NotImplementedError

    def _handle(self, info: TaskInfo) -> H:
        """The surface's task handle of ``info``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.base_url}>"

    # ------------------------------------------------------------------ the one exchange
    def _exchange(self, req: ApiRequest, *, stream: bool = False) -> Op[Any]:
        """Send ``req`` (headers: the client's, then the request's), retried by `retry`; the
        envelope's ``data``, or the mapped `MatcalcError`. With ``stream``, a successful
        event stream comes back as the open response instead."""
        attempt = 0
        while True:
            try:
                response = yield Transmit(req.build(self._http), stream)
            except httpx.TransportError as exc:
                if not self.retry.retry_error(req, exc, attempt):
                    raise transport_error(exc, req, attempt + 1) from exc
                delay, why = self.retry.delay(attempt), repr(exc)
            else:
                if not self.retry.retry_response(req, response, attempt):
                    if stream and response.is_success and EVENT_STREAM in response.headers.get("content-type", ""):
                        return response
                    if stream:
                        yield ReadBody(response)
                    return parse_response(response)
                delay, why = self.retry.delay(attempt, response), f"HTTP {response.status_code}"
                yield Close(response)
            log.info("%s %s: %s; retry %d in %.2f s", req.method, req.path, why, attempt + 1, delay)
            yield Sleep(delay)
            attempt += 1

    # ------------------------------------------------------------------ task submission
    def _submit(self, spec: Property[Any], structure: StructureLike, model: Any,
                given: Mapping[str, Any]) -> Op[H]:
        data = yield from self._exchange(submission(spec, structure, model, given))
        return self._handle(TaskInfo.from_json(data))

    @endpoint
    def submit(self, /, kind: str, structure: StructureLike, model: str = "chgnet", **params: Any) -> Op[H]:
        """Submit any task type by name (``relax``/``optimization``, ``bulk_modulus``/``bulk-modulus``...)
        with that property's keywords and the task options; checked here first, like the property's
        own method."""
        return (yield from self._submit(property_for(kind), structure, model, params))

    @endpoint
    def submit_batch(self, specs: Iterable[Mapping[str, Any]], *, idempotency_key: str | None = None) -> Op[list[H]]:
        """Submit many tasks atomically (all stored, or none: the error names the bad index), under one
        Idempotency-Key (``idempotency_key``, default a new random one).

        Each spec is ``{"type": "relax", "structure": ..., "model": "emt", **parameters}`` with the
        structure in any accepted form (or ``builtin``/``structure_id``); each is checked here first."""
        tasks = [batch_entry(s, i) for i, s in enumerate(specs)]
        if not tasks:
            raise ValueError("submit_batch needs at least one task spec")
        data = yield from self._exchange(ApiRequest.submission("/tasks/batch", {"tasks": tasks}, idempotency_key))
        return [self._handle(TaskInfo.from_json(t)) for t in data["tasks"]]

    # ------------------------------------------------------------------ tasks
    def _fetch_task(self, task_id: str) -> Op[TaskInfo]:
        return TaskInfo.from_json((yield from self._exchange(ApiRequest.get(f"/tasks/{check_id(task_id)}"))))

    def _fetch_result(self, task_id: str) -> Op[Result]:
        return _load_result((yield from self._exchange(ApiRequest.get(f"/tasks/{check_id(task_id)}/result"))))

    @endpoint
    def get_task(self, task_id: str) -> Op[H]:
        """The task with this id (``NotFoundError`` if there is none)."""
        return self._handle((yield from self._fetch_task(task_id)))

    @endpoint
    def list_tasks(self, *, status: str | Iterable[str] | None = None, type: str | None = None,  # noqa: A002
                   model: str | None = None, priority: str | None = None, batch_id: str | None = None,
                   label: str | None = None, created_after: datetime | str | None = None,
                   created_before: datetime | str | None = None, page: int = 1, page_size: int = 50) -> Op[Page[H]]:
        """Tasks, newest first, filtered (``status`` one or several; ``type`` as REST or function name;
        ``label`` exact)."""
        data = yield from self._exchange(ApiRequest.get("/tasks", {
            "status": statuses(status), "type": task_type(type) if type else None, "model": model,
            "priority": priority, "batch_id": batch_id, "label": label, "created_after": created_after,
            "created_before": created_before, "page": page, "page_size": page_size}))
        return _page(data, lambda t: self._handle(TaskInfo.from_json(t)))

    def _cancel(self, task_id: str) -> Op[bool]:
        """Cancel a queued or running task; False when it had already finished. Retried safely."""
        try:
            data = yield from self._exchange(ApiRequest.post(f"/tasks/{check_id(task_id)}/cancel", idempotent=True))
        except TaskStateError as exc:
            if exc.code == 50003:
                return False
            raise
        return bool(data.get("cancelled", True)) if isinstance(data, dict) else True

    cancel = endpoint(_cancel)

    def _task_logs(self, task_id: str, level: str | None, limit: int, after: int | None) -> Op[list[LogRecord]]:
        data = yield from self._exchange(ApiRequest.get(f"/tasks/{check_id(task_id)}/logs",
                                                        {"level": level, "limit": limit, "after": after}))
        return [LogRecord.from_json(r) for r in data or []]

    def _log_stream(self, task_id: str, level: str | None, poll: float, read_timeout_s: float | None) -> Op[None]:
        """Emit the task's log records live (SSE) until it ends; polls ``/logs?after=`` on a server
        without the stream, or when the stream closed before the task ended."""
        req = ApiRequest.get(f"/tasks/{check_id(task_id)}/logs/stream", {"level": level},
                             headers={"Accept": EVENT_STREAM}, timeout=httpx.Timeout(self.timeout, read=read_timeout_s))
        last_id: int | None = None
        try:
            response = yield from self._exchange(req, stream=True)
            if not isinstance(response, httpx.Response):
                raise TaskStateError(f"GET {req.path}: not an event stream")
            decoder = SSEDecoder()
            lines = yield Lines(response)
            while not decoder.ended and (line := (yield NextLine(lines))) is not None:
                record = decoder.feed(line)
                if record is not None:
                    rec = LogRecord.from_json(record)
                    last_id = rec.id if rec.id is not None else last_id
                    yield Emit(rec)
            if not decoder.ended and (tail := decoder.flush()) is not None:
                yield Emit(LogRecord.from_json(tail))
            yield Close(response)
            # the stream closed without its end: resume by polling when the task goes on
            if decoder.ended or last_id is None or (yield from self._fetch_task(task_id)).done:
                return
            log.info("log stream of %s closed early; polling from record %d", task_id, last_id)
        except MatcalcError as exc:
            if not route_missing(exc):
                raise
            log.info("server has no log stream; polling %s/logs every %g s", task_id, poll)
        except httpx.TransportError as exc:
            raise transport_error(exc, req, 1) from exc
        yield from self._poll_logs(task_id, level, poll, last_id)

    def _poll_logs(self, task_id: str, level: str | None, poll: float, after: int | None) -> Op[None]:
        """``GET /logs?after=`` until the task ended and its last records were read."""
        if poll <= 0:
            raise ValueError(f"poll must be > 0 seconds, got {poll!r}")
        while True:
            finished = (yield from self._fetch_task(task_id)).done  # read before the logs: nothing after is lost
            while True:
                batch = yield from self._task_logs(task_id, level, 1000, after)
                for rec in batch:
                    after = rec.id if rec.id is not None else after
                    yield Emit(rec)
                if len(batch) < 1000:
                    break
            if finished:
                return
            yield Sleep(poll)

    # ------------------------------------------------------------------ structures
    @endpoint
    def upload_structure(self, structure: StructureLike, *, name: str | None = None,
                         format: str | None = None) -> Op[StructureInfo]:  # noqa: A002
        """Store a structure on the server (deduplicated by content); pass the returned
        `StructureInfo` (or its ``id``) as a task's structure."""
        return StructureInfo.from_json((yield from self._exchange(
            ApiRequest.post("/structures", upload_body(structure, name, format)))))

    @endpoint
    def list_structures(self, *, page: int = 1, page_size: int = 50, source: str | None = None) -> Op[Page[StructureInfo]]:
        """Stored structures, newest first (``source``: upload, inline or builtin)."""
        data = yield from self._exchange(ApiRequest.get("/structures", {"page": page, "page_size": page_size,
                                                                        "source": source}))
        return _page(data, StructureInfo.from_json)

    @endpoint
    def get_structure(self, structure_id: str) -> Op[StructureInfo]:
        """One stored structure with its original text in ``content``."""
        return StructureInfo.from_json((yield from self._exchange(
            ApiRequest.get(f"/structures/{check_id(structure_id, 'structure id')}"))))

    @endpoint
    def builtin_structures(self) -> Op[list[dict[str, Any]]]:
        """Structures shipped with the server's matcalc (name, formula, n_atoms)."""
        return [dict(b) for b in (yield from self._exchange(ApiRequest.get("/structures/builtin")))]

    # ------------------------------------------------------------------ models
    def _model(self, name: str, action: str = "") -> Op[Any]:
        path = f"/models/{check_id(name, 'model name')}"
        return (yield from self._exchange(ApiRequest.post(f"{path}/{action}") if action else ApiRequest.get(path)))

    @endpoint
    def list_models(self, *, include_d3: bool = True) -> Op[list[ModelInfo]]:
        """Registered models, their availability on the server and where they are loaded."""
        return [ModelInfo.from_json(m) for m in (yield from self._exchange(
            ApiRequest.get("/models", {"include_d3": include_d3})))]

    @endpoint
    def get_model(self, name: str) -> Op[ModelInfo]:
        """One model card."""
        return ModelInfo.from_json((yield from self._model(name)))

    @endpoint
    def load_model(self, name: str) -> Op[ModelInfo]:
        """Load a model on the server's workers (returns once loaded)."""
        return ModelInfo.from_json((yield from self._model(name, "load")))

    @endpoint
    def unload_model(self, name: str) -> Op[bool]:
        """Drop a model from the workers' memory; False when it was not loaded."""
        data = yield from self._model(name, "unload")
        return bool(data.get("unloaded")) if isinstance(data, dict) else False

    def _custom(self, model_id: str | None = None, action: str = "", method: str = "GET") -> Op[Any]:
        path = "/models/custom" + (f"/{check_id(model_id, 'custom model id')}" if model_id is not None else "")
        path += f"/{action}" if action else ""
        return (yield from self._exchange(ApiRequest(method, path, idempotent=method == "GET")))

    @endpoint
    def upload_model(self, path: str | os.PathLike[str], *, name: str, family: str, format: str | None = None,  # noqa: A002
                     description: str = "", options: Mapping[str, Any] | None = None, validate: bool = False,
                     timeout: float | None = None, poll: float = 1.0) -> Op[CustomModelInfo]:
        """Upload a model file (TorchScript, or the family's weights-only checkpoint) under ``name``.

        ``options`` go to the family loader (e.g. ``dtype``, ``elements``, ``cutoff_A``). The model runs
        tasks only once validated: pass ``validate=True`` to validate at once and wait (see
        `validate_model`). Refused files raise `ValidationError` (unsafe, corrupt, wrong format).
        """
        meta = {"format": format, "description": description or None, "options": dict(options) if options else None}
        req, fh = model_upload(path, name, family, meta)
        try:
            info = CustomModelInfo.from_json((yield from self._exchange(req)))
        finally:
            fh.close()
        if validate:
            info = yield from self._validate_model(info.id, timeout=timeout, poll=poll)
        return info

    @endpoint
    def list_custom_models(self) -> Op[list[CustomModelInfo]]:
        """Uploaded models with their status and last validation report."""
        return [CustomModelInfo.from_json(m) for m in (yield from self._custom())]

    @endpoint
    def get_custom_model(self, model_id: str) -> Op[CustomModelInfo]:
        """One uploaded model."""
        return CustomModelInfo.from_json((yield from self._custom(model_id)))

    def _validate_model(self, model_id: str, *, wait: bool = True, timeout: float | None = None,
                        poll: float = 1.0) -> Op[CustomModelInfo]:
        """Validate an uploaded model on the server (in an isolated process: finite results, forces =
        -dE/dx, stress = dE/dstrain, rotation invariance, batch = one by one). With ``wait``, poll every
        ``poll`` s until it is VALIDATED or FAILED (`TimeoutError` after ``timeout`` s)."""
        if poll <= 0:
            raise ValueError(f"poll must be > 0 seconds, got {poll!r}")
        info = CustomModelInfo.from_json((yield from self._custom(model_id, "validate", "POST")))
        deadline = None if timeout is None else time.monotonic() + timeout
        while wait and info.status == "VALIDATING":
            if deadline is not None and time.monotonic() >= deadline:
                raise ClientTimeout(f"model {info.name} still validating after {timeout} s",
                                    data={"status": info.status})
            yield Sleep(poll)
            info = CustomModelInfo.from_json((yield from self._custom(model_id)))
        return info

    validate_model = endpoint(_validate_model)

    @endpoint
    def delete_model(self, model_id: str) -> Op[CustomModelInfo]:
        """Delete an uploaded model and its file (refused while queued or running tasks use it)."""
        return CustomModelInfo.from_json((yield from self._custom(model_id, method="DELETE")))

    # ------------------------------------------------------------------ system
    def _health(self) -> Op[dict[str, Any]]:
        """Liveness and readiness (``ready``, ``checks`` of database and executor, version, uptime_s).
        A not-ready server answers 503: returned here too, not raised."""
        try:
            return dict((yield from self._exchange(ApiRequest.get("/health", retry_status=False))))
        except MatcalcError as exc:
            if exc.http_status == 503 and isinstance(exc.data, dict) and "ready" in exc.data:
                return dict(exc.data)
            raise

    health = endpoint(_health)

    @endpoint
    def system_status(self) -> Op[dict[str, Any]]:
        """``{"health": ..., "queue": ...}``: readiness, and task counts per priority and status."""
        queue = yield from self._exchange(ApiRequest.get("/system/queue"))
        return {"health": (yield from self._health()), "queue": dict(queue)}

    @endpoint
    def config(self) -> Op[dict[str, Any]]:
        """The server's effective configuration (secrets redacted)."""
        return dict((yield from self._exchange(ApiRequest.get("/system/config"))))

    @endpoint
    def gpus(self) -> Op[list[dict[str, Any]]]:
        """The server's GPUs (empty without one)."""
        return [dict(g) for g in (yield from self._exchange(ApiRequest.get("/system/gpus")))]

    @endpoint
    def alerts(self, which: Literal["active", "rules", "history"] = "active", *, page: int = 1,
               page_size: int = 50) -> Op[list[dict[str, Any]]]:
        """Alerts: ``active`` ones, the ``rules``, or the ``history`` (newest first, paged);
        `NotFoundError` on a server without alerting."""
        if which not in ("active", "rules", "history"):
            raise ValueError(f"which must be 'active', 'rules' or 'history', got {which!r}")
        params = {"page": page, "page_size": page_size} if which == "history" else None
        data = yield from self._exchange(ApiRequest.get(f"/system/alerts/{which}", params))
        items = data.get("items", []) if isinstance(data, dict) else data
        return [dict(a) for a in items or []]


# ----------------------------------------------------------------------------- the per-property methods
def property_endpoint(spec: Property[Any]) -> Endpoint[..., Any]:
    """The client method of a property: its signature (`method_signature`) and docstring
    (`method_doc`) from the declaration; it submits ``POST /tasks/{spec.task_type}``."""
    sig = method_signature(spec)

    def op(self: ClientCore[Any], *args: Any, **kwargs: Any) -> Op[Any]:
        arguments = sig.bind(self, *args, **kwargs).arguments
        given = {k: v for k, v in arguments.items() if k not in ("self", "structure", "model")}
        return (yield from self._submit(spec, arguments["structure"], arguments.get("model", "chgnet"), given))

    op.__name__ = op.__qualname__ = spec.client_method
    op.__doc__ = method_doc(spec)
    op.__signature__ = sig  # type: ignore[attr-defined]
    return Endpoint(op)


def install_property_methods(cls: type[ClientCore[Any]]) -> None:
    """Give ``cls`` one method per declared property (``optimization`` and its alias ``relax``, ...)."""
    for spec in properties().values():
        method = property_endpoint(spec)
        for name in method_names(spec):
            if name in vars(cls) and not isinstance(vars(cls)[name], Endpoint):
                raise RuntimeError(f"property method {name!r} would hide {cls.__name__}.{name}")
            setattr(cls, name, method)


install_property_methods(ClientCore)


# ----------------------------------------------------------------------------- task handles
class TaskCore(Generic[C]):
    """The state of a task handle and its calls, for both surfaces: the last snapshot
    (`info`), which never backs out of a terminal status, and the operations on the task."""

    def __init__(self, client: C, info: TaskInfo) -> None:
        self._client = client
        self._http = client._http
        self.id = info.id
        self._info = info
        self._fetched_at = time.monotonic()
        self._lock = threading.RLock()
        self._result: Result | None = None

    # ------------------------------------------------------------------ the snapshot
    @property
    def info(self) -> TaskInfo:
        """The last snapshot fetched from the server (no request)."""
        return self._info

    def _set_info(self, info: TaskInfo) -> None:
        with self._lock:
            if self._info.done and not info.done:  # never back out of a terminal state
                return
            self._info = info
            self._fetched_at = time.monotonic()

    def _freshen(self) -> None:
        """Called before `status` is read (the sync handle refreshes a stale snapshot here)."""

    @property
    def status(self) -> str:
        """Status (``PENDING`` ... ``COMPLETED``/``FAILED``/``CANCELLED``/``TIMEOUT``)."""
        self._freshen()
        return self._info.status

    def done(self) -> bool:
        """True once the task is in a terminal state."""
        self._freshen()
        return self._info.done

    @property
    def progress(self) -> dict[str, Any] | None:
        """Latest progress event of the last snapshot (stage, step, total_steps, energy_eV, fmax_eV_per_A)."""
        return self._info.progress

    @property
    def error(self) -> str | None:
        """The task's error text once FAILED/TIMEOUT/CANCELLED (last snapshot)."""
        if self._info.status == "CANCELLED" and not self._info.error:
            return "cancelled"
        return self._info.error

    @property
    def label(self) -> str:
        """The task's label."""
        return self._info.label or ""

    @property
    def model(self) -> str:
        """Model name."""
        return self._info.model

    @property
    def created_at(self) -> float | None:
        """UNIX time (s) of submission."""
        return None if self._info.created_at is None else self._info.created_at.timestamp()

    @property
    def started_at(self) -> float | None:
        """UNIX time (s) it started running (last snapshot)."""
        return None if self._info.started_at is None else self._info.started_at.timestamp()

    @property
    def finished_at(self) -> float | None:
        """UNIX time (s) it finished (last snapshot)."""
        return None if self._info.finished_at is None else self._info.finished_at.timestamp()

    @builtins.property
    def property(self) -> str:
        """The local function's name (``relax``, ``bulk_modulus``...)."""
        return self._info.property

    def snapshot(self) -> TaskSnapshot:
        """The shared task snapshot (`matcalc.tasks.TaskSnapshot`), as fresh as `status`."""
        self._freshen()
        info = self._info
        return TaskSnapshot.of({"id": info.id, "status": info.status, "property": info.property,
                                "model": info.model, "priority": info.priority, "label": info.label,
                                "attempts": info.attempts, "crashes": info.crashes, "worker": info.worker,
                                "progress": info.progress, "error": info.error, "created_at": info.created_at,
                                "started_at": info.started_at, "finished_at": info.finished_at})

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self._info.type}/{self._info.model} {self._info.status}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskCore) and other.id == self.id and other._client is self._client

    def __hash__(self) -> int:
        return hash(self.id)

    # ------------------------------------------------------------------ operations
    def _fetch(self) -> Op[TaskInfo]:
        self._set_info((yield from self._client._fetch_task(self.id)))
        return self._info

    def _refresh(self) -> Op[TaskInfo]:
        """Fetch the task from the server and return it (terminal snapshots are final and not
        fetched again; fires no callbacks)."""
        return self._info if self._info.done else (yield from self._fetch())

    refresh = endpoint(_refresh)

    def _wait(self, timeout: float | None = None, poll: float = 1.0) -> Op[TaskInfo]:
        """Poll every ``poll`` s until the task finishes; returns the final snapshot (whatever the
        outcome). Raises `matcalc.client.TimeoutError` after ``timeout`` s (the task goes on)."""
        if poll <= 0:
            raise ValueError(f"poll must be > 0 seconds, got {poll!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = yield from self._refresh()
            if info.done:
                return info
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ClientTimeout(f"task {self.id} not finished after {timeout} s (status {info.status})",
                                    data={"status": info.status})
            yield Sleep(poll if left is None else min(poll, left))

    wait = endpoint(_wait)

    @endpoint
    def result(self, timeout: float | None = None, poll: float = 1.0) -> Op[Result]:
        """Wait (at most ``timeout`` s) and return the same result dataclass as the local function
        (``RelaxResult``...). Raises `TaskFailed` when it FAILED, was CANCELLED or TIMED OUT."""
        if self._result is None:
            info = yield from self._wait(timeout, poll)
            if info.status != "COMPLETED":
                raise (yield from self._failure(info))
            self._result = yield from self._client._fetch_result(self.id)
        return self._result

    def _failure(self, info: TaskInfo) -> Op[TaskFailed]:
        try:
            yield from self._client._fetch_result(self.id)
        except TaskFailed as exc:  # the server's own message, code and request id
            return exc
        except TaskStateError as exc:
            return TaskFailed(exc.message, code=exc.code, http_status=exc.http_status, request_id=exc.request_id,
                              data={"status": info.status, "error": info.error})
        return TaskFailed(f"task {self.id} is {info.status}: {info.error}", data={"status": info.status})

    @endpoint
    def exception(self, timeout: float | None = None) -> Op[BaseException | None]:
        """Wait like `result`; the `TaskFailed` it would raise, or ``None`` when COMPLETED."""
        info = yield from self._wait(timeout)
        return None if info.status == "COMPLETED" else (yield from self._failure(info))

    @endpoint
    def cancel(self) -> Op[bool]:
        """Cancel the task (queued or running); False when it had already finished."""
        ok = yield from self._client._cancel(self.id)
        if ok:
            try:
                yield from self._fetch()
            except MatcalcError:
                log.debug("refresh after cancel failed", exc_info=True)
        return ok

    @endpoint
    def logs(self, level: str | None = None, limit: int = 1000, after: int | None = None) -> Op[list[LogRecord]]:
        """Stored log records (oldest first); ``after`` continues from a record's ``id``; ``level``
        is the minimum level (``debug`` shows progress steps too)."""
        return (yield from self._client._task_logs(self.id, level, limit, after))

    @stream(LogRecord)
    def stream_logs(self, level: str | None = None, poll: float = 1.0, read_timeout_s: float | None = None) -> Op[None]:
        """Iterate over the task's log records live until the task ends (``for``, or ``async for`` on
        an ``AsyncRemoteTask``): the backlog first, then new lines. Uses the server's SSE stream
        (``GET /tasks/{id}/logs/stream``); on a server without it, polls ``GET /tasks/{id}/logs?after=``
        every ``poll`` s instead."""
        yield from self._client._log_stream(self.id, level, poll, read_timeout_s)


__all__ = ["ClientCore", "TaskCore", "install_property_methods", "property_endpoint"]
