"""Benchmark 1: single points on rattled copies of the small hcmof cells, batched vs one-by-one ASE.

peer    : for each structure, CHGNet's ASE calculator (energy, forces, stress), one model call each
matcalc : ``map_property("single_point", cells)`` - one thread per structure, fused by the batching engine
engine  : the same structures handed to the engine as one list (what EOS/phonon code paths do)
"""

from __future__ import annotations

import _common as c

args = c.parse(__doc__.splitlines()[0], n_default=64)

import numpy as np  # noqa: E402

from matcalc import batching  # noqa: E402
from matcalc.calculations.many import map_property  # noqa: E402
from matcalc.models import EV_PER_A3_TO_GPA, get_model  # noqa: E402


def peer(cells, calc):
    out = []
    for atoms in cells:
        a = atoms.copy()
        a.calc = calc
        out.append((a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=True)))
    c.sync(args.device)
    return out


def ours(cells, pot):
    res = map_property("single_point", cells, model=pot, progress=False)
    c.sync(args.device)
    for r in res:
        if isinstance(r, Exception):
            raise r
    return [(r.energy_eV, r.forces_eV_per_A, r.stress_GPa / EV_PER_A3_TO_GPA) for r in res]


def main() -> None:
    c.header("Benchmark 1: single points, batched vs one-by-one ASE calculator", args)
    pot = get_model(args.model, args.device)
    calc = c.peer_calculator(pot, args.device)
    cells = c.rattled_cells(args.n, args.names, args.rattle)
    engine = batching.engine_for(pot)
    print(f"{len(cells)} structures, {sum(len(a) for a in cells)} atoms; engine budget {engine.budget_atoms} atoms")
    peer(cells[:2], calc)  # warm-up both sides
    ours(cells[:2], pot)
    peer_t, ours_t, eng_t = [], [], []
    for rep in range(args.repeat):
        if rep % 2 == 0:
            tp, ref = c.clock(lambda: peer(cells, calc))
        engine.reset_stats()
        to, got = c.clock(lambda: ours(cells, pot))
        s = engine.stats_snapshot()
        te, _ = c.clock(lambda: engine.evaluate(cells))
        if rep % 2 == 1:  # alternate the order: the shared machine's load drifts
            tp, ref = c.clock(lambda: peer(cells, calc))
        peer_t.append(tp), ours_t.append(to), eng_t.append(te)
        print(f"run {rep + 1}: peer {tp:.2f} s | matcalc map_property {to:.2f} s ({tp / to:.2f}x) | "
              f"engine.evaluate(list) {te:.2f} s ({tp / te:.2f}x) | model calls {s.calls} for {s.requests} "
              f"requests, mean batch {s.mean_batch_size:.1f} structures / {s.mean_atoms_per_call:.0f} atoms, "
              f"fill {s.mean_fill:.2f}, model time {s.model_time_s:.2f} s")
    if args.device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
        engine.evaluate(cells)
        print(c.peak_memory_note(args.device, engine.stats.max_atoms_per_call))
    de = max(abs(a[0] - b[0]) / len(x) for a, b, x in zip(ref, got, cells, strict=True))
    df = max(np.abs(a[1] - b[1]).max() for a, b in zip(ref, got, strict=True))
    ds = max(np.abs(a[2] - b[2]).max() for a, b in zip(ref, got, strict=True)) * EV_PER_A3_TO_GPA
    ok = de <= 1e-5 and df <= 1e-4
    print(f"agreement: max |dE| {de:.2e} eV/atom, max |dF| {df:.2e} eV/A, max |dstress| {ds:.2e} GPa "
          f"({'within' if ok else 'OUTSIDE'} 1e-5 eV/atom, 1e-4 eV/A)")
    print(c.summary_line("single points (map_property)", peer_t, ours_t, 3.0))
    print(c.summary_line("single points (engine.evaluate list)", peer_t, eng_t, 3.0))
    batching.shutdown()


if __name__ == "__main__":
    main()
