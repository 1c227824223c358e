"""Shared helpers for the benchmark scripts: arguments, environment, structures, the peers' ASE calculator.

Import this module *before* numpy/torch in a script: :func:`parse` sets the BLAS thread count first.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

HCMOF = ["RSM0009", "RSM0010", "RSM0011", "RSM0012", "RSM0020"]
"""The small hcmof cells shipped as builtins (22-30 atoms)."""


def parse(description: str, n_default: int, extra: Callable[[argparse.ArgumentParser], None] | None = None
          ) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--n", type=int, default=n_default, help=f"number of structures (default {n_default})")
    p.add_argument("--repeat", type=int, default=2,
                   help="timed repetitions of each side, alternating which side goes first (default 2)")
    p.add_argument("--model", default="chgnet", help="matcalc model name (default chgnet; peers' side is "
                   "CHGNet's own ASE calculator, so keep chgnet for the comparison)")
    p.add_argument("--rattle", type=float, default=0.05, help="rattle amplitude in Å (default 0.05)")
    p.add_argument("--blas-threads", type=int, default=1,
                   help="OpenBLAS threads for numpy (default 1: more threads thrash on a shared CPU and slow "
                        "ASE's small linear algebra on both sides; 0 = leave the environment alone). Torch's "
                        "own threads are set with --torch-threads")
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--budget-atoms", type=int, default=0, help="engine atom budget (0 = matcalc default)")
    p.add_argument("--structures", default=",".join(HCMOF),
                   help="comma-separated builtin names to cycle through (default: the hcmof cells "
                        "RSM0009-RSM0012, RSM0020; e.g. MOF-5 for the GPU target)")
    if extra:
        extra(p)
    args = p.parse_args()
    args.names = [x.strip() for x in args.structures.split(",") if x.strip()]
    if args.n < 1:
        p.error("--n must be >= 1")
    if args.blas_threads > 0:
        os.environ["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)
    if args.budget_atoms > 0:
        os.environ["MATCALC_BATCH_ATOMS"] = str(args.budget_atoms)
    import torch

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    return args


def header(title: str, args: argparse.Namespace) -> None:
    import ase
    import torch

    import matcalc

    try:
        import chgnet

        chgnet_version = chgnet.__version__
    except Exception:  # noqa: BLE001
        chgnet_version = "-"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {title}")
    print(f"date {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC | host {platform.node()} | "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}) | GPU {gpu} | load1 {load:.1f}")
    print(f"python {platform.python_version()} | matcalc {matcalc.__version__} | torch {torch.__version__} "
          f"({torch.get_num_threads()} threads) | chgnet {chgnet_version} | ase {ase.__version__} | "
          f"device {args.device} | n {args.n} | BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}")


def rattled_cells(n: int, names: list[str], rattle: float, seed: int = 0) -> list[Any]:
    """``n`` copies of the builtin ``names`` (cycled), each rattled with its own seed."""
    import matcalc

    base = [matcalc.load_structure(x) for x in names]
    out = []
    for i in range(n):
        a = base[i % len(base)].copy()
        a.rattle(rattle, seed=seed + i)
        a.info["label"] = f"{names[i % len(names)]}-{i}"
        out.append(a)
    return out


def peer_calculator(potential: Any, device: str) -> Any:
    """CHGNet's own ASE calculator on the *same* loaded model (what MOFSimBench-style loops use)."""
    from chgnet.model.dynamics import CHGNetCalculator

    if getattr(potential, "family", "") != "chgnet":
        raise SystemExit("the peers' side uses CHGNetCalculator: run with --model chgnet")
    return CHGNetCalculator(model=potential.model, use_device=device)


class Timed:
    """Wrap an ASE calculator to sum the time spent inside ``calculate`` (the model) and count calls."""

    def __init__(self, calc: Any) -> None:
        self.calc = calc
        self.model_time_s = 0.0
        self.calls = 0
        original = calc.calculate

        def calculate(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                self.model_time_s += time.perf_counter() - t0
                self.calls += 1

        calc.calculate = calculate


def clock(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def peak_memory_note(device: str, n_atoms: int) -> str:
    """Peak CUDA memory per atom of the largest call (to calibrate matcalc.batching.ATOMS_PER_GB)."""
    if not device.startswith("cuda"):
        return ""
    import torch

    peak = torch.cuda.max_memory_allocated()
    return (f"peak CUDA memory {peak / 2**20:.0f} MiB for {n_atoms} atoms in one call = "
            f"{peak / 2**20 / max(n_atoms, 1):.3f} MiB/atom (matcalc.batching.ATOMS_PER_GB = 90 assumes ~11 MiB/atom)")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def summary_line(name: str, peer_s: list[float], ours_s: list[float], target: float) -> str:
    p, o = statistics.median(peer_s), statistics.median(ours_s)
    ratio = p / o
    verdict = "meets" if ratio >= target else "BELOW"
    runs = ", ".join(f"{a / b:.2f}x" for a, b in zip(peer_s, ours_s, strict=True))
    return (f"RESULT {name}: peer {p:.2f} s | matcalc {o:.2f} s | speed-up {ratio:.2f}x (runs: {runs}) | "
            f"target >= {target}x on CPU: {verdict}")
