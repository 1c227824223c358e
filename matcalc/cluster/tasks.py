"""Tasks on a dask cluster: the `Task` handle a user holds for one submitted calculation.

The lifecycle (statuses, transitions, priorities) is `matcalc.tasks`; a Task keeps its
`TaskState` in `Task.state`, which the `Cluster`
moves through its public transitions as dask reports progress, logs and outcomes from the workers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any, Protocol

from matcalc.execution import json_safe
from matcalc.tasks import (
    TaskCancelledError,
    TaskSnapshot,
    TaskState,
    TaskStatus,
    TaskTimeoutError,
    check_priority,
)

if TYPE_CHECKING:
    from matcalc.calculations.results import Result

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
    level = check_priority(priority).level
    with _ORDER_LOCK:
        now = max(time.time_ns() // 1000, _LAST_US[0] + 1)
        _LAST_US[0] = now
    return level * _LEVEL_SPAN - now


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


class TaskRunner(Protocol):
    """What a `Task` asks of the cluster that runs it."""

    def wait_for(self, task: Task, timeout: float | None) -> bool:
        """Block until ``task`` is finished (True) or ``timeout`` s passed (False)."""

    def cancel_task(self, task: Task) -> bool: ...


class Task:
    """Handle of one submitted calculation (thread-safe).

    Attributes:
        id: stable id (the caller's ``task_id`` or a fresh uuid hex).
        property: property name (``"relax"``...) or the function name for a custom callable.
        model: model name. priority: ``CRITICAL``/``HIGH``/``NORMAL``/``LOW``.
        label: name of the input (file stem, builtin name). structure_hash: sha256 of the input.
        params: keyword arguments passed to the calculation.
        timeout_s, retries: limits given at submission.
        created_at: UNIX time (s).
        state: the lifecycle state (`matcalc.tasks.TaskState`): status, attempts, crashes, worker,
            start and end times, result or error, progress, logs.
    """

    def __init__(self, *, task_id: str, prop: str, model: str, priority: str, params: dict[str, Any],
                 label: str = "", structure_hash: str | None = None, timeout_s: float | None = None,
                 retries: int = 0, runner: TaskRunner | None = None) -> None:
        self.id = task_id
        self.property = prop
        self.model = model
        self.priority = check_priority(priority).value
        self.params = dict(params)
        self.label = label
        self.structure_hash = structure_hash
        self.timeout_s = timeout_s
        self.retries = retries
        self.created_at = time.time()
        self.runner = runner
        self.state = TaskState(self)

    # ------------------------------------------------------------------ the state, read through
    @property
    def status(self) -> TaskStatus:
        return self.state.status

    @property
    def attempts(self) -> int:
        """How many times the task was sent to a worker."""
        return self.state.attempts

    @property
    def crashes(self) -> int:
        """How many of those executions died with their worker."""
        return self.state.crashes

    @property
    def worker(self) -> str | None:
        """Address of the worker that ran (or runs) it."""
        return self.state.worker

    @property
    def started_at(self) -> float | None:
        return self.state.started_at

    @property
    def finished_at(self) -> float | None:
        return self.state.finished_at

    @property
    def progress(self) -> dict[str, Any] | None:
        """The latest progress event (stage, step, total_steps, fraction, energy_eV, fmax_eV_per_A)."""
        return self.state.progress

    @property
    def logs(self) -> list[dict[str, Any]]:
        """Log records of the ``matcalc`` loggers emitted by this task on its worker
        (``time``, ``level``, ``logger``, ``message``)."""
        return self.state.logs

    @property
    def error(self) -> str | None:
        """``"Type: message"`` of the failure, None unless FAILED/TIMEOUT/CANCELLED."""
        return self.state.error

    def done(self) -> bool:
        return self.state.done()

    # ------------------------------------------------------------------ waiting
    def result(self, timeout: float | None = None) -> Result:
        """Wait (at most ``timeout`` s) and return the result dataclass; raise the task's error.

        Raises:
            TimeoutError: still running after ``timeout`` seconds (the task goes on).
            TaskTimeoutError: the task ran past its own ``timeout_s``.
            TaskCancelledError: the task was cancelled.
            WorkerCrashedError: its worker died as often as allowed.
            Exception: the calculation's own exception, re-raised.
        """
        self._wait_or_raise(timeout)
        if self.state.exception is not None:
            raise self.state.exception
        return self.state.result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait like `result`; the task's error, or None when it completed."""
        self._wait_or_raise(timeout)
        return self.state.exception

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished (True) or ``timeout`` s passed (False)."""
        if self.runner is None or self.state.done():
            return self.state.wait(timeout)
        return self.runner.wait_for(self, timeout)

    def _wait_or_raise(self, timeout: float | None) -> None:
        if not self.wait(timeout):
            raise TimeoutError(f"task {self.id} not finished after {timeout} s (status {self.status})")

    # ------------------------------------------------------------------ control
    def cancel(self) -> bool:
        """Cancel a queued task, or ask a running one to stop; False when already finished."""
        if self.done():
            return False
        if self.runner is None:
            return self.state.finish(TaskStatus.CANCELLED, error=TaskCancelledError(f"task {self.id} cancelled"))
        return self.runner.cancel_task(self)

    def add_done_callback(self, fn: Callable[[Task], None]) -> None:
        """Call ``fn(task)`` once the task reaches a terminal state (at once if it has)."""
        self.state.add_done_callback(fn)

    def add_progress_callback(self, fn: Callable[[Task, dict[str, Any]], None]) -> None:
        """Call ``fn(task, event_dict)`` for each progress event (on the client's event thread:
        keep it quick)."""
        self.state.add_progress_callback(fn)

    def add_status_callback(self, fn: Callable[[Task, TaskStatus], None]) -> None:
        """Call ``fn(task, new_status)`` on every status change."""
        self.state.add_status_callback(fn)

    # ------------------------------------------------------------------ views
    def snapshot(self) -> TaskSnapshot:
        s = self.state
        return TaskSnapshot(id=self.id, status=s.status, property=self.property, model=self.model,
                            priority=check_priority(self.priority), label=self.label, attempts=s.attempts,
                            crashes=s.crashes, worker=s.worker, progress=s.progress, error=s.error,
                            created_at=self.created_at, started_at=s.started_at, finished_at=s.finished_at)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary: the snapshot, plus the identity, the limits and the result as
        ``Result.to_dict()`` when COMPLETED."""
        result = self.state.result
        return {**self.snapshot().to_dict(), "structure_hash": self.structure_hash, "params": json_safe(self.params),
                "timeout_s": self.timeout_s, "retries": self.retries,
                "result": result.to_dict() if result is not None else None}

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.property}/{self.model} {self.status.value} {self.priority}>"


__all__ = ["Task", "TaskRunner", "WorkerTaskError", "dask_priority", "is_transient"]
