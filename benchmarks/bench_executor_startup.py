"""Start-up cost of the server's executors, side by side in one run (the machine may be loaded: compare the
ratios): the default supervised worker process (``--cluster process``) and a local dask cluster
(``--cluster local``), each with one worker: seconds from ``start()`` to the first EMT single point's
outcome, and for the worker process the respawn after a crash (SIGKILL) until the next outcome.

    python benchmarks/bench_executor_startup.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import statistics
import threading
import time
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ["MATCALC_CACHE"] = "0"

from ase.build import bulk  # noqa: E402
from ase.io import write  # noqa: E402

from matcalc.execution import Job  # noqa: E402


class Outcomes:
    """Executor callbacks that record the outcomes (no store)."""

    def __init__(self) -> None:
        self.done: dict[str, threading.Event] = {}
        self.status: dict[str, str] = {}
        self.attempt = 0

    def expect(self, task_id: str) -> threading.Event:
        return self.done.setdefault(task_id, threading.Event())

    def on_assigned(self, *a: Any) -> None: ...

    def on_started(self, task_id: str, worker: str | None, gpu: str | None) -> int:
        self.attempt += 1
        return self.attempt

    def on_progress(self, *a: Any) -> None: ...

    def on_log(self, *a: Any) -> None: ...

    def on_done(self, task_id: str, status: str, result: Any, error: str | None, attempt: int | None) -> None:
        self.status[task_id] = status
        self.expect(task_id).set()

    def on_crashed(self, task_id: str, reason: str, attempt: int | None) -> bool:
        return True

    def on_requeued(self, task_id: str, reason: str) -> bool:
        return True


def cif() -> str:
    buf = io.BytesIO()
    write(buf, bulk("Cu", "fcc", a=3.6, cubic=True), format="cif")
    return buf.getvalue().decode()


def first_outcome(executor: Any, cb: Outcomes, task_id: str) -> float:
    t0 = time.perf_counter()
    executor.start(cb)
    executor.submit(Job(task_id=task_id, model="emt", prop="single_point", structure=cif(), fmt="cif"))
    assert cb.expect(task_id).wait(300), "no outcome"
    assert cb.status[task_id] == "COMPLETED", cb.status
    return time.perf_counter() - t0


def process_pool() -> tuple[float, float]:
    from matcalc.server.pool import PoolExecutor

    cb = Outcomes()
    ex = PoolExecutor(1)
    try:
        start = first_outcome(ex, cb, "p1")
        pid = ex.info()["processes"][0]["pid"]
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)  # what the OOM killer does
        while ex.info()["processes"][0]["pid"] == pid:
            time.sleep(0.01)
        ex.submit(Job(task_id="p2", model="emt", prop="single_point", structure=cif(), fmt="cif"))
        assert cb.expect("p2").wait(300)
        return start, time.perf_counter() - t0
    finally:
        ex.shutdown(5)


def dask_local() -> float:
    from matcalc.server.cluster_executor import ClusterExecutor

    cb = Outcomes()
    ex = ClusterExecutor("local", workers=1)
    try:
        return first_outcome(ex, cb, "d1")
    finally:
        ex.shutdown(5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    rows: dict[str, list[float]] = {"process: start to first outcome": [], "process: respawn after SIGKILL": [],
                                    "dask local: start to first outcome": []}
    for i in range(args.repeat):
        for side in ((process_pool, dask_local) if i % 2 == 0 else (dask_local, process_pool)):
            if side is process_pool:
                start, respawn = process_pool()
                rows["process: start to first outcome"].append(start)
                rows["process: respawn after SIGKILL"].append(respawn)
            else:
                rows["dask local: start to first outcome"].append(dask_local())
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f} (1 min), {args.repeat} repeat(s), median s:")
    med = {k: statistics.median(v) for k, v in rows.items()}
    for k, v in med.items():
        print(f"  {k:38s} {v:6.2f} s  ({', '.join(f'{x:.2f}' for x in rows[k])})")
    print(f"  dask local / process start: {med['dask local: start to first outcome'] / med['process: start to first outcome']:.2f}x")


if __name__ == "__main__":
    main()
