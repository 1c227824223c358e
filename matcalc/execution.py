"""The job runner: what runs one calculation, wherever it runs (a dask worker, a worker process of
``matcalc serve``, a thread of the server in its in-process mode). Everything around the calculation
is here once:

* stop requests (`request_stop`, by task id, remembered briefly when they come before the
  task starts) and the timeout, both through `matcalc.progress`'s stop event: ASE loops end at
  their next step;
* the progress sink, throttled to one event per ``progress_interval_s`` (the last one always sent);
* log capture: records of the ``matcalc`` loggers emitted while a task runs go to that task
  (threads started by the calculation inherit the context);
* the current task: one context variable (`current_task`);
* a plain `Outcome` returned, never raised: COMPLETED with the result, or FAILED / CANCELLED /
  TIMEOUT with the error.

`plan_concurrency` sizes the workers of both the server's executor and ``matcalc.cluster.start``.
`matcalc.progress` stays the low-level module calculations call (``report``, ``should_stop``).
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from matcalc import progress
from matcalc.tasks import TaskCancelledError, TaskStatus, TaskTimeoutError

log = logging.getLogger(__name__)

Publish = Callable[[dict[str, Any]], None]
"""Receives the messages of a running task: ``{"type": "running" | "progress" | "log", "task_id",
"attempt", ...}`` (JSON-safe values only)."""


@dataclass
class Job:
    """One execution of one task: what a worker needs to run it."""

    task_id: str
    model: str
    prop: str | None = None
    """Property name (``relax``, ``bulk_modulus``...; see `matcalc.calculations.property_function`)."""
    fn: Callable[..., Any] | None = None
    """Any ``fn(structure, model=..., **params)`` instead of a property (then ``prop`` is only a label)."""
    params: dict[str, Any] = field(default_factory=dict)
    structure: Any = None
    """An ``ase.Atoms``, or the text of a structure file (parsed by the runner, never unpickled)."""
    fmt: str | None = None
    """Format of a structure text (``cif``, ``vasp``, ``extxyz``; None: detected)."""
    label: str | None = None
    device: str | None = None
    timeout_s: float | None = None
    """Wall-clock limit once running (s); the outcome is then TIMEOUT."""
    priority: str = "NORMAL"
    attempt: int = 1
    crashes: int = 0
    """Earlier executions of this task that died with their worker (the executor runs it alone then)."""


@dataclass
class Outcome:
    """How one execution ended (``status`` is terminal)."""

    task_id: str
    attempt: int
    status: TaskStatus
    result: Any = None
    """The result dataclass (`Result`) when COMPLETED."""
    error: str | None = None
    """``"Type: message"`` unless COMPLETED."""
    exception: BaseException | None = None
    logs: list[dict[str, Any]] = field(default_factory=list)
    worker: str | None = None
    models: list[str] = field(default_factory=list)
    """Models loaded in the worker afterwards (model affinity)."""
    run_time_s: float = 0.0

    def to_message(self) -> dict[str, Any]:
        """JSON-safe form (the result as ``Result.to_dict()``), for pipes and stores."""
        return {"type": "done", "task_id": self.task_id, "attempt": self.attempt, "status": self.status.value,
                "result": self.result.to_dict() if self.result is not None else None, "error": self.error,
                "worker": self.worker, "models": list(self.models), "run_time_s": self.run_time_s}


# ----------------------------------------------------------------------------- the current task
@dataclass
class TaskContext:
    """The task a thread is running (inherited by threads the calculation starts with its context)."""

    task_id: str
    attempt: int
    publish: Publish | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    seq: Any = field(default_factory=itertools.count)


_CURRENT: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar("matcalc_task", default=None)


def current_task() -> TaskContext | None:
    """The task running in this context (None outside a task)."""
    return _CURRENT.get()


def current_task_id() -> str | None:
    ctx = _CURRENT.get()
    return None if ctx is None else ctx.task_id


# ----------------------------------------------------------------------------- stop requests
_RUNNING: dict[str, tuple[threading.Event, list[str]]] = {}
_EARLY: OrderedDict[str, str] = OrderedDict()
_REG_LOCK = threading.Lock()
_EARLY_MAX = 10_000


def request_stop(task_id: str, reason: str = "cancel") -> bool:
    """Ask the task ``task_id`` running in this process to stop (``reason``: ``cancel`` or ``timeout``).

    Returns True when it runs here; otherwise the request is remembered (the last 10 000) in case the
    task starts right after.
    """
    with _REG_LOCK:
        entry = _RUNNING.get(task_id)
        if entry is None:
            _EARLY[task_id] = reason
            while len(_EARLY) > _EARLY_MAX:
                _EARLY.popitem(last=False)
            return False
    stop, reasons = entry
    if not reasons:
        reasons.append(reason)
    stop.set()
    return True


def running_tasks() -> list[str]:
    """Ids of the tasks running in this process."""
    with _REG_LOCK:
        return sorted(_RUNNING)


# ----------------------------------------------------------------------------- log capture
SKIPPED_LOGGERS = ("matcalc.server", "matcalc.store")
"""Service loggers whose records never belong to a task (in-process mode runs them in task threads)."""


class TaskLogHandler(logging.Handler):
    """Routes records of the ``matcalc`` loggers to the task whose context emitted them."""

    def emit(self, record: logging.LogRecord) -> None:
        ctx = _CURRENT.get()
        if ctx is None or record.name.startswith(SKIPPED_LOGGERS):
            return
        try:
            rec = {"time": record.created, "level": record.levelname, "logger": record.name,
                   "message": record.getMessage(), "task_id": ctx.task_id, "attempt": ctx.attempt,
                   "seq": next(ctx.seq)}
        except Exception:  # noqa: BLE001 - a bad format string must not break the task
            self.handleError(record)
            return
        ctx.records.append(rec)
        if ctx.publish is not None:
            try:
                ctx.publish({"type": "log", "task_id": ctx.task_id, "attempt": ctx.attempt, "record": rec})
            except Exception:  # noqa: BLE001 - logging must never break a task
                pass


_HANDLER: TaskLogHandler | None = None
_HANDLER_LOCK = threading.Lock()


def install_log_capture(level: int | str = logging.INFO) -> None:
    """Attach the per-task handler to the ``matcalc`` logger (once per process) at ``level``."""
    global _HANDLER
    logger = logging.getLogger("matcalc")
    lvl = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    with _HANDLER_LOCK:
        if _HANDLER is None:
            _HANDLER = TaskLogHandler()
            logger.addHandler(_HANDLER)
        _HANDLER.setLevel(lvl)
    if logger.getEffectiveLevel() > lvl:
        logger.setLevel(lvl)


# ----------------------------------------------------------------------------- running one job
def loaded_model_names() -> list[str]:
    """Names of the models loaded in this process."""
    from matcalc.models.registry import loaded_models

    return sorted({name for name, _ in loaded_models()})


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON types (for event streams and pipes): numpy scalars and arrays become
    numbers and lists, anything else JSON cannot hold becomes its text; NaN stays NaN."""
    return json.loads(json.dumps(value, default=_plain))


def _plain(obj: Any) -> Any:
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars
    return tolist() if callable(tolist) else str(obj)


def prepare(job: Job) -> tuple[Callable[..., Any], Any, dict[str, Any]]:
    """``(function, structure, kwargs)`` of ``job``; structure texts are parsed here."""
    from matcalc.structures import load_structure

    fn = job.fn
    if fn is None:
        from matcalc.calculations import property_function

        fn = property_function(job.prop or "")
    atoms = job.structure
    if isinstance(atoms, str):
        atoms = load_structure(atoms, fmt=job.fmt, require_cell=False, max_atoms=None)
        if job.label:
            atoms.info["label"] = job.label
    kwargs = dict(job.params)
    guest = kwargs.get("guest")
    if isinstance(guest, str) and "\n" in guest.strip():  # a guest given as structure text
        kwargs["guest"] = load_structure(guest, require_cell=False, max_atoms=None)
    if job.device is not None:
        kwargs["device"] = job.device
    return fn, atoms, kwargs


def run_job(job: Job, publish: Publish | None = None, *, worker: str | None = None,
            progress_interval_s: float = 0.1) -> Outcome:
    """Run ``job`` here and return its `Outcome` (never raises for the calculation's errors).

    ``publish`` gets a ``running`` message first, then progress events (at most one per
    ``progress_interval_s``; the last one is always sent) and log records. A stop request or the
    timeout sets the progress stop event; the outcome is then CANCELLED or TIMEOUT.
    """
    stop = threading.Event()
    reasons: list[str] = []
    with _REG_LOCK:
        _RUNNING[job.task_id] = (stop, reasons)
        early = _EARLY.pop(job.task_id, None)
    if early:
        reasons.append(early)
        stop.set()
    timer = None
    if job.timeout_s is not None:
        def fire() -> None:
            if not reasons:
                reasons.append("timeout")
            stop.set()

        timer = threading.Timer(job.timeout_s, fire)
        timer.daemon = True
        timer.start()
    ctx = TaskContext(job.task_id, job.attempt, publish)
    token = _CURRENT.set(ctx)
    throttle = _Throttle(publish, job.task_id, job.attempt, progress_interval_s)
    t0 = time.perf_counter()
    outcome = Outcome(job.task_id, job.attempt, TaskStatus.COMPLETED, worker=worker)
    try:
        if publish is not None:
            publish({"type": "running", "task_id": job.task_id, "attempt": job.attempt, "worker": worker,
                     "pid": os.getpid(), "models": sorted({*loaded_model_names(), job.model}), "time": time.time()})
        try:
            if stop.is_set():
                raise _stopped(job, reasons)
            fn, atoms, kwargs = prepare(job)
            with progress.reporting(throttle, stop=stop):
                outcome.result = fn(atoms, model=job.model, **kwargs)
            if reasons:
                raise _stopped(job, reasons)
        except Exception as exc:  # noqa: BLE001 - the task failed; the worker goes on
            if reasons and not isinstance(exc, (TaskTimeoutError, TaskCancelledError)):
                exc = _stopped(job, reasons)
            outcome.result = None
            outcome.exception = exc
            outcome.error = f"{type(exc).__name__}: {exc}"
            outcome.status = (TaskStatus.TIMEOUT if isinstance(exc, TaskTimeoutError) else
                              TaskStatus.CANCELLED if isinstance(exc, TaskCancelledError) else TaskStatus.FAILED)
        throttle.flush()
    finally:
        if timer is not None:
            timer.cancel()
        _CURRENT.reset(token)
        with _REG_LOCK:
            if _RUNNING.get(job.task_id, (None,))[0] is stop:
                del _RUNNING[job.task_id]
    outcome.logs = list(ctx.records)
    outcome.models = loaded_model_names()
    outcome.run_time_s = time.perf_counter() - t0
    return outcome


def _stopped(job: Job, reasons: list[str]) -> Exception:
    if reasons and reasons[0] == "timeout":
        return TaskTimeoutError(f"task {job.task_id} timed out after {job.timeout_s:g} s")
    return TaskCancelledError(f"task {job.task_id} cancelled while running")


class _Throttle:
    """The progress sink of one job: at most one event per interval reaches ``publish``."""

    def __init__(self, publish: Publish | None, task_id: str, attempt: int, interval_s: float) -> None:
        self.publish, self.task_id, self.attempt, self.interval_s = publish, task_id, attempt, interval_s
        self.last = 0.0
        self.pending: dict[str, Any] | None = None
        self.lock = threading.Lock()

    def __call__(self, event: progress.ProgressEvent) -> None:
        if self.publish is None:
            return
        msg = {"type": "progress", "task_id": self.task_id, "attempt": self.attempt,
               **json_safe(event.to_dict())}
        now = time.monotonic()
        with self.lock:
            if now - self.last < self.interval_s:
                self.pending = msg
                return
            self.last, self.pending = now, None
        self.publish(msg)

    def flush(self) -> None:
        with self.lock:
            msg, self.pending = self.pending, None
        if msg is not None and self.publish is not None:
            self.publish(msg)


# ----------------------------------------------------------------------------- sizing workers
GPU_SLOTS = 4
"""Concurrent tasks per GPU worker: their force calls are fused on the device by the batching engine."""
CPU_SLOTS = 1
"""Concurrent tasks per CPU worker process. On a CPU the host's Python work (optimizer and filter steps,
neighbour lists) serialises under one GIL, so processes beat threads: the benchmarks measured two
single-task processes 1.6x faster than two task threads in one process on 2 cores; and a second task
thread made one-at-a-time tasks wait for the batching engine's idle "active caller"."""
MEMORY_PER_CPU_WORKER_GIB = 2.0
"""Memory planned per CPU worker process (torch, a loaded uMLIP and a MOF-sized calculation)."""


@dataclass(frozen=True)
class Concurrency:
    """How many worker processes, concurrent tasks per worker and torch threads per worker to run."""

    workers: int
    slots: int
    torch_threads: int
    gpus: tuple[int, ...] = ()
    """GPU index of each worker (one per GPU); empty on CPU."""
    reason: str = ""

    @property
    def tasks(self) -> int:
        """Tasks running at once."""
        return self.workers * self.slots


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def memory_bytes() -> int | None:
    """Physical memory of the machine (None when unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return None


def plan_concurrency(gpus: Sequence[int] = (), *, workers: int | None = None, slots: int | None = None,
                     torch_threads: int | None = None, cpus: int | None = None,
                     memory: int | None = None) -> Concurrency:
    """Size the workers for this machine (explicit values win).

    * GPUs: one worker per GPU with `GPU_SLOTS` concurrent tasks sharing that GPU's batching
      engine (one lane), and the CPUs split among the workers for torch.
    * CPU: one worker process per CPU (at most one per `MEMORY_PER_CPU_WORKER_GIB` of memory),
      one task each, one torch thread each. The batching engine still fuses the structures of one task
      (the EOS points, the phonon displacements); its CPU lanes follow the torch threads, so there is one
      lane per worker. One task alone then uses one core: throughput over latency, as a server and a
      screening campaign want; give ``workers=1, torch_threads=cpus`` for one big calculation.
    """
    cpus = cpus or cpu_count()
    for name, value in (("workers", workers), ("slots", slots), ("torch_threads", torch_threads)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if gpus:
        n = workers or len(gpus)
        per_worker = tuple(gpus[i % len(gpus)] for i in range(n))
        return Concurrency(n, slots or GPU_SLOTS, torch_threads or max(1, cpus // n), per_worker,
                           f"{len(gpus)} GPU(s): one worker per GPU, {slots or GPU_SLOTS} tasks each")
    if workers is None:
        mem = memory if memory is not None else memory_bytes()
        by_memory = max(1, int(mem // (MEMORY_PER_CPU_WORKER_GIB * 2**30))) if mem else cpus
        workers = max(1, min(cpus, by_memory))
        reason = f"{cpus} CPU(s): one worker process per CPU" + (
            f", {workers} by memory ({MEMORY_PER_CPU_WORKER_GIB:g} GiB each)" if workers < cpus else "")
    else:
        reason = f"{workers} worker(s) as given"
    return Concurrency(workers, slots or CPU_SLOTS, torch_threads or max(1, cpus // workers), (), reason)


def visible_gpus() -> list[int]:
    """Indices of the CUDA GPUs torch sees (empty without torch CUDA; torch is not even imported on a
    machine without NVIDIA devices)."""
    import glob

    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "" or not glob.glob("/dev/nvidia[0-9]*"):
        return []
    try:
        import torch

        return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    except Exception:  # noqa: BLE001 - no torch, a broken driver: CPU
        return []


# ----------------------------------------------------------------------------- a worker process
def _load_model(name: str, device: str | None) -> bool:
    from matcalc.models import get_model

    get_model(name, device)
    return True


def _unload_model(name: str, device: str | None) -> bool:
    from matcalc.models.registry import unload_model

    return unload_model(name, device)


def _loaded_models(device: str | None) -> list[tuple[str, str]]:
    from matcalc.models.registry import loaded_models

    return loaded_models()


def _register_custom_model(model: Any, device: str | None) -> bool:
    from matcalc.models.custom import register_validated

    register_validated(model)
    return True


def _unregister_custom_model(name: str, device: str | None) -> bool:
    from matcalc.models.custom import unregister_model_file

    unregister_model_file(name)
    return True


WORKER_CALLS: dict[str, Callable[..., Any]] = {
    "load_model": _load_model,
    "unload_model": _unload_model,
    "loaded_models": _loaded_models,
    "register_custom_model": _register_custom_model,
    "unregister_custom_model": _unregister_custom_model,
}
"""What an executor may ask a worker process to do (``fn(*args, device)``)."""
_INLINE_CALLS = frozenset({"register_custom_model", "unregister_custom_model"})
"""Quick calls a worker answers in its message loop, so they take effect before the tasks sent after them
(the others, such as loading a model, run on a thread of their own)."""


class _Forward(logging.Handler):
    """A worker process' log records, to the executor's process (``syslog`` messages), tagged with the task
    that emitted them."""

    def __init__(self, send: Publish) -> None:
        super().__init__()
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            rec = {"name": record.name, "levelno": record.levelno, "levelname": record.levelname,
                   "msg": record.getMessage(), "created": record.created, "process": record.process,
                   "threadName": record.threadName, "task_id": current_task_id(),
                   "exc_text": self.formatter.formatException(record.exc_info)
                   if record.exc_info and self.formatter else None}
            self.send({"type": "syslog", "record": rec})
        except Exception:  # noqa: BLE001 - the executor is gone or the record is odd: drop it
            pass


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the thread that started it ends (the executor's process died)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent_pid:  # it died before prctl
        os._exit(0)


def worker_main(fd: int) -> None:
    """Entry point of a worker process (``python -c "from matcalc.execution import worker_main; worker_main(fd)"``):
    run the jobs an executor sends over the connection ``fd``, one thread per job, and answer its
    `WORKER_CALLS`. Exits when the executor's end of the connection closes."""
    from multiprocessing.connection import Connection

    t0 = time.monotonic()
    conn = Connection(fd)
    init = conn.recv()
    _die_with_parent(int(init["parent_pid"]))
    name, device = init["name"], init.get("device")
    send_lock = threading.Lock()

    def send(msg: dict[str, Any]) -> None:
        with send_lock:
            conn.send(msg)

    level = str(init.get("log_level", "INFO")).upper()
    handler = _Forward(send)
    handler.setFormatter(logging.Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level, logging.INFO))
    install_log_capture(level)
    if init.get("blas_threads"):
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=int(init["blas_threads"]), user_api="blas")
        except ImportError:  # pragma: no cover - threadpoolctl comes with scipy's stack
            pass
    # torch is imported by the first model that needs it and takes its threads from OMP_NUM_THREADS
    # (set by the executor): importing it here would cost seconds per worker start for EMT/LJ tasks
    import matcalc.calculations  # noqa: F401 - the property modules, once before the first task
    from matcalc.models.registry import model_names

    model_names()  # imports the model plugins (MATCALC_PLUGINS, entry points)
    for model in init.get("custom_models", ()):
        try:
            _register_custom_model(model, device)
        except Exception as exc:  # noqa: BLE001 - one broken model must not stop the worker
            log.error("could not register custom model %s: %s", getattr(model, "name", model), exc)
    interval = float(init.get("progress_interval_s", 0.1))

    def run(job: Job) -> None:
        outcome = run_job(job, send, worker=name, progress_interval_s=interval)
        try:
            send(outcome.to_message())
        except Exception as exc:  # noqa: BLE001 - a result that does not pickle
            send({"type": "done", "task_id": job.task_id, "attempt": job.attempt, "status": TaskStatus.FAILED.value,
                  "result": None, "error": f"{type(exc).__name__}: the outcome could not be sent: {exc}"})

    def call(rid: int, method: str, args: tuple[Any, ...]) -> None:
        try:
            send({"type": "reply", "id": rid, "ok": True, "value": WORKER_CALLS[method](*args, device)})
        except Exception as exc:  # noqa: BLE001 - reported to the executor
            send({"type": "reply", "id": rid, "ok": False, "value": f"{type(exc).__name__}: {exc}"})

    send({"type": "ready", "pid": os.getpid(), "setup_s": time.monotonic() - t0})
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            os._exit(0)  # the executor is gone
        op = msg.get("op")
        if op == "run":
            threading.Thread(target=run, args=(msg["job"],), daemon=True, name="matcalc-task").start()
        elif op == "stop":
            request_stop(msg["task_id"], msg.get("reason", "cancel"))
        elif op == "call" and msg["method"] in _INLINE_CALLS:  # in order: before any task sent after it
            call(msg["id"], msg["method"], tuple(msg.get("args", ())))
        elif op == "call":
            threading.Thread(target=call, args=(msg["id"], msg["method"], tuple(msg.get("args", ()))),
                             daemon=True, name="matcalc-call").start()
        elif op == "exit":
            os._exit(0)


__all__ = [
    "CPU_SLOTS",
    "GPU_SLOTS",
    "Concurrency",
    "Job",
    "Outcome",
    "Publish",
    "WORKER_CALLS",
    "TaskContext",
    "TaskLogHandler",
    "cpu_count",
    "current_task",
    "current_task_id",
    "install_log_capture",
    "json_safe",
    "loaded_model_names",
    "plan_concurrency",
    "prepare",
    "request_stop",
    "run_job",
    "running_tasks",
    "visible_gpus",
    "worker_main",
]
