"""The task lifecycle, once: statuses, the terminal and active sets, priorities (one order), the
transitions between statuses, the state of one task and its snapshot.

Every layer that handles tasks takes these from here (the store, the dask cluster, the server and
its executors, the REST client, the widgets); nothing in this module imports the rest of matcalc.

Lifecycle (DESIGN §5)::

    PENDING -> QUEUED -> ASSIGNED -> RUNNING -> COMPLETED | FAILED | CANCELLED | TIMEOUT

A task only moves forward, may skip steps (an executor without an ASSIGNED step goes from QUEUED
to RUNNING), and never leaves a terminal status. The one way back is `TaskState.retry`: a
new attempt after the execution died (or a transient error), back to PENDING.

In the spirit of dask's ``Future``/``FutureState``, the *handle* a user holds (a cluster
`Task`, a REST ``RemoteTask``) is apart from the *state*
(`TaskState`) that executors move through public transitions.
"""

from __future__ import annotations

import builtins
import enum
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

log = logging.getLogger(__name__)


class TaskStatus(enum.StrEnum):
    """Where a task is in its lifecycle; the members are in lifecycle order."""

    PENDING = "PENDING"
    """Created, not yet handed to an executor (or waiting for a new attempt)."""
    QUEUED = "QUEUED"
    """Waiting in an executor's queue (or the scheduler's)."""
    ASSIGNED = "ASSIGNED"
    """On one worker's queue (executors that have that step: dask)."""
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"

    @property
    def terminal(self) -> bool:
        """A status the task never leaves."""
        return self in TERMINAL

    @property
    def active(self) -> bool:
        """Not finished: an executor still owes an outcome."""
        return self in ACTIVE

    @property
    def rank(self) -> int:
        """Position in the lifecycle (0 = PENDING); terminal statuses share the last rank."""
        return _RANK[self]


TERMINAL: frozenset[TaskStatus] = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.TIMEOUT})
"""Statuses a task never leaves."""
ACTIVE: frozenset[TaskStatus] = frozenset(set(TaskStatus) - TERMINAL)
"""PENDING, QUEUED, ASSIGNED, RUNNING: not finished."""
WAITING: frozenset[TaskStatus] = frozenset({TaskStatus.PENDING, TaskStatus.QUEUED, TaskStatus.ASSIGNED})
"""Active but not running yet: the queue."""
ON_WORKER: frozenset[TaskStatus] = frozenset({TaskStatus.ASSIGNED, TaskStatus.RUNNING})
"""Handed to a worker: what a worker's death or a restart interrupts."""
FAILURES: frozenset[TaskStatus] = frozenset({TaskStatus.FAILED, TaskStatus.TIMEOUT})
"""Terminal statuses that count as failures (alerts, metrics, log level ERROR)."""
STATUSES: tuple[str, ...] = tuple(s.value for s in TaskStatus)
"""Every status name, in lifecycle order."""
_RANK = {s: min(i, 4) for i, s in enumerate(TaskStatus)}


class Priority(enum.StrEnum):
    """Task priorities, most urgent first: the one order (``CRITICAL > HIGH > NORMAL > LOW``).
    FIFO within a level; no preemption."""

    CRITICAL = "CRITICAL"
    HIGH = "HIGH"
    NORMAL = "NORMAL"
    LOW = "LOW"

    @property
    def rank(self) -> int:
        """Sort key, 0 = most urgent (CRITICAL 0 ... LOW 3)."""
        return _PRIORITY_INDEX[self]

    @property
    def level(self) -> int:
        """Higher = more urgent (CRITICAL 3 ... LOW 0), as dask's priorities count."""
        return len(_PRIORITY_INDEX) - 1 - _PRIORITY_INDEX[self]


_PRIORITY_INDEX = {p: i for i, p in enumerate(Priority)}
PRIORITIES: tuple[str, ...] = tuple(p.value for p in Priority)
"""Every priority name, most urgent first."""
DEFAULT_PRIORITY = Priority.NORMAL


def check_priority(priority: str | Priority) -> Priority:
    """The priority named ``priority`` (any case, surrounding blanks ignored); ``ValueError`` naming
    the allowed values otherwise."""
    key = priority.strip().upper() if isinstance(priority, str) else None
    if key not in _NAMES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    return Priority(key)


_NAMES = frozenset(PRIORITIES)


def check_status(status: str | TaskStatus) -> TaskStatus:
    """The status named ``status`` (any case); ``ValueError`` naming the allowed values otherwise."""
    key = str(getattr(status, "value", status)).strip().upper()
    if key not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    return TaskStatus(key)


def can_advance(current: TaskStatus | str, new: TaskStatus | str) -> bool:
    """True when a task in ``current`` may move to ``new``: forward only, never out of a terminal status
    (a terminal ``new`` is reachable from every active status)."""
    cur, nxt = TaskStatus(current), TaskStatus(new)
    if cur.terminal:
        return False
    return nxt.terminal or nxt.rank > cur.rank


# ----------------------------------------------------------------------------- crashes
DEFAULT_MAX_CRASHES = 2
"""A task whose execution died this many times (its worker process aborted, segfaulted, was killed,
or the server stopped under it) is FAILED instead of being run again."""
WORKER_CRASHED = "worker crashed"
"""Stable start of the error text of a task FAILED because its executions died."""


class TaskTimeoutError(TimeoutError):
    """The task ran longer than its ``timeout_s`` (status TIMEOUT)."""


class TaskCancelledError(CancelledError):
    """The task was cancelled (status CANCELLED)."""


class WorkerCrashedError(RuntimeError):
    """The process running the task died (status FAILED once the crash cap is reached)."""


def death_reason(exitcode: int | None) -> str:
    """What a process exit code says: ``killed by signal 6 (SIGABRT)``, ``exited with status 3``."""
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-exitcode} ({name})"
    return f"exited with status {exitcode}"


def crash_error(reason: str, crashes: int, max_crashes: int) -> str:
    """The error text of a task that died ``crashes`` times (``max_crashes`` allowed)."""
    return (f"{WORKER_CRASHED}: the process running the task died ({reason}); "
            f"its execution died {crashes} time(s), the limit is {max_crashes}")


# ----------------------------------------------------------------------------- snapshot
@dataclass(frozen=True)
class TaskSnapshot:
    """What every surface shows of a task (store rows, cluster tasks, REST tasks, widget rows).
    Times are UNIX seconds."""

    id: str
    status: TaskStatus
    property: str = ""
    """Property function name (``relax``, ``bulk_modulus``...)."""
    model: str = ""
    priority: Priority = DEFAULT_PRIORITY
    label: str = ""
    attempts: int = 0
    """How many times a worker started the task."""
    crashes: int = 0
    """How many of those executions died."""
    worker: str | None = None
    progress: Mapping[str, Any] | None = None
    """The latest progress event (stage, step, total_steps, fraction, energy_eV, fmax_eV_per_A)."""
    error: str | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @builtins.property  # the field ``property`` shadows the builtin in this class body
    def done(self) -> bool:
        return self.status.terminal

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"], d["priority"] = self.status.value, self.priority.value
        d["progress"] = dict(self.progress) if self.progress is not None else None
        return d

    @classmethod
    def of(cls, obj: Any) -> TaskSnapshot:
        """The snapshot of any task-like object (``snapshot()`` when it has one, else its attributes) or a
        mapping such as a REST task (``type`` and ``parameters`` accepted, times as ISO 8601 or seconds)."""
        if isinstance(obj, TaskSnapshot):
            return obj
        if hasattr(obj, "snapshot") and callable(obj.snapshot):
            snap = obj.snapshot()
            if isinstance(snap, TaskSnapshot):
                return snap
        get = obj.get if isinstance(obj, Mapping) else (lambda k, d=None: getattr(obj, k, d))
        prio = get("priority", None)
        progress = get("progress", None)
        return cls(
            id=str(get("id")), status=check_status(get("status", "PENDING")),
            property=str(get("property", None) or get("type", "") or ""), model=str(get("model", "") or ""),
            priority=check_priority(prio) if prio else DEFAULT_PRIORITY, label=str(get("label", "") or ""),
            attempts=int(get("attempts", 0) or 0), crashes=int(get("crashes", 0) or 0), worker=get("worker", None),
            progress=dict(progress) if isinstance(progress, Mapping) else None, error=get("error", None),
            created_at=_seconds(get("created_at", None)), started_at=_seconds(get("started_at", None)),
            finished_at=_seconds(get("finished_at", None)))


def _seconds(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return float(value)


# ----------------------------------------------------------------------------- state
StatusCallback = Callable[[Any, TaskStatus], None]
ProgressCallback = Callable[[Any, dict[str, Any]], None]
DoneCallback = Callable[[Any], None]


class TaskState:
    """The lifecycle state of one task, moved by its executor through public transitions (thread-safe).

    Callbacks receive ``owner`` (the handle the user holds) first. Status callbacks run on every change,
    progress callbacks on every progress event, done callbacks once, when a terminal status is reached.
    """

    def __init__(self, owner: Any = None) -> None:
        self.owner = owner if owner is not None else self
        self.lock = threading.RLock()
        self._status = TaskStatus.PENDING
        self._done = threading.Event()
        self.attempts = 0
        """Executions started (1 for the first)."""
        self.crashes = 0
        """Executions that died with their worker."""
        self.worker: str | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.result: Any = None
        self.exception: BaseException | None = None
        self.progress: dict[str, Any] | None = None
        self._logs: list[dict[str, Any]] = []
        self._status_cbs: list[StatusCallback] = []
        self._progress_cbs: list[ProgressCallback] = []
        self._done_cbs: list[DoneCallback] = []

    # ------------------------------------------------------------------ reading
    @property
    def status(self) -> TaskStatus:
        return self._status

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a terminal status (True) or ``timeout`` s passed (False)."""
        return self._done.wait(timeout)

    @property
    def error(self) -> str | None:
        """``"Type: message"`` of the failure; None unless FAILED/TIMEOUT/CANCELLED."""
        e = self.exception
        return None if e is None else f"{type(e).__name__}: {e}"

    @property
    def logs(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self._logs)

    # ------------------------------------------------------------------ transitions
    def start_attempt(self) -> int:
        """Count a new execution (before it is handed to an executor); returns its number."""
        with self.lock:
            self.attempts += 1
            return self.attempts

    def advance(self, status: TaskStatus, worker: str | None = None, at: float | None = None) -> bool:
        """Move forward to the non-terminal ``status`` (see `can_advance`); False when not allowed.
        ``at``: when it happened (UNIX s; RUNNING sets ``started_at``)."""
        if status.terminal:
            raise ValueError(f"advance() takes a non-terminal status, got {status}; use finish()")
        with self.lock:
            if not can_advance(self._status, status):
                return False
            self._status = status
            if worker:
                self.worker = worker
            if status == TaskStatus.RUNNING:
                self.started_at = at if at is not None else time.time()
            callbacks = list(self._status_cbs)
        for cb in callbacks:
            _safe(cb, self.owner, status)
        return True

    def finish(self, status: TaskStatus, *, result: Any = None, error: BaseException | None = None) -> bool:
        """Enter the terminal ``status`` once (COMPLETED with ``result``, otherwise with ``error``);
        False when the task had finished already."""
        if not status.terminal:
            raise ValueError(f"finish() takes a terminal status, got {status}")
        if status == TaskStatus.COMPLETED and error is not None:
            raise ValueError("a COMPLETED task carries a result, not an error")
        with self.lock:
            if self._done.is_set():
                return False
            self._status = status
            self.result = result if status == TaskStatus.COMPLETED else None
            self.exception = error
            self.finished_at = time.time()
            status_cbs, done_cbs = list(self._status_cbs), list(self._done_cbs)
            self._done_cbs.clear()
            self._done.set()
        for cb in status_cbs:
            _safe(cb, self.owner, status)
        for done_cb in done_cbs:
            _safe(done_cb, self.owner)
        return True

    def retry(self, *, crashed: bool = False) -> bool:
        """Back to PENDING for a new attempt (``crashed``: the last execution died, counted in
        `crashes`); False when the task had finished already."""
        with self.lock:
            if self._done.is_set():
                return False
            if crashed:
                self.crashes += 1
            self._status = TaskStatus.PENDING
            self.started_at = None
            self.progress = None
            callbacks = list(self._status_cbs)
        for cb in callbacks:
            _safe(cb, self.owner, TaskStatus.PENDING)
        return True

    def record_progress(self, event: dict[str, Any]) -> bool:
        """Keep the latest progress event of an unfinished task and tell the progress callbacks."""
        with self.lock:
            if self._done.is_set():
                return False
            self.progress = event
            callbacks = list(self._progress_cbs)
        for cb in callbacks:
            _safe(cb, self.owner, event)
        return True

    def add_logs(self, records: list[dict[str, Any]]) -> None:
        """Add log records not seen yet (by ``attempt`` and ``seq``), kept in (attempt, seq) order."""
        with self.lock:
            seen = {(r.get("attempt"), r.get("seq")) for r in self._logs}
            new = [r for r in records if (r.get("attempt"), r.get("seq")) not in seen or r.get("seq") is None]
            if not new:
                return
            self._logs.extend(new)
            self._logs.sort(key=lambda r: (r.get("attempt") or 0, r.get("seq") or 0))

    # ------------------------------------------------------------------ callbacks
    def add_status_callback(self, fn: StatusCallback) -> None:
        with self.lock:
            self._status_cbs.append(fn)

    def add_progress_callback(self, fn: ProgressCallback) -> None:
        with self.lock:
            self._progress_cbs.append(fn)

    def add_done_callback(self, fn: DoneCallback) -> None:
        """Call ``fn(owner)`` once finished (at once when it is)."""
        with self.lock:
            if not self._done.is_set():
                self._done_cbs.append(fn)
                return
        _safe(fn, self.owner)


def _safe(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - a broken callback must not break the task machinery
        log.exception("task callback %r failed", fn)


__all__ = [
    "ACTIVE",
    "DEFAULT_MAX_CRASHES",
    "DEFAULT_PRIORITY",
    "FAILURES",
    "ON_WORKER",
    "PRIORITIES",
    "STATUSES",
    "TERMINAL",
    "WAITING",
    "WORKER_CRASHED",
    "Priority",
    "TaskCancelledError",
    "TaskSnapshot",
    "TaskState",
    "TaskStatus",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "can_advance",
    "check_priority",
    "check_status",
    "crash_error",
    "death_reason",
]
