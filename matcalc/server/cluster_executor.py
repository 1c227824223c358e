"""The dask executor (``matcalc serve --cluster local|ADDRESS``): tasks go to :mod:`matcalc.cluster`.

``local`` starts a cluster on this machine (one worker per GPU, or CPU workers); any other value
is a scheduler address to :func:`matcalc.cluster.connect` to. Status changes, progress, logs and
outcomes of the cluster's :class:`~matcalc.cluster.Task` objects are forwarded to the task
service (and so to the store).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from matcalc.server.executor import ExecutorCallbacks, Job

log = logging.getLogger(__name__)


class ClusterExecutor:
    name = "dask"

    def __init__(self, address: str, *, workers: int | None = None, device: str | None = None) -> None:
        self.address = address
        self.threads_per_worker = workers or None
        self.device = device
        self.cluster: Any = None
        self._callbacks: ExecutorCallbacks | None = None
        self._attempts: dict[str, int | None] = {}
        self._lock = threading.Lock()
        self._closing = False

    # -------------------------------------------------------------- lifecycle
    def start(self, callbacks: ExecutorCallbacks) -> None:
        from matcalc import cluster

        self._callbacks = callbacks
        if self.address == "local":
            self.cluster = cluster.start(threads_per_worker=self.threads_per_worker, preload=(), dashboard=True)
        else:
            self.cluster = cluster.connect(self.address)
        log.info("executor: dask cluster %s (dashboard %s)", self.cluster.address, self.cluster.dashboard_link)

    def submit(self, job: Job) -> None:
        from matcalc.server.executor import build_call

        if self._closing or self.cluster is None:
            raise RuntimeError("executor is shutting down")
        _, atoms, kwargs = build_call(job)
        if self.device:
            kwargs["device"] = self.device
        task = self.cluster.submit(job.prop, atoms, model=job.model, priority=job.priority, timeout_s=job.timeout_s,
                                   task_id=job.task_id, **kwargs)
        task.add_status_callback(self._on_status)
        task.add_progress_callback(lambda t, event: self._forward("on_progress", t.id, event))
        task.add_done_callback(self._on_done)

    def cancel(self, task_id: str) -> bool:
        try:
            return bool(self.cluster.get(task_id).cancel())
        except KeyError:
            return False

    def shutdown(self, timeout_s: float) -> list[str]:
        from matcalc.cluster import TaskStatus

        if self.cluster is None:
            return []
        running = [t for t in self.cluster.tasks() if t.status in (TaskStatus.ASSIGNED, TaskStatus.RUNNING)]
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
        return (n > 0), f"{n} dask worker(s) at {self.cluster.address}"

    def info(self) -> dict[str, Any]:
        from matcalc.cluster import TaskStatus

        tasks = self.cluster.tasks() if self.cluster is not None else []
        count = {s: sum(t.status == s for t in tasks) for s in TaskStatus}
        return {"kind": self.name, "address": self.cluster.address if self.cluster else None,
                "dashboard": self.cluster.dashboard_link if self.cluster else None,
                "gpu": bool(self.cluster and self.cluster.gpu),
                "running": count[TaskStatus.RUNNING] + count[TaskStatus.ASSIGNED],
                "queued": count[TaskStatus.QUEUED] + count[TaskStatus.PENDING],
                "completed": count[TaskStatus.COMPLETED], "failed": count[TaskStatus.FAILED]}

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

    def _on_status(self, task: Any, status: Any) -> None:
        from matcalc.cluster import TaskStatus

        gpu = "GPU" if self.cluster is not None and self.cluster.gpu else None
        if status == TaskStatus.ASSIGNED:
            self._forward("on_assigned", task.id, task.worker, gpu)
        elif status == TaskStatus.RUNNING:
            attempt = self._forward("on_started", task.id, task.worker, gpu)
            with self._lock:
                self._attempts[task.id] = attempt
            if attempt is None and not self._closing:
                task.cancel()  # cancelled (or finished) in the store meanwhile

    def _on_done(self, task: Any) -> None:
        from matcalc.cluster import TaskStatus

        with self._lock:
            attempt = self._attempts.pop(task.id, None)
        for record in task.logs:
            self._forward("on_log", task.id, record)
        status = task.status
        if status == TaskStatus.COMPLETED:
            self._forward("on_done", task.id, "COMPLETED", task.result().to_dict(), None, attempt)
        else:
            self._forward("on_done", task.id, status.value, None, task.error, attempt)
