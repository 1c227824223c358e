"""The state behind the progress views: task-like adapters, one row per task, throttled refresh.

Nothing here imports ipywidgets, so the same state drives the notebook widget and the tqdm
fallback, and tests can drive it without a kernel.

The *task-like protocol* (what `matcalc.widgets.progress` needs from a task):

* ``id`` (str), ``status`` (a `TaskStatus` or its string value),
  ``progress`` (the latest progress event dict or ``None``);
* ``add_done_callback(fn)`` calling ``fn(task)`` once finished (at once when already finished),
  ``add_progress_callback(fn)`` calling ``fn(task, event)``; optionally
  ``add_status_callback(fn)`` calling ``fn(task, status)``;
* ``cancel()``, ``result(timeout)``, ``exception(timeout)``, ``done()``;
* optional descriptive attributes ``label``, ``property``, ``model``, ``error``, ``created_at``,
  ``started_at``, ``finished_at`` (UNIX s).

`matcalc.cluster.Task` implements it, and so will the REST client's ``RemoteTask``. Plain
``concurrent.futures.Future`` and dask ``distributed.Future`` objects are wrapped by
`FutureTask` (status and timing only: futures carry no progress events).
"""

from __future__ import annotations

import builtins
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from matcalc.tasks import STATUSES, TERMINAL, TaskSnapshot

log = logging.getLogger(__name__)

DONE_TIMEOUT_S = 10.0
"""Wait for ``result()``/``exception()`` of a task already finished: a dask future or a remote task
may still have to fetch it over the network (``timeout=0`` would fail there)."""


@runtime_checkable
class TaskLike(Protocol):
    """What a progress view needs from a task (see the module docstring)."""

    id: str

    @property
    def status(self) -> Any: ...

    @property
    def progress(self) -> dict[str, Any] | None: ...

    def add_done_callback(self, fn: Callable[[Any], None]) -> None: ...

    def add_progress_callback(self, fn: Callable[[Any, dict[str, Any]], None]) -> None: ...

    def cancel(self) -> bool: ...

    def result(self, timeout: float | None = None) -> Any: ...

    def exception(self, timeout: float | None = None) -> BaseException | None: ...


def status_name(status: Any) -> str:
    """``"RUNNING"`` for ``TaskStatus.RUNNING``, ``"running"`` or any enum with that value."""
    value = getattr(status, "value", status)
    return str(value).upper()


class FutureTask:
    """A ``concurrent.futures.Future`` or dask ``distributed.Future`` seen as a task-like object.

    Status comes from the future (dask: ``pending`` → QUEUED, ``finished`` → COMPLETED, ``error`` →
    FAILED, ``cancelled`` → CANCELLED; concurrent: ``running()`` → RUNNING); there are no progress
    events, so the row shows status and elapsed time only.
    """

    def __init__(self, future: Any, *, label: str = "", prop: str = "", model: str = "") -> None:
        self.future = future
        key = getattr(future, "key", None)
        self.id = str(key) if key is not None else f"future-{id(future):x}"
        self.label = label or (str(key) if key is not None else "")
        self.property = prop
        self.model = model
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.progress: dict[str, Any] | None = None

    @property
    def status(self) -> str:
        f = self.future
        dask_status = getattr(f, "status", None)
        if isinstance(dask_status, str):  # distributed.Future
            return {"pending": "QUEUED", "finished": "COMPLETED", "error": "FAILED",
                    "cancelled": "CANCELLED", "lost": "FAILED"}.get(dask_status, "QUEUED")
        if f.cancelled():
            return "CANCELLED"
        if f.done():
            return "FAILED" if f.exception() is not None else "COMPLETED"
        return "RUNNING" if f.running() else "QUEUED"

    @property
    def error(self) -> str | None:
        if self.status not in ("FAILED", "CANCELLED"):
            return None
        if self.status == "CANCELLED":
            return "CancelledError: cancelled"
        exc = self.exception(DONE_TIMEOUT_S)
        return None if exc is None else f"{type(exc).__name__}: {exc}"

    def done(self) -> bool:
        return bool(self.future.done())

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        def _cb(_: Any) -> None:
            if self.finished_at is None:
                self.finished_at = time.time()
            fn(self)

        self.future.add_done_callback(_cb)

    def add_progress_callback(self, fn: Callable[[Any, dict[str, Any]], None]) -> None:
        """Futures have no progress events: accepted and never called."""

    def cancel(self) -> bool:
        return bool(self.future.cancel())

    def result(self, timeout: float | None = None) -> Any:
        return self.future.result(timeout=timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return self.future.exception(timeout=timeout)
        except CancelledError as exc:
            return exc

    def __repr__(self) -> str:
        return f"<FutureTask {self.id} {self.status}>"


def as_task(obj: Any) -> Any:
    """``obj`` itself when it is task-like, a `FutureTask` for a future; ``TypeError`` otherwise."""
    if hasattr(obj, "add_progress_callback") and hasattr(obj, "status") and hasattr(obj, "id"):
        return obj
    if hasattr(obj, "add_done_callback") and hasattr(obj, "result") and hasattr(obj, "cancel"):
        return FutureTask(obj)
    raise TypeError(f"expected a matcalc Task, a task-like object or a future, got {type(obj).__name__}")


def as_tasks(tasks: Any) -> list[Any]:
    """A list of task-like objects from one task, a future or an iterable of them."""
    if hasattr(tasks, "add_done_callback") and not isinstance(tasks, (list, tuple)):
        tasks = [tasks]
    out = [as_task(t) for t in tasks]
    ids = [t.id for t in out]
    if len(set(ids)) != len(ids):
        raise ValueError("tasks must have distinct ids")
    return out


@dataclass(frozen=True)
class Row:
    """What one task's row shows (a snapshot)."""

    id: str
    label: str
    property: str
    model: str
    status: str
    stage: str | None = None
    step: int | None = None
    total_steps: int | None = None
    fraction: float | None = None
    energy_eV: float | None = None
    fmax_eV_per_A: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    note: str | None = None
    """The calculation's own one-line status (a progress event's ``extra["note"]``, e.g. Widom insertions
    done and the running K_H with its error)."""

    @builtins.property  # the field ``property`` shadows the builtin in this class body
    def done(self) -> bool:
        return self.status in TERMINAL

    def elapsed_s(self, now: float | None = None) -> float | None:
        """Seconds since the task started running (to its end once finished); None before it ran."""
        if self.started_at is None:
            return None
        end = self.finished_at if self.finished_at is not None else (now if now is not None else time.time())
        return max(0.0, end - self.started_at)

    def step_text(self) -> str:
        if self.step is None:
            return ""
        stage = f"{self.stage} " if self.stage else ""
        total = f"/{self.total_steps}" if self.total_steps else ""
        return f"{stage}{self.step}{total}"


def _note(event: dict[str, Any]) -> str | None:
    extra = event.get("extra")
    note = extra.get("note") if isinstance(extra, dict) else None
    return str(note) if note else None


class ProgressState:
    """Rows of ``tasks`` kept current by their callbacks; thread-safe.

    Listeners (``add_listener(fn)``) are called with the ids of changed rows, on the thread of the
    callback that changed them: keep them quick (the views only mark themselves dirty).
    """

    def __init__(self, tasks: Any) -> None:
        self.tasks = as_tasks(tasks)
        self._by_id = {t.id: t for t in self.tasks}
        self._lock = threading.RLock()
        self._listeners: list[Callable[[set[str]], None]] = []
        self._seen_running: dict[str, float] = {}
        self._rows: dict[str, Row] = {t.id: self._read(t) for t in self.tasks}
        self._all_done = threading.Event()
        self._check_done()
        for t in self.tasks:
            t.add_progress_callback(self._on_progress)
            if hasattr(t, "add_status_callback"):
                t.add_status_callback(self._on_status)
            t.add_done_callback(self._on_done)

    # ------------------------------------------------------------------ reading
    def _read(self, task: Any, event: dict[str, Any] | None = None) -> Row:
        snap = TaskSnapshot.of(task)
        status = snap.status.value
        ev = event if event is not None else dict(snap.progress or {})
        started = snap.started_at
        if started is None and status == "RUNNING":  # futures and clients that do not time tasks
            started = self._seen_running.setdefault(task.id, time.time())
        finished = snap.finished_at
        if finished is None and status in TERMINAL:
            finished = time.time()
        if started is None and finished is not None:
            started = snap.created_at
        error = snap.error if status in TERMINAL else None
        if status in TERMINAL and status != "COMPLETED" and error is None:
            try:
                exc = task.exception(DONE_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - the task's own error API failed
                exc = e
            error = None if exc is None else f"{type(exc).__name__}: {exc}"
        return Row(
            id=task.id,
            label=snap.label,
            property=snap.property,
            model=snap.model,
            status=status,
            stage=ev.get("stage"),
            step=ev.get("step"),
            total_steps=ev.get("total_steps"),
            fraction=1.0 if status == "COMPLETED" else ev.get("fraction"),
            energy_eV=ev.get("energy_eV"),
            fmax_eV_per_A=ev.get("fmax_eV_per_A"),
            started_at=started,
            finished_at=finished,
            error=str(error) if error else None,
            note=_note(ev),
        )

    def _update(self, task: Any, event: dict[str, Any] | None = None) -> None:
        with self._lock:
            old = self._rows.get(task.id)
            new = self._read(task, event)
            if old is not None:
                if old.done and not new.done:  # never go back from a terminal state
                    return
                if event is None and new.step is None and old.step is not None:
                    new = replace(new, stage=old.stage, step=old.step, total_steps=old.total_steps,
                                  fraction=new.fraction if new.fraction is not None else old.fraction,
                                  energy_eV=old.energy_eV, fmax_eV_per_A=old.fmax_eV_per_A, note=old.note)
                if old.done and old.finished_at is not None:
                    new = replace(new, finished_at=old.finished_at)
            self._rows[task.id] = new
            listeners = list(self._listeners)
        self._check_done()
        for fn in listeners:
            try:
                fn({task.id})
            except Exception:  # noqa: BLE001 - a view must not break the task machinery
                log.exception("progress listener %r failed", fn)

    def _on_progress(self, task: Any, event: dict[str, Any]) -> None:
        self._update(task, event)

    def _on_status(self, task: Any, status: Any) -> None:
        self._update(task)

    def _on_done(self, task: Any) -> None:
        self._update(task)

    def _check_done(self) -> None:
        with self._lock:
            if all(r.done for r in self._rows.values()):
                self._all_done.set()

    def refresh(self) -> None:
        """Re-read every task (for task-like objects whose status changes without a callback)."""
        for t in self.tasks:
            self._update(t)

    # ------------------------------------------------------------------ public
    def add_listener(self, fn: Callable[[set[str]], None]) -> None:
        with self._lock:
            self._listeners.append(fn)

    def rows(self) -> list[Row]:
        """Current rows, in task order."""
        with self._lock:
            return [self._rows[t.id] for t in self.tasks]

    def row(self, task_id: str) -> Row:
        with self._lock:
            return self._rows[task_id]

    def task(self, task_id: str) -> Any:
        return self._by_id[task_id]

    def counts(self) -> dict[str, int]:
        """Number of tasks per status (only statuses that occur), in lifecycle order."""
        with self._lock:
            names = [r.status for r in self._rows.values()]
        return {s: names.count(s) for s in STATUSES if s in names} | {
            s: names.count(s) for s in sorted(set(names) - set(STATUSES))}

    def n_done(self) -> int:
        with self._lock:
            return sum(r.done for r in self._rows.values())

    def all_done(self) -> bool:
        return self._all_done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every task is finished (True) or ``timeout`` s passed (False)."""
        return self._all_done.wait(timeout)

    def cancel(self, task_id: str) -> bool:
        """Cancel one task (False when it had already finished)."""
        task = self._by_id[task_id]
        try:
            ok = bool(task.cancel())
        except Exception:  # noqa: BLE001 - e.g. the cluster is gone; show it, do not raise into the UI
            log.exception("cancelling task %s failed", task_id)
            return False
        self._update(task)
        return ok

    def cancel_all(self) -> int:
        """Cancel every unfinished task; returns how many accepted."""
        ids = [r.id for r in self.rows() if not r.done]
        return sum(self.cancel(i) for i in ids)


class Throttle:
    """Call ``fn`` at most once per ``min_interval_s``, on a timer thread, after `request`.

    Requests arriving while a call is scheduled merge into it, so a burst of callbacks costs one
    refresh. `flush` runs a pending call at once (tests, final refresh).
    """

    def __init__(self, fn: Callable[[], None], min_interval_s: float = 0.2) -> None:
        self._fn = fn
        self.min_interval_s = float(min_interval_s)
        self._lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._last = 0.0
        self.calls = 0

    def request(self) -> None:
        with self._lock:
            if self._timer is not None:
                return
            delay = max(0.0, self._last + self.min_interval_s - time.monotonic())
            self._timer = threading.Timer(delay, self._run)
            self._timer.daemon = True
            self._timer.start()

    def _run(self) -> None:
        with self._lock:
            self._timer = None
            self._last = time.monotonic()
        with self._run_lock:
            self.calls += 1
            try:
                self._fn()
            except Exception:  # noqa: BLE001 - keep the view alive
                log.exception("progress refresh failed")

    def flush(self) -> None:
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        self._run()

    def cancel(self) -> None:
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()


class Ticker:
    """A daemon thread calling ``fn`` every ``interval_s`` until ``until()`` is true (keeps the
    elapsed-time column moving while nothing else changes)."""

    def __init__(self, fn: Callable[[], None], interval_s: float, until: Callable[[], bool]) -> None:
        self._stop = threading.Event()
        self._fn, self._until, self.interval_s = fn, until, interval_s
        self.thread = threading.Thread(target=self._loop, name="matcalc-widget-ticker", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self._until():
                break
            self._fn()

    def stop(self) -> None:
        self._stop.set()


def fmt_float(value: float | None, spec: str, unit: str = "") -> str:
    if value is None:
        return ""
    try:
        return f"{float(value):{spec}}{(' ' + unit) if unit else ''}"
    except (TypeError, ValueError):
        return str(value)


def fmt_elapsed(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m}:{s:02d} min"
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d} h"

