"""The server's default executor: calculations run in supervised worker processes, never in the API process.

`PoolExecutor` keeps the queue (priority, then FIFO) in the server and hands each task to a
worker with a free slot (one task per worker process on a CPU, several on a GPU worker, whose force
calls the batching engine fuses). Every worker runs the one job runner,
`matcalc.execution.run_job`, and streams its messages back over a pipe.

When a worker process dies (a native abort, a segfault, the OOM killer's SIGKILL), the task it was
running, and only that task, counts a crash (`ExecutorCallbacks.on_crashed`): it runs again
alone, and once it has died ``max_crashes`` times it is FAILED with ``worker crashed: ... killed by
signal 6 (SIGABRT) ...``. The worker is restarted, the API keeps answering, and the next task runs.
A cancelled or timed-out task that does not stop within ``stop_grace_s`` has its worker killed.

Why processes of our own and not a local dask worker: the server knows which task each process runs
(one at a time on a CPU), so a death is charged to exactly that task, with the signal that ended it;
dask charges every task queued on a dead worker and does not report the signal. The queue stays in the
server, so priorities and cancellation of queued tasks are exact, and the API answers at once while
the workers start (measured start-up of a worker: see benchmarks/README.md). ``--cluster local`` gives
the dask path for multi-GPU machines and clusters.

``isolated=False`` (``--cluster inprocess``) runs the same runner in threads of the API process: for
tests with FastAPI's TestClient and for debugging; a native crash there takes the server down.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

from matcalc.execution import (
    WORKER_CALLS,
    Concurrency,
    Job,
    install_log_capture,
    plan_concurrency,
    request_stop,
    run_job,
)
from matcalc.server.config import Settings
from matcalc.server.executor import Executor, ExecutorCallbacks
from matcalc.tasks import DEFAULT_MAX_CRASHES, TaskStatus, check_priority, death_reason

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0
"""A worker process that is not ready after this long is killed and started again."""
CALL_TIMEOUT_S = 600.0
"""Longest wait for a worker to answer a call (loading a model can take a while)."""
RESTART_BACKOFF_S = (0.0, 1.0, 5.0, 30.0)
PROGRESS_INTERVAL_S = 0.1
"""Most progress events per task and second the workers send (the live log streams show them all)."""
"""Wait before restarting a worker that died before it was ready, after 1, 2, 3+ such deaths in a row."""


# ----------------------------------------------------------------------------- bookkeeping
@dataclass
class _Run:
    """One execution in progress."""

    job: Job
    worker: _Worker
    timer: threading.Timer | None = None
    ended: bool = False
    kill_reason: str | None = None
    """Why the executor killed the worker: ``timeout``, ``cancel`` or ``shutdown``."""
    started: bool = False
    """The worker reported running it (its ``running`` message came before any death)."""


@dataclass(eq=False)
class _Worker:
    """What the executor knows of one worker (a process, or the API process itself)."""

    name: str
    slots: int
    gpu: int | None = None
    running: dict[str, _Run] = field(default_factory=dict)
    models: set[str] = field(default_factory=set)
    ready: bool = False
    pid: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    conn: Connection | None = None
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    replies: dict[int, list[Any]] = field(default_factory=dict)
    failed_starts: int = 0
    """Deaths before ready, in a row (restart back-off)."""
    started_at: float = 0.0
    startup_s: float | None = None
    last_exit: str | None = None

    @property
    def free(self) -> int:
        return self.slots - len(self.running) if self.ready else 0

    @property
    def alone(self) -> bool:
        """Runs a task that crashed before: nothing else may join it."""
        return any(r.job.crashes for r in self.running.values())

    def send(self, msg: dict[str, Any]) -> None:
        assert self.conn is not None
        with self.send_lock:
            self.conn.send(msg)


# ----------------------------------------------------------------------------- the executor
class PoolExecutor:
    """Runs tasks in ``workers`` supervised worker processes (``isolated=True``) or threads of this process.

    Args:
        workers: worker processes (threads with ``isolated=False``); None: one per CPU, memory permitting
            (or one per GPU), see `matcalc.execution.plan_concurrency`; 0: queue only.
        slots: concurrent tasks per worker process (default 1 on CPU, 4 on a GPU).
        device: ``cpu``, ``cuda``... for every calculation (None: the model's default).
        blas_threads: OpenBLAS/MKL threads in each worker (1: many small matrices run faster single-threaded).
        torch_threads: torch threads per worker (default: CPUs // workers).
        max_crashes: a task whose worker died this many times while running it is FAILED.
        stop_grace_s: how long a cancelled or timed-out task may take to stop before its worker is killed.
        log_level: level of the workers' logs (their records come to this process' logging).
    """

    def __init__(self, workers: int | None = None, *, isolated: bool = True, slots: int | None = None,
                 device: str | None = None, blas_threads: int | None = 1, torch_threads: int | None = None,
                 max_crashes: int = DEFAULT_MAX_CRASHES, stop_grace_s: float = 10.0, log_level: str = "INFO",
                 progress_interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.name = "process" if isolated else "inprocess"
        self.isolated = isolated
        self.requested = (workers, slots, torch_threads)
        self.device = device
        self.blas_threads = blas_threads
        self.max_crashes = max_crashes
        self.stop_grace_s = stop_grace_s
        self.log_level = log_level
        self.progress_interval_s = progress_interval_s
        self.plan: Concurrency | None = None
        self.workers: list[_Worker] = []
        self._queue: list[tuple[int, int, Job]] = []
        self._seq = itertools.count()
        self._queued: set[str] = set()
        self._runs: dict[str, _Run] = {}
        self._custom: dict[str, Any] = {}
        self._cond = threading.Condition()
        self._callbacks: ExecutorCallbacks | None = None
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._spawn_requests: list[tuple[float, _Worker]] = []
        self._closed = threading.Event()
        """Set once the worker processes are gone: the spawner thread (their parent) may end then."""
        self.completed = 0
        self.failed = 0
        self.crashed = 0
        self.restarts = 0

    # -------------------------------------------------------------- lifecycle
    def start(self, callbacks: ExecutorCallbacks) -> None:
        self._callbacks = callbacks
        workers, slots, torch_threads = self.requested
        if workers == 0 and self.isolated:
            log.info("executor: queue only (workers=0)")
            return
        if self.isolated:
            from matcalc.execution import visible_gpus

            gpus = visible_gpus() if self.device in (None, "cuda") or str(self.device).startswith("cuda") else []
            self.plan = plan_concurrency(gpus, workers=workers, slots=slots, torch_threads=torch_threads)
            self.workers = [_Worker(f"process-{i}", self.plan.slots, self.plan.gpus[i] if self.plan.gpus else None)
                            for i in range(self.plan.workers)]
            # children are started from this one long-lived thread: they die with it (PR_SET_PDEATHSIG)
            self._spawn_thread = self._thread(self._spawner, "matcalc-pool-spawner")
            with self._cond:
                self._spawn_requests.extend((0.0, w) for w in self.workers)
                self._cond.notify_all()
            log.info("executor: %d worker process(es), %d task(s) each, %d torch thread(s) each (%s)",
                     self.plan.workers, self.plan.slots, self.plan.torch_threads, self.plan.reason)
        else:
            n = workers if workers is not None else 2
            self.plan = Concurrency(1, n, torch_threads or 1, (), f"{n} thread(s) in the API process")
            install_log_capture(self.log_level)
            self._blas_limit()
            self.workers = [_Worker(f"inprocess:{os.getpid()}", n, ready=True, pid=os.getpid())]  # 0 slots: queue only
        self._thread(self._dispatch_loop, "matcalc-pool-dispatch")

    def _thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def _blas_limit(self) -> None:
        if self.blas_threads:
            try:
                from threadpoolctl import threadpool_limits

                threadpool_limits(limits=self.blas_threads, user_api="blas")
            except ImportError:  # pragma: no cover - threadpoolctl comes with scipy's stack
                log.info("threadpoolctl not installed: BLAS thread count left as is")

    def submit(self, job: Job) -> None:
        check_priority(job.priority)
        with self._cond:
            if self._stopping:
                raise RuntimeError("executor is shutting down")
            self._queued.add(job.task_id)
            heapq.heappush(self._queue, (check_priority(job.priority).rank, next(self._seq), job))
            self._cond.notify_all()

    def cancel(self, task_id: str) -> bool:
        with self._cond:
            if task_id in self._queued:
                self._queued.discard(task_id)  # dropped when it reaches the head of the queue
                return True
            run = self._runs.get(task_id)
        if run is None:
            return False
        self._stop(run, "cancel")
        return True

    def shutdown(self, timeout_s: float) -> list[str]:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._runs and time.monotonic() < deadline:
                self._cond.wait(max(0.0, min(0.2, deadline - time.monotonic())))
            left = list(self._runs.values())
            for run in left:
                run.ended, run.kill_reason = True, "shutdown"  # later outcomes are not reported: requeued
                if run.timer is not None:
                    run.timer.cancel()
            self._runs.clear()
        for run in left:
            if not self.isolated:
                request_stop(run.job.task_id, "cancel")
        if self.isolated:
            self._close_workers()
        self._closed.set()
        return [r.job.task_id for r in left]

    def health(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "shutting down"
        if not self.workers:
            return True, "queue only (workers=0)"
        if not self.isolated:
            n = self.workers[0].slots
            return True, f"{n} worker thread(s) in the API process" + (" (queue only: workers=0)" if not n else "")
        ready = sum(w.ready for w in self.workers)
        failing = [w for w in self.workers if not w.ready and w.failed_starts >= 3]
        if failing and not ready:
            return False, (f"worker processes fail to start ({failing[0].last_exit}); "
                           "see the server log")
        return True, f"{ready} of {len(self.workers)} worker process(es) ready, {self.plan.slots if self.plan else 1} " \
                     f"task(s) each"

    def workers_online(self) -> dict[str, bool]:
        """Worker name -> online: a worker process that is restarting is offline; in-process, each task slot
        (``matcalc-worker-N``) is online while the executor runs."""
        with self._cond:
            if not self.isolated:
                n = self.workers[0].slots if self.workers else 0
                return {} if self._stopping else {f"matcalc-worker-{i}": True for i in range(n)}
            return {} if self._stopping else {w.name: w.ready for w in self.workers}

    def info(self) -> dict[str, Any]:
        with self._cond:
            return {"kind": self.name, "workers": len(self.workers), "slots": self.plan.slots if self.plan else 0,
                    "running": len(self._runs), "queued": len(self._queued), "completed": self.completed,
                    "failed": self.failed, "crashed": self.crashed, "restarts": self.restarts,
                    "max_crashes": self.max_crashes,
                    "processes": [{"name": w.name, "pid": w.pid, "ready": w.ready, "running": sorted(w.running),
                                   "startup_s": w.startup_s, "last_exit": w.last_exit} for w in self.workers]}

    # -------------------------------------------------------------- models
    def _call_all(self, method: str, *args: Any) -> dict[str, Any]:
        """``method(*args)`` on every ready worker: ``{worker name: value}`` (errors logged, left out)."""
        out = {}
        for w in list(self.workers):
            if not w.ready:
                continue
            try:
                out[w.name] = self._call(w, method, *args)
            except Exception as exc:  # noqa: BLE001 - one broken worker must not fail the request
                log.warning("worker %s: %s%r failed: %s", w.name, method, args, exc)
                if method == "load_model":
                    raise
        return out

    def _call(self, w: _Worker, method: str, *args: Any) -> Any:
        if not self.isolated:
            return WORKER_CALLS[method](*args, self.device)
        box: list[Any] = []
        done = threading.Event()
        rid = next(self._seq)
        w.replies[rid] = [box, done]
        try:
            w.send({"op": "call", "id": rid, "method": method, "args": args})
            if not done.wait(CALL_TIMEOUT_S):
                raise TimeoutError(f"worker {w.name} did not answer {method} within {CALL_TIMEOUT_S:g} s")
        finally:
            w.replies.pop(rid, None)
        if not box:
            raise RuntimeError(f"worker {w.name} died before answering {method}")
        ok, value = box[0]
        if not ok:
            raise RuntimeError(value)
        return value

    def load_model(self, name: str) -> list[str]:
        return sorted(self._call_all("load_model", name))

    def unload_model(self, name: str) -> bool:
        return any(self._call_all("unload_model", name).values())

    def loaded_models(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for worker, pairs in self._call_all("loaded_models").items():
            for name, device in pairs:
                out.setdefault(name, []).append(f"{worker}/{device}")
        return out

    def register_custom_model(self, model: Any) -> None:
        """Register a validated user model here (the API checks names against it) and on every worker,
        present and future."""
        WORKER_CALLS["register_custom_model"](model, self.device)
        with self._cond:
            self._custom[model.name] = model
        if self.isolated:
            self._call_all("register_custom_model", model)

    def unregister_custom_model(self, name: str) -> None:
        WORKER_CALLS["unregister_custom_model"](name, self.device)
        with self._cond:
            self._custom.pop(name, None)
        if self.isolated:
            self._call_all("unregister_custom_model", name)

    # -------------------------------------------------------------- dispatch
    def _dispatch_loop(self) -> None:
        while True:
            with self._cond:
                pick = None
                while not self._stopping:
                    pick = self._pick()
                    if pick is not None:
                        break
                    self._cond.wait(1.0)
                if pick is None:
                    return
            try:
                self._start_run(*pick)
            except Exception:  # noqa: BLE001 - the dispatcher must survive anything
                log.exception("could not start task %s", pick[1].task_id)

    def _pick(self) -> tuple[_Worker, Job] | None:
        """The next job that can start, and its worker (lock held): priority order; a task that crashed a
        worker before waits for an idle worker and runs alone; model affinity among free workers."""
        skipped, pick = [], None
        while self._queue:
            item = heapq.heappop(self._queue)
            job = item[2]
            if job.task_id not in self._queued:
                continue  # cancelled while queued
            free = [w for w in self.workers if w.free > 0 and not w.alone and (not job.crashes or not w.running)]
            if not free:
                skipped.append(item)
                if not job.crashes:
                    break  # nothing free for an ordinary task: keep the order
                continue
            free.sort(key=lambda w: (job.model.lower() not in w.models, -w.free, w.name))
            self._queued.discard(job.task_id)
            pick = (free[0], job)
            break
        for item in skipped:
            heapq.heappush(self._queue, item)
        return pick

    def _start_run(self, worker: _Worker, job: Job) -> None:
        cb = self._callbacks
        assert cb is not None
        gpu = None if worker.gpu is None else f"cuda:{worker.gpu}"
        attempt = cb.on_started(job.task_id, worker.name if worker.pid is None else f"{worker.name}:{worker.pid}", gpu)
        if attempt is None:
            return  # cancelled or finished in the store meanwhile
        job = replace(job, attempt=attempt, device=self.device if job.device is None else job.device)
        run = _Run(job, worker)
        with self._cond:
            worker.running[job.task_id] = run  # a worker dying from here on requeues it (never started)
            self._runs[job.task_id] = run
            alive = worker.ready or not self.isolated
        if not alive:
            self._lost(run, "its worker died before the task started")
            return
        if job.timeout_s is not None:  # the runner stops it at timeout_s; this is the hard limit
            run.timer = threading.Timer(job.timeout_s + self.stop_grace_s, self._overdue, args=(run, "timeout"))
            run.timer.daemon = True
            run.timer.start()
        if self.isolated:
            try:
                worker.send({"op": "run", "job": job})
            except OSError:
                pass  # the worker is dying: its reader reports the run as crashed
        else:
            threading.Thread(target=self._run_here, args=(worker, job), daemon=True,
                             name=f"matcalc-task-{job.task_id[:8]}").start()

    def _run_here(self, worker: _Worker, job: Job) -> None:
        """In-process mode: the runner in a thread of the API process."""
        from matcalc.server.envelope import request_id_var

        token = request_id_var.set(f"task:{job.task_id}")  # the server's log lines of the task carry its id
        try:
            outcome = run_job(job, lambda msg: self._on_message(worker, msg), worker=worker.name,
                              progress_interval_s=self.progress_interval_s)
            self._on_message(worker, outcome.to_message())
        except Exception:  # noqa: BLE001 - e.g. a result that cannot be serialised
            log.exception("task %s: the outcome could not be reported", job.task_id)
            self._on_message(worker, {"type": "done", "task_id": job.task_id, "attempt": job.attempt,
                                      "status": TaskStatus.FAILED.value, "result": None,
                                      "error": "RuntimeError: the outcome could not be reported"})
        finally:
            request_id_var.reset(token)

    # -------------------------------------------------------------- messages from workers
    def _on_message(self, worker: _Worker, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "reply":
            slot = worker.replies.get(msg.get("id", -1))
            if slot is not None:
                slot[0].append((msg.get("ok", False), msg.get("value")))
                slot[1].set()
            return
        if kind == "ready":
            self._on_ready(worker, msg)
            return
        if kind == "syslog":  # the worker's own log record: into this process' logging (files, streams)
            rec = logging.makeLogRecord(msg.get("record") or {})
            task = getattr(rec, "task_id", None)
            rec.request_id = f"task:{task}" if task else worker.name
            logging.getLogger(rec.name).handle(rec)
            return
        with self._cond:
            run = self._runs.get(msg.get("task_id", ""))
        if run is None or run.worker is not worker or run.job.attempt != msg.get("attempt") or run.ended:
            return
        cb = self._callbacks
        assert cb is not None
        task_id = run.job.task_id
        if kind == "progress":
            cb.on_progress(task_id, {k: v for k, v in msg.items() if k not in ("type", "task_id", "attempt")})
        elif kind == "log":
            cb.on_log(task_id, msg.get("record") or {})
        elif kind == "running":
            run.started = True
            worker.models.update(msg.get("models") or ())
        elif kind == "done":
            worker.models.update(msg.get("models") or ())
            if self._end(run):
                status = msg.get("status", TaskStatus.FAILED.value)
                self._count(status)
                cb.on_done(task_id, status, msg.get("result"), msg.get("error"), run.job.attempt)

    def _count(self, status: str) -> None:
        with self._cond:
            if status == TaskStatus.COMPLETED.value:
                self.completed += 1
            elif status == TaskStatus.FAILED.value:
                self.failed += 1

    def _end(self, run: _Run) -> bool:
        """Close ``run`` once (False when it had ended already); frees its slot."""
        with self._cond:
            if run.ended:
                return False
            run.ended = True
            run.worker.running.pop(run.job.task_id, None)
            if self._runs.get(run.job.task_id) is run:
                del self._runs[run.job.task_id]
            self._cond.notify_all()
        if run.timer is not None:
            run.timer.cancel()
        return True

    # -------------------------------------------------------------- stop, timeout
    def _stop(self, run: _Run, reason: str) -> None:
        """Ask the runner to stop ``run``; kill its worker if it has not stopped within ``stop_grace_s``."""
        if self.isolated:
            with contextlib.suppress(OSError):
                run.worker.send({"op": "stop", "task_id": run.job.task_id, "reason": reason})
            timer = threading.Timer(self.stop_grace_s, self._overdue, args=(run, reason))
            timer.daemon = True
            timer.start()
        else:
            request_stop(run.job.task_id, reason)

    def _overdue(self, run: _Run, reason: str) -> None:
        """``run`` did not end in time after a stop (``cancel``) or past its timeout: its worker is killed
        (the task ends CANCELLED or TIMEOUT, not as a crash); in-process, the outcome is given up on."""
        with self._cond:
            if run.ended:
                return
            run.kill_reason = reason
        job = run.job
        cb = self._callbacks
        assert cb is not None
        if reason == "timeout":
            error = (f"TaskTimeoutError: task {job.task_id} timed out after {job.timeout_s:g} s and did not "
                     f"stop within {self.stop_grace_s:g} s" + ("; its worker process was killed" if self.isolated else ""))
            if self._end(run):
                cb.on_done(job.task_id, TaskStatus.TIMEOUT.value, None, error, job.attempt)
        elif self._end(run):
            cb.on_done(job.task_id, TaskStatus.CANCELLED.value, None, "stopped on request", job.attempt)
        if self.isolated:
            log.warning("task %s did not stop within %g s (%s): killing worker %s", job.task_id, self.stop_grace_s,
                        reason, run.worker.name)
            self._kill(run.worker)

    # -------------------------------------------------------------- worker processes
    def _spawner(self) -> None:
        """Starts (and restarts) the worker processes, from this one thread. The kernel kills them when it
        ends, so it ends only after `shutdown` closed them."""
        while True:
            with self._cond:
                while not self._stopping and not any(t <= time.monotonic() for t, _ in self._spawn_requests):
                    wait = min((t for t, _ in self._spawn_requests), default=time.monotonic() + 1.0)
                    self._cond.wait(max(0.05, min(1.0, wait - time.monotonic())))
                if self._stopping:
                    break
                now = time.monotonic()
                due = [w for t, w in self._spawn_requests if t <= now]
                self._spawn_requests = [(t, w) for t, w in self._spawn_requests if t > now]
            for w in due:
                try:
                    self._spawn(w)
                except Exception as exc:  # noqa: BLE001 - e.g. out of file descriptors: try again later
                    log.error("could not start worker %s: %s", w.name, exc)
                    w.failed_starts += 1
                    w.last_exit = f"could not start: {exc}"
                    self._respawn_later(w)
        self._closed.wait()

    def _respawn_later(self, w: _Worker) -> None:
        delay = RESTART_BACKOFF_S[min(w.failed_starts, len(RESTART_BACKOFF_S) - 1)]
        with self._cond:
            if not self._stopping:
                self._spawn_requests.append((time.monotonic() + delay, w))
                self._cond.notify_all()

    def _spawn(self, w: _Worker) -> None:
        assert self.plan is not None
        parent, child = socket.socketpair()
        env = dict(os.environ)
        env.pop("MALLOC_TRIM_THRESHOLD_", None)  # it made CHGNet 2.5x slower (DESIGN §5)
        threads = str(self.plan.torch_threads)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=str(self.blas_threads or threads),
                   OPENBLAS_NUM_THREADS=str(self.blas_threads or threads))
        if w.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(w.gpu)
        code = f"from matcalc.execution import worker_main; worker_main({child.fileno()})"
        try:
            w.proc = subprocess.Popen([sys.executable, "-c", code], env=env, pass_fds=[child.fileno()],
                                      stdin=subprocess.DEVNULL, close_fds=True)
        finally:
            child.close()
        w.conn = Connection(parent.detach())
        w.pid, w.ready, w.started_at, w.models = w.proc.pid, False, time.monotonic(), set()
        w.send({"op": "init", "name": w.name, "device": self.device, "log_level": self.log_level,
                "torch_threads": self.plan.torch_threads,
                "blas_threads": self.blas_threads, "custom_models": list(self._custom.values()),
                "progress_interval_s": self.progress_interval_s, "parent_pid": os.getpid()})
        threading.Thread(target=self._reader, args=(w, w.conn, w.proc), daemon=True,
                         name=f"matcalc-pool-{w.name}").start()
        timer = threading.Timer(START_TIMEOUT_S, self._check_started, args=(w, w.proc))
        timer.daemon = True
        timer.start()

    def _check_started(self, w: _Worker, proc: subprocess.Popen[bytes]) -> None:
        if w.proc is proc and not w.ready and proc.poll() is None:
            log.error("worker %s (pid %d) not ready after %g s: killing it", w.name, proc.pid, START_TIMEOUT_S)
            proc.kill()

    def _on_ready(self, w: _Worker, msg: dict[str, Any]) -> None:
        with w.send_lock:  # user models registered since the worker's init reach it before any task
            with self._cond:
                w.ready, w.failed_starts = True, 0
                w.startup_s = time.monotonic() - w.started_at  # from spawn to ready: interpreter, imports, plugins
                models = list(self._custom.values())
                self._cond.notify_all()
            assert w.conn is not None
            for model in models:
                w.conn.send({"op": "call", "id": -1, "method": "register_custom_model", "args": (model,)})
        log.info("worker %s ready (pid %s, started in %.1f s)", w.name, w.pid, w.startup_s)

    def _reader(self, w: _Worker, conn: Connection, proc: subprocess.Popen[bytes]) -> None:
        """Reads one worker's messages until its pipe closes, then handles its death."""
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # noqa: BLE001 - a message that cannot be read: the worker is broken
                log.exception("worker %s sent an unreadable message", w.name)
                proc.kill()
                break
            try:
                self._on_message(w, msg)
            except Exception:  # noqa: BLE001 - a broken callback must not stop the reader
                log.exception("handling a message of worker %s failed", w.name)
        try:
            exitcode = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            exitcode = proc.wait()
        with contextlib.suppress(OSError):
            conn.close()
        self._on_exit(w, exitcode)

    def _on_exit(self, w: _Worker, exitcode: int) -> None:
        reason = death_reason(exitcode)
        with self._cond:
            was_ready = w.ready
            w.ready, w.pid, w.conn = False, None, None
            w.last_exit = reason
            runs = list(w.running.values())
            stopping = self._stopping
            self._cond.notify_all()
        for slot in list(w.replies.values()):
            slot[1].set()
        if not was_ready:
            w.failed_starts += 1
        if stopping:  # shutting down: its tasks are left to the shutdown (requeued), not crashes
            return
        for run in runs:
            if run.kill_reason is not None:
                continue  # killed on purpose: its outcome is reported
            if run.started:
                if self._end(run):
                    self._crashed(run, reason)
            else:
                self._lost(run, f"worker {w.name} {reason} before the task started")
        level = logging.ERROR if runs or not was_ready else logging.WARNING
        log.log(level, "worker %s %s%s; restarting it", w.name, reason,
                f" while running {', '.join(r.job.task_id for r in runs)}" if runs else
                ("" if was_ready else " before it was ready"))
        self.restarts += 1
        self._respawn_later(w)

    def _crashed(self, run: _Run, reason: str) -> None:
        """The worker died under ``run``: count the crash; run it again alone, or FAILED at the cap."""
        cb = self._callbacks
        assert cb is not None
        with self._cond:
            self.crashed += 1
        job = run.job
        where = f"worker {run.worker.name} {reason}"
        try:
            again = cb.on_crashed(job.task_id, where, job.attempt)
        except Exception:  # noqa: BLE001 - e.g. the database is down: leave it for the next start
            log.exception("could not record the crash of task %s", job.task_id)
            return
        if again and not self._stopping:
            self.submit(replace(job, crashes=job.crashes + 1))

    def _lost(self, run: _Run, reason: str) -> None:
        """``run`` never started on its worker, which died: back in the queue, no crash counted."""
        if not self._end(run):
            return
        cb = self._callbacks
        assert cb is not None
        if cb.on_requeued(run.job.task_id, reason) and not self._stopping:
            self.submit(run.job)

    def _kill(self, w: _Worker) -> None:
        proc = w.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGKILL)

    def _close_workers(self, wait_s: float = 3.0) -> None:
        """Ask every worker process to exit (one still starting is killed), kill those left after ``wait_s``."""
        procs = []
        for w in self.workers:
            proc, conn, ready = w.proc, w.conn, w.ready
            w.ready = False
            if proc is None or proc.poll() is not None:
                continue
            procs.append(proc)
            if ready and conn is not None:
                with contextlib.suppress(OSError):
                    w.send({"op": "exit"})
            else:
                proc.kill()
        deadline = time.monotonic() + wait_s
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(wait_s)


def make_executor(settings: Settings) -> Executor:
    """The executor ``settings.cluster`` names: ``process`` (default), ``inprocess``, ``local``, ``slurm``,
    ``pbs`` or a dask scheduler address."""
    kind = settings.cluster.strip()
    # the runner forwards at most one progress event per interval: as often as the most eager consumer
    # (stored progress, progress webhooks) wants them, at most every 0.1 s for the live streams
    interval = min(PROGRESS_INTERVAL_S, settings.progress_interval_s, settings.webhook_progress_interval_s)
    common = {"device": settings.device, "max_crashes": settings.max_crashes, "progress_interval_s": interval}
    if kind.lower() in ("process", "processes", ""):
        return PoolExecutor(settings.workers, slots=settings.slots_per_worker, blas_threads=settings.blas_threads,
                            stop_grace_s=settings.stop_grace_s, log_level=settings.log_level, **common)
    if kind.lower() in ("inprocess", "in-process"):
        return PoolExecutor(settings.workers, isolated=False, blas_threads=settings.blas_threads,
                            stop_grace_s=settings.stop_grace_s, log_level=settings.log_level, **common)
    from matcalc.server.cluster_executor import ClusterExecutor

    return ClusterExecutor(kind, workers=settings.workers, slots=settings.slots_per_worker,
                           options=settings.cluster_options, **common)


__all__ = ["PoolExecutor", "make_executor"]
