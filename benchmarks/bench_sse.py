"""Benchmark: how much 20 live log streams (SSE) slow the task they follow, on a live `matcalc serve`.

The same EMT relaxation (rattled Cu, FIRE, fmax 1e-3 eV/Å, positions only) runs with no stream and with
``--streams`` streams opened before it starts, alternating which side goes first; the task's own run time
(``finished_at - started_at`` from the server) is compared, and the CPU seconds the server's processes
spent meanwhile (robust to a loaded machine, where wall times scatter). Two servers: the default progress interval
(0.5 s: a few stored lines) and ``--progress-interval-s 0`` (every optimizer step a stored line, the
worst case for the streams). The server's ``matcalc_log_stream_reads_total`` counter gives the store
reads the shared feed made. Run by hand; asserts nothing. Goal: ratio <= 1.10. ``--cluster inprocess``
(the task in the API process, sharing its GIL with the streams) is the hard case; the default
``process`` executor runs the task in a worker process.

    python benchmarks/bench_sse.py --repeat 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx

API = "/api/v1"
ENDLESS = {"model": "emt", "ensemble": "nvt", "nvt_steps": 10_000_000, "relax_first": False, "interval": 10}


def cif(repeat: int, seed: int) -> str:
    from ase.build import bulk
    from ase.io import write

    atoms = bulk("Cu", "fcc", a=3.66, cubic=True).repeat((repeat, repeat, repeat))
    atoms.rattle(0.1, seed=seed)
    buf = io.BytesIO()
    write(buf, atoms, format="cif")
    return buf.getvalue().decode()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(c: httpx.Client, tid: str, statuses: set[str], timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        t = c.get(f"/tasks/{tid}").json()["data"]
        if t["status"] in statuses:
            return t
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {tid} still {t['status']}")
        time.sleep(0.05)


def seconds(t: dict) -> float:
    def parse(s: str) -> datetime:
        return datetime.fromisoformat(s.replace("Z", "+00:00"))

    return (parse(t["finished_at"]) - parse(t["started_at"])).total_seconds()


def stream_reads(c: httpx.Client) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith("matcalc_log_stream_reads_total"):
            return float(line.split()[-1])
    return 0.0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of the server and its worker processes so far."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def one_run(c: httpx.Client, url: str, body: dict, n_streams: int, pid: int) -> tuple[float, int, int, float]:
    """The relaxation with ``n_streams`` streams: (run seconds, lines stored, stream bytes read, server CPU s)."""
    blocker = c.post("/tasks/stability", json={"structure": cif(2, 99), **ENDLESS}).json()["data"]["id"]
    wait(c, blocker, {"RUNNING"})
    tid = c.post("/tasks/optimization", json=body).json()["data"]["id"]
    opened = threading.Barrier(n_streams + 1)
    got = [0] * n_streams

    def follow(i: int) -> None:
        with httpx.Client(base_url=url + API, timeout=600) as ci, ci.stream("GET", f"/tasks/{tid}/logs/stream") as r:
            chunks = r.iter_bytes()
            got[i] += len(next(chunks))
            opened.wait(120)
            for chunk in chunks:
                got[i] += len(chunk)

    threads = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(n_streams)]
    for t in threads:
        t.start()
    if n_streams:
        opened.wait(120)
    cpu0 = cpu_s(pid)
    c.post(f"/tasks/{blocker}/cancel")  # the relaxation starts now
    task = wait(c, tid, {"COMPLETED", "FAILED"})
    for t in threads:
        t.join(120)
    cpu = cpu_s(pid) - cpu0
    lines = len(c.get(f"/tasks/{tid}/logs", params={"limit": 10000}).json()["data"])
    return seconds(task), lines, sum(got), cpu


def scenario(args: argparse.Namespace, cluster: str, progress_interval_s: float,
             tmp: Path) -> tuple[list[float], list[float]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    name = f"{cluster}-{progress_interval_s}"
    log = open(tmp / f"server-{name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "matcalc.cli", "serve", "--port", str(port), "--db",
                             f"sqlite:///{tmp / f'sse-{name}.db'}", "--cluster", cluster, "--workers", "1",
                             "--rate-limit", "0", "--progress-interval-s", str(progress_interval_s)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + API + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp / f"server-{name}.log").read_text()[-2000:])
            time.sleep(0.2)
        body = {"structure": cif(args.repeat_cell, 1), "model": "emt", "fmax": 1e-3, "optimizer": "FIRE",
                "max_steps": 5000, "relax_cell": False}
        ratios: list[float] = []
        cpu_ratios: list[float] = []
        with httpx.Client(base_url=url + API, timeout=600) as c:
            one_run(c, url, body, 0, proc.pid)  # warm-up (EMT, imports, the store)
            for rep in range(args.repeat):
                order = (0, args.streams) if rep % 2 == 0 else (args.streams, 0)
                res = {}
                for n in order:
                    reads0 = stream_reads(c)
                    t, lines, nbytes, cpu = one_run(c, url, body, n, proc.pid)
                    res[n] = (t, lines, stream_reads(c) - reads0, nbytes, cpu)
                (t0, _, _, _, cpu0), (tn, lines_n, reads_n, bytes_n, cpu_n) = res[0], res[args.streams]
                ratios.append(tn / t0)
                cpu_ratios.append(cpu_n / cpu0)
                print(f"  run {rep + 1}: no stream {t0:6.2f} s | {args.streams} streams {tn:6.2f} s | ratio "
                      f"{tn / t0:.3f} | server CPU {cpu0:.2f} s vs {cpu_n:.2f} s, ratio {cpu_n / cpu0:.3f} | "
                      f"{lines_n} lines, {reads_n:.0f} shared feed reads, {bytes_n / 1e6:.2f} MB streamed", flush=True)
        return ratios, cpu_ratios
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3, help="pairs of runs, alternating which side goes first")
    p.add_argument("--repeat-cell", type=int, default=3, help="Cu supercell n x n x n (default 3: 108 atoms)")
    p.add_argument("--clusters", default="inprocess,process",
                   help="executors to run (default inprocess: the task shares the API process with the streams; "
                        "process: the default, the task in a worker process)")
    p.add_argument("--intervals", default="0.5,0", help="progress_interval_s values (default 0.5,0)")
    args = p.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ["MATCALC_CACHE"] = "0"  # the same relaxation every run: time computations, never cache hits
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {args.streams} SSE streams vs none on one EMT relaxation (Cu {args.repeat_cell}^3 x 4 atoms)")
    print(f"host {platform.node()} | {os.cpu_count()} CPUs | load1 {load:.1f} | python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        for cluster in [c.strip() for c in args.clusters.split(",") if c.strip()]:
            for interval in [float(x) for x in args.intervals.split(",") if x.strip()]:
                print(f"-- --cluster {cluster}, progress_interval_s {interval:g}")
                ratios, cpu_ratios = scenario(args, cluster, interval, Path(tmp))
                print(f"  median ratio {statistics.median(ratios):.3f} (goal <= 1.10); server CPU "
                      f"{statistics.median(cpu_ratios):.3f}")


if __name__ == "__main__":
    main()
