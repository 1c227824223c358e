"""Benchmark 2: relaxation of rattled small MOFs with the "fast" preset, relax_many vs a serial ASE loop.

peer    : for each structure, LBFGS + FrechetCellFilter with CHGNet's ASE calculator, fmax 0.05 eV/Å,
          at most 500 steps (the "fast" preset), one structure after the other
matcalc : ``relax_many(cells, protocol="fast")`` - concurrent relaxations fused by the batching engine
"""

from __future__ import annotations

import _common as c

args = c.parse(__doc__.splitlines()[0], n_default=16)

import numpy as np  # noqa: E402
from ase.filters import FrechetCellFilter  # noqa: E402
from ase.optimize import LBFGS  # noqa: E402

from matcalc import batching  # noqa: E402
from matcalc.calculations import protocols  # noqa: E402
from matcalc.calculations.many import relax_many  # noqa: E402
from matcalc.models import get_model  # noqa: E402

FAST = protocols.PROTOCOLS["fast"]["relax"]


def peer(cells, calc):
    """The serial ASE loop (calc may be wrapped by _common.Timed to time the model)."""
    out = []
    for atoms in cells:
        a = atoms.copy()
        a.calc = calc
        opt = LBFGS(FrechetCellFilter(a), logfile=None)
        converged = opt.run(fmax=FAST["fmax"], steps=FAST["max_steps"])
        out.append((a.get_potential_energy(), a.get_volume(), opt.nsteps, converged))
    return out


def ours(cells, pot):
    res = relax_many(cells, model=pot, protocol="fast", progress=False)
    for r in res:
        if isinstance(r, Exception):
            raise r
    return [(r.final_energy_eV, r.final_volume_A3, r.steps, r.converged) for r in res]


def main() -> None:
    c.header("Benchmark 2: relaxation ('fast' preset), relax_many vs serial ASE loop", args)
    assert FAST["optimizer"] == "LBFGS" and FAST["relax_cell"]
    pot = get_model(args.model, args.device)
    timed = c.Timed(c.peer_calculator(pot, args.device))
    calc = timed.calc
    cells = c.rattled_cells(args.n, args.names, args.rattle)
    engine = batching.engine_for(pot)
    print(f"{len(cells)} structures, {sum(len(a) for a in cells)} atoms; LBFGS + FrechetCellFilter, "
          f"fmax {FAST['fmax']} eV/A, <= {FAST['max_steps']} steps; engine budget {engine.budget_atoms} atoms")
    peer(cells[:1], calc)  # warm-up
    peer_t, ours_t = [], []
    for rep in range(args.repeat):
        timed.model_time_s = 0.0
        if rep % 2 == 0:
            tp, ref = c.clock(lambda: peer(cells, calc))
            peer_model = timed.model_time_s
        engine.reset_stats()
        to, got = c.clock(lambda: ours(cells, pot))
        s = engine.stats_snapshot()
        if rep % 2 == 1:
            tp, ref = c.clock(lambda: peer(cells, calc))
            peer_model = timed.model_time_s
        peer_t.append(tp), ours_t.append(to)
        peer_steps = sum(r[2] + 1 for r in ref)
        our_steps = sum(r[2] + 1 for r in got)
        print(f"run {rep + 1}: host ms per structure-step (wall - model time): peer "
              f"{1000 * (tp - peer_model) / peer_steps:.2f} ms | relax_many "
              f"{1000 * max(0.0, to - s.model_time_s / max(1, engine.lanes)) / our_steps:.2f} ms "
              f"(model time summed over {engine.lanes} lane(s)); model ms per structure-step: peer "
              f"{1000 * peer_model / peer_steps:.1f} | relax_many {1000 * s.model_time_s / our_steps:.1f}")
        print(f"run {rep + 1}: peer {tp:.1f} s ({sum(r[2] for r in ref)} steps) | relax_many {to:.1f} s "
              f"({sum(r[2] for r in got)} steps) | {tp / to:.2f}x | model calls {s.calls} for {s.requests} "
              f"requests, mean batch {s.mean_batch_size:.1f} structures / {s.mean_atoms_per_call:.0f} atoms, "
              f"wait {s.wait_s:.1f} s summed, model time {s.model_time_s:.1f} s, dropped callers "
              f"{s.dropped_callers}")
    de = np.array([abs(a[0] - b[0]) / len(x) for a, b, x in zip(ref, got, cells, strict=True)])
    dv = np.array([abs(a[1] - b[1]) / a[1] * 100 for a, b in zip(ref, got, strict=True)])
    print(f"agreement: final energy max |dE| {de.max():.2e} eV/atom (median {np.median(de):.1e}), final volume "
          f"max {dv.max():.3f} % ; converged peer {sum(r[3] for r in ref)}/{len(ref)}, matcalc "
          f"{sum(r[3] for r in got)}/{len(got)} (trajectories may part at float32 noise; both stop at fmax 0.05)")
    print(c.summary_line("relaxation (relax_many)", peer_t, ours_t, 1.5))
    batching.shutdown()


if __name__ == "__main__":
    main()
