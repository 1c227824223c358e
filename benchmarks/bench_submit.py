"""Benchmark: task submissions per second against a live `matcalc serve` on SQLite, synchronous=NORMAL vs FULL.

FULL (the default) fsyncs every commit, so an acknowledged task survives a power loss; NORMAL (WAL) only
a crash of the process. Each side: a fresh server and database, one uploaded structure, then ``--n``
single-point POSTs (EMT, by ``structure_id``) from ``--clients`` threads; the tasks run meanwhile, as in
production. The sides alternate which goes first over ``--repeat`` rounds. Run by hand; asserts nothing.

    python benchmarks/bench_submit.py --n 500 --repeat 2
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

API = "/api/v1"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cu_cif() -> str:
    from ase.build import bulk
    from ase.io import write

    buf = io.BytesIO()
    write(buf, bulk("Cu", "fcc", a=3.61, cubic=True), format="cif")
    return buf.getvalue().decode()


def one_side(mode: str, n: int, clients: int, workdir: Path) -> float:
    """Submissions per second with ``synchronous=mode``."""
    port = free_port()
    db = workdir / f"bench-{mode}-{time.monotonic_ns()}.db"
    env = {**os.environ, "MATCALC_SQLITE_SYNCHRONOUS": mode, "MATCALC_CACHE": "0"}
    log = open(workdir / f"server-{mode}.log", "w")  # noqa: SIM115 - the server's output, closed in finally
    proc = subprocess.Popen([sys.executable, "-m", "matcalc.cli", "serve", "--port", str(port), "--db",
                             f"sqlite:///{db}"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    try:
        url = f"http://127.0.0.1:{port}{API}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"server did not start: {(workdir / f'server-{mode}.log').read_text()[-2000:]}")
            time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=60) as c:
            sid = c.post("/structures", json={"content": cu_cif(), "format": "cif"}).json()["data"]["id"]

            def post(i: int) -> int:
                return c.post("/tasks/single-point", json={"structure_id": sid, "model": "emt",
                                                           "label": f"t{i}"}).status_code

            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                codes = list(pool.map(post, range(n)))
            dt = time.perf_counter() - t0
        assert all(code == 201 for code in codes), sorted(set(codes))
        return n / dt
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500, help="POSTs per side (default 500)")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads (default 8)")
    p.add_argument("--repeat", type=int, default=2, help="rounds, alternating which side goes first (default 2)")
    args = p.parse_args()
    rates: dict[str, list[float]] = {"NORMAL": [], "FULL": []}
    with tempfile.TemporaryDirectory(prefix="matcalc-bench-submit-") as tmp:
        for r in range(args.repeat):
            for mode in (("NORMAL", "FULL") if r % 2 == 0 else ("FULL", "NORMAL")):
                rate = one_side(mode, args.n, args.clients, Path(tmp))
                rates[mode].append(rate)
                print(f"round {r + 1}: synchronous={mode}: {rate:.1f} tasks/s", flush=True)
    normal, full = statistics.median(rates["NORMAL"]), statistics.median(rates["FULL"])
    print(f"\n{platform.node()} ({os.cpu_count()} CPUs, load shared), {args.n} POSTs x {args.clients} clients, "
          f"SQLite on {tempfile.gettempdir()}")
    print(f"synchronous=NORMAL: {normal:.1f} tasks/s   synchronous=FULL: {full:.1f} tasks/s   "
          f"FULL/NORMAL = {full / normal:.2f}")


if __name__ == "__main__":
    main()
