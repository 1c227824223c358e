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

os.environ["MATCALC_CACHE"] = "0"  # benchmarks time computations: never serve them from the result cache

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


class HarmonicWells:
    """An instant model for host-cost benchmarks: harmonic wells at a reference structure's fractional
    positions plus a harmonic volume term, vectorised over a whole batch (one numpy pass per call).

    ``E = k/2 sum |d_i|^2 + B V0/2 (V/V0 - 1)^2`` with ``d_i = (s_i - s0_i) h`` (minimum image, cell rows
    ``h``), ``V0 = volume_factor * V_ref``; forces ``-k d_i``; stress ``k sum d d^T / V + B (V/V0 - 1) I``
    (ASE sign). Energies, forces and stresses are consistent, so optimizers converge on it.
    """

    def __new__(cls, reference: Any, k_eV_per_A2: float = 5.0, bulk_eV_per_A3: float = 0.1,
                volume_factor: float = 0.97) -> Any:
        import numpy as np

        from matcalc.models.base import Evaluation, Potential

        s0 = reference.get_scaled_positions()
        v0 = volume_factor * reference.get_volume()

        class _Harmonic(Potential):
            family = "harmonic"
            supports_batching = True

            def _evaluate_batch(self, atoms_list):  # noqa: ANN001, ANN202
                sizes = [len(a) for a in atoms_list]
                cells = np.stack([np.array(a.cell) for a in atoms_list])
                pos = np.concatenate([a.positions for a in atoms_list])
                owner = np.repeat(np.arange(len(sizes)), sizes)
                frac = np.einsum("ni,nij->nj", pos, np.linalg.inv(cells)[owner])
                dfrac = frac - np.tile(s0, (len(sizes), 1))
                dfrac -= np.round(dfrac)
                d = np.einsum("ni,nij->nj", dfrac, cells[owner])
                vol = np.abs(np.linalg.det(cells))
                starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
                e_w = 0.5 * k_eV_per_A2 * np.add.reduceat((d * d).sum(axis=1), starts)
                dd = np.add.reduceat(np.einsum("ni,nj->nij", d, d), starts)
                strain = vol / v0 - 1.0
                energy = e_w + 0.5 * bulk_eV_per_A3 * v0 * strain**2
                stress = k_eV_per_A2 * dd / vol[:, None, None] + (bulk_eV_per_A3 * strain)[:, None, None] * np.eye(3)
                voigt = stress[:, [0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
                forces = -k_eV_per_A2 * d
                return [Evaluation(float(energy[i]), forces[starts[i]:starts[i] + n], voigt[i])
                        for i, n in enumerate(sizes)]

        return _Harmonic("harmonic", device="cpu", max_batch_atoms=1_000_000)
