"""API latency under load: p50/p99 of ``GET /tasks/{id}`` and ``GET /health`` while 200 single-point tasks
(EMT) are submitted by 32 concurrent clients and run, against a live ``matcalc serve`` (default executor:
worker processes; ``--cluster local`` for dask). The goal is p99 < 200 ms; run by hand, asserts nothing
(the machine may be loaded: its load average is printed).

    python benchmarks/bench_api_latency.py [--n 200] [--cluster process]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from ase.build import bulk
from ase.io import write

API = "/api/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--cluster", default="process")
    args = p.parse_args()
    buf = io.BytesIO()
    write(buf, bulk("Cu", "fcc", a=3.6, cubic=True), format="cif")
    cif = buf.getvalue().decode()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(Path(tmp) / "server.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "matcalc.cli", "serve", "--port", str(port), "--db",
                                 f"sqlite:///{tmp}/lat.db", "--cluster", args.cluster, "--rate-limit", "0"],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MATCALC_CACHE": "0"})
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if httpx.get(url + API + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
            ids: list[str] = []
            samples: dict[str, list[float]] = {"GET /tasks/{id}": [], "GET /health": []}
            stop = threading.Event()

            def poll(path_of: str) -> None:
                with httpx.Client(base_url=url + API, timeout=300) as c:
                    while not stop.is_set():
                        if path_of == "GET /health":
                            path = "/health"
                        elif ids:
                            path = f"/tasks/{ids[len(samples[path_of]) % len(ids)]}"
                        else:
                            time.sleep(0.01)
                            continue
                        t0 = time.perf_counter()
                        c.get(path)
                        samples[path_of].append(time.perf_counter() - t0)

            def post(i: int) -> None:
                with httpx.Client(base_url=url + API, timeout=60) as c:
                    r = c.post("/tasks/single-point", json={"structure": cif, "model": "emt", "label": f"l{i}"})
                    assert r.status_code == 201, r.text
                    ids.append(r.json()["data"]["id"])

            pollers = [threading.Thread(target=poll, args=(k,)) for k in samples for _ in range(2)]
            for t in pollers:
                t.start()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(post, range(args.n)))
            submitted = time.perf_counter() - t0
            with httpx.Client(base_url=url + API, timeout=30) as c:
                while c.get("/tasks", params={"status": "COMPLETED", "page_size": 1}).json()["data"]["total"] < args.n:
                    time.sleep(0.2)
            done = time.perf_counter() - t0
            stop.set()
            for t in pollers:
                t.join()
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f} (1 min), executor {args.cluster}: {args.n} tasks "
          f"submitted in {submitted:.1f} s, all completed after {done:.1f} s")
    for k, v in samples.items():
        v.sort()
        p99 = v[min(len(v) - 1, int(0.99 * len(v)))]
        print(f"  {k:16s} n={len(v):5d}  p50 {statistics.median(v) * 1e3:6.1f} ms  p99 {p99 * 1e3:6.1f} ms  "
              f"max {v[-1] * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
