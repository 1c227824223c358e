"""What runs on a dask worker: the task function (`run_task`, over the one job runner of
`matcalc.execution`) and `MatcalcWorkerPlugin` (torch threads, model preload, log capture,
assignment events).

Models are cached per process by `matcalc.models.get_model`, and every calculation asks
`matcalc.calculations.common.evaluator_for` for its evaluator, so all tasks on one worker
share one loaded model and one batching engine without anything here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Iterable
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from matcalc.execution import (
    Job,
    Outcome,
    Publish,
    cpu_count,
    install_log_capture,
    loaded_model_names,
    request_stop,
    run_job,
    running_tasks,
)

log = logging.getLogger(__name__)

TASK_KEY_BODY = r"[A-Za-z][A-Za-z0-9_]*(?:-\[[A-Za-z0-9._+=-]*\])?-[0-9a-f]{12}"
"""The shape of a matcalc task's dask key (`task_key`): ``relax-[CALF-20]-3f2a9c1b0d4e``."""
TASK_KEY = re.compile(rf"^{TASK_KEY_BODY}$")
LABEL_CHARS = 40
"""Longest structure label kept in a dask key (characters)."""
BATCHING_METRIC = "matcalc_batching"
"""Name of the per-worker metric (sent to the scheduler with every heartbeat) holding the batching counters."""
ASSIGNED_TOPIC = "matcalc-assigned"
"""Event topic on which workers announce tasks that reached their queue."""
MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_"


class DropLogRecords(logging.Filter):
    """Drops log records whose message matches ``pattern`` (a regular expression, matched at the start)."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern, re.DOTALL)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


def key_label(label: str | None) -> str:
    """``label`` made safe for a dask key and the dashboard: letters, digits and ``. _ + = -`` kept, runs of
    anything else become one ``_``, at most `LABEL_CHARS` characters (``"MOF-5 (prim)"`` ->
    ``"MOF-5_prim"``)."""
    text = re.sub(r"[^A-Za-z0-9._+=-]+", "_", str(label or "")).strip("_")
    return text[:LABEL_CHARS].rstrip("_")


def task_key(prop: str, label: str | None = None, token: str | None = None) -> str:
    """A fresh dask key for one attempt of a matcalc task: ``{property}-[{label}]-{12 hex}``.

    dask's dashboard groups tasks by the key's leading words (``dask.utils.key_split``): the bracket stops that
    group at the property (one word: ``bulk_modulus``), so its progress bars read ``relax``, ``bulk_modulus``... while the task stream and task
    pages show the structure, e.g. ``relax-[CALF-20]-3f2a9c1b0d4e``. Without a label: ``relax-3f2a9c1b0d4e``.
    """
    import uuid

    name = re.sub(r"[^A-Za-z0-9_]+", "_", str(prop)).strip("_") or "task"
    if not name[0].isalpha():
        name = f"task_{name}"
    tag = key_label(label)
    token = token or uuid.uuid4().hex[:12]
    return f"{name}-[{tag}]-{token}" if tag else f"{name}-{token}"


def is_task_key(key: Any) -> bool:
    """True for a dask key made by `task_key`."""
    return isinstance(key, str) and TASK_KEY.match(key) is not None


EXPECTED_FAILURE = DropLogRecords(rf"Compute Failed\s+Key:\s+{TASK_KEY_BODY}(?:\s|$)")
"""dask's worker logs a task whose function raised as "Compute Failed" with its traceback, at ERROR. For a
matcalc task that failure is the task's own outcome (FAILED, with its error, on the Task), so it is not printed
again in the notebook: `MatcalcWorkerPlugin` puts this filter on ``distributed.worker``."""


def quiet_expected_failures() -> None:
    """Install `EXPECTED_FAILURE` on this process' ``distributed.worker`` logger (idempotent)."""
    logger = logging.getLogger("distributed.worker")
    if EXPECTED_FAILURE not in logger.filters:
        logger.addFilter(EXPECTED_FAILURE)


# ---------------------------------------------------------------------------- the task function
async def request_stop_async(task_id: str, reason: str = "cancel") -> bool:
    """`matcalc.execution.request_stop` as a coroutine (runs in the worker's event loop via
    ``Client.run``)."""
    return request_stop(task_id, reason)


async def request_stop_many_async(task_ids: list[str], reason: str = "cancel") -> int:
    """Stop requests for several tasks; returns how many were running here."""
    return sum(request_stop(t, reason) for t in task_ids)


def _dask_publisher(topic: str) -> Publish | None:
    """Messages of a task to the worker's event stream on ``topic``. The ``running`` message goes to
    the scheduler synchronously (an RPC, not the batched stream): once the calculation starts, the
    scheduler has it, so a worker that dies while running the task is known to have been running it."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except ValueError:
        return None

    def publish(msg: dict[str, Any]) -> None:
        if msg.get("type") == "running":
            from distributed.utils import sync

            try:
                sync(worker.loop, worker.scheduler.log_event, topic=topic, msg=msg)
                return
            except Exception as exc:  # noqa: BLE001 - fall back to the batched stream
                log.debug("synchronous running event failed (%s); sending it batched", exc)
        worker.log_event(topic, msg)

    return publish


def worker_address() -> str | None:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except ValueError:
        return None


def run_task(job: Job, topic: str | None = None, progress_interval_s: float = 0.1) -> Outcome:
    """What a dask worker runs for one task: `matcalc.execution.run_job`, its messages published
    on ``topic``; the `Outcome` comes back as the future's result."""
    outcome = run_job(job, _dask_publisher(topic) if topic else None, worker=worker_address(),
                      progress_interval_s=progress_interval_s)
    if outcome.exception is not None:
        import pickle

        try:
            pickle.dumps(outcome.exception)
        except Exception:  # noqa: BLE001 - an exception type that cannot travel: keep its text
            from matcalc.cluster.tasks import WorkerTaskError

            outcome.exception = WorkerTaskError(outcome.error)
    return outcome


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


class MatcalcWorkerPlugin(WorkerPlugin):
    """Set up a worker for matcalc tasks.

    * torch intra-op threads = ``torch_threads`` (default: this host's CPUs / its workers). OpenMP
      keeps the setting per thread: it reaches threads that run torch for the first time after
      setup (dask's task threads, the batching engine's dispatcher), not those that already did;
    * per-task log capture of the ``matcalc`` loggers at ``log_level``;
    * ``plugins``: model plugin modules (``MATCALC_PLUGINS``; default: the client's) added to the worker's
      ``MATCALC_PLUGINS`` and imported, so user models registered by them resolve on every worker;
    * ``pin_gpu``: a worker that is one of several in a job with several GPUs (dask-jobqueue's ``--nworkers``)
      keeps one of them in ``CUDA_VISIBLE_DEVICES`` (`gpu_for_worker`), as dask-cuda does on one machine;
    * ``preload``: model names loaded once at start (kept in the per-process model cache);
    * announces tasks arriving on the worker's queue (status ASSIGNED) on `ASSIGNED_TOPIC`;
    * sends the batching engines' counters to the scheduler with every heartbeat (metric
      `BATCHING_METRIC`: `batching_counters`);
    * warns when the process runs with dask's ``MALLOC_TRIM_THRESHOLD_`` (it slows CHGNet 2.5×);
    * a matcalc task that fails is not logged again by dask (`EXPECTED_FAILURE`).
    """

    name = "matcalc"
    idempotent = False

    def __init__(self, preload: Iterable[str] = (), torch_threads: int | None = None,
                 log_level: str = "INFO", device: str | None = None, *, plugins: Iterable[str] | None = None,
                 pin_gpu: bool = False) -> None:
        from matcalc.models.plugins import env_plugins

        self.preload = tuple(preload)
        self.torch_threads = torch_threads
        self.log_level = log_level
        self.device = device
        self.plugins = tuple(env_plugins() if plugins is None else plugins)
        self.pin_gpu = pin_gpu
        self.worker: Any = None

    async def setup(self, worker: Any) -> None:
        self.worker = worker
        install_log_capture(self.log_level)
        quiet_expected_failures()
        if self.pin_gpu:
            pin_worker_gpu(str(getattr(worker, "name", "")))
        threads = self.torch_threads
        if threads is None:
            threads = await self._cpu_share(worker)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        set_torch_threads(threads)
        if self.plugins:
            install_plugins(self.plugins)
        metrics = getattr(worker, "metrics", None)
        if isinstance(metrics, dict):
            metrics[BATCHING_METRIC] = batching_counters
        if os.environ.get(MALLOC_TRIM):
            log.warning("worker %s runs with %s=%s (dask's nanny default), which slowed CHGNet 2.5x here; "
                        "start workers with distributed.nanny.pre-spawn-environ.%s unset",
                        worker.address, MALLOC_TRIM, os.environ[MALLOC_TRIM], MALLOC_TRIM)
        if self.preload:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, preload_models, self.preload, self.device)

    async def _cpu_share(self, worker: Any) -> int:
        cpus = cpu_count()
        try:
            ident = await worker.scheduler.identity(n_workers=-1)
            hosts = [w.get("host") for w in ident.get("workers", {}).values()]
            same = max(1, sum(1 for h in hosts if h == worker.ip))
        except Exception:  # noqa: BLE001
            same = 1
        return max(1, cpus // same)

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if start == "released" and finish == "waiting" and is_task_key(key):
            self.worker.log_event(ASSIGNED_TOPIC, {"key": key, "worker": self.worker.address})


def install_plugins(modules: Iterable[str]) -> list[str]:
    """Add ``modules`` to this process' ``MATCALC_PLUGINS`` (keeping those already there) and import every
    plugin; returns the names that failed to import (each is also logged as a warning by the registry)."""
    from matcalc.models.plugins import ENV_VAR, env_plugins, load_plugins

    names = list(dict.fromkeys([*env_plugins(), *modules]))
    os.environ[ENV_VAR] = ",".join(names)
    statuses = load_plugins(force=True)
    return [s.name for s in statuses if not s.loaded]


def gpu_for_worker(name: str, visible: str | None) -> str | None:
    """The one GPU (an entry of ``visible``, a ``CUDA_VISIBLE_DEVICES`` value) that worker ``name`` keeps when a
    job runs one worker per GPU: dask's ``--nworkers N --name JOB`` names its workers ``JOB-0`` ... ``JOB-(N-1)``,
    and worker ``JOB-i`` takes GPU ``i`` (modulo the GPUs). None when there is nothing to choose (one GPU or none
    visible, or a name without an index)."""
    devices = [d.strip() for d in (visible or "").split(",") if d.strip()]
    if len(devices) < 2:
        return None
    head, _, tail = name.rpartition("-")
    if not head or not tail.isdigit():
        return None
    return devices[int(tail) % len(devices)]


def pin_worker_gpu(name: str) -> str | None:
    """Restrict this worker process to its GPU (`gpu_for_worker`) before CUDA starts; returns it."""
    choice = gpu_for_worker(name, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if choice is None:
        return None
    import torch

    if torch.cuda.is_initialized():
        log.warning("worker %s: CUDA already started, cannot pin it to GPU %s; it sees %s", name, choice,
                    os.environ.get("CUDA_VISIBLE_DEVICES"))
        return None
    os.environ["CUDA_VISIBLE_DEVICES"] = choice
    return choice


def batching_counters(dask_worker: Any = None) -> list[dict[str, Any]]:
    """The counters of each batching engine of this process (one dict per engine): model, device, requests,
    structures, calls (fused model calls), atoms (summed over calls), model_time_s, mean_fill (atoms per call /
    atom budget), mean_batch_size (structures per call), atoms_per_s (atoms / model time) and budget_atoms.
    Sent to the scheduler with each heartbeat; also for ``Client.run``."""
    from matcalc import batching

    rows = []
    for engine in batching.engines():
        s = engine.stats_snapshot()
        atoms = int(sum(s.atoms_per_call))
        rows.append({"model": str(engine.potential.name), "device": str(engine.potential.device),
                     "requests": int(s.requests), "structures": int(s.structures), "calls": int(s.calls),
                     "atoms": atoms, "model_time_s": float(s.model_time_s), "mean_fill": float(s.mean_fill),
                     "mean_batch_size": float(s.mean_batch_size),
                     "atoms_per_s": atoms / s.model_time_s if s.model_time_s > 0 else 0.0,
                     "budget_atoms": int(s.budget_atoms)})
    return rows


class CustomModelsPlugin(WorkerPlugin):
    """Registers validated user models (`matcalc.models.custom.CustomModel`) on every worker, present
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
    """What `Cluster.workers` reports about one worker (runs on that worker)."""
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
