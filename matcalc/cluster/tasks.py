"""Tasks: one property calculation on one structure, run on a dask cluster.

A :class:`Task` wraps the dask future with a stable id, the lifecycle of DESIGN §5
(PENDING → QUEUED → ASSIGNED → RUNNING → COMPLETED | FAILED | CANCELLED | TIMEOUT), a priority,
live progress and a per-task log (both pushed from the worker through dask's event stream).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed import Future

    from matcalc.calculations.results import Result
    from matcalc.cluster.local import Cluster

log = logging.getLogger(__name__)


class TaskStatus(str, Enum):
    """Lifecycle of a task (DESIGN §5)."""

    PENDING = "PENDING"
    """Created on the client, not yet handed to dask (or waiting to be resubmitted)."""
    QUEUED = "QUEUED"
    """Known to the scheduler, not yet on a worker."""
    ASSIGNED = "ASSIGNED"
    """On a worker's queue."""
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.TIMEOUT})
_ORDER = {s: i for i, s in enumerate(TaskStatus)}

PRIORITIES: dict[str, int] = {"CRITICAL": 3, "HIGH": 2, "NORMAL": 1, "LOW": 0}
"""Priority name -> level (higher runs first). See :func:`dask_priority`."""

_LEVEL_SPAN = 10**16  # > microseconds since 1970 until the year 2286
_ORDER_LOCK = threading.Lock()
_LAST_US = [0]


def dask_priority(priority: str) -> int:
    """The integer dask priority of a task submitted now with ``priority``.

    dask runs higher numbers first but does not keep submission order among equal numbers
    (measured: tasks of one level queued on a worker ran newest first), so submission time is
    encoded too: ``level * 1e16 - microseconds since 1970`` (strictly increasing per process).
    Within a level the oldest task runs first, across every client of the scheduler.
    """
    level = PRIORITIES[check_priority(priority)]
    with _ORDER_LOCK:
        now = max(time.time_ns() // 1000, _LAST_US[0] + 1)
        _LAST_US[0] = now
    return level * _LEVEL_SPAN - now


def check_priority(priority: str) -> str:
    """The canonical priority name; ``ValueError`` naming the allowed values otherwise."""
    key = str(priority).strip().upper() if isinstance(priority, str) else None
    if key not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    return key


class TaskTimeoutError(TimeoutError):
    """The task ran longer than its ``timeout_s`` (status TIMEOUT)."""


class TaskCancelledError(CancelledError):
    """The task was cancelled (status CANCELLED)."""


class WorkerTaskError(RuntimeError):
    """An error raised on a worker whose type could not be rebuilt on the client."""


def is_transient(exc: BaseException) -> bool:
    """Errors worth a retry: a lost worker, CUDA out-of-memory, a dropped connection.

    Invalid input (``ValueError`` and subclasses such as ``StructureError``) never is.
    """
    if isinstance(exc, (ValueError, TypeError, TaskTimeoutError, CancelledError)):
        return False
    name = type(exc).__name__
    if name in {"KilledWorker", "OutOfMemoryError", "CommClosedError", "WorkerLost"}:
        return True
    text = str(exc)
    return "CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text


ProgressCallback = Callable[["Task", dict[str, Any]], None]
DoneCallback = Callable[["Task"], None]


class Task:
    """Handle of one submitted calculation (thread-safe).

    Attributes:
        id: stable id (the caller's ``task_id`` or a fresh uuid hex).
        property: property name (``"relax"``...) or the function name for a custom callable.
        model: model name. priority: ``CRITICAL``/``HIGH``/``NORMAL``/``LOW``.
        label: name of the input (file stem, builtin name). structure_hash: sha256 of the input.
        params: keyword arguments passed to the calculation.
        timeout_s, retries: limits given at submission. attempts: how many times it was sent.
        worker: address of the worker that ran (or runs) it.
        created_at, started_at, finished_at: UNIX times (s).
    """

    def __init__(self, *, task_id: str, prop: str, model: str, priority: str, params: dict[str, Any],
                 label: str = "", structure_hash: str | None = None, timeout_s: float | None = None,
                 retries: int = 0, cluster: Cluster | None = None) -> None:
        self.id = task_id
        self.property = prop
        self.model = model
        self.priority = priority
        self.params = dict(params)
        self.label = label
        self.structure_hash = structure_hash
        self.timeout_s = timeout_s
        self.retries = retries
        self.attempts = 0
        self.worker: str | None = None
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.key: str | None = None
        self._cluster = cluster
        self._future: Future | None = None
        self._status = TaskStatus.PENDING
        self._lock = threading.RLock()
        self._done = threading.Event()
        self._result: Result | None = None
        self._error: BaseException | None = None
        self._progress: dict[str, Any] | None = None
        self._logs: list[dict[str, Any]] = []
        self._done_callbacks: list[DoneCallback] = []
        self._progress_callbacks: list[ProgressCallback] = []
        self._status_callbacks: list[Callable[[Task, TaskStatus], None]] = []
        self._timer: threading.Timer | None = None
        self._custom_fn: Callable[..., Any] | None = None
        self._atoms: Any = None
        self._settled_key: Any = None
        self._waiters = 0

    # ------------------------------------------------------------------ public API
    @property
    def status(self) -> TaskStatus:
        return self._status

    @property
    def progress(self) -> dict[str, Any] | None:
        """The latest progress event (stage, step, total_steps, fraction, energy_eV, fmax_eV_per_A)."""
        return self._progress

    @property
    def logs(self) -> list[dict[str, Any]]:
        """Log records of the ``matcalc`` loggers emitted by this task on its worker
        (``time``, ``level``, ``logger``, ``message``)."""
        with self._lock:
            return list(self._logs)

    @property
    def error(self) -> str | None:
        """``"Type: message"`` of the failure, None unless FAILED/TIMEOUT/CANCELLED."""
        e = self._error
        return None if e is None else f"{type(e).__name__}: {e}"

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Result:
        """Wait (at most ``timeout`` s) and return the result dataclass; raise the task's error.

        Raises:
            TimeoutError: still running after ``timeout`` seconds (the task goes on).
            TaskTimeoutError: the task ran past its own ``timeout_s``.
            TaskCancelledError: the task was cancelled.
            Exception: the calculation's own exception, re-raised.
        """
        if not self._wait(timeout):
            raise TimeoutError(f"task {self.id} not finished after {timeout} s (status {self.status})")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait like :meth:`result`; the task's error, or None when it completed."""
        if not self._wait(timeout):
            raise TimeoutError(f"task {self.id} not finished after {timeout} s (status {self.status})")
        return self._error

    def _wait(self, timeout: float | None) -> bool:
        """Wait for a terminal state. While a dask future is out, wait on it and settle the task in
        this thread (saves the hop through dask's callback thread); retries swap the future."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            future, cluster = self._future, self._cluster
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if future is None or cluster is None:
                return self._done.wait(left)
            if not cluster._wait_future(self, future, left):
                return self._done.is_set()
        return True

    def cancel(self) -> bool:
        """Cancel a queued task, or ask a running one to stop; False when already finished."""
        if self.done():
            return False
        if self._cluster is None:
            return self._finish(TaskStatus.CANCELLED, error=TaskCancelledError(f"task {self.id} cancelled"))
        return self._cluster._cancel(self)

    def add_done_callback(self, fn: DoneCallback) -> None:
        """Call ``fn(task)`` once the task reaches a terminal state (at once if it has)."""
        with self._lock:
            if not self.done():
                self._done_callbacks.append(fn)
                return
        _safe(fn, self)

    def add_progress_callback(self, fn: ProgressCallback) -> None:
        """Call ``fn(task, event_dict)`` for each progress event (on the client's event thread:
        keep it quick)."""
        with self._lock:
            self._progress_callbacks.append(fn)

    def add_status_callback(self, fn: Callable[[Task, TaskStatus], None]) -> None:
        """Call ``fn(task, new_status)`` on every status change."""
        with self._lock:
            self._status_callbacks.append(fn)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (the result as ``Result.to_dict()`` when COMPLETED)."""
        from matcalc.calculations.results import _jsonable

        return {
            "id": self.id,
            "status": self.status.value,
            "property": self.property,
            "model": self.model,
            "priority": self.priority,
            "label": self.label,
            "structure_hash": self.structure_hash,
            "params": _jsonable(self.params),
            "timeout_s": self.timeout_s,
            "retries": self.retries,
            "attempts": self.attempts,
            "worker": self.worker,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "progress": self._progress,
            "error": self.error,
            "result": self._result.to_dict() if self._result is not None else None,
        }

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.property}/{self.model} {self.status.value} {self.priority}>"

    # ------------------------------------------------------------------ internal (cluster side)
    def _advance(self, status: TaskStatus, worker: str | None = None) -> bool:
        """Move forward to a non-terminal ``status`` (never backwards, never out of a terminal one)."""
        with self._lock:
            if self.done() or _ORDER[status] <= _ORDER[self._status]:
                return False
            self._status = status
            if worker:
                self.worker = worker
            if status == TaskStatus.RUNNING and self.started_at is None:
                self.started_at = time.time()
            callbacks = list(self._status_callbacks)
        for cb in callbacks:
            _safe(cb, self, status)
        return True

    def _reset_for_retry(self) -> None:
        with self._lock:
            self._status = TaskStatus.PENDING
            self.started_at = None
            self._progress = None

    def _on_progress(self, event: dict[str, Any]) -> None:
        with self._lock:
            if self.done():
                return
            self._progress = event
            callbacks = list(self._progress_callbacks)
        for cb in callbacks:
            _safe(cb, self, event)

    def _on_log(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._logs.append(record)

    def _merge_logs(self, records: list[dict[str, Any]]) -> None:
        """Add records returned with the result that the event stream has not delivered (yet)."""
        with self._lock:
            seen = {(r.get("seq"), r.get("attempt")) for r in self._logs}
            for r in records:
                if (r.get("seq"), r.get("attempt")) not in seen:
                    self._logs.append(r)
            self._logs.sort(key=lambda r: (r.get("attempt", 0), r.get("seq", 0)))

    def _finish(self, status: TaskStatus, *, result: Result | None = None,
                error: BaseException | None = None) -> bool:
        """Enter a terminal state once; returns False when already terminal."""
        with self._lock:
            if self.done():
                return False
            self._status = status
            self._result = result
            self._error = error
            self.finished_at = time.time()
            if self._timer is not None:
                self._timer.cancel()
            callbacks = list(self._done_callbacks)
            status_callbacks = list(self._status_callbacks)
            self._done_callbacks.clear()
            self._done.set()
        for status_cb in status_callbacks:
            _safe(status_cb, self, status)
        for cb in callbacks:
            _safe(cb, self)
        return True


def _safe(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - a broken callback must not break the task machinery
        log.exception("task callback %r failed", fn)
