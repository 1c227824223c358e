"""Cluster vs in-process: the same single points through ``matcalc.cluster`` and in-process.

    python benchmarks/bench_cluster.py [--n 32] [--workers 2] [--model chgnet] [--repeats 3]

Prints wall times, the ratio cluster / in-process (target <= 1.1 on 2 CPU workers) and the
per-task overhead of the cluster path (target <= 20 ms/task), measured two ways:

* throughput: (cluster wall - in-process wall) / n for the CHGNet batch, against the plain loop
  (``[mc.single_point(s, model) for s in ...]``, with 1 torch thread and with one per CPU) and against the same calls from concurrent threads
  (which the batching engine fuses, as it fuses the concurrent tasks on each worker);
* latency: one trivial task (EMT, 4 atoms) at a time, submit -> result, minus the same call
  in-process (median of ``--latency-n``).

The in-process baseline runs in separate, dask-free processes (a LocalCluster's scheduler and
nannies live in the client process and would share its CPU time and GIL), one per torch thread
setting, each set before any torch work. Baseline and cluster runs alternate so that load from
other processes hits both alike. Cluster start and model loading are not timed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from typing import Any

import numpy as np

os.environ["MATCALC_CACHE"] = "0"  # benchmarks time computations: never serve them from the result cache


def structures(n: int, seed: int = 0) -> list:
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)  # 8 atoms
        atoms.positions += rng.normal(0, 0.03, atoms.positions.shape)
        atoms.info["label"] = f"Si8-{i}"
        out.append(atoms)
    return out


def _baseline(conn: Any, model: str, n: int, torch_threads: int) -> None:
    """Child process: answers 'loop' / 'threads' / 'latency' with timings (and energies).

    torch threads are set once, before any torch work: ``torch.set_num_threads`` called later does
    not reach threads that already ran torch code (OpenMP keeps a per-thread setting), e.g. the
    batching engine's dispatcher thread.
    """
    import torch
    from ase.build import bulk

    import matcalc as mc
    from matcalc.calculations.common import map_threads

    torch.set_num_threads(torch_threads)
    items = structures(n)
    cu4 = bulk("Cu", "fcc", a=3.6, cubic=True)
    for s in structures(4, seed=1):
        mc.single_point(s, model)
    for _ in range(5):
        mc.single_point(cu4, "emt")
    conn.send("ready")
    while True:
        cmd, arg = conn.recv()
        if cmd == "stop":
            return
        t0 = time.perf_counter()
        if cmd == "loop":
            res = [mc.single_point(s, model) for s in items]
            conn.send((time.perf_counter() - t0, [(r.energy_eV, r.forces_eV_per_A) for r in res]))
        elif cmd == "threads":
            map_threads(lambda s: mc.single_point(s, model), items, max_workers=arg)
            conn.send((time.perf_counter() - t0, None))
        elif cmd == "latency":
            lat = []
            for _ in range(arg):
                t0 = time.perf_counter()
                mc.single_point(cu4, "emt")
                lat.append(time.perf_counter() - t0)
            conn.send((statistics.median(lat), None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--model", default="chgnet")
    ap.add_argument("--latency-n", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each path (best is reported)")
    args = ap.parse_args()

    from ase.build import bulk

    from matcalc import cluster

    cpus = len(os.sched_getaffinity(0))
    print(f"bench_cluster: {args.n} single points, model {args.model}, {cpus} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} (other processes share these CPUs)")
    items = structures(args.n)
    cu4 = bulk("Cu", "fcc", a=3.6, cubic=True)
    ctx = mp.get_context("spawn")
    children = {}
    for tt in sorted({1, cpus}):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_baseline, args=(child, args.model, args.n, tt))
        proc.start()
        children[tt] = (parent, proc)
    for parent, _ in children.values():
        assert parent.recv() == "ready"

    def ask(tt: int, cmd: str, arg: Any = None) -> tuple[float, Any]:
        parent = children[tt][0]
        parent.send((cmd, arg))
        return parent.recv()

    t0 = time.perf_counter()
    with cluster.start(n_gpus=0, n_workers=args.workers, threads_per_worker=args.threads_per_worker,
                       preload=(args.model, "emt"), dashboard=False) as cl:
        t_start = time.perf_counter() - t0
        info = cl.workers()
        cl.gather_frame(cl.map("single_point", structures(4, seed=1) * args.workers, args.model))
        for _ in range(5):
            cl.submit("single_point", cu4, "emt").result()
        t_in, t_in_all, t_thr, t_cl, lat_in, lat_cl = [], [], [], [], [], []
        for _ in range(args.repeats):
            t, local = ask(1, "loop")
            t_in.append(t)
            t_in_all.append(ask(cpus, "loop")[0])
            t_thr.append(ask(1, "threads", args.workers * args.threads_per_worker)[0])
            t0 = time.perf_counter()
            tasks = cl.map("single_point", items, args.model)
            remote = [t.result() for t in tasks]
            t_cl.append(time.perf_counter() - t0)
            lat_in.append(ask(1, "latency", args.latency_n)[0])
            lat = []
            for _ in range(args.latency_n):
                t0 = time.perf_counter()
                cl.submit("single_point", cu4, "emt").result()
                lat.append(time.perf_counter() - t0)
            lat_cl.append(statistics.median(lat))
    for parent, proc in children.values():
        parent.send(("stop", None))
        proc.join(30)

    t_local, t_threads, t_cluster = min(t_in), min(t_thr), min(t_cl)
    de = max(abs(e - r.energy_eV) for (e, _), r in zip(local, remote, strict=True))
    df = max(float(np.abs(f - r.forces_eV_per_A).max()) for (_, f), r in zip(local, remote, strict=True))
    runs = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    print(f"cluster: {args.workers} CPU worker processes x {args.threads_per_worker} task threads, torch threads "
          f"{[w['torch_threads'] for w in info]}; start + preload {t_start:.1f} s (not timed)")
    print(f"in-process loop, 1 torch thread : {t_local:7.3f} s = {1e3 * t_local / args.n:6.1f} ms/structure  "
          f"[runs {runs(t_in)}]")
    print(f"in-process loop, {cpus} torch threads: {min(t_in_all):7.3f} s  [runs {runs(t_in_all)}]")
    print(f"in-process, {args.workers * args.threads_per_worker} threads x 1 torch thread (fused by the batching "
          f"engine): {t_threads:7.3f} s  [runs {runs(t_thr)}]")
    print(f"cluster map: {t_cluster:7.3f} s = {1e3 * t_cluster / args.n:6.1f} ms/structure  [runs {runs(t_cl)}]")
    best = min(t_local, min(t_in_all))
    print(f"ratio cluster / best in-process loop: {t_cluster / best:.2f}  (target <= 1.1)")
    print(f"ratio cluster / in-process threads: {t_cluster / t_threads:.2f}")
    print(f"throughput overhead: {1e3 * (t_cluster - best) / args.n:+.1f} ms/task vs the best loop, "
          f"{1e3 * (t_cluster - t_threads) / args.n:+.1f} ms/task vs threads  (target <= 20)")
    li, lc = min(lat_in), min(lat_cl)
    print(f"latency, one EMT Cu4 task at a time: in-process {1e3 * li:.1f} ms, cluster {1e3 * lc:.1f} ms -> "
          f"overhead {1e3 * (lc - li):.1f} ms/task (best of {args.repeats} medians of {args.latency_n}; "
          f"cluster medians {runs([1e3 * x for x in lat_cl])} ms)")
    print(f"same numbers: max |dE| {de:.2e} eV, max |dF| {df:.2e} eV/A")


if __name__ == "__main__":
    main()
