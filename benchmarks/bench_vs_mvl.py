"""Benchmark 6: relax_many (in-process) vs matcalc MVL 0.7 ``RelaxCalc.calc_many(n_jobs=2)``, same cores.

peer    : MVL matcalc 0.7 in its own environment (same import name as ours, so in a subprocess:
          ``--peer-python``, default /work/peer-venv/bin/python): ``RelaxCalc(CHGNetCalculator(), "LBFGS",
          fmax, max_steps).calc_many(cells, n_jobs=2)`` - joblib processes, ASE's LBFGS + FrechetCellFilter
matcalc : ``relax_many(cells, optimizer="LBFGS", fmax=..., max_steps=..., relax_cell=True)`` in this process
          (batched stepping + the batching engine's CPU lanes)

Same rattled cells (default 16 hcmof cells), same CHGNet 0.3.0 weights, sides alternating which runs first.
Set up the peer environment once:  python3 -m venv /work/peer-venv && /work/peer-venv/bin/pip install
torch==2.13.0 && /work/peer-venv/bin/pip install "matcalc==0.7.*" chgnet
"""

from __future__ import annotations

import _common as c

args = c.parse(__doc__.splitlines()[0], n_default=16, extra=lambda p: (
    p.add_argument("--peer-python", default="/work/peer-venv/bin/python"),
    p.add_argument("--n-jobs", type=int, default=2),
    p.add_argument("--fmax", type=float, default=0.05),
    p.add_argument("--max-steps", type=int, default=150)))

import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from ase.io import write  # noqa: E402

from matcalc import batching  # noqa: E402
from matcalc.calculations.many import relax_many  # noqa: E402
from matcalc.models import get_model  # noqa: E402

PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "mvl_relax.py"


def peer(path: str) -> dict:
    cmd = [args.peer_python, str(PEER_SCRIPT), path, "--n-jobs", str(args.n_jobs), "--fmax", str(args.fmax),
           "--max-steps", str(args.max_steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=3600,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"peer failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ours(cells, pot) -> tuple[float, list]:
    t, res = c.clock(lambda: relax_many(cells, model=pot, optimizer="LBFGS", fmax=args.fmax,
                                        max_steps=args.max_steps, relax_cell=True, progress=False))
    for r in res:
        if isinstance(r, Exception):
            raise r
    return t, res


def main() -> None:
    c.header("Benchmark 6: relax_many vs MVL matcalc 0.7 calc_many(n_jobs=2)", args)
    pot = get_model(args.model, args.device)
    cells = c.rattled_cells(args.n, args.names, args.rattle)
    print(f"{len(cells)} cells, {sum(len(a) for a in cells)} atoms; LBFGS + FrechetCellFilter, fmax {args.fmax}, "
          f"<= {args.max_steps} steps; peer {args.peer_python} n_jobs={args.n_jobs}")
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "cells.extxyz")
        write(path, cells)
        ours(cells[:2], pot)  # warm-up (model, threads)
        peer_t, ours_t = [], []
        for rep in range(args.repeat):
            if rep % 2 == 0:
                ref = peer(path)
            t, got = ours(cells, pot)
            if rep % 2 == 1:
                ref = peer(path)
            peer_t.append(ref["wall_s"])
            ours_t.append(t)
            print(f"run {rep + 1}: MVL {ref['matcalc']} calc_many {ref['wall_s']:.1f} s | relax_many {t:.1f} s "
                  f"({sum(r.steps for r in got)} steps, {sum(r.converged for r in got)}/{len(got)} converged) | "
                  f"{ref['wall_s'] / t:.2f}x")
    n = np.array([len(a) for a in cells])
    de = np.abs(np.array(ref["energy_eV"]) - [r.final_energy_eV for r in got]) / n
    dv = np.abs(np.array(ref["volume_A3"]) / [r.final_volume_A3 for r in got] - 1) * 100
    print(f"agreement: final energy max |dE| {de.max():.2e} eV/atom (median {np.median(de):.1e}), volume max "
          f"{dv.max():.3f} %; peer max force <= fmax: {sum(f <= args.fmax for f in ref['max_force'])}/{len(cells)}")
    print(c.summary_line("relax_many vs MVL calc_many(n_jobs=2)", peer_t, ours_t, 1.5))
    batching.shutdown()


if __name__ == "__main__":
    main()
