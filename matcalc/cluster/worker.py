"""What runs on a dask worker: the task function, cooperative stop/timeout, per-task log capture,
and :class:`MatcalcWorkerPlugin` (torch threads, model preload, log capture, assignment events).

Models are cached per process by :func:`matcalc.models.get_model`, and every calculation asks
:func:`matcalc.calculations.common.evaluator_for` for its evaluator, so all tasks on one worker
share one loaded model and one batching engine without anything here.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from matcalc import progress
from matcalc.cluster.tasks import TaskCancelledError, TaskTimeoutError

log = logging.getLogger(__name__)

KEY_PREFIX = "matcalc-"
"""Every dask key of a matcalc task starts with this."""
ASSIGNED_TOPIC = "matcalc-assigned"
"""Event topic on which workers announce tasks that reached their queue."""
MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_"

Publish = Callable[[dict[str, Any]], None]


@dataclass
class TaskSpec:
    """What the worker needs to run one task (small; the structure travels separately)."""

    task_id: str
    model: str
    prop: str | None = None
    """Property name (``calculations.property_function``); None when ``fn`` is given."""
    fn: Callable[..., Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    topic: str | None = None
    """Event topic for progress/log/state messages (None: publish nothing)."""
    timeout_s: float | None = None
    attempt: int = 1
    progress_interval_s: float = 0.1
    """At most one progress event per interval (the last one of the task is always sent)."""


# ---------------------------------------------------------------------------- stop requests
_RUNNING: dict[str, tuple[threading.Event, list[str]]] = {}
_EARLY: OrderedDict[str, str] = OrderedDict()
_REG_LOCK = threading.Lock()


def request_stop(task_id: str, reason: str = "cancel") -> bool:
    """Ask the task ``task_id`` running in this process to stop (``reason``: cancel or timeout).

    Returns True when it was running here; otherwise the request is remembered briefly in case
    the task starts right after.
    """
    with _REG_LOCK:
        entry = _RUNNING.get(task_id)
        if entry is None:
            _EARLY[task_id] = reason
            while len(_EARLY) > 10_000:
                _EARLY.popitem(last=False)
            return False
    stop, reasons = entry
    if not reasons:
        reasons.append(reason)
    stop.set()
    return True


async def request_stop_async(task_id: str, reason: str = "cancel") -> bool:
    """:func:`request_stop` as a coroutine (runs in the worker's event loop via ``Client.run``)."""
    return request_stop(task_id, reason)


async def request_stop_many_async(task_ids: list[str], reason: str = "cancel") -> int:
    """Stop requests for several tasks; returns how many were running here."""
    return sum(request_stop(t, reason) for t in task_ids)


def running_tasks() -> list[str]:
    """Ids of the tasks running in this process."""
    with _REG_LOCK:
        return sorted(_RUNNING)


# ---------------------------------------------------------------------------- log capture
@dataclass
class _TaskContext:
    task_id: str
    attempt: int
    publish: Publish | None
    records: list[dict[str, Any]] = field(default_factory=list)
    seq: itertools.count = field(default_factory=itertools.count)


_CURRENT: contextvars.ContextVar[_TaskContext | None] = contextvars.ContextVar("matcalc_task", default=None)


class TaskLogHandler(logging.Handler):
    """Routes records of the ``matcalc`` loggers to the task whose context emitted them
    (threads started with :func:`matcalc.calculations.common.map_threads` inherit the context)."""

    def emit(self, record: logging.LogRecord) -> None:
        ctx = _CURRENT.get()
        if ctx is None:
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
            ctx.publish({"type": "log", "record": rec})


_HANDLER: TaskLogHandler | None = None


def install_log_capture(level: int | str = logging.INFO) -> None:
    """Attach the per-task handler to the ``matcalc`` logger (once per process) at ``level``."""
    global _HANDLER
    logger = logging.getLogger("matcalc")
    lvl = logging.getLevelName(level) if isinstance(level, str) else level
    if _HANDLER is None:
        _HANDLER = TaskLogHandler()
        logger.addHandler(_HANDLER)
    _HANDLER.setLevel(lvl)
    if logger.getEffectiveLevel() > lvl:
        logger.setLevel(lvl)


# ---------------------------------------------------------------------------- the task function
def _event_safe(value: Any) -> Any:
    from matcalc.calculations.results import _jsonable

    v = _jsonable(value)
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {k: _event_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_event_safe(x) for x in v]
    return str(v)


def _dask_publisher(topic: str, task_id: str, attempt: int) -> Publish | None:
    try:
        from distributed import get_worker

        worker = get_worker()
    except ValueError:
        return None

    def publish(msg: dict[str, Any]) -> None:
        worker.log_event(topic, {"task_id": task_id, "attempt": attempt, **msg})

    return publish


def worker_address() -> str | None:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except ValueError:
        return None


def loaded_model_names() -> list[str]:
    from matcalc.models.registry import loaded_models

    return sorted({name for name, _ in loaded_models()})


def run_task(spec: TaskSpec, structure: Any, publish: Publish | None = None) -> dict[str, Any]:
    """Run one calculation (on a worker, or in-process) and return ``{"result", "logs", ...}``.

    Progress events and log records go to ``publish`` (default: the worker's event stream on
    ``spec.topic``). A timeout or cancel sets the progress stop event: ASE loops end at their
    next step, then :class:`TaskTimeoutError` / :class:`TaskCancelledError` is raised.
    """
    if publish is None and spec.topic:
        publish = _dask_publisher(spec.topic, spec.task_id, spec.attempt)
    address = worker_address()
    stop = threading.Event()
    reasons: list[str] = []
    with _REG_LOCK:
        _RUNNING[spec.task_id] = (stop, reasons)
        early = _EARLY.pop(spec.task_id, None)
    if early:
        reasons.append(early)
        stop.set()
    timer = None
    if spec.timeout_s is not None:
        def fire() -> None:
            if not reasons:
                reasons.append("timeout")
            stop.set()

        timer = threading.Timer(spec.timeout_s, fire)
        timer.daemon = True
        timer.start()
    ctx = _TaskContext(spec.task_id, spec.attempt, publish)
    token = _CURRENT.set(ctx)
    last_sent = [0.0]
    pending: list[dict[str, Any] | None] = [None]

    def sink(event: progress.ProgressEvent) -> None:
        if publish is None:
            return
        msg = {"type": "progress", **_event_safe(event.to_dict())}
        now = time.monotonic()
        if now - last_sent[0] >= spec.progress_interval_s:
            last_sent[0] = now
            pending[0] = None
            publish(msg)
        else:
            pending[0] = msg

    t0 = time.perf_counter()
    try:
        if publish is not None:
            publish({"type": "running", "worker": address, "models": sorted({*loaded_model_names(), spec.model}),
                     "time": time.time()})
        if stop.is_set():
            raise _stopped(spec, reasons)
        fn = spec.fn
        if fn is None:
            from matcalc.calculations import property_function

            fn = property_function(spec.prop or "")
        try:
            with progress.reporting(sink, stop=stop):
                result = fn(structure, model=spec.model, **spec.params)
        except Exception as exc:
            if reasons:
                raise _stopped(spec, reasons) from exc
            raise
        if reasons:
            raise _stopped(spec, reasons)
        if publish is not None and pending[0] is not None:
            publish(pending[0])
        return {"result": result, "logs": ctx.records, "worker": address, "models": loaded_model_names(),
                "run_time_s": time.perf_counter() - t0}
    except BaseException as exc:
        try:
            exc.matcalc_logs = list(ctx.records)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - some exception types refuse attributes
            pass
        raise
    finally:
        if timer is not None:
            timer.cancel()
        _CURRENT.reset(token)
        with _REG_LOCK:
            if _RUNNING.get(spec.task_id, (None,))[0] is stop:
                del _RUNNING[spec.task_id]


def _stopped(spec: TaskSpec, reasons: list[str]) -> Exception:
    if reasons and reasons[0] == "timeout":
        return TaskTimeoutError(f"task {spec.task_id} exceeded its timeout of {spec.timeout_s} s")
    return TaskCancelledError(f"task {spec.task_id} cancelled while running")


# ---------------------------------------------------------------------------- worker plugin
def set_torch_threads(n: int) -> int:
    """``torch.set_num_threads(n)`` (intra-op threads; new threads inherit it); returns the value set."""
    import torch

    n = max(1, int(n))
    torch.set_num_threads(n)
    return torch.get_num_threads()


def preload_models(names: Iterable[str], device: str | None = None) -> list[str]:
    """Load ``names`` into this process' model cache; returns the names that loaded."""
    from matcalc.models import get_model

    done = []
    for name in names:
        try:
            get_model(name, device)
            done.append(name)
        except Exception as exc:  # noqa: BLE001 - a missing optional model must not kill the worker
            log.warning("could not preload model %s: %s", name, exc)
    return done


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class MatcalcWorkerPlugin(WorkerPlugin):
    """Set up a worker for matcalc tasks.

    * torch intra-op threads = ``torch_threads`` (default: this host's CPUs / its workers). OpenMP
      keeps the setting per thread: it reaches threads that run torch for the first time after
      setup (dask's task threads, the batching engine's dispatcher), not those that already did;
    * per-task log capture of the ``matcalc`` loggers at ``log_level``;
    * ``preload``: model names loaded once at start (kept in the per-process model cache);
    * announces tasks arriving on the worker's queue (status ASSIGNED) on :data:`ASSIGNED_TOPIC`;
    * warns when the process runs with dask's ``MALLOC_TRIM_THRESHOLD_`` (it slows CHGNet 2.5×).
    """

    name = "matcalc"
    idempotent = False

    def __init__(self, preload: Iterable[str] = (), torch_threads: int | None = None,
                 log_level: str = "INFO", device: str | None = None) -> None:
        self.preload = tuple(preload)
        self.torch_threads = torch_threads
        self.log_level = log_level
        self.device = device
        self.worker: Any = None

    async def setup(self, worker: Any) -> None:
        self.worker = worker
        install_log_capture(self.log_level)
        threads = self.torch_threads
        if threads is None:
            threads = await self._cpu_share(worker)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        set_torch_threads(threads)
        if os.environ.get(MALLOC_TRIM):
            log.warning("worker %s runs with %s=%s (dask's nanny default), which slowed CHGNet 2.5x here; "
                        "start workers with distributed.nanny.pre-spawn-environ.%s unset",
                        worker.address, MALLOC_TRIM, os.environ[MALLOC_TRIM], MALLOC_TRIM)
        if self.preload:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, preload_models, self.preload, self.device)

    async def _cpu_share(self, worker: Any) -> int:
        cpus = _cpu_count()
        try:
            ident = await worker.scheduler.identity(n_workers=-1)
            hosts = [w.get("host") for w in ident.get("workers", {}).values()]
            same = max(1, sum(1 for h in hosts if h == worker.ip))
        except Exception:  # noqa: BLE001
            same = 1
        return max(1, cpus // same)

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if start == "released" and finish == "waiting" and isinstance(key, str) and key.startswith(KEY_PREFIX):
            self.worker.log_event(ASSIGNED_TOPIC, {"key": key, "worker": self.worker.address})


class CustomModelsPlugin(WorkerPlugin):
    """Registers validated user models (:class:`matcalc.models.custom.CustomModel`) on every worker, present
    and future; registering a new plugin under the same name replaces the set (models left out are dropped).

    The model files must be readable at the same paths on the workers (one machine, or a shared file system).
    """

    name = "matcalc-custom-models"
    idempotent = False

    def __init__(self, models: Iterable[Any] = ()) -> None:
        self.models = tuple(models)

    def setup(self, worker: Any) -> None:
        from matcalc.models.custom import custom_models, register_validated, unregister_model_file

        keep = {m.name for m in self.models}
        for m in custom_models():
            if m.name not in keep:
                unregister_model_file(m.name)
        for m in self.models:
            register_validated(m)


def worker_info(dask_worker: Any = None) -> dict[str, Any]:
    """What :meth:`Cluster.workers` reports about one worker (runs on that worker)."""
    import torch

    info: dict[str, Any] = {
        "address": getattr(dask_worker, "address", None),
        "name": str(getattr(dask_worker, "name", "")),
        "pid": os.getpid(),
        "nthreads": getattr(getattr(dask_worker, "state", None), "nthreads", None),
        "torch_threads": torch.get_num_threads(),
        "resources": dict(getattr(dask_worker, "total_resources", {}) or {}),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "malloc_trim_threshold": os.environ.get(MALLOC_TRIM),
        "models": loaded_model_names(),
        "running_tasks": running_tasks(),
        "gpu": None,
        "device": "cpu",
    }
    try:
        from matcalc import batching

        info["batching"] = [{"model": e.potential.name, "device": str(e.potential.device),
                             **e.stats_snapshot().summary()} for e in batching.engines()]
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        info["batching"] = f"unavailable: {exc}"
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        info["device"] = f"cuda:{idx}"
        info["gpu"] = {"name": torch.cuda.get_device_name(idx),
                       "memory_total_MiB": round(torch.cuda.get_device_properties(idx).total_memory / 2**20, 1),
                       "memory_allocated_MiB": round(torch.cuda.memory_allocated(idx) / 2**20, 1)}
    return info


def worker_environ(dask_worker: Any = None) -> dict[str, str]:
    """The worker process' environment (for checks)."""
    return dict(os.environ)
