"""Where tasks run. The server talks to an `Executor`; the implementations:

* `PoolExecutor` (default, ``--cluster process``): supervised worker
  processes; with ``--cluster inprocess`` the same runner in threads of the API process (tests);
* `ClusterExecutor` (``--cluster local|ADDRESS``): the dask
  cluster of `matcalc.cluster`.

All of them run `matcalc.execution.run_job` on a `Job` and report back
through `ExecutorCallbacks` (the task service writes to the store). `make_executor` in
`matcalc.server.pool` builds the one ``--cluster`` names.
"""

from __future__ import annotations

from typing import Any, Protocol

from matcalc.execution import Job

__all__ = ["Executor", "ExecutorCallbacks", "Job"]


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

    def on_crashed(self, task_id: str, reason: str, attempt: int | None) -> bool:
        """The worker died while running the task (``reason``: what ended it): the crash is counted;
        True when the task goes back to the queue (the executor runs it again, alone), False when it
        reached the crashes cap (FAILED) or is no longer active."""

    def on_requeued(self, task_id: str, reason: str) -> bool:
        """The task left a worker before it started there (the worker died, or it moved): back to QUEUED
        without a crash; True when it is to be run again."""


class Executor(Protocol):
    name: str
    isolated: bool
    """Calculations run outside the API process: a task cannot take the server down with it."""

    def start(self, callbacks: ExecutorCallbacks) -> None: ...

    def submit(self, job: Job) -> None: ...

    def cancel(self, task_id: str) -> bool: ...

    def shutdown(self, timeout_s: float) -> list[str]:
        """Stop; wait up to ``timeout_s`` for running tasks; return the ids still running."""

    def health(self) -> tuple[bool, str]: ...

    def workers_online(self) -> dict[str, bool]:
        """Worker name -> online (the ``worker_offline`` alert watches it)."""

    def info(self) -> dict[str, Any]: ...

    def load_model(self, name: str) -> list[str]: ...

    def unload_model(self, name: str) -> bool: ...

    def loaded_models(self) -> dict[str, list[str]]: ...

    def register_custom_model(self, model: Any) -> None:
        """Make a validated user model (`matcalc.models.custom.CustomModel`) loadable by name."""

    def unregister_custom_model(self, name: str) -> None: ...
