"""The synchronous client (``httpx.Client``) and :class:`RemoteTask`."""

from __future__ import annotations

import builtins
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Unpack

import httpx

from matcalc.client._base import (
    ApiRequest,
    BaseClient,
    Optimizer,
    SSEDecoder,
    StructureLike,
    TaskOptions,
    parse_response,
    route_missing,
    transport_error,
)
from matcalc.client._errors import MatcalcError, TaskFailed, TaskStateError
from matcalc.client._errors import TimeoutError as ClientTimeout
from matcalc.client._models import CustomModelInfo, LogRecord, ModelInfo, Page, StructureInfo, TaskInfo
from matcalc.tasks import TERMINAL

if TYPE_CHECKING:
    from matcalc.calculations.results import Result

log = logging.getLogger("matcalc.client")

FRESH_S = 0.2
"""``RemoteTask.status`` reuses a snapshot younger than this (s) instead of asking again (a progress
view reads the status right after the poller fetched it)."""

DoneCallback = Callable[["RemoteTask"], None]
ProgressCallback = Callable[["RemoteTask", dict[str, Any]], None]
StatusCallback = Callable[["RemoteTask", str], None]


def _ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


class RemoteTask:
    """Handle of a task on a matcalc server; the same task-like protocol as
    :class:`matcalc.cluster.Task`, so :func:`matcalc.widgets.progress` shows it live.

    ``status`` asks the server (terminal states are cached: they never change); ``info`` is the
    last snapshot. Callbacks (``add_done_callback``, ``add_progress_callback``,
    ``add_status_callback``) are driven by one background poller thread per client, started on the
    first registration, polling every ``client.poll_interval`` s each task that has callbacks and is
    not finished, and stopping when none is left; callbacks run on that thread (keep them quick).
    """

    def __init__(self, client: Client, info: TaskInfo) -> None:
        self._client = client
        self.id = info.id
        self._info = info
        self._fetched_at = time.monotonic()
        self._lock = threading.RLock()
        self._result: Result | None = None
        self._done_callbacks: list[DoneCallback] = []
        self._progress_callbacks: list[ProgressCallback] = []
        self._status_callbacks: list[StatusCallback] = []

    # ------------------------------------------------------------------ state
    @property
    def info(self) -> TaskInfo:
        """The last snapshot fetched from the server (no request)."""
        return self._info

    def refresh(self) -> TaskInfo:
        """Fetch the task from the server and return it (fires no callbacks)."""
        if self._info.done:
            return self._info
        info = self._client._get_task_info(self.id)
        self._set_info(info)
        return info

    def _set_info(self, info: TaskInfo) -> None:
        with self._lock:
            if self._info.done and not info.done:  # never back out of a terminal state
                return
            self._info = info
            self._fetched_at = time.monotonic()

    @property
    def status(self) -> str:
        """Current status, from the server (``PENDING`` ... ``COMPLETED``/``FAILED``/``CANCELLED``/``TIMEOUT``)."""
        if not self._info.done and time.monotonic() - self._fetched_at > FRESH_S:
            self.refresh()
        return self._info.status

    @property
    def progress(self) -> dict[str, Any] | None:
        """Latest progress event of the last snapshot (stage, step, total_steps, energy_eV, fmax_eV_per_A);
        kept current by :meth:`wait` and the callback poller."""
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
        return _ts(self._info.created_at)

    @property
    def started_at(self) -> float | None:
        """UNIX time (s) it started running (last snapshot)."""
        return _ts(self._info.started_at)

    @property
    def finished_at(self) -> float | None:
        """UNIX time (s) it finished (last snapshot)."""
        return _ts(self._info.finished_at)

    def done(self) -> bool:
        """True once the task is in a terminal state (asks the server)."""
        return self.status in TERMINAL

    # ------------------------------------------------------------------ waiting and results
    def wait(self, timeout: float | None = None, poll: float = 1.0) -> TaskInfo:
        """Poll every ``poll`` s until the task finishes; returns the final snapshot (whatever the
        outcome). Raises :class:`matcalc.client.TimeoutError` after ``timeout`` s (the task goes on)."""
        if poll <= 0:
            raise ValueError(f"poll must be > 0 seconds, got {poll!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.refresh()
            if info.done:
                return info
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ClientTimeout(f"task {self.id} not finished after {timeout} s (status {info.status})",
                                    data={"status": info.status})
            time.sleep(poll if left is None else min(poll, left))

    def result(self, timeout: float | None = None, poll: float = 1.0) -> Result:
        """Wait (at most ``timeout`` s) and return the same result dataclass as the local function
        (``RelaxResult``...). Raises :class:`TaskFailed` when it FAILED, was CANCELLED or TIMED OUT."""
        if self._result is not None:
            return self._result
        info = self.wait(timeout, poll)
        if info.status != "COMPLETED":
            raise self._failure(info)
        self._result = self._client._fetch_result(self.id)
        return self._result

    def _failure(self, info: TaskInfo) -> TaskFailed:
        try:
            self._client._fetch_result(self.id)
        except TaskFailed as exc:  # the server's own message, code and request id
            return exc
        except TaskStateError as exc:
            return TaskFailed(exc.message, code=exc.code, http_status=exc.http_status, request_id=exc.request_id,
                              data={"status": info.status, "error": info.error})
        return TaskFailed(f"task {self.id} is {info.status}: {info.error}", data={"status": info.status})

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait like :meth:`result`; the :class:`TaskFailed` it would raise, or ``None`` when COMPLETED."""
        info = self.wait(timeout)
        return None if info.status == "COMPLETED" else self._failure(info)

    def cancel(self) -> bool:
        """Cancel the task (queued or running); False when it had already finished."""
        ok = self._client.cancel(self.id)
        if ok:
            try:
                self.refresh()
            except MatcalcError:
                log.debug("refresh after cancel failed", exc_info=True)
        return ok

    # ------------------------------------------------------------------ logs
    def logs(self, level: str | None = None, limit: int = 1000, after: int | None = None) -> list[LogRecord]:
        """Stored log records (oldest first); ``after`` continues from a record's ``id``; ``level``
        is the minimum level (``debug`` shows progress steps too)."""
        return self._client._task_logs(self.id, level, limit, after)

    def stream_logs(self, level: str | None = None, poll: float = 1.0,
                    read_timeout_s: float | None = None) -> Iterator[LogRecord]:
        """Iterate over the task's log records live until the task ends: the backlog first, then new
        lines. Uses the server's SSE stream (``GET /tasks/{id}/logs/stream``); on a server without it,
        polls ``GET /tasks/{id}/logs?after=`` every ``poll`` s instead."""
        return self._client._stream_logs(self.id, level, poll, read_timeout_s)

    # ------------------------------------------------------------------ callbacks (task-like protocol)
    def add_done_callback(self, fn: DoneCallback) -> None:
        """Call ``fn(task)`` once the task finished (at once when it already has)."""
        with self._lock:
            if not self._info.done:
                self._done_callbacks.append(fn)
                self._client._watcher.watch(self)
                return
        _safe(fn, self)

    def add_progress_callback(self, fn: ProgressCallback) -> None:
        """Call ``fn(task, event)`` for each new progress snapshot seen by the poller (the server
        stores one per ``progress_interval_s``, and always the last step of a run)."""
        with self._lock:
            self._progress_callbacks.append(fn)
        if not self._info.done:
            self._client._watcher.watch(self)

    def add_status_callback(self, fn: StatusCallback) -> None:
        """Call ``fn(task, status)`` on each status change seen by the poller."""
        with self._lock:
            self._status_callbacks.append(fn)
        if not self._info.done:
            self._client._watcher.watch(self)

    def _poll(self) -> bool:
        """One poller step: fetch, fire callbacks for what changed; True once finished."""
        old = self._info
        info = self._client._get_task_info(self.id)
        self._set_info(info)
        with self._lock:
            status_cbs = list(self._status_callbacks) if info.status != old.status else []
            progress_cbs = list(self._progress_callbacks) if info.progress and info.progress != old.progress else []
            done_cbs: list[DoneCallback] = []
            if info.done:
                done_cbs, self._done_callbacks = self._done_callbacks, []
        for pcb in progress_cbs:  # the newest progress first (also the last one of a task that just ended)
            _safe(pcb, self, dict(info.progress or {}))
        for scb in status_cbs:
            _safe(scb, self, info.status)
        for dcb in done_cbs:
            _safe(dcb, self)
        return info.done

    def __repr__(self) -> str:
        return f"<RemoteTask {self.id} {self._info.type}/{self._info.model} {self._info.status}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteTask) and other.id == self.id and other._client is self._client

    def __hash__(self) -> int:
        return hash(self.id)

    @builtins.property
    def property(self) -> str:
        """The local function's name (``relax``, ``bulk_modulus``...)."""
        return self._info.property


def _safe(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - a broken callback must not stop the poller
        log.exception("task callback %r failed", fn)


class _Watcher:
    """The client's callback poller: one daemon thread, started when a task is watched, ending when
    every watched task has finished (or the client closes)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._tasks: dict[str, RemoteTask] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, task: RemoteTask) -> None:
        with self._lock:
            self._tasks[task.id] = task
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="matcalc-client-poller", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                tasks = list(self._tasks.values())
            for task in tasks:
                if self._stop.is_set():
                    return
                try:
                    finished = task._poll()
                except Exception as exc:  # noqa: BLE001 - keep polling the others; try again next round
                    if self._stop.is_set():
                        return
                    log.warning("polling task %s failed: %s", task.id, exc)
                    continue
                if finished:
                    with self._lock:
                        self._tasks.pop(task.id, None)
            with self._lock:
                if not self._tasks:
                    self._thread = None
                    return
            self._stop.wait(self._client.poll_interval)

    def close(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)


class Client(BaseClient):
    """Synchronous client of a matcalc server (``matcalc serve``).

    >>> with Client("http://127.0.0.1:8000", api_key="...") as c:       # doctest: +SKIP
    ...     task = c.relax("MOF-5.cif", model="chgnet", protocol="fast")
    ...     r = task.result()                # RelaxResult, as matcalc.relax returns it

    Args:
        base_url: the server (``http://host:port``; ``/api/v1`` is appended when missing).
        api_key: sent as ``X-API-Key``.
        timeout: seconds per HTTP request (not per task: see :meth:`RemoteTask.wait`).
        retries: retries of idempotent calls (GET, cancel) on connection errors, HTTP 503 and 429,
            with exponential backoff from ``backoff_s`` (at most ``max_backoff_s``). Submissions are
            never retried.
        poll_interval: seconds between polls of the callback poller.
        transport: an httpx transport (tests: ``httpx.MockTransport``).
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0, retries: int = 3, *,
                 backoff_s: float = 0.5, max_backoff_s: float = 8.0, poll_interval: float = 1.0,
                 headers: Mapping[str, str] | None = None, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, timeout, retries, backoff_s=backoff_s, max_backoff_s=max_backoff_s,
                         poll_interval=poll_interval, headers=headers)
        self._http = httpx.Client(base_url=self.base_url + "/", headers=self._headers, timeout=self.timeout,
                                  transport=transport)
        self._watcher = _Watcher(self)

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        """Stop the callback poller and close the connections."""
        self._watcher.close()
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _send(self, req: ApiRequest) -> Any:
        """Send with the retry policy; the envelope's ``data`` or the mapped error."""
        attempt = 0
        while True:
            try:
                response = self._http.send(req.build(self._http))
            except httpx.TransportError as exc:
                if self.retry.retry_error(req, exc, attempt):
                    delay = self.retry.delay(attempt)
                    log.info("%s %s: %r; retry %d in %.2f s", req.method, req.path, exc, attempt + 1, delay)
                    time.sleep(delay)
                    attempt += 1
                    continue
                raise transport_error(exc, req, attempt + 1) from exc
            if self.retry.retry_response(req, response, attempt):
                delay = self.retry.delay(attempt, response)
                log.info("%s %s: HTTP %d; retry %d in %.2f s", req.method, req.path, response.status_code,
                         attempt + 1, delay)
                response.close()
                time.sleep(delay)
                attempt += 1
                continue
            return parse_response(response)

    def _task(self, data: Any) -> RemoteTask:
        return RemoteTask(self, self._p_task(data))

    def _get_task_info(self, task_id: str) -> TaskInfo:
        return self._p_task(self._send(self._r_get_task(task_id)))

    def _fetch_result(self, task_id: str) -> Result:
        result: Result = self._p_result(self._send(self._r_result(task_id)))
        return result

    def _task_logs(self, task_id: str, level: str | None, limit: int, after: int | None) -> list[LogRecord]:
        return self._p_logs(self._send(self._r_logs(task_id, level, limit, after)))

    def _stream_logs(self, task_id: str, level: str | None, poll: float,
                     read_timeout_s: float | None) -> Iterator[LogRecord]:
        req = self._r_stream(task_id, level, None)
        timeout = httpx.Timeout(self.timeout, read=read_timeout_s)
        last_id: int | None = None
        try:
            with self._http.stream(req.method, req.path.lstrip("/"), params=req.params, headers=dict(req.headers),
                                   timeout=timeout) as response:
                if response.status_code != 200 or "text/event-stream" not in response.headers.get("content-type", ""):
                    response.read()
                    parse_response(response)  # raises the mapped error
                    raise TaskStateError(f"GET {req.path}: not an event stream "
                                         f"({response.headers.get('content-type')})")
                decoder = SSEDecoder()
                for line in response.iter_lines():
                    record = decoder.feed(line)
                    if record is not None:
                        rec = LogRecord.from_json(record)
                        last_id = rec.id if rec.id is not None else last_id
                        yield rec
                    if decoder.ended:
                        return
                tail = decoder.flush()
                if tail is not None:
                    yield LogRecord.from_json(tail)
            # the stream closed without its end: resume by polling when the task goes on
            if last_id is None or (self._get_task_info(task_id)).done:
                return
            log.info("log stream of %s closed early; polling from record %d", task_id, last_id)
        except MatcalcError as exc:
            if not route_missing(exc):
                raise
            log.info("server has no log stream; polling %s/logs every %g s", task_id, poll)
        except httpx.TransportError as exc:
            raise transport_error(exc, req, 1) from exc
        yield from self._poll_logs(task_id, level, poll, last_id)

    def _poll_logs(self, task_id: str, level: str | None, poll: float, after: int | None) -> Iterator[LogRecord]:
        """Fallback of :meth:`RemoteTask.stream_logs`: ``GET /logs?after=`` until the task ended and
        its last records were read."""
        if poll <= 0:
            raise ValueError(f"poll must be > 0 seconds, got {poll!r}")
        while True:
            finished = self._get_task_info(task_id).done  # read before the logs: nothing after is lost
            while True:
                batch = self._task_logs(task_id, level, 1000, after)
                for rec in batch:
                    if rec.id is not None:
                        after = rec.id
                    yield rec
                if len(batch) < 1000:
                    break
            if finished:
                return
            time.sleep(poll)

    # ------------------------------------------------------------------ task submission
    def optimization(self, structure: StructureLike, model: str = "chgnet", *, fmax: float | None = None,
                     max_steps: int | None = None, optimizer: Optimizer | None = None,
                     relax_cell: bool | None = None, fixed_atoms: Sequence[int] | Sequence[bool] | None = None,
                     **options: Unpack[TaskOptions]) -> RemoteTask:
        """Submit a relaxation (``matcalc.relax`` on the server). ``fmax`` in eV/Å; ``fixed_atoms``
        indices (or a boolean mask). Returns at once; ``.result()`` is a ``RelaxResult``."""
        params = {"fmax": fmax, "max_steps": max_steps, "optimizer": optimizer, "relax_cell": relax_cell,
                  "fixed_atoms": fixed_atoms, **options}
        return self._task(self._send(self._r_submit("optimization", structure, model, params)))

    relax = optimization

    def single_point(self, structure: StructureLike, model: str = "chgnet",
                     **options: Unpack[TaskOptions]) -> RemoteTask:
        """Submit energy, forces and stress; ``.result()`` is a ``SinglePointResult``."""
        return self._task(self._send(self._r_submit("single-point", structure, model, dict(options))))

    def bulk_modulus(self, structure: StructureLike, model: str = "chgnet", *, strain: float | None = None,
                     n_points: int | None = None,
                     eos: Literal["birchmurnaghan", "murnaghan", "vinet", "sj"] | None = None,
                     relax_first: bool | None = None, fmax: float | None = None, relax_max_steps: int | None = None,
                     relax_optimizer: Optimizer | None = None, fixed_cell_max_steps: int | None = None,
                     fixed_cell_optimizer: Optimizer | None = None, **options: Unpack[TaskOptions]) -> RemoteTask:
        """Submit an equation-of-state fit (volumes V0·(1±strain), ``n_points`` of them; fmax eV/Å);
        ``.result()`` is a ``BulkModulusResult`` (GPa)."""
        params = {"strain": strain, "n_points": n_points, "eos": eos, "relax_first": relax_first, "fmax": fmax,
                  "relax_max_steps": relax_max_steps, "relax_optimizer": relax_optimizer,
                  "fixed_cell_max_steps": fixed_cell_max_steps, "fixed_cell_optimizer": fixed_cell_optimizer,
                  **options}
        return self._task(self._send(self._r_submit("bulk-modulus", structure, model, params)))

    def heat_capacity(self, structure: StructureLike, model: str = "chgnet", *,
                      supercell: Sequence[int] | None = None, displacement: float | None = None,
                      mesh: float | Sequence[int] | None = None, t_min: float | None = None,
                      t_max: float | None = None, t_step: float | None = None, relax_first: bool | None = None,
                      fmax: float | None = None, relax_max_steps: int | None = None,
                      relax_optimizer: Optimizer | None = None, **options: Unpack[TaskOptions]) -> RemoteTask:
        """Submit phonons and thermal properties (displacement Å, temperatures K, fmax eV/Å);
        ``.result()`` is a ``HeatCapacityResult``."""
        params = {"supercell": supercell, "displacement": displacement,
                  "mesh": float(mesh) if isinstance(mesh, int) else mesh, "t_min": t_min,
                  "t_max": t_max, "t_step": t_step, "relax_first": relax_first, "fmax": fmax,
                  "relax_max_steps": relax_max_steps, "relax_optimizer": relax_optimizer, **options}
        return self._task(self._send(self._r_submit("heat-capacity", structure, model, params)))

    def stability(self, structure: StructureLike, model: str = "chgnet", *, temperature_K: float | None = None,
                  timestep_fs: float | None = None, nvt_steps: int | None = None, npt_steps: int | None = None,
                  pressure_bar: float | None = None, friction_per_fs: float | None = None,
                  tdamp_fs: float | None = None, pdamp_fs: float | None = None,
                  ensemble: Literal["nvt", "npt"] | None = None, interval: int | None = None, seed: int | None = None,
                  relax_first: bool | None = None, fmax: float | None = None, relax_max_steps: int | None = None,
                  **options: Unpack[TaskOptions]) -> RemoteTask:
        """Submit an MD stability run (K, fs, bar); ``.result()`` is a ``StabilityResult``."""
        params = {"temperature_K": temperature_K, "timestep_fs": timestep_fs, "nvt_steps": nvt_steps,
                  "npt_steps": npt_steps, "pressure_bar": pressure_bar, "friction_per_fs": friction_per_fs,
                  "tdamp_fs": tdamp_fs, "pdamp_fs": pdamp_fs, "ensemble": ensemble, "interval": interval,
                  "seed": seed, "relax_first": relax_first, "fmax": fmax, "relax_max_steps": relax_max_steps,
                  **options}
        return self._task(self._send(self._r_submit("stability", structure, model, params)))

    def interaction_energy(self, structure: StructureLike, model: str = "chgnet", *, guest: Any = None,
                           guest_indices: Sequence[int] | None = None, guest_tag: int | None = None,
                           position: Sequence[float] | None = None, box_A: float | None = None,
                           **options: Unpack[TaskOptions]) -> RemoteTask:
        """Submit a host-guest interaction energy. ``structure`` is the complex (guest selected by
        ``guest_indices``/``guest_tag``) or the host (then ``guest``: CO2, H2O, N2, CH4 or a
        structure, placed at ``position`` Å). ``.result()`` is an ``InteractionEnergyResult`` (eV)."""
        params = {"guest": guest, "guest_indices": guest_indices, "guest_tag": guest_tag, "position": position,
                  "box_A": box_A, **options}
        return self._task(self._send(self._r_submit("interaction-energy", structure, model, params)))

    def submit(self, kind: str, structure: StructureLike, model: str = "chgnet", **params: Any) -> RemoteTask:
        """Submit any task type by name (``relax``/``optimization``, ``bulk_modulus``/``bulk-modulus``...)."""
        return self._task(self._send(self._r_submit(kind, structure, model, params)))

    def submit_batch(self, specs: Iterable[Mapping[str, Any]]) -> list[RemoteTask]:
        """Submit many tasks atomically (all stored, or none: the error names the bad index).

        Each spec is ``{"type": "relax", "structure": ..., "model": "emt", **parameters}`` with the
        structure in any accepted form (or ``builtin``/``structure_id``)."""
        return [RemoteTask(self, t) for t in self._p_batch(self._send(self._r_batch(specs)))]

    # ------------------------------------------------------------------ tasks
    def get_task(self, task_id: str) -> RemoteTask:
        """The task with this id (``NotFoundError`` if there is none)."""
        return RemoteTask(self, self._get_task_info(task_id))

    def list_tasks(self, *, status: str | Iterable[str] | None = None, type: str | None = None,  # noqa: A002
                   model: str | None = None, priority: str | None = None, batch_id: str | None = None,
                   created_after: datetime | str | None = None, created_before: datetime | str | None = None,
                   page: int = 1, page_size: int = 50) -> Page[RemoteTask]:
        """Tasks, newest first, filtered (``status`` one or several; ``type`` as REST or function name)."""
        p = self._p_tasks(self._send(self._r_list_tasks(status, type, model, priority, batch_id, created_after,
                                                        created_before, page, page_size)))
        return Page([RemoteTask(self, t) for t in p.items], p.total, p.page, p.page_size)

    def cancel(self, task_id: str) -> bool:
        """Cancel a queued or running task; False when it had already finished. Retried safely."""
        try:
            data = self._send(self._r_cancel(task_id))
        except TaskStateError as exc:
            if exc.code == 50003:
                return False
            raise
        return bool(data.get("cancelled", True)) if isinstance(data, dict) else True

    # ------------------------------------------------------------------ structures
    def upload_structure(self, structure: StructureLike, *, name: str | None = None,
                         format: str | None = None) -> StructureInfo:  # noqa: A002
        """Store a structure on the server (deduplicated by content); pass the returned
        :class:`StructureInfo` (or its ``id``) as a task's structure."""
        return self._p_structure(self._send(self._r_upload_structure(structure, name, format)))

    def list_structures(self, *, page: int = 1, page_size: int = 50, source: str | None = None) -> Page[StructureInfo]:
        """Stored structures, newest first (``source``: upload, inline or builtin)."""
        return self._p_structures(self._send(self._r_list_structures(page, page_size, source)))

    def get_structure(self, structure_id: str) -> StructureInfo:
        """One stored structure with its original text in ``content``."""
        return self._p_structure(self._send(self._r_get_structure(structure_id)))

    def builtin_structures(self) -> list[dict[str, Any]]:
        """Structures shipped with the server's matcalc (name, formula, n_atoms)."""
        data: list[dict[str, Any]] = self._send(ApiRequest.get("/structures/builtin"))
        return data

    # ------------------------------------------------------------------ models
    def list_models(self, *, include_d3: bool = True) -> list[ModelInfo]:
        """Registered models, their availability on the server and where they are loaded."""
        return self._p_models(self._send(self._r_list_models(include_d3)))

    def get_model(self, name: str) -> ModelInfo:
        return self._p_model(self._send(self._r_model(name)))

    def load_model(self, name: str) -> ModelInfo:
        """Load a model on the server's workers (returns once loaded)."""
        return self._p_model(self._send(self._r_model(name, "load")))

    def unload_model(self, name: str) -> bool:
        """Drop a model from the workers' memory; False when it was not loaded."""
        data = self._send(self._r_model(name, "unload"))
        return bool(data.get("unloaded")) if isinstance(data, dict) else False

    def upload_model(self, path: str | os.PathLike[str], *, name: str, family: str,
                     format: str | None = None, description: str = "", options: Mapping[str, Any] | None = None,
                     validate: bool = False, timeout: float | None = None, poll: float = 1.0) -> CustomModelInfo:
        """Upload a model file (TorchScript, or the family's weights-only checkpoint) under ``name``.

        ``options`` go to the family loader (e.g. ``dtype``, ``elements``, ``cutoff_A``). The model runs
        tasks only once validated: pass ``validate=True`` to validate at once and wait (see
        :meth:`validate_model`). Refused files raise :class:`ValidationError` (unsafe, corrupt, wrong format).
        """
        meta = {"format": format, "description": description or None, "options": dict(options) if options else None}
        req, fh = self._r_upload_model(path, name, family, meta)
        try:
            info = self._p_custom(self._send(req))
        finally:
            fh.close()
        if validate:
            info = self.validate_model(info.id, timeout=timeout, poll=poll)
        return info

    def list_custom_models(self) -> list[CustomModelInfo]:
        """Uploaded models with their status and last validation report."""
        return self._p_customs(self._send(self._r_custom()))

    def get_custom_model(self, model_id: str) -> CustomModelInfo:
        return self._p_custom(self._send(self._r_custom(model_id)))

    def validate_model(self, model_id: str, *, wait: bool = True, timeout: float | None = None,
                       poll: float = 1.0) -> CustomModelInfo:
        """Validate an uploaded model on the server (in an isolated process: finite results, forces =
        -dE/dx, stress = dE/dstrain, rotation invariance, batch = one by one). With ``wait``, poll every
        ``poll`` s until it is VALIDATED or FAILED (:class:`TimeoutError` after ``timeout`` s)."""
        if poll <= 0:
            raise ValueError(f"poll must be > 0 seconds, got {poll!r}")
        info = self._p_custom(self._send(self._r_custom(model_id, "validate", "POST")))
        deadline = None if timeout is None else time.monotonic() + timeout
        while wait and info.status == "VALIDATING":
            if deadline is not None and time.monotonic() >= deadline:
                raise ClientTimeout(f"model {info.name} still validating after {timeout} s",
                                    data={"status": info.status})
            time.sleep(poll)
            info = self.get_custom_model(model_id)
        return info

    def delete_model(self, model_id: str) -> CustomModelInfo:
        """Delete an uploaded model and its file (refused while queued or running tasks use it)."""
        return self._p_custom(self._send(self._r_custom(model_id, method="DELETE")))

    # ------------------------------------------------------------------ system
    def health(self) -> dict[str, Any]:
        """Liveness and readiness (``ready``, ``checks`` of database and executor, version, uptime_s).
        A not-ready server answers 503: returned here too, not raised, once retries are spent."""
        try:
            data: dict[str, Any] = self._send(self._r_system("health"))
        except MatcalcError as exc:
            if exc.http_status == 503 and isinstance(exc.data, dict) and "ready" in exc.data:
                return exc.data
            raise
        return data

    def system_status(self) -> dict[str, Any]:
        """``{"health": ..., "queue": ...}``: readiness, and task counts per priority and status."""
        queue: dict[str, Any] = self._send(self._r_system("queue"))
        return {"health": self.health(), "queue": queue}

    def config(self) -> dict[str, Any]:
        """The server's effective configuration (secrets redacted)."""
        data: dict[str, Any] = self._send(self._r_system("config"))
        return data

    def gpus(self) -> list[dict[str, Any]]:
        """The server's GPUs (empty without one)."""
        data: list[dict[str, Any]] = self._send(self._r_system("gpus"))
        return data

    def alerts(self, which: Literal["active", "rules", "history"] = "active", *, page: int = 1,
               page_size: int = 50) -> list[dict[str, Any]]:
        """Alerts: ``active`` ones, the ``rules``, or the ``history`` (newest first, paged);
        :class:`NotFoundError` on a server without alerting."""
        return self._p_alerts(self._send(self._r_alerts(which, page, page_size)))
