"""Where tasks run. The server talks to an :class:`Executor`; two implementations:

* :class:`InProcessExecutor` (default, ``--cluster inprocess``): worker threads in the server
  process, a priority queue (priority, then FIFO), cooperative stop for cancel and timeout;
* :class:`ClusterExecutor` (``--cluster local|ADDRESS``): the dask cluster of :mod:`matcalc.cluster`.

Executors report back through :class:`ExecutorCallbacks` (the task service writes to the store).
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

PRIORITY_RANK = {"CRITICAL": 0, "HIGH": 1, "NORMAL": 2, "LOW": 3}


@dataclass
class Job:
    """One task as the executor sees it (plain, JSON-safe values only)."""

    task_id: str
    prop: str
    """Property function name (``relax``, ``bulk_modulus``...)."""
    model: str
    structure: str
    """Structure text (as stored)."""
    fmt: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    priority: str = "NORMAL"
    timeout_s: float | None = None
    label: str | None = None


class ExecutorCallbacks(Protocol):
    def on_assigned(self, task_id: str, worker: str | None, gpu: str | None) -> None:
        """A worker took the task into its queue (executors that have such a step)."""

    def on_started(self, task_id: str, worker: str | None, gpu: str | None) -> int | None:
        """A worker starts the task; returns the attempt number, or None to skip it (e.g. cancelled)."""

    def on_progress(self, task_id: str, event: dict[str, Any]) -> None: ...

    def on_log(self, task_id: str, record: dict[str, Any]) -> None: ...

    def on_done(self, task_id: str, status: str, result: dict[str, Any] | None, error: str | None,
                attempt: int | None) -> None:
        """Terminal outcome: COMPLETED (with ``Result.to_dict()``), FAILED, TIMEOUT or CANCELLED."""


class Executor(Protocol):
    name: str

    def start(self, callbacks: ExecutorCallbacks) -> None: ...

    def submit(self, job: Job) -> None: ...

    def cancel(self, task_id: str) -> bool: ...

    def shutdown(self, timeout_s: float) -> list[str]:
        """Stop; wait up to ``timeout_s`` for running tasks; return the ids still running."""

    def health(self) -> tuple[bool, str]: ...

    def info(self) -> dict[str, Any]: ...

    def load_model(self, name: str) -> list[str]: ...

    def unload_model(self, name: str) -> bool: ...

    def loaded_models(self) -> dict[str, list[str]]: ...

    def register_custom_model(self, model: Any) -> None:
        """Make a validated user model (:class:`matcalc.models.custom.CustomModel`) loadable by name."""

    def unregister_custom_model(self, name: str) -> None: ...


# ----------------------------------------------------------------------------- running one job
def build_call(job: Job) -> tuple[Callable[..., Any], Any, dict[str, Any]]:
    """``(function, structure, kwargs)`` of a job; structures are parsed here, never unpickled."""
    from matcalc.calculations import property_function
    from matcalc.structures import load_structure

    fn = property_function(job.prop)
    atoms = load_structure(job.structure, fmt=job.fmt, require_cell=False, max_atoms=None)
    if job.label:
        atoms.info["label"] = job.label
    kwargs = dict(job.params)
    guest = kwargs.get("guest")
    if job.prop == "interaction_energy" and isinstance(guest, str) and "\n" in guest.strip():
        kwargs["guest"] = load_structure(guest, require_cell=False, max_atoms=None)
    return fn, atoms, kwargs


_current_task: contextvars.ContextVar[str | None] = contextvars.ContextVar("matcalc_server_task", default=None)


class _TaskLogHandler(logging.Handler):
    """Forwards ``matcalc`` log records emitted while a task runs to its log."""

    def __init__(self, sink: Callable[[str, dict[str, Any]], None]) -> None:
        super().__init__(logging.INFO)
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        task_id = _current_task.get()
        if task_id is None or record.name.startswith("matcalc.server") or record.name.startswith("matcalc.store"):
            return
        try:
            self._sink(task_id, {"level": record.levelname, "logger": record.name, "message": record.getMessage(),
                                 "time": record.created})
        except Exception:  # noqa: BLE001 - logging must never break a task
            pass


@dataclass
class _Running:
    job: Job
    stop: threading.Event
    attempt: int | None
    ended: bool = False
    timer: threading.Timer | None = None


class InProcessExecutor:
    """Worker threads in this process pulling jobs by (priority, submission order)."""

    name = "inprocess"

    def __init__(self, workers: int = 2, device: str | None = None, blas_threads: int | None = None) -> None:
        self.n_workers = int(workers)
        self.device = device
        self.blas_threads = blas_threads
        self._queue: queue.PriorityQueue[tuple[int, int, Job | None]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._cancelled: set[str] = set()
        self._queued: set[str] = set()
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._callbacks: ExecutorCallbacks | None = None
        self._stopping = threading.Event()
        self._handler: _TaskLogHandler | None = None
        self.completed = 0
        self.failed = 0
        self.worker_name = f"inprocess:{os.getpid()}"

    # -------------------------------------------------------------- lifecycle
    def start(self, callbacks: ExecutorCallbacks) -> None:
        self._callbacks = callbacks
        if self.blas_threads:
            try:
                from threadpoolctl import threadpool_limits

                threadpool_limits(limits=self.blas_threads, user_api="blas")
            except ImportError:  # pragma: no cover - threadpoolctl comes with scipy's stack
                log.info("threadpoolctl not installed: BLAS thread count left as is")
        self._handler = _TaskLogHandler(callbacks.on_log)
        logging.getLogger("matcalc").addHandler(self._handler)
        for i in range(self.n_workers):
            t = threading.Thread(target=self._loop, name=f"matcalc-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            raise RuntimeError("executor is shutting down")
        with self._lock:
            self._queued.add(job.task_id)
            self._cancelled.discard(job.task_id)
        self._queue.put((PRIORITY_RANK.get(job.priority, 2), next(self._seq), job))

    def cancel(self, task_id: str) -> bool:
        with self._lock:
            run = self._running.get(task_id)
            if run is not None:
                run.stop.set()
                return True
            if task_id in self._queued:
                self._cancelled.add(task_id)
                return True
        return False

    def shutdown(self, timeout_s: float) -> list[str]:
        self._stopping.set()
        for _ in self._threads:
            self._queue.put((-1, -1, None))  # wake every worker (sorts first)
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            left = list(self._running)
            for run in self._running.values():
                run.ended = True  # later outcomes are not reported: the task gets requeued
                run.stop.set()
        if self._handler is not None:
            logging.getLogger("matcalc").removeHandler(self._handler)
        return left

    def health(self) -> tuple[bool, str]:
        alive = sum(t.is_alive() for t in self._threads)
        if self._stopping.is_set():
            return False, "shutting down"
        if alive < self.n_workers:
            return False, f"{self.n_workers - alive} of {self.n_workers} worker threads died"
        return True, f"{alive} worker thread(s)" + (" (queue only: workers=0)" if self.n_workers == 0 else "")

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {"kind": self.name, "workers": self.n_workers, "running": len(self._running),
                    "queued": len(self._queued), "completed": self.completed, "failed": self.failed}

    # -------------------------------------------------------------- models
    def load_model(self, name: str) -> list[str]:
        from matcalc.models import get_model

        get_model(name, self.device)
        return [self.worker_name]

    def unload_model(self, name: str) -> bool:
        from matcalc.models.registry import unload_model

        return unload_model(name, self.device)

    def register_custom_model(self, model: Any) -> None:
        from matcalc.models.custom import register_validated

        register_validated(model)

    def unregister_custom_model(self, name: str) -> None:
        from matcalc.models.custom import unregister_model_file

        unregister_model_file(name)

    def loaded_models(self) -> dict[str, list[str]]:
        from matcalc.models.registry import loaded_models

        out: dict[str, list[str]] = {}
        for name, device in loaded_models():
            out.setdefault(name, []).append(f"{self.worker_name}/{device}")
        return out

    # -------------------------------------------------------------- workers
    def _loop(self) -> None:
        while True:
            _, _, job = self._queue.get()
            if job is None or self._stopping.is_set():
                return
            with self._lock:
                self._queued.discard(job.task_id)
                if job.task_id in self._cancelled:
                    self._cancelled.discard(job.task_id)
                    continue
            try:
                self._run(job)
            except Exception:  # noqa: BLE001 - a worker thread must survive anything
                log.exception("worker failed on task %s", job.task_id)

    def _run(self, job: Job) -> None:
        from matcalc import progress

        cb = self._callbacks
        assert cb is not None
        attempt = cb.on_started(job.task_id, self.worker_name, None)
        if attempt is None:
            return
        run = _Running(job, threading.Event(), attempt)
        with self._lock:
            self._running[job.task_id] = run
        if job.timeout_s:
            run.timer = threading.Timer(job.timeout_s, self._timeout, args=(run,))
            run.timer.daemon = True
            run.timer.start()

        def sink(event: progress.ProgressEvent) -> None:
            if not run.ended:
                cb.on_progress(job.task_id, event.to_dict())

        from matcalc.server.middleware import request_id_var

        status, result, error = "COMPLETED", None, None
        token = _current_task.set(job.task_id)
        rid_token = request_id_var.set(f"task:{job.task_id}")  # log lines of the task carry its id
        try:
            fn, atoms, kwargs = build_call(job)
            with progress.reporting(sink, stop=run.stop):
                res = fn(atoms, model=job.model, device=self.device, **kwargs)
            result = res.to_dict()
        except BaseException as exc:  # noqa: BLE001 - the task failed, the worker goes on
            status, error = "FAILED", f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, Exception):
                raise
        finally:
            _current_task.reset(token)
            request_id_var.reset(rid_token)
            if run.timer is not None:
                run.timer.cancel()
            with self._lock:
                self._running.pop(job.task_id, None)
        if run.stop.is_set() and status == "COMPLETED" and not run.ended:
            status, result, error = "CANCELLED", None, "stopped on request"
        self._report(run, status, result, error)

    def _timeout(self, run: _Running) -> None:
        run.stop.set()
        self._report(run, "TIMEOUT", None, f"timed out after {run.job.timeout_s:g} s")

    def _report(self, run: _Running, status: str, result: dict[str, Any] | None, error: str | None) -> None:
        with self._lock:
            if run.ended:
                return
            run.ended = True
            if status == "COMPLETED":
                self.completed += 1
            elif status == "FAILED":
                self.failed += 1
        assert self._callbacks is not None
        self._callbacks.on_done(run.job.task_id, status, result, error, run.attempt)


def make_executor(cluster: str, workers: int, device: str | None, blas_threads: int | None = None) -> Executor:
    """The executor for ``--cluster``: ``inprocess``, ``local`` or a dask scheduler address."""
    if cluster in ("inprocess", "in-process", ""):
        return InProcessExecutor(workers=workers, device=device, blas_threads=blas_threads)
    from matcalc.server.cluster_executor import ClusterExecutor

    return ClusterExecutor(cluster, workers=workers, device=device)
