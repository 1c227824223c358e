"""Execution on dask: ``start()`` a local (GPU or CPU) cluster or one in SLURM/PBS jobs
(``kind="slurm"|"pbs"``), or ``connect()`` to one, then
``submit``/``map`` calculations as `Task` objects with priorities, live progress, logs,
timeouts, retries and cancellation. ``gpus()`` reports the GPUs through NVML.

>>> import matcalc as mc
>>> with mc.cluster.start(preload=("emt",)) as cl:          # doctest: +SKIP
...     tasks = cl.map("relax", ["a.cif", "b.cif"], model="emt", priority="HIGH")
...     df = cl.gather_frame(tasks)
"""

from __future__ import annotations

from matcalc.cluster.gpus import cuda_status, gpus
from matcalc.cluster.hpc import KINDS as JOB_KINDS
from matcalc.cluster.local import Cluster, connect, install_setup, start, tasks_frame
from matcalc.cluster.scheduler import MatcalcSchedulerPlugin
from matcalc.cluster.tasks import Task, is_transient
from matcalc.cluster.worker import MatcalcWorkerPlugin, task_key
from matcalc.tasks import (
    PRIORITIES,
    TERMINAL,
    TaskCancelledError,
    TaskStatus,
    TaskTimeoutError,
    WorkerCrashedError,
    check_priority,
)

__all__ = [
    "JOB_KINDS",
    "PRIORITIES",
    "TERMINAL",
    "Cluster",
    "MatcalcSchedulerPlugin",
    "MatcalcWorkerPlugin",
    "Task",
    "TaskCancelledError",
    "TaskStatus",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "check_priority",
    "connect",
    "cuda_status",
    "gpus",
    "install_setup",
    "is_transient",
    "start",
    "task_key",
    "tasks_frame",
]
