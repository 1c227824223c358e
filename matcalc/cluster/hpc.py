"""Workers in SLURM or PBS batch jobs, through dask-jobqueue (``pip install 'matcalc-mof[hpc]'``).

`jobqueue_cluster` builds the ``dask_jobqueue.SLURMCluster`` / ``PBSCluster`` that
`matcalc.cluster.start` (``kind="slurm"|"pbs"``) connects to. The scheduler runs in the calling process
(a login node, a notebook, ``matcalc serve``); each job runs ``dask worker`` processes sized as on one machine
(`matcalc.execution.plan_concurrency` applied to the job's cores, memory and GPUs):

* GPU jobs (``gpus_per_job=G``): ``G`` worker processes per job, one per GPU (each keeps one GPU in its
  ``CUDA_VISIBLE_DEVICES``, see `matcalc.cluster.worker.gpu_for_worker`), each with the worker resource
  ``GPU=1`` and 4 task threads sharing the GPU's batching engine; the job asks for the GPUs (SLURM
  ``--gres=gpu:G``, PBS ``ngpus=G``);
* CPU jobs: one worker process per core (at most one per 2 GiB of the job's memory), one task thread and one
  torch thread each.

Every worker starts without dask's ``MALLOC_TRIM_THRESHOLD_`` and with one BLAS thread (the job script exports
``DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON``); the rest of matcalc's worker setup (torch threads, model
plugins, log capture, batching counters) comes through the client as for every cluster.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from matcalc.calculations import checks
from matcalc.execution import Concurrency, plan_concurrency

KINDS = {"slurm": "SLURMCluster", "pbs": "PBSCluster"}
"""``kind`` -> the dask_jobqueue cluster class."""
INSTALL_HINT = "pip install 'matcalc-mof[hpc]' (dask-jobqueue)"


@dataclass(frozen=True)
class JobPlan:
    """How one batch job is laid out."""

    cores: int
    """CPU cores booked per job."""
    memory: str
    gpus: int
    """GPUs booked per job (0: CPU job)."""
    concurrency: Concurrency
    """Worker processes per job, task threads and torch threads per worker."""

    @property
    def workers(self) -> int:
        return self.concurrency.workers

    @property
    def gpu_share(self) -> float | None:
        """The share of resource ``GPU`` each task asks for (None on CPU jobs)."""
        if not self.gpus:
            return None
        return 2.0 ** -math.ceil(math.log2(max(1, self.concurrency.slots)))


def check_kind(kind: str) -> str:
    k = str(kind).strip().lower()
    if k not in KINDS:
        raise ValueError(f"kind must be 'local' or one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    return k


def plan_job(cores: int, memory: str, gpus_per_job: int = 0, *, processes: int | None = None,
             threads_per_worker: int | None = None, torch_threads: int | None = None) -> JobPlan:
    """Lay out one job of ``cores`` CPUs, ``memory`` (dask's format: ``"32GB"``) and ``gpus_per_job`` GPUs."""
    from dask.utils import parse_bytes

    checks.integer("cores", cores, minimum=1)
    checks.integer("gpus_per_job", gpus_per_job, minimum=0)
    if not isinstance(memory, str) or not memory.strip():
        raise ValueError(f"memory must be given per job as a string such as '16GB', got {memory!r}")
    try:
        mem = parse_bytes(memory)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"memory: cannot read {memory!r} as a size such as '16GB' ({exc})") from exc
    if processes is not None:
        checks.integer("processes", processes, minimum=1)
    plan = plan_concurrency(list(range(gpus_per_job)), workers=processes, slots=threads_per_worker,
                            torch_threads=torch_threads, cpus=cores, memory=mem)
    return JobPlan(cores=cores, memory=memory, gpus=gpus_per_job, concurrency=plan)


def worker_environment(torch_threads: int) -> dict[str, str | None]:
    """What a worker process must (not) inherit: dask's ``MALLOC_TRIM_THRESHOLD_`` unset, OpenMP (torch)
    threads = ``torch_threads``, one OpenBLAS/MKL thread (the same as `matcalc.cluster.start` uses)."""
    from matcalc.cluster.worker import MALLOC_TRIM

    return {MALLOC_TRIM: None, "OMP_NUM_THREADS": str(torch_threads), "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1"}


def environment_prologue(env: Mapping[str, str | None]) -> list[str]:
    """Job-script lines giving ``env`` to the nanny's worker processes (``None``: removed)."""
    value = repr(dict(env))  # dask reads a Python literal from the variable
    if any(c in value for c in '"$`\\!'):
        raise ValueError(f"worker environment values must not contain shell metacharacters: {value}")
    lines = [f"unset {k}" for k, v in env.items() if v is None]
    lines.append(f'export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON="{value}"')
    return lines


def jobqueue_cluster(kind: str, *, jobs: int = 1, cores: int | None = None, memory: str | None = None,
                     walltime: str | None = None, queue: str | None = None, account: str | None = None,
                     gpus_per_job: int = 0, processes: int | None = None, threads_per_worker: int | None = None,
                     torch_threads: int | None = None, interface: str | None = None,
                     job_extra_directives: Sequence[str] = (), job_script_prologue: Sequence[str] = (),
                     worker_extra_args: Sequence[str] = (), **jobqueue_kwargs: Any) -> tuple[Any, JobPlan]:
    """A dask-jobqueue cluster of ``kind`` (``"slurm"``/``"pbs"``) laid out by `plan_job`, with ``jobs``
    jobs submitted (``0``: none yet; use `Cluster.scale` or `Cluster.adapt`).

    Args:
        kind: ``"slurm"`` or ``"pbs"``.
        jobs: jobs submitted now.
        cores: CPU cores booked per job (required, here or in dask-jobqueue's configuration file).
        memory: memory booked per job, e.g. ``"32GB"`` (required, as ``cores``).
        walltime: job time limit (``"HH:MM:SS"``).
        queue: partition (SLURM) or queue (PBS).
        account: project to charge.
        gpus_per_job: GPUs per job; one worker per GPU.
        processes: worker processes per job (overrides `plan_job`).
        threads_per_worker: task threads per worker (overrides `plan_job`).
        torch_threads: torch threads per worker (overrides `plan_job`).
        interface: network interface the scheduler and the workers use (``"ib0"``; ``"lo"`` on one machine).
        job_extra_directives: added to dask-jobqueue's (``#SBATCH``/``#PBS`` lines).
        job_script_prologue: shell lines run before the workers start (``module load ...``).
        worker_extra_args: added to the ``dask worker`` command line.
        **jobqueue_kwargs: passed on (``local_directory``, ``log_directory``, ``python``, ``job_name``...).

    Returns:
        The dask-jobqueue cluster and the `JobPlan` of its jobs.
    """
    import dask
    from dask.utils import parse_bytes

    k = check_kind(kind)
    try:
        import dask_jobqueue
    except ImportError as exc:
        raise ImportError(f"kind={kind!r} needs dask-jobqueue: {INSTALL_HINT}") from exc
    checks.integer("jobs", jobs, minimum=0)
    cfg = f"jobqueue.{'slurm' if k == 'slurm' else 'pbs'}"
    cores = cores if cores is not None else dask.config.get(f"{cfg}.cores", None)
    memory = memory if memory is not None else dask.config.get(f"{cfg}.memory", None)
    if cores is None or memory is None:
        raise ValueError(f"kind={kind!r}: give cores= and memory= per job (e.g. cores=8, memory='32GB')")
    plan = plan_job(int(cores), str(memory), gpus_per_job, processes=processes,
                    threads_per_worker=threads_per_worker, torch_threads=torch_threads)
    conc = plan.concurrency
    directives = list(job_extra_directives)
    extra_args = list(worker_extra_args)
    if plan.gpus:
        extra_args += ["--resources", "GPU=1"]
    prologue = [*environment_prologue(worker_environment(conc.torch_threads)), *job_script_prologue]
    kwargs: dict[str, Any] = {
        # dask-jobqueue gives each worker cores // processes task threads: ask for slots x workers of them
        "cores": conc.slots * conc.workers, "processes": conc.workers, "memory": plan.memory,
        "walltime": walltime, "queue": queue, "account": account, "interface": interface,
        "job_extra_directives": directives, "job_script_prologue": prologue, "worker_extra_args": extra_args,
        "scheduler_options": {"dashboard_address": ":0"},  # a free port (the scheduler's HTTP server)
    }
    if k == "slurm":
        kwargs["job_cpu"] = plan.cores  # the booking; the task threads are the workers' own
        if plan.gpus:
            directives.append(f"--gres=gpu:{plan.gpus}")
    else:
        from dask_jobqueue.pbs import pbs_format_bytes_ceil

        spec = f"select=1:ncpus={plan.cores}" + (f":ngpus={plan.gpus}" if plan.gpus else "")
        kwargs["resource_spec"] = f"{spec}:mem={pbs_format_bytes_ceil(parse_bytes(plan.memory))}"
    opts = jobqueue_kwargs.pop("scheduler_options", None)
    if opts:
        kwargs["scheduler_options"] = {**kwargs["scheduler_options"], **opts}
    kwargs.update(jobqueue_kwargs)
    kwargs = {key: v for key, v in kwargs.items() if v is not None}
    cluster = getattr(dask_jobqueue, KINDS[k])(**kwargs)
    if jobs:
        cluster.scale(jobs=jobs)
    return cluster, plan


def job_ids(cluster: Any) -> dict[str, str]:
    """Worker name -> batch job id, for the jobs of a dask-jobqueue ``cluster`` that have one. With several
    workers per job, each worker's name is the job's name plus ``-i``."""
    out: dict[str, str] = {}
    for name, job in dict(getattr(cluster, "workers", {}) or {}).items():
        jid = getattr(job, "job_id", None)
        if jid:
            out[str(name)] = str(jid)
    return out


def worker_job(cluster: Any, worker_name: str) -> str | None:
    """The batch job id running the dask worker named ``worker_name`` (None when unknown)."""
    ids = job_ids(cluster)
    if worker_name in ids:
        return ids[worker_name]
    head, _, tail = worker_name.rpartition("-")
    return ids.get(head) if tail.isdigit() else None


def describe(plan: JobPlan, kind: str) -> str:
    """One line on the layout of the jobs."""
    c = plan.concurrency
    what = f"{plan.gpus} GPU(s), one worker per GPU" if plan.gpus else f"{c.workers} CPU worker(s)"
    return (f"{kind} jobs of {plan.cores} cores, {plan.memory}, {what}; {c.slots} task thread(s) and "
            f"{c.torch_threads} torch thread(s) per worker")


__all__ = ["INSTALL_HINT", "KINDS", "JobPlan", "check_kind", "describe", "environment_prologue", "job_ids",
           "jobqueue_cluster", "plan_job", "worker_environment", "worker_job"]
