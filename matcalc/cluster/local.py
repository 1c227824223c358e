"""Start or connect to a dask cluster and run matcalc tasks on it.

``start()`` builds a ``dask_cuda.LocalCUDACluster`` (one pinned worker per GPU, each carrying the
resource ``GPU=1``) when GPUs, torch CUDA and ``dask_cuda`` are all present, otherwise a
``distributed.LocalCluster`` of CPU worker processes; ``connect(address)`` attaches to any running
scheduler (dask-jobqueue, Kubernetes, ``dask scheduler`` + ``dask worker``). Both return a
`Cluster`.

Scheduling choices (DESIGN §5):

* priority names map to dask priorities (`dask_priority`): the level
  first, then submission time, because dask alone does not keep submission order among equal
  priorities. FIFO within a level; no preemption.
* every task carries a loose worker hint (``workers=..., allow_other_workers=True``): the workers
  that already hold the task's model, else those with no model yet, else all. This is the model
  affinity, and it also makes dask send tasks straight to a worker queue (where they are ordered by
  priority) instead of its "root task" queue, so priorities hold for every task.
* progress events, log records and state changes travel from the worker through dask's event
  stream (``Worker.log_event`` -> ``Client.subscribe_topic``), one topic per `Cluster`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from matcalc.calculations import PROPERTIES, checks
from matcalc.calculations.common import label_of
from matcalc.cluster.gpus import cuda_status
from matcalc.cluster.tasks import Task, WorkerTaskError, dask_priority, is_transient
from matcalc.cluster.worker import (
    ASSIGNED_TOPIC,
    MALLOC_TRIM,
    DropLogRecords,
    MatcalcWorkerPlugin,
    request_stop_async,
    request_stop_many_async,
    run_task,
    task_key,
    worker_info,
)
from matcalc.execution import Job, Outcome, plan_concurrency
from matcalc.tasks import (
    DEFAULT_MAX_CRASHES,
    ON_WORKER,
    TaskCancelledError,
    TaskStatus,
    TaskTimeoutError,
    WorkerCrashedError,
    check_priority,
    crash_error,
)

if TYPE_CHECKING:
    import pandas as pd
    from distributed import Client, Future

log = logging.getLogger(__name__)

CLOSING_NOISE = DropLogRecords(r"Worker process still alive after .* seconds, killing")
"""dask's nanny warns when a worker takes more than a few seconds to exit and kills it: while `Cluster.close`
shuts down a cluster it started, that is routine (its tasks are finished or cancelled), not a warning for the
notebook."""

DEFAULT_THREADS_GPU = 4
"""Concurrent tasks per GPU worker (their force requests are fused by the batching engine);
`matcalc.execution.GPU_SLOTS`."""
DEFAULT_THREADS_CPU = 1
"""On a CPU, fusing MOF-sized CHGNet calls does not pay (benchmarks/README.md) and a second task thread
per worker made one-at-a-time tasks wait for the batching engine's idle "active caller" (~40 ms);
`matcalc.execution.CPU_SLOTS`."""
WORKER_REFRESH_S = 2.0
LOST_WORKER_TIMEOUT_S = 600.0
"""How long a local cluster waits for a crashed worker's restart before giving up on it (s)."""
SCHEDULER_TOPIC = "all"
"""The scheduler's own event topic (workers added and removed, with the tasks they were processing)."""


def property_name(fn: str | Callable[..., Any]) -> tuple[str, Callable[..., Any] | None]:
    """``(name, custom_fn)``: a property name or one of the property functions gives ``(name, None)``;
    any other callable gives ``(fn.__name__, fn)`` and runs as ``fn(structure, model=..., **params)``."""
    if isinstance(fn, str):
        from matcalc.calculations import property_function

        f = property_function(fn)  # ValueError for unknown names
        return f.__name__, None
    if not callable(fn):
        raise ValueError(f"fn must be a property name or a callable, not {type(fn).__name__}")
    name = getattr(fn, "__name__", type(fn).__name__)
    if name in PROPERTIES and getattr(fn, "__module__", None) == PROPERTIES[name][0]:
        return name, None
    return name, fn


def _prepare_structure(structure: Any) -> tuple[Any, str, str | None]:
    """Read the structure on the client (paths exist only here): ``(atoms, label, hash)``.

    Raises StructureError for unreadable input. Element/size checks happen on the worker,
    against the model.
    """
    from ase import Atoms

    from matcalc.structures import StructureError, load_structure, structure_hash

    label = label_of(structure)
    if isinstance(structure, Atoms):  # validated on the worker; skip the neighbour search here
        if len(structure) == 0:
            raise StructureError("the structure has no atoms")
        atoms = structure.copy()
        atoms.calc = None
    else:
        atoms = load_structure(structure, require_cell=False, max_atoms=None)
    if label:
        atoms.info["label"] = label
    return atoms, label, structure_hash(atoms)


@dataclass
class _Submission:
    """What the cluster keeps of one task while dask runs it (the `Task` is the user's handle)."""

    task: Task
    fn: Callable[..., Any] | None
    atoms: Any
    key: str | None = None
    future: Future | None = None
    timer: threading.Timer | None = None
    running_on: str | None = None
    """Worker that reported running the current attempt (None until it did)."""
    hint: tuple[str, ...] = ()
    """The workers the current attempt was hinted to (model affinity)."""
    settled_key: str | None = None
    waiters: int = 0


class Cluster:
    """A dask client plus matcalc task handling; use as a context manager.

    Build with `start` or `connect`. ``close()`` shuts down a cluster that
    `start` created and only disconnects from one given to `connect`.

    Worker deaths: when a worker dies, its tasks are sent again (new dask keys, fresh worker hints);
    the task it was *running* counts a crash and, after ``max_crashes`` of them, is FAILED with
    `WorkerCrashedError` ("worker crashed: ..."), so a task that kills its worker
    never stays RUNNING and never loops. A task that crashed once runs alone on its next GPU worker.
    """

    def __init__(self, client: Client, cluster: Any = None, *, owns_cluster: bool = False,
                 gpu: bool = False, gpu_share: float | None = None, gpu_reason: str = "",
                 dashboard: bool = True, progress_interval_s: float = 0.1,
                 max_crashes: int = DEFAULT_MAX_CRASHES, kind: str = "local") -> None:
        checks.integer("max_crashes", max_crashes, minimum=1)
        self.client = client
        self.cluster = cluster
        self.kind = kind
        """``local`` (a cluster `start` made on this machine), ``slurm``/``pbs`` (batch jobs through
        dask-jobqueue) or ``connected`` (`connect`)."""
        self.gpu = gpu
        """True when tasks request the worker resource ``GPU``."""
        self.gpu_reason = gpu_reason
        """Why GPUs are (not) used."""
        self.max_crashes = max_crashes
        """A task whose worker died this many times while running it is FAILED."""
        self._gpu_share = gpu_share
        self._owns = owns_cluster
        self._dashboard = dashboard
        self.progress_interval_s = progress_interval_s
        self.topic = f"matcalc-events-{uuid.uuid4().hex[:16]}"
        self._lock = threading.RLock()
        self._tasks: dict[str, Task] = {}
        self._subs: dict[str, _Submission] = {}
        self._by_key: dict[str, _Submission] = {}
        self._worker_models: dict[str, set[str]] = {}
        self._workers_seen: tuple[float, list[str]] = (0.0, [])
        self._gone: set[str] = set()
        """Workers that left the scheduler."""
        self._closed = False
        self._helper = ThreadPoolExecutor(1, thread_name_prefix="matcalc-cluster")
        """Work that must not run on the client's event loop thread (blocking dask calls), in order."""
        client.subscribe_topic(self.topic, self._on_event)
        client.subscribe_topic(ASSIGNED_TOPIC, self._on_assigned)
        client.subscribe_topic(SCHEDULER_TOPIC, self._on_scheduler_event)

    # ------------------------------------------------------------------ context / info
    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "GPU" if self.gpu else "CPU"
        try:
            n = str(len(self._worker_addresses(force=False)))
        except Exception:  # noqa: BLE001
            n = "?"
        return (f"<matcalc Cluster {self.kind} {self.client.scheduler.address} {kind} workers={n} "
                f"dashboard={self.dashboard_link}>")

    def _repr_html_(self) -> str:
        """The notebook view: scheduler, kind, workers, task counts and links to dask's dashboard and to the
        workers' batching counters."""
        import html

        try:
            n = str(len(self._worker_addresses(force=True)))
        except Exception:  # noqa: BLE001 - the scheduler may be gone
            n = "?"
        counts: dict[str, int] = {}
        for t in self.tasks():
            counts[t.status.value] = counts.get(t.status.value, 0) + 1
        link, page = self.dashboard_link, self.batching_link

        def a(url: str | None) -> str:
            return f"<a href='{html.escape(url)}' target='_blank'>{html.escape(url)}</a>" if url else "none"

        kind = f"{html.escape(self.kind)}, {'GPU' if self.gpu else 'CPU'} workers"
        rows = [("scheduler", html.escape(self.address)), ("kind", kind), ("workers", n),
                ("tasks", html.escape(", ".join(f"{k} {v}" for k, v in counts.items()) or "none")),
                ("dashboard", a(link)), ("batching", a(page))]
        body = "".join(f"<tr><th style='text-align:left'>{k}</th><td style='text-align:left'>{v}</td></tr>"
                       for k, v in rows)
        return f"<div><strong>matcalc Cluster</strong><table>{body}</table></div>"

    @property
    def address(self) -> str:
        return str(self.client.scheduler.address)

    @property
    def dashboard_link(self) -> str | None:
        """URL of dask's dashboard (None when disabled or unavailable)."""
        if not self._dashboard:
            return None
        try:
            return str(self.client.dashboard_link)
        except Exception:  # noqa: BLE001
            return None

    @property
    def batching_link(self) -> str | None:
        """URL of the page of the workers' batching counters on the scheduler's dashboard server
        (`matcalc.cluster.scheduler`; None without a dashboard)."""
        link = self.dashboard_link
        if not link:
            return None
        from matcalc.cluster.scheduler import BATCHING_PATH

        base = link[: -len("/status")] if link.endswith("/status") else link.rstrip("/")
        return base + BATCHING_PATH

    def batching(self) -> pd.DataFrame:
        """The batching counters of every worker as the scheduler has them (sent with the workers'
        heartbeats): one row per worker and model with worker, name, model, device, requests, structures,
        calls, atoms, model_time_s, mean_fill, mean_batch_size, atoms_per_s and budget_atoms."""
        import pandas as pd

        from matcalc.cluster.scheduler import scheduler_batching_rows

        return pd.DataFrame(self.client.run_on_scheduler(scheduler_batching_rows))

    def scale(self, n: int | None = None, *, jobs: int | None = None) -> None:
        """Ask for ``n`` workers (or, for SLURM/PBS, ``jobs`` batch jobs) on a cluster `start` made."""
        if self.cluster is None:
            raise RuntimeError("scale() needs a cluster started by matcalc.cluster.start(), not one connected to")
        if jobs is not None:
            checks.integer("jobs", jobs, minimum=0)
            if self.kind not in ("slurm", "pbs"):
                raise ValueError("jobs= is for SLURM/PBS clusters; give n= workers")
            self.cluster.scale(jobs=jobs)
            return
        if n is None:
            raise ValueError("give n (workers) or jobs=")
        checks.integer("n", n, minimum=0)
        self.cluster.scale(n)
        self._workers_seen = (0.0, [])

    def adapt(self, minimum: int | None = None, maximum: int | None = None, *, minimum_jobs: int | None = None,
              maximum_jobs: int | None = None, **kwargs: Any) -> Any:
        """Let dask grow and shrink the cluster with the work queued: between ``minimum`` and ``maximum``
        workers, or (SLURM/PBS) ``minimum_jobs`` and ``maximum_jobs`` batch jobs. Idle workers are retired
        (their tasks are moved first); ``**kwargs`` go to dask's ``Adaptive`` (``interval``, ``wait_count``...).
        Returns dask's Adaptive object."""
        if self.cluster is None:
            raise RuntimeError("adapt() needs a cluster started by matcalc.cluster.start(), not one connected to")
        for name, v in (("minimum", minimum), ("maximum", maximum), ("minimum_jobs", minimum_jobs),
                        ("maximum_jobs", maximum_jobs)):
            if v is not None:
                checks.integer(name, v, minimum=0)
        if (minimum_jobs is not None or maximum_jobs is not None) and self.kind not in ("slurm", "pbs"):
            raise ValueError("minimum_jobs/maximum_jobs are for SLURM/PBS clusters; give minimum/maximum workers")
        lo = minimum_jobs if minimum_jobs is not None else minimum
        hi = maximum_jobs if maximum_jobs is not None else maximum
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"adapt: the minimum ({lo}) is above the maximum ({hi})")
        if self.kind in ("slurm", "pbs"):
            opts = {k: v for k, v in (("minimum_jobs", lo), ("maximum_jobs", hi)) if v is not None}
        else:
            opts = {k: v for k, v in (("minimum", lo), ("maximum", hi)) if v is not None}
        return self.cluster.adapt(**opts, **kwargs)

    def wait_for_workers(self, n: int = 1, timeout_s: float | None = None) -> None:
        """Block until ``n`` workers are connected (batch jobs start when the queue lets them)."""
        checks.integer("n", n, minimum=1)
        self.client.wait_for_workers(n, timeout=timeout_s)
        self._workers_seen = (0.0, [])

    def job_of(self, worker: str) -> str | None:
        """The SLURM/PBS job id running ``worker`` (an address or a worker name); None elsewhere."""
        if self.kind not in ("slurm", "pbs") or self.cluster is None:
            return None
        from matcalc.cluster.hpc import worker_job

        name = worker
        info = self.client.scheduler_info(n_workers=-1).get("workers", {})
        if worker in info:
            name = str(info[worker].get("name", worker))
        return worker_job(self.cluster, name)

    def close(self) -> None:
        """Stop timers, unsubscribe, disconnect; shut the cluster down when `start` made it.
        Tasks still unfinished become CANCELLED ("cluster closed")."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            subs = list(self._subs.values())
        futures, started = [], []
        for sub in subs:
            if sub.timer is not None:
                sub.timer.cancel()
            future = sub.future
            if sub.task.state.finish(TaskStatus.CANCELLED,
                                     error=TaskCancelledError(f"task {sub.task.id}: cluster closed")):
                if future is not None:
                    futures.append(future)
                if sub.task.worker:
                    started.append(sub.task.id)
        try:  # unfinished work must not keep running for nobody (on a cluster we only connected to)
            if futures:
                self.client.cancel(futures)
            if started:
                self.client.run(request_stop_many_async, started, "cancel", on_error="ignore")
        except Exception as exc:  # noqa: BLE001 - closing must not fail
            log.debug("cancelling unfinished tasks on close failed: %s", exc)
        for topic in (self.topic, ASSIGNED_TOPIC, SCHEDULER_TOPIC):
            try:
                self.client.unsubscribe_topic(topic)
            except Exception:  # noqa: BLE001
                pass
        self._helper.shutdown(wait=False, cancel_futures=True)
        try:
            self.client.close()
        finally:
            if self._owns and self.cluster is not None:
                nanny = logging.getLogger("distributed.nanny")
                nanny.addFilter(CLOSING_NOISE)  # we close the workers: a slow exit is killed, nothing is lost
                try:
                    self.cluster.close()
                finally:
                    nanny.removeFilter(CLOSING_NOISE)

    def workers(self) -> list[dict[str, Any]]:
        """Per worker: address, pid, nthreads, torch_threads, resources, device, gpu, loaded
        models, running task ids, CUDA_VISIBLE_DEVICES and MALLOC_TRIM_THRESHOLD_ (should be None)."""
        infos = self.client.run(worker_info)
        out = []
        with self._lock:
            for addr, info in sorted(infos.items()):
                info["address"] = addr
                self._worker_models[addr] = set(info.get("models", []))
                out.append(info)
        return out

    def share_custom_models(self) -> None:
        """Register this process's user models (`matcalc.register_model_file`) on every worker,
        including workers that join later; models unregistered here are dropped there too."""
        from matcalc.cluster.worker import CustomModelsPlugin
        from matcalc.models.custom import custom_models

        self.client.register_plugin(CustomModelsPlugin(custom_models()), name=CustomModelsPlugin.name)

    def preload(self, *models: str) -> None:
        """Load ``models`` on every worker now (they stay loaded)."""
        from matcalc.cluster.worker import preload_models

        self.client.run(preload_models, list(models))
        self.workers()

    def tasks(self) -> list[Task]:
        """Every task submitted through this object."""
        with self._lock:
            return list(self._tasks.values())

    def get(self, task_id: str) -> Task:
        with self._lock:
            if task_id not in self._tasks:
                raise KeyError(f"no task {task_id!r}")
            return self._tasks[task_id]

    # ------------------------------------------------------------------ submission
    def submit(self, fn: str | Callable[..., Any], structure: Any, model: str = "chgnet", *,
               priority: str = "NORMAL", timeout_s: float | None = None, retries: int = 0,
               task_id: str | None = None, crashes: int = 0, **params: Any) -> Task:
        """Run ``fn`` (a property name such as ``"relax"``, a property function such as
        ``matcalc.relax``, or any ``fn(structure, model=..., **params)``) on ``structure``.

        Args:
            model: model name (loaded once per worker).
            priority: ``CRITICAL`` > ``HIGH`` > ``NORMAL`` > ``LOW``; FIFO within a level.
            timeout_s: wall-clock limit once running (s); the task then ends as TIMEOUT.
            retries: resubmissions after transient errors (CUDA out of memory, a dropped connection);
                never after invalid input. A worker that dies is handled apart (``max_crashes``).
            task_id: stable id to use (default: a uuid hex); must be unique in this cluster.
            crashes: executions of this task that already died elsewhere (e.g. before a server restart);
                they count towards the cluster's ``max_crashes``.
            **params: keyword arguments of the calculation (``protocol="fast"``, ``fmax=``...).

        An unreadable structure gives a task that is FAILED at once (no exception here), so
        one bad file never stops a ``map``.
        """
        if self._closed:
            raise RuntimeError("cluster is closed")
        prop, custom = property_name(fn)
        prio = check_priority(priority)
        if timeout_s is not None:
            checks.positive("timeout_s", timeout_s)
        checks.integer("retries", retries, minimum=0)
        checks.integer("crashes", crashes, minimum=0)
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model must be a model name (str), got {model!r}")
        tid = str(task_id) if task_id is not None else uuid.uuid4().hex
        with self._lock:
            if tid in self._tasks:
                raise ValueError(f"task_id {tid!r} is already used in this cluster")
            task = Task(task_id=tid, prop=prop, model=model, priority=prio, params=params,
                        timeout_s=timeout_s, retries=int(retries), runner=self)
            task.state.crashes = int(crashes)
            self._tasks[tid] = task
        task.label = label_of(structure)  # before reading it: an unreadable file's task keeps the file's name
        try:
            atoms, task.label, task.structure_hash = _prepare_structure(structure)
        except ValueError as exc:  # StructureError: invalid input fails the task, never the batch
            task.state.finish(TaskStatus.FAILED, error=exc)
            return task
        sub = _Submission(task, custom, atoms)
        with self._lock:
            self._subs[tid] = sub
        if task.state.crashes >= self.max_crashes:
            task.state.finish(TaskStatus.FAILED, error=WorkerCrashedError(crash_error(
                "in an earlier session", task.state.crashes, self.max_crashes)))
            return task
        self._send(sub)
        return task

    def map(self, fn: str | Callable[..., Any], structures: Iterable[Any], model: str = "chgnet", *,
            priority: str = "NORMAL", timeout_s: float | None = None, retries: int = 0,
            task_id: Sequence[str] | None = None, **params: Any) -> list[Task]:
        """`submit` for each structure (in order, so FIFO holds); ``task_id`` may list one id
        per structure."""
        structures = list(structures)
        ids: list[str | None] = [None] * len(structures)
        if task_id is not None:
            if isinstance(task_id, str) or len(task_id) != len(structures):
                raise ValueError("task_id for map must be a sequence with one id per structure")
            ids = list(task_id)
        return [self.submit(fn, s, model, priority=priority, timeout_s=timeout_s, retries=retries,
                            task_id=i, **params) for s, i in zip(structures, ids, strict=True)]

    def _worker_addresses(self, force: bool = False) -> list[str]:
        t, addrs = self._workers_seen
        if force or not addrs or time.monotonic() - t > WORKER_REFRESH_S:
            info = self.client.scheduler_info(n_workers=-1)
            addrs = sorted(info.get("workers", {}))
            self._workers_seen = (time.monotonic(), addrs)
        return addrs

    def _preferred_workers(self, model: str) -> list[str] | None:
        addrs = [a for a in self._worker_addresses() if a not in self._gone]
        if not addrs:
            return None
        key = model.strip().lower()
        with self._lock:
            have = [a for a in addrs if key in self._worker_models.get(a, ())]
            if have:
                return have
            fresh = [a for a in addrs if not self._worker_models.get(a)]
        return fresh or addrs

    def _send(self, sub: _Submission) -> None:
        task = sub.task
        attempt = task.state.start_attempt()
        key = task_key(task.property, task.label)  # the dashboard shows property and structure
        job = Job(task_id=task.id, model=task.model, prop=None if sub.fn else task.property, fn=sub.fn,
                  params=task.params, structure=sub.atoms, label=task.label or None, timeout_s=task.timeout_s,
                  priority=task.priority, attempt=attempt, crashes=task.crashes)
        hint = self._preferred_workers(task.model)
        kwargs: dict[str, Any] = {}
        if hint:
            kwargs.update(workers=hint, allow_other_workers=True)
        if self.gpu and self._gpu_share:  # a task that crashed a worker runs alone on the next one
            kwargs["resources"] = {"GPU": 1.0 if task.crashes else self._gpu_share}
        with self._lock:
            sub.key, sub.running_on, sub.hint = key, None, tuple(hint or ())
            self._by_key[key] = sub
        try:
            future = self.client.submit(run_task, job, self.topic, self.progress_interval_s, key=key, pure=False,
                                        priority=dask_priority(task.priority), retries=0, **kwargs)
        except Exception as exc:  # noqa: BLE001 - e.g. unpicklable custom function
            with self._lock:
                self._by_key.pop(key, None)
            task.state.finish(TaskStatus.FAILED, error=exc)
            return
        sub.future = future
        task.state.advance(TaskStatus.QUEUED)
        future.add_done_callback(lambda f, s=sub: self._on_future_done(s, f))

    def _sub(self, task: Task) -> _Submission | None:
        with self._lock:
            return self._subs.get(task.id)

    # ------------------------------------------------------------------ completion
    def wait_for(self, task: Task, timeout: float | None = None) -> bool:
        """Wait for ``task`` to finish (False: ``timeout`` s passed first). While its dask future is
        out, this thread waits on it and settles the task itself (saves the hop through dask's callback
        thread); resubmissions swap the future."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not task.done():
            sub = self._sub(task)
            future = sub.future if sub is not None else None
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if sub is None or future is None:
                return task.state.wait(left)
            if not self._wait_future(sub, future, left):
                return task.done()
        return True

    def _wait_future(self, sub: _Submission, future: Future, timeout: float | None) -> bool:
        """Wait for ``future`` and settle its task from it in this thread (False: timed out first).

        While a thread waits here, dask's done-callback leaves the task alone, so the result is
        fetched once, without the hop through dask's callback thread.
        """
        from concurrent.futures import CancelledError

        with self._lock:
            sub.waiters += 1
        outcome: tuple[str, Any] | None = None
        try:
            try:
                outcome = ("finished", future.result(timeout=timeout))
            except CancelledError as exc:
                outcome = ("cancelled", exc)
            except BaseException as exc:  # noqa: BLE001 - the task's error, or our wait timing out
                outcome = ("error", exc) if future.done() else None
        finally:
            with self._lock:
                sub.waiters -= 1
        if outcome is None and not future.done():
            return False
        self._settle(sub, future, outcome)
        return True

    def _on_future_done(self, sub: _Submission, future: Future) -> None:
        """dask's done-callback (its callback thread); a thread in `_wait_future` takes precedence."""
        with self._lock:
            if sub.waiters:
                return
        self._settle(sub, future, None)

    def _settle(self, sub: _Submission, future: Future, outcome: tuple[str, Any] | None) -> None:
        """Move the task to its terminal state (or send it again) from its finished ``future``; once per future."""
        task = sub.task
        with self._lock:
            if sub.settled_key == future.key:
                return
            sub.settled_key = future.key
            self._by_key.pop(str(future.key), None)
            current = future.key == sub.key
        if not current or task.done():
            return
        try:
            if outcome is None:
                status = future.status
                if status == "finished":
                    outcome = ("finished", future.result())
                elif status == "cancelled":
                    outcome = ("cancelled", _cancel_reason(future))
                else:
                    err = future.exception()
                    outcome = ("error", err if err is not None else
                               WorkerTaskError(f"task {task.id} ended with dask status {status!r}"))
            kind, value = outcome
            if kind == "finished":
                self._finish_outcome(sub, value)
            elif kind == "cancelled" and self._scheduler_lost(value):
                task.state.finish(TaskStatus.FAILED, error=ConnectionError(
                    f"task {task.id}: lost the dask scheduler at {self.address} "
                    f"({getattr(value, 'reason', None) or 'connection closed'}); the task did not finish"))
            elif kind == "cancelled":
                task.state.finish(TaskStatus.CANCELLED, error=TaskCancelledError(f"task {task.id} cancelled"))
            elif type(value).__name__ == "KilledWorker":  # dask gave up on it: its workers died
                last = getattr(getattr(value, "last_worker", None), "address", None)
                self._lost(sub, str(future.key), last)
            elif is_transient(value) and task.attempts <= task.retries and not self._closed:
                self._retry(sub, value)
            else:
                task.state.finish(TaskStatus.FAILED, error=value)
        except Exception as exc:  # noqa: BLE001 - e.g. the result could not be fetched
            task.state.finish(TaskStatus.FAILED, error=exc)
        finally:
            self._release(sub)

    def _scheduler_lost(self, cancelled: BaseException | None) -> bool:
        """Was a future cancelled because this client lost its scheduler (not by anyone's request)?"""
        reason = str(getattr(cancelled, "reason", "") or "")
        if reason.startswith("scheduler"):  # dask's "scheduler-connection-lost", "scheduler-restart"
            return True
        return not self._closed and str(getattr(self.client, "status", "running")) not in ("running", "newly-created")

    def _finish_outcome(self, sub: _Submission, outcome: Outcome) -> None:
        task = sub.task
        task.state.add_logs(outcome.logs)
        if outcome.worker:
            task.state.worker = outcome.worker
            with self._lock:
                self._worker_models[outcome.worker] = set(outcome.models)
        if outcome.status == TaskStatus.COMPLETED:
            task.state.finish(TaskStatus.COMPLETED, result=outcome.result)
            return
        exc = outcome.exception if outcome.exception is not None else WorkerTaskError(outcome.error)
        if (outcome.status == TaskStatus.FAILED and is_transient(exc) and task.attempts <= task.retries
                and not self._closed):
            self._retry(sub, exc)
            return
        task.state.finish(outcome.status, error=exc)

    def _retry(self, sub: _Submission, exc: BaseException) -> None:
        task = sub.task
        log.warning("task %s attempt %d failed (%s: %s); retrying", task.id, task.attempts,
                    type(exc).__name__, exc)
        if sub.timer is not None:
            sub.timer.cancel()
        if task.state.retry():
            self._send(sub)

    def _release(self, sub: _Submission) -> None:
        if sub.task.done():
            if sub.timer is not None:
                sub.timer.cancel()
            sub.future = None  # let dask release the result on the worker
            sub.atoms = None

    # ------------------------------------------------------------------ worker deaths
    def _on_scheduler_event(self, event: tuple[float, dict[str, Any]]) -> None:
        """A worker left the scheduler unexpectedly: its tasks go again (on the client's event loop
        thread: the work is handed to the helper thread)."""
        _, msg = event
        if not isinstance(msg, dict) or msg.get("action") != "remove-worker":
            return
        worker = msg.get("worker")
        with self._lock:
            self._workers_seen = (0.0, [])  # hints name live workers only
            self._worker_models.pop(worker, None)
            self._gone.add(worker)
            lost = [(self._by_key[k], k) for k in msg.get("processing-tasks", ()) if k in self._by_key]
            # dask never schedules a waiting task whose hinted workers are all gone (even with
            # allow_other_workers): send those again too
            lost_keys = {k for _, k in lost}
            stranded = [(s, s.key) for s in self._by_key.values() if s.key not in lost_keys and s.hint
                        and s.running_on is None and set(s.hint) <= self._gone]
        if msg.get("expected"):
            lost = []  # retired on purpose: dask moves its tasks itself
        for sub, key in [*lost, *stranded]:
            self._helper.submit(self._lost, sub, key, worker)

    def _lost(self, sub: _Submission, key: str, worker: str | None) -> None:
        """The dask task ``key`` of ``sub`` was on a worker that died: send the task again, counting a
        crash when it was running there; FAILED once it crashed ``max_crashes`` times."""
        task = sub.task
        with self._lock:
            if sub.key != key or task.done() or self._closed:
                return
            running = sub.running_on is not None and (worker is None or sub.running_on == worker)
            old, where = sub.future, worker or sub.running_on or "?"
            sub.key = None  # claimed: the other notice of the same death (event or KilledWorker) stops here
        if sub.timer is not None:
            sub.timer.cancel()
        if running and task.crashes + 1 >= self.max_crashes:
            task.state.crashes += 1
            task.state.finish(TaskStatus.FAILED, error=WorkerCrashedError(crash_error(
                f"dask worker {where} died while running it", task.crashes, self.max_crashes)))
            log.error("task %s: its worker %s died while running it (%d time(s)); FAILED", task.id, where,
                      task.crashes)
        else:
            if running:
                log.warning("task %s: its worker %s died while running it; running it again (crash %d of %d "
                            "allowed)", task.id, where, task.crashes + 1, self.max_crashes)
            if task.state.retry(crashed=running):
                self._send(sub)
        if old is not None:
            try:
                old.cancel()  # dask may have rescheduled it with stale worker hints
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._release(sub)

    # ------------------------------------------------------------------ events from workers
    def _on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        _, msg = event
        with self._lock:
            sub = self._subs.get(msg.get("task_id", ""))
        if sub is None or msg.get("attempt") != sub.task.attempts:
            return
        task = sub.task
        kind = msg.get("type")
        if kind == "progress":
            task.state.record_progress({k: v for k, v in msg.items() if k not in ("type", "task_id", "attempt")})
        elif kind == "log":
            task.state.add_logs([msg["record"]])
        elif kind == "running":
            worker = msg.get("worker")
            with self._lock:
                sub.running_on = worker or "?"
                if worker:
                    self._worker_models.setdefault(worker, set()).update(msg.get("models", []))
            at = float(msg["time"]) if msg.get("time") else None  # worker clock: the true start order
            if task.state.advance(TaskStatus.RUNNING, worker, at=at) and task.timeout_s is not None:
                timer = threading.Timer(task.timeout_s, self._timeout, args=(task, task.attempts))
                timer.daemon = True
                sub.timer = timer
                timer.start()

    def _on_assigned(self, event: tuple[float, dict[str, Any]]) -> None:
        _, msg = event
        with self._lock:
            sub = self._by_key.get(msg.get("key", ""))
        if sub is not None and sub.key == msg.get("key"):
            sub.task.state.advance(TaskStatus.ASSIGNED, msg.get("worker"))

    # ------------------------------------------------------------------ cancel / timeout
    def _stop_remote(self, task: Task, reason: str, future: Future | None) -> None:
        """Cancel the future and set the task's stop event on its worker. Callbacks run on the
        client's event loop thread, where blocking dask calls are not allowed: from there this
        runs on a helper thread."""
        import asyncio

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._stop_remote_now(task, reason, future)
            return
        threading.Thread(target=self._stop_remote_now, args=(task, reason, future), daemon=True,
                         name=f"matcalc-stop-{task.id}").start()

    def _stop_remote_now(self, task: Task, reason: str, future: Future | None) -> None:
        worker = task.worker
        if future is not None:
            try:
                future.cancel()
            except Exception:  # noqa: BLE001 - already gone
                pass
        try:
            self.client.run(request_stop_async, task.id, reason, workers=[worker] if worker else None,
                            on_error="ignore")
        except Exception as exc:  # noqa: BLE001 - the worker may be gone; the task is over anyway
            log.debug("stop request for task %s failed: %s", task.id, exc)

    def cancel_task(self, task: Task) -> bool:
        """Cancel ``task`` (queued: dropped; running: asked to stop on its worker); False when finished."""
        sub = self._sub(task)
        future = sub.future if sub is not None else None
        was_started = task.status in ON_WORKER
        if not task.state.finish(TaskStatus.CANCELLED, error=TaskCancelledError(f"task {task.id} cancelled")):
            return False
        if sub is not None:
            self._release(sub)
        self._stop_remote(task, "cancel", future)
        log.info("task %s cancelled (%s)", task.id, "running" if was_started else "queued")
        return True

    def _timeout(self, task: Task, attempt: int) -> None:
        if task.attempts != attempt or task.done():
            return
        sub = self._sub(task)
        future = sub.future if sub is not None else None
        err = TaskTimeoutError(f"task {task.id} timed out after {task.timeout_s:g} s")
        if task.state.finish(TaskStatus.TIMEOUT, error=err):
            if sub is not None:
                self._release(sub)
            self._stop_remote(task, "timeout", future)

    # ------------------------------------------------------------------ results
    def wait(self, tasks: Iterable[Task], timeout: float | None = None) -> bool:
        """Block until every task is finished (True) or ``timeout`` s passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in tasks:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not t.wait(left):
                return False
        return True

    def gather_frame(self, tasks: Iterable[Task], timeout: float | None = None) -> pd.DataFrame:
        """Wait for ``tasks`` and return one row per task: task_id, label, property, model, status,
        the result's scalar fields, and ``error`` (None for completed tasks)."""
        return tasks_frame(list(tasks), timeout=timeout)


def _cancel_reason(future: Future) -> BaseException | None:
    """The ``CancelledError`` of a cancelled dask future (it carries dask's reason), or None."""
    from concurrent.futures import CancelledError

    try:
        future.result(timeout=0)
    except CancelledError as exc:
        return exc
    except Exception:  # noqa: BLE001 - not a cancellation after all
        return None
    return None


def tasks_frame(tasks: Sequence[Task], timeout: float | None = None) -> pd.DataFrame:
    """One row per task (see `Cluster.gather_frame`)."""
    import pandas as pd

    deadline = None if timeout is None else time.monotonic() + timeout
    rows = []
    for t in tasks:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        t.wait(left)
        row: dict[str, Any] = {"task_id": t.id, "label": t.label, "property": t.property, "model": t.model,
                               "status": t.status.value, "structure_hash": t.structure_hash}
        result = t.state.result
        if t.status == TaskStatus.COMPLETED and result is not None:
            row.update(result.row())
            row["status"] = t.status.value
        row["error"] = t.error
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- start / connect
def _gpu_devices(n_gpus: int | str | Sequence[int]) -> list[int]:
    import torch

    available = torch.cuda.device_count()
    if isinstance(n_gpus, str):
        if n_gpus.lower() != "all":
            raise ValueError(f"n_gpus must be 'all', an integer or a list of GPU indices, got {n_gpus!r}")
        return list(range(available))
    if isinstance(n_gpus, int):
        checks.integer("n_gpus", n_gpus, minimum=0)
        if n_gpus > available:
            raise ValueError(f"n_gpus={n_gpus} but only {available} GPU(s) are visible")
        return list(range(n_gpus))
    devices = [int(i) for i in n_gpus]
    bad = [i for i in devices if not 0 <= i < available]
    if bad:
        raise ValueError(f"n_gpus lists GPU indices {bad} outside 0..{available - 1}")
    return devices


def _env_config(torch_threads: int) -> dict[str, Any]:
    """dask config for the worker environment (`matcalc.cluster.hpc.worker_environment`): no
    MALLOC_TRIM_THRESHOLD_; OpenMP (torch) threads = the worker's CPU share; OpenBLAS/MKL for numpy stay at 1
    thread (ASE's small linear algebra, e.g. FrechetCellFilter's expm: an EMT Cu32 cell relaxation took 43 s
    with OpenBLAS' default 2 threads vs 6.6 s with 1 on a busy 2-core machine here; torch sets its own MKL
    threads through ``torch.set_num_threads``)."""
    from matcalc.cluster.hpc import worker_environment

    return {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in worker_environment(torch_threads).items()}


SCHEDULER_CONFIG = {"distributed.scheduler.allowed-failures": 0}
"""The config of a scheduler matcalc starts: the cluster handles worker deaths itself (Cluster._lost); dask
must not retry a task on other workers behind its back (with stale worker hints it even left such tasks
waiting forever)."""


def install_setup(client: Client, plugin: MatcalcWorkerPlugin) -> None:
    """Install matcalc's setup through ``client``: the worker plugin on every worker, present and future, and
    `MatcalcSchedulerPlugin` on the scheduler (when the scheduler cannot
    load it, e.g. matcalc is not installed there, the batching counters are not served: a warning says so)."""
    from matcalc.cluster.scheduler import MatcalcSchedulerPlugin

    client.register_plugin(plugin, name=plugin.name)
    try:
        client.register_plugin(MatcalcSchedulerPlugin(), name=MatcalcSchedulerPlugin.name)
    except Exception as exc:  # noqa: BLE001 - a scheduler without matcalc still runs the tasks
        log.warning("matcalc: the scheduler did not take matcalc's scheduler plugin (%s: %s); the workers' "
                    "batching counters are not served there, and it may rerun a dead worker's task itself",
                    type(exc).__name__, exc)


def _announce(cl: Cluster, what: str, verbose: bool) -> None:
    link = cl.dashboard_link
    line = f"matcalc cluster: {what}; scheduler {cl.address}; dashboard {link or 'off'}"
    log.info(line)
    if verbose:
        print(line, flush=True)  # the link a notebook user needs, where logging does not show


def start(n_gpus: int | str | Sequence[int] = "all", n_workers: int | None = None,
          threads_per_worker: int | None = None, dashboard: bool = True, preload: Iterable[str] = ("chgnet",),
          *, kind: str = "local", jobs: int = 1, cores: int | None = None, memory: str | None = None,
          walltime: str | None = None, queue: str | None = None, account: str | None = None,
          gpus_per_job: int = 0, minimum_jobs: int | None = None, maximum_jobs: int | None = None,
          torch_threads: int | None = None, memory_limit: str | float | None = "auto",
          log_level: str = "INFO", max_crashes: int = DEFAULT_MAX_CRASHES, verbose: bool = True,
          **cluster_kwargs: Any) -> Cluster:
    """Start a dask cluster for matcalc and connect to it; prints one line with the dashboard's link
    (``verbose=False``: only logged).

    ``kind="local"`` (default): workers on this machine. Sizes come from
    `matcalc.execution.plan_concurrency` (the server's executor uses the same): with GPUs (torch CUDA +
    ``dask_cuda``), one worker per selected GPU (``CUDA_VISIBLE_DEVICES`` pinned by dask-cuda), each with
    resource ``GPU=1`` and ``threads_per_worker`` concurrent tasks (default 4) sharing that GPU's batching
    engine. Otherwise one CPU worker process per CPU (at most one per 2 GiB of memory), one task and one torch
    thread each (a warning says why GPUs are not used).

    ``kind="slurm"`` or ``"pbs"``: workers in batch jobs through dask-jobqueue (``matcalc-mof[hpc]``), the
    scheduler in this process; each job is laid out as one machine (`matcalc.cluster.hpc`): one worker per
    GPU with ``gpus_per_job``, else one per core. The same Tasks, widgets and ``gather_frame``; a job that is
    cancelled or killed under a running task is handled as any worker death (the task is sent again).

    Args:
        n_gpus: local: ``"all"``, a count, or a list of GPU indices; ``0`` forces CPU workers.
        n_workers: local CPU path only: worker processes (default: one per CPU, memory permitting).
        threads_per_worker: concurrent tasks per worker (default 4 on GPU, 1 on CPU).
        dashboard: serve dask's dashboard (``Cluster.dashboard_link``) on a free port.
        preload: model names each worker loads at start (a model that cannot load is skipped
            with a warning).
        kind: ``"local"``, ``"slurm"`` or ``"pbs"``.
        jobs: SLURM/PBS: batch jobs submitted now (``0``: none; see `Cluster.scale`, `Cluster.adapt`).
        cores: SLURM/PBS: CPU cores booked per job.
        memory: SLURM/PBS: memory booked per job (``"32GB"``).
        walltime: SLURM/PBS: job time limit, ``"HH:MM:SS"``.
        queue: SLURM/PBS: partition (SLURM) or queue (PBS).
        account: SLURM/PBS: project to charge.
        gpus_per_job: SLURM/PBS: GPUs per job (one worker per GPU, resource ``GPU=1``).
        minimum_jobs: SLURM/PBS: adapt the number of jobs to the work, at least this many
            (`Cluster.adapt`), instead of keeping ``jobs``.
        maximum_jobs: SLURM/PBS: adapt, at most this many jobs.
        torch_threads: torch intra-op threads per worker (default: CPUs // workers).
        memory_limit: local: per worker, as dask takes it.
        log_level: level of the per-task log capture on the workers.
        max_crashes: a task whose worker died this many times while running it is FAILED.
        verbose: print the dashboard line.
        **cluster_kwargs: passed on to ``LocalCluster`` / ``LocalCUDACluster``, or to
            `matcalc.cluster.hpc.jobqueue_cluster` (``processes``, ``interface``, ``job_extra_directives``,
            ``job_script_prologue``, ``local_directory``, ``log_directory``, ``python``...).
    """
    from distributed import Client
    from dask.utils import parse_timedelta

    import dask

    mode = str(kind).strip().lower()
    if mode != "local":
        from matcalc.cluster.hpc import check_kind

        check_kind(mode)
        if n_workers is not None:
            raise ValueError(f"n_workers is for kind='local'; for {mode} give jobs= (and processes= per job)")
    if n_workers is not None:
        checks.integer("n_workers", n_workers, minimum=1)
    if threads_per_worker is not None:
        checks.integer("threads_per_worker", threads_per_worker, minimum=1)
    if torch_threads is not None:
        checks.integer("torch_threads", torch_threads, minimum=1)
    checks.integer("max_crashes", max_crashes, minimum=1)
    if os.environ.get(MALLOC_TRIM):
        # glibc reads it at process start; workers spawned from here would inherit it
        log.info("removing %s=%s from this process' environment so dask workers do not inherit it",
                 MALLOC_TRIM, os.environ.pop(MALLOC_TRIM))
    if dashboard and importlib.util.find_spec("bokeh") is None:
        import warnings

        warnings.warn("matcalc cluster: no dashboard: dask's dashboard needs bokeh, which matcalc-mof installs; "
                      "reinstall it (pip install 'bokeh>=3.1')", UserWarning, stacklevel=2)
        dashboard = False
    if mode != "local":
        return _start_jobqueue(mode, jobs=jobs, cores=cores, memory=memory, walltime=walltime, queue=queue,
                               account=account, gpus_per_job=gpus_per_job, minimum_jobs=minimum_jobs,
                               maximum_jobs=maximum_jobs, threads_per_worker=threads_per_worker,
                               torch_threads=torch_threads, preload=preload, dashboard=dashboard,
                               log_level=log_level, max_crashes=max_crashes, verbose=verbose, **cluster_kwargs)
    use_gpu = False
    reason = "n_gpus=0 asked for CPU workers"
    if n_gpus not in (0, None, False) and n_gpus != []:
        use_gpu, reason = cuda_status()
    dashboard_address = ":0"  # a free port: the scheduler's HTTP server (health, metrics) runs regardless
    gpu_share = None
    config = dict(SCHEDULER_CONFIG)
    # a LocalCluster shuts a nanny down for good when its crashed worker is not back within this timeout
    # (read when the worker dies, so set for the process): dask's 15 s were too short for a worker
    # that imports torch on a busy machine (measured 14-16 s here), and the cluster shrank
    if parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout")) < LOST_WORKER_TIMEOUT_S:
        dask.config.set({"distributed.deploy.lost-worker-timeout": f"{LOST_WORKER_TIMEOUT_S:g}s"})
    if use_gpu:
        from dask_cuda import LocalCUDACluster

        devices = _gpu_devices(n_gpus)
        if not devices:
            raise ValueError("n_gpus selected no GPU")
        plan = plan_concurrency(devices, slots=threads_per_worker, torch_threads=torch_threads)
        tpw, tt = plan.slots, plan.torch_threads
        # each task asks for a power-of-two share of the GPU so tpw tasks fit exactly (no float drift)
        gpu_share = 2.0 ** -math.ceil(math.log2(tpw))
        with dask.config.set({**_env_config(tt), **config}):
            cluster = LocalCUDACluster(CUDA_VISIBLE_DEVICES=devices, n_workers=plan.workers,
                                       threads_per_worker=tpw, resources={"GPU": 1},
                                       dashboard_address=dashboard_address, memory_limit=memory_limit,
                                       **cluster_kwargs)
        what = f"{plan.workers} GPU worker(s) on GPUs {devices}, {tpw} task threads and {tt} torch threads each"
    else:
        from distributed import LocalCluster

        if n_gpus not in (0, None, False) and n_gpus != []:
            log.warning("matcalc cluster: GPUs not used: %s; starting CPU workers", reason)
        plan = plan_concurrency(workers=n_workers, slots=threads_per_worker, torch_threads=torch_threads)
        tpw, tt = plan.slots, plan.torch_threads
        with dask.config.set({**_env_config(tt), **config}):
            cluster = LocalCluster(n_workers=plan.workers, threads_per_worker=tpw, processes=True,
                                   dashboard_address=dashboard_address, memory_limit=memory_limit,
                                   **cluster_kwargs)
        what = (f"{plan.workers} CPU worker process(es) ({plan.reason}), {tpw} task thread(s) and {tt} torch "
                "thread(s) each")
    try:
        client = Client(cluster)
        install_setup(client, MatcalcWorkerPlugin(preload=preload, torch_threads=tt, log_level=log_level))
        cl = Cluster(client, cluster, owns_cluster=True, gpu=use_gpu, gpu_share=gpu_share, gpu_reason=reason,
                     dashboard=dashboard, max_crashes=max_crashes, kind="local")
    except BaseException:
        cluster.close()
        raise
    _announce(cl, what, verbose)
    return cl


def _start_jobqueue(kind: str, *, jobs: int, minimum_jobs: int | None, maximum_jobs: int | None,
                    preload: Iterable[str], dashboard: bool, log_level: str, max_crashes: int, verbose: bool,
                    **options: Any) -> Cluster:
    """`start` for ``kind`` ``"slurm"``/``"pbs"`` (see `matcalc.cluster.hpc`)."""
    import dask
    from distributed import Client

    from matcalc.cluster.hpc import describe, jobqueue_cluster

    adaptive = minimum_jobs is not None or maximum_jobs is not None
    with dask.config.set(SCHEDULER_CONFIG):  # the scheduler starts in this process
        cluster, plan = jobqueue_cluster(kind, jobs=0 if adaptive else jobs, **options)
    try:
        client = Client(cluster)
        install_setup(client, MatcalcWorkerPlugin(preload=preload, torch_threads=plan.concurrency.torch_threads,
                                                  log_level=log_level, pin_gpu=plan.gpus > 1))
        cl = Cluster(client, cluster, owns_cluster=True, gpu=plan.gpus > 0, gpu_share=plan.gpu_share,
                     gpu_reason=f"{plan.gpus} GPU(s) per {kind} job" if plan.gpus else f"CPU {kind} jobs",
                     dashboard=dashboard, max_crashes=max_crashes, kind=kind)
        if adaptive:
            cl.adapt(minimum_jobs=minimum_jobs, maximum_jobs=maximum_jobs)
    except BaseException:
        cluster.close()
        raise
    size = (f"adapting between {minimum_jobs or 0} and {maximum_jobs} job(s)" if adaptive
            else f"{jobs} job(s) submitted")
    _announce(cl, f"{size}: {describe(plan, kind)}", verbose)
    return cl


def connect(address: str, *, preload: Iterable[str] = (), torch_threads: int | None = None,
            log_level: str = "INFO", dashboard: bool = True, timeout_s: float = 30.0,
            max_crashes: int = DEFAULT_MAX_CRASHES, verbose: bool = False) -> Cluster:
    """Attach to a running dask scheduler at ``address`` (e.g. ``"tcp://host:8786"``, started with
    ``dask scheduler``, workers with ``dask worker ADDRESS``).

    matcalc's setup is installed through this client (`install_setup`): the worker plugin on its
    workers, present and future (torch threads, the model plugins of ``MATCALC_PLUGINS``, log capture,
    batching counters; matcalc must be installed there), and the scheduler plugin. ``torch_threads`` reaches
    only worker threads that have not run torch yet, so give it to the first client that connects (or start
    the workers with ``OMP_NUM_THREADS`` set). Workers that carry the resource ``GPU`` make tasks request a
    share of it. ``close()`` disconnects without stopping the cluster. Worker deaths are handled as with
    `start` (the scheduler plugin stops the scheduler from rerunning a dead worker's task on its own).

    Raises:
        ConnectionError: no scheduler answered at ``address`` within ``timeout_s``.
    """
    from distributed import Client

    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"address must be a scheduler address such as 'tcp://host:8786', got {address!r}")
    checks.positive("timeout_s", timeout_s)
    try:
        client = Client(address, timeout=f"{timeout_s}s")
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(f"no dask scheduler answered at {address} within {timeout_s:g} s "
                              f"({type(exc).__name__}: {exc})") from exc
    try:
        install_setup(client, MatcalcWorkerPlugin(preload=preload, torch_threads=torch_threads,
                                                  log_level=log_level))
        info = client.scheduler_info(n_workers=-1)
        gpu_workers = [w for w in info.get("workers", {}).values() if (w.get("resources") or {}).get("GPU")]
        share = None
        if gpu_workers:
            tpw = max(int(w.get("nthreads", 1)) for w in gpu_workers)
            share = 2.0 ** -math.ceil(math.log2(max(1, tpw)))
        reason = f"{len(gpu_workers)} worker(s) with resource GPU" if gpu_workers else "no worker has resource GPU"
        cl = Cluster(client, None, owns_cluster=False, gpu=bool(gpu_workers), gpu_share=share, gpu_reason=reason,
                     dashboard=dashboard, max_crashes=max_crashes, kind="connected")
    except BaseException:
        client.close()
        raise
    _announce(cl, f"connected, {len(info.get('workers', {}))} worker(s)", verbose)
    return cl
