"""Prepared check for a GPU machine: ``matcalc.cluster.start()`` with one worker per GPU.

    python benchmarks/gpu_cluster_check.py [--n 64] [--model chgnet] [--structure RSM0009]

Checks (each printed PASS/FAIL; exit code 1 if any fails):

1. ``gpus()`` lists every GPU NVML sees (name, memory, utilization, temperature) and matches
   ``torch.cuda.device_count()``; ``cuda_status()`` says the GPU path is usable (dask_cuda imports,
   the nvidia-ml-py / nvidia-ml-py3 ``pynvml`` clash is not biting).
2. ``start()`` builds a GPU cluster: one worker per GPU, each with resource GPU=1, a distinct
   ``CUDA_VISIBLE_DEVICES`` whose first entry is its own GPU, torch device ``cuda:0`` inside the
   worker mapped to that physical GPU (NVML UUID compared), the model preloaded on the GPU,
   no ``MALLOC_TRIM_THRESHOLD_`` in the worker environment.
3. Tasks run on the GPU: ``n`` single points spread over all workers, each result's model
   on ``cuda``; the same structures in-process on GPU 0 give the same energies (float32 tolerance).
4. Throughput: the ``n`` single points and ``n // 4`` fast relaxations through the cluster vs
   in-process on one GPU (printed, no target), with ``gpus()`` utilization sampled meanwhile.

Nothing here downloads anything; the structures are matcalc builtins.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Any

os.environ["MATCALC_CACHE"] = "0"  # benchmarks time computations: never serve them from the result cache

FAILED: list[str] = []


def check(name: str, ok: bool, detail: Any = "") -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail != "" else ""), flush=True)
    if not ok:
        FAILED.append(name)
    return ok


def placement(dask_worker: Any = None) -> dict[str, Any]:
    """Runs on each worker: where torch puts work, and the NVML UUID of that device."""
    import torch

    from matcalc.models import get_model

    out: dict[str, Any] = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                           "cuda_available": torch.cuda.is_available(),
                           "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        out["current_device"] = idx
        out["name"] = torch.cuda.get_device_name(idx)
        props = torch.cuda.get_device_properties(idx)
        out["uuid"] = str(getattr(props, "uuid", "")) or None
        x = torch.ones(8, device="cuda")
        out["tensor_device"] = str(x.device)
    try:
        pot = get_model("chgnet")
        out["model_device"] = str(pot.device)
    except Exception as exc:  # noqa: BLE001
        out["model_device"] = f"error: {exc}"
    return out


def result_device(structure: Any, model: str, **params: Any) -> dict[str, Any]:
    """A task function: a single point plus the device its model sits on."""
    from matcalc.calculations.single_point import single_point
    from matcalc.models import get_model

    r = single_point(structure, model, **params)
    return {"energy_eV": r.energy_eV, "device": str(get_model(model).device),
            "cvd": os.environ.get("CUDA_VISIBLE_DEVICES")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--model", default="chgnet")
    ap.add_argument("--structure", default="RSM0009", help="builtin structure to rattle (default RSM0009, 22 atoms)")
    ap.add_argument("--threads-per-worker", type=int, default=None)
    args = ap.parse_args()

    import numpy as np
    import torch

    import matcalc as mc
    from matcalc import cluster

    # ------------------------------------------------------------------ 1. inventory
    n_torch = torch.cuda.device_count() if torch.cuda.is_available() else 0
    inv = cluster.gpus()
    for g in inv:
        print("   ", g)
    check("gpus() lists every GPU", len(inv) == n_torch and n_torch > 0, f"NVML {len(inv)}, torch {n_torch}")
    check("gpus() fields", bool(inv) and all(g.get("name") and g.get("memory_total_MiB") and g.get("temperature_C") is not None
                               and g.get("utilization_percent") is not None for g in inv))
    usable, reason = cluster.cuda_status()
    from matcalc.cluster.gpus import pynvml_providers

    print("    pynvml provided by:", pynvml_providers())
    check("cuda_status() usable", usable, reason)
    if not usable:
        print("cannot start a GPU cluster; stopping here")
        return 1

    base = mc.load_structure(args.structure)
    rng = np.random.default_rng(0)
    cells = []
    for i in range(args.n):
        a = base.copy()
        a.positions += rng.normal(0, 0.03, a.positions.shape)
        a.info["label"] = f"{args.structure}-{i}"
        cells.append(a)

    # ------------------------------------------------------------------ 2. cluster layout
    t0 = time.perf_counter()
    cl = cluster.start(n_gpus="all", threads_per_worker=args.threads_per_worker, preload=(args.model,))
    print(f"    start + preload: {time.perf_counter() - t0:.1f} s; dashboard {cl.dashboard_link}")
    with cl:
        check("cluster is a GPU cluster", cl.gpu, cl.gpu_reason)
        workers = cl.workers()
        for w in workers:
            print("   ", {k: w[k] for k in ("address", "nthreads", "torch_threads", "resources", "device",
                                           "cuda_visible_devices", "models", "gpu", "malloc_trim_threshold")})
        check("one worker per GPU", len(workers) == n_torch, f"{len(workers)} workers, {n_torch} GPUs")
        check("every worker has resource GPU=1", all(w["resources"].get("GPU") == 1 for w in workers))
        firsts = [str(w["cuda_visible_devices"]).split(",")[0] for w in workers]
        check("distinct CUDA_VISIBLE_DEVICES per worker", len(set(firsts)) == len(workers), firsts)
        check("no MALLOC_TRIM_THRESHOLD_ in workers", all(w["malloc_trim_threshold"] is None for w in workers))
        check(f"{args.model} preloaded on every worker", all(args.model in w["models"] for w in workers))
        places = cl.client.run(placement)
        uuids = {p.get("uuid") for p in places.values()}
        for addr, p in sorted(places.items()):
            print("   ", addr, p)
        check("each worker's torch device is cuda:0 of its own GPU",
              all(p.get("tensor_device") == "cuda:0" and p.get("current_device") == 0 for p in places.values())
              and len(uuids) == len(places), f"{len(uuids)} distinct GPU UUIDs")
        check("models sit on cuda", all(str(p.get("model_device", "")).startswith("cuda") for p in places.values()))

        # -------------------------------------------------------------- 3. tasks on the GPUs
        tasks = cl.map(result_device, cells, args.model)
        outs = [t.result(600) for t in tasks]
        used = {t.worker for t in tasks}
        check("tasks spread over all workers", len(used) == len(workers), f"{len(used)} of {len(workers)} used")
        check("task models on cuda", all(o["device"].startswith("cuda") for o in outs))
        local = [mc.single_point(c, args.model) for c in cells[:8]]
        de = max(abs(o["energy_eV"] - r.energy_eV) for o, r in zip(outs[:8], local, strict=True))
        check("cluster energies equal in-process (GPU 0)", de < 1e-4 * max(1.0, abs(local[0].energy_eV)),
              f"max |dE| {de:.2e} eV")

        # -------------------------------------------------------------- 4. throughput
        samples: list[list[dict[str, Any]]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append(cluster.gpus())
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        cl.gather_frame(cl.map("single_point", cells, args.model))
        t_sp_cluster = time.perf_counter() - t0
        relax_cells = cells[: max(1, args.n // 4)]
        t0 = time.perf_counter()
        frame = cl.gather_frame(cl.map("relax", relax_cells, args.model, protocol="fast"))
        t_rx_cluster = time.perf_counter() - t0
        stop.set()
        sampler.join()
        check("fast relaxations completed", frame["error"].isna().all(), f"{len(frame)} relaxations")
    t0 = time.perf_counter()
    for c in cells:
        mc.single_point(c, args.model)
    t_sp_local = time.perf_counter() - t0
    from matcalc.calculations.many import map_property

    t0 = time.perf_counter()
    map_property("single_point", cells, model=args.model, progress=False)
    t_sp_threads = time.perf_counter() - t0
    t0 = time.perf_counter()
    map_property("relax", relax_cells, model=args.model, protocol="fast", progress=False)
    t_rx_local = time.perf_counter() - t0
    print(f"single points x{args.n}: cluster {t_sp_cluster:.2f} s, in-process loop {t_sp_local:.2f} s, "
          f"in-process threads (batched) {t_sp_threads:.2f} s -> cluster speed-up vs loop "
          f"{t_sp_local / t_sp_cluster:.1f}x, vs threads {t_sp_threads / t_sp_cluster:.1f}x")
    print(f"fast relaxations x{len(relax_cells)}: cluster {t_rx_cluster:.2f} s, in-process batched "
          f"{t_rx_local:.2f} s -> {t_rx_local / t_rx_cluster:.1f}x")
    if samples:
        peak: dict[int, float] = {}
        for snap in samples:
            for g in snap:
                peak[g["index"]] = max(peak.get(g["index"], 0.0), g.get("utilization_percent") or 0.0)
        print(f"peak GPU utilization during the cluster runs: {peak}")
    print("FAILED: " + ", ".join(FAILED) if FAILED else "all checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
