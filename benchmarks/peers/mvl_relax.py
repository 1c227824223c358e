"""Peer side of bench_vs_mvl.py: matcalc MVL 0.7 ``RelaxCalc.calc_many`` with CHGNet's ASE calculator.

Run with the peer environment's python (its ``matcalc`` is MVL's, same import name as ours), from a directory
that does not shadow it:  /work/peer-venv/bin/python mvl_relax.py cells.extxyz --n-jobs 2 --fmax 0.05 ...
Prints one JSON line: wall time of ``calc_many`` and per structure energy (eV), volume (Å³), max force.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

warnings.filterwarnings("ignore")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("structures")
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--optimizer", default="LBFGS")
    a = p.parse_args()
    import matcalc
    from ase.io import read
    from chgnet.model.dynamics import CHGNetCalculator

    assert not matcalc.__file__.startswith("/work/main"), "this must run MVL's matcalc, not ours"
    cells = read(a.structures, ":")
    calc = CHGNetCalculator(use_device="cpu")
    rc = matcalc.RelaxCalc(calc, optimizer=a.optimizer, fmax=a.fmax, max_steps=a.max_steps, relax_cell=True)
    t0 = time.perf_counter()
    res = list(rc.calc_many(cells, n_jobs=a.n_jobs))
    wall = time.perf_counter() - t0
    print(json.dumps({
        "matcalc": matcalc.__version__, "wall_s": wall,
        "energy_eV": [float(r["energy"]) for r in res],
        "volume_A3": [float(r["volume"]) for r in res],
        "max_force": [float(r["max_force"]) for r in res],
    }))


if __name__ == "__main__":
    main()
