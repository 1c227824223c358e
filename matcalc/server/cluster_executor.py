"""The dask executor (``matcalc serve --cluster local|slurm|pbs|ADDRESS``): tasks go to `matcalc.cluster`.

``local`` starts a cluster on this machine (one worker per GPU, or CPU worker processes); ``slurm`` and
``pbs`` start one whose workers run in batch jobs (dask-jobqueue), laid out by the ``cluster_options``
setting (the config file's ``[cluster]`` table: jobs, cores, memory, walltime, queue, gpus_per_job,
minimum_jobs/maximum_jobs...); any other value is a scheduler address to `matcalc.cluster.connect` to
(``cluster_options`` then are connect's keywords, e.g. ``timeout_s``). Status changes, progress, logs and
outcomes of the cluster's `Task` objects are forwarded to the task service (and
so to the store). Worker deaths are the cluster's (it runs the task again on another worker, then
FAILs it at ``max_crashes``); each one is recorded in the store as it happens.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from matcalc.execution import Job, prepare
from matcalc.server.executor import ExecutorCallbacks
from matcalc.tasks import DEFAULT_MAX_CRASHES, ON_WORKER, TaskStatus, WorkerCrashedError

log = logging.getLogger(__name__)


class ClusterExecutor:
    name = "dask"
    isolated = True

    def __init__(self, address: str, *, workers: int | None = None, slots: int | None = None,
                 device: str | None = None, max_crashes: int = DEFAULT_MAX_CRASHES,
                 progress_interval_s: float = 0.1, options: dict[str, Any] | None = None) -> None:
        self.progress_interval_s = progress_interval_s
        self.address = address
        self.options = dict(options or {})
        """Keywords of `matcalc.cluster.start` (local, slurm, pbs) or `matcalc.cluster.connect`."""
        self.n_workers = workers or None
        self.slots = slots
        self.device = device
        self.max_crashes = max_crashes
        self.cluster: Any = None
        self._callbacks: ExecutorCallbacks | None = None
        self._attempts: dict[str, int | None] = {}
        self._crashes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._closing = False

    # -------------------------------------------------------------- lifecycle
    def start(self, callbacks: ExecutorCallbacks) -> None:
        from matcalc import cluster

        self._callbacks = callbacks
        kind = self.address.strip().lower()
        common = {"max_crashes": self.max_crashes, "verbose": False}
        try:
            if kind == "local":
                self.cluster = cluster.start(**{"n_workers": self.n_workers, "threads_per_worker": self.slots,
                                                "preload": (), "dashboard": True, **common, **self.options})
            elif kind in cluster.JOB_KINDS:
                self.cluster = cluster.start(**{"kind": kind, "threads_per_worker": self.slots, "preload": (),
                                                "dashboard": True, **common, **self.options})
            else:
                self.cluster = cluster.connect(self.address, **{**common, **self.options})
        except TypeError as exc:  # an unknown keyword in cluster_options
            raise ValueError(f"cluster_options for --cluster {self.address}: {exc}") from exc
        self.cluster.progress_interval_s = self.progress_interval_s
        log.info("executor: dask cluster %s (dashboard %s)", self.cluster.address, self.cluster.dashboard_link)

    def submit(self, job: Job) -> None:
        if self._closing or self.cluster is None:
            raise RuntimeError("executor is shutting down")
        _, atoms, kwargs = prepare(Job(job.task_id, job.model, prop=job.prop, params=job.params,
                                       structure=job.structure, fmt=job.fmt, label=job.label,
                                       device=job.device or self.device))
        with self._lock:
            self._crashes[job.task_id] = job.crashes
        task = self.cluster.submit(job.prop, atoms, model=job.model, priority=job.priority, timeout_s=job.timeout_s,
                                   task_id=job.task_id, crashes=job.crashes, **kwargs)
        task.add_status_callback(self._on_status)
        task.add_progress_callback(lambda t, event: self._forward("on_progress", t.id, event))
        task.add_done_callback(self._on_done)

    def cancel(self, task_id: str) -> bool:
        try:
            return bool(self.cluster.get(task_id).cancel())
        except KeyError:
            return False

    def shutdown(self, timeout_s: float) -> list[str]:
        if self.cluster is None:
            return []
        running = [t for t in self.cluster.tasks() if t.status in ON_WORKER]
        self.cluster.wait(running, timeout=timeout_s)
        self._closing = True  # from here on, outcomes are not reported: unfinished tasks stay requeueable
        left = [t.id for t in running if not t.done()]
        try:
            self.cluster.close()
        except Exception as exc:  # noqa: BLE001 - closing a broken cluster must not block shutdown
            log.warning("closing the dask cluster failed: %s", exc)
        return left

    def health(self) -> tuple[bool, str]:
        if self.cluster is None or self._closing:
            return False, "not running"
        try:
            n = len(self.cluster.client.scheduler_info(n_workers=-1).get("workers", {}))
        except Exception as exc:  # noqa: BLE001
            return False, f"scheduler unreachable: {exc}"
        if self.cluster.kind in ("slurm", "pbs"):  # workers come and go with the batch jobs: tasks queue meanwhile
            return True, f"{n} dask worker(s) in {self.cluster.kind} jobs, scheduler {self.cluster.address}"
        return (n > 0), f"{n} dask worker(s) at {self.cluster.address}"

    def workers_online(self) -> dict[str, bool]:
        if self.cluster is None or self._closing:
            return {}
        info = self.cluster.client.scheduler_info(n_workers=-1)
        return {addr: True for addr in info.get("workers", {})}

    def info(self) -> dict[str, Any]:
        tasks = self.cluster.tasks() if self.cluster is not None else []
        count = {s: sum(t.status == s for t in tasks) for s in TaskStatus}
        return {"kind": self.name, "address": self.cluster.address if self.cluster else None,
                "cluster": self.cluster.kind if self.cluster else self.address,
                "dashboard": self.cluster.dashboard_link if self.cluster else None,
                "batching": self.cluster.batching_link if self.cluster else None,
                "gpu": bool(self.cluster and self.cluster.gpu),
                "running": count[TaskStatus.RUNNING] + count[TaskStatus.ASSIGNED],
                "queued": count[TaskStatus.QUEUED] + count[TaskStatus.PENDING],
                "completed": count[TaskStatus.COMPLETED], "failed": count[TaskStatus.FAILED],
                "crashed": sum(t.crashes for t in tasks), "max_crashes": self.max_crashes}

    # -------------------------------------------------------------- models
    def load_model(self, name: str) -> list[str]:
        self.cluster.preload(name)
        return [w["address"] for w in self.cluster.workers() if name in w.get("models", [])]

    def unload_model(self, name: str) -> bool:
        from matcalc.models.registry import unload_model

        done = self.cluster.client.run(unload_model, name)
        self.cluster.workers()
        return any(done.values())

    def register_custom_model(self, model: Any) -> None:
        """Register here and on every worker, present and future (a worker plugin holds the set)."""
        from matcalc.models.custom import register_validated

        register_validated(model)
        self.cluster.share_custom_models()

    def unregister_custom_model(self, name: str) -> None:
        from matcalc.models.custom import unregister_model_file

        unregister_model_file(name)
        self.cluster.share_custom_models()

    def loaded_models(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for w in self.cluster.workers():
            for m in w.get("models", []):
                out.setdefault(m, []).append(f"{w['address']}/{w.get('device', '?')}")
        return out

    # -------------------------------------------------------------- callbacks from the cluster
    def _forward(self, method: str, *args: Any) -> Any:
        if self._closing or self._callbacks is None:
            return None
        return getattr(self._callbacks, method)(*args)

    def _new_crash(self, task: Any) -> bool:
        """True (once) when ``task`` counted a crash since the last look."""
        with self._lock:
            seen = self._crashes.get(task.id, 0)
            self._crashes[task.id] = task.crashes
        return task.crashes > seen

    def _on_status(self, task: Any, status: TaskStatus) -> None:
        gpu = "GPU" if self.cluster is not None and self.cluster.gpu else None
        if status == TaskStatus.ASSIGNED:
            self._forward("on_assigned", task.id, task.worker, gpu)
        elif status == TaskStatus.RUNNING:
            attempt = self._forward("on_started", task.id, task.worker, gpu)
            with self._lock:
                self._attempts[task.id] = attempt
            if attempt is None and not self._closing:
                task.cancel()  # cancelled (or finished) in the store meanwhile
        elif status == TaskStatus.PENDING:  # the cluster sends it again: its worker died
            with self._lock:
                attempt = self._attempts.pop(task.id, None)
            if self._new_crash(task):
                again = self._forward("on_crashed", task.id, f"dask worker {task.worker} died while running it",
                                      attempt)
                if again is False and not self._closing:
                    task.cancel()  # FAILED in the store (its crashes cap) or no longer active there
            else:
                self._forward("on_requeued", task.id, f"dask worker {task.worker} left before it started the task")

    def _on_done(self, task: Any) -> None:
        with self._lock:
            attempt = self._attempts.pop(task.id, None)
            self._crashes.pop(task.id, None)
        for record in task.logs:
            self._forward("on_log", task.id, record)
        status = task.status
        if status == TaskStatus.COMPLETED:
            self._forward("on_done", task.id, "COMPLETED", task.result().to_dict(), None, attempt)
        elif isinstance(task.exception(0), WorkerCrashedError):
            self._forward("on_crashed", task.id, f"dask worker {task.worker} died while running it", attempt)
        else:
            self._forward("on_done", task.id, status.value, None, task.error, attempt)
