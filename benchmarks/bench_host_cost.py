"""Benchmark 5: host cost of optimisation with an instant model (harmonic wells): ms per structure-step.

The model costs next to nothing, so the wall time is orchestration: the optimizer and cell-filter step,
structure handling and the hand-off to the model. FIRE + FrechetCellFilter on rattled MOF-5 cells (106 atoms),
a fixed number of steps (fmax so small that nothing converges), three paths side by side in one process:

plain ASE           : FIRE(FrechetCellFilter(atoms)) with the harmonic model as an ASE calculator, one structure
                      after the other (what a peer's loop costs per step)
relax_many (ASE)    : ``relax_many`` with ``MATCALC_BATCHED=0`` - ASE's loops in threads over the batching engine
                      (matcalc before batched stepping)
relax_many (batched): ``relax_many`` with batched stepping (one vectorised FIRE/Frechet step and one model
                      request per step for all structures)

Printed: host ms per structure-step = (wall - time inside the model) / structure-steps, and the ratios.
Target: batched <= 2 ms per structure-step, about 10x under plain ASE.
"""

from __future__ import annotations

import _common as c

args = c.parse(__doc__.splitlines()[0], n_default=16, extra=lambda p: p.add_argument(
    "--steps", type=int, default=40, help="optimizer steps per structure (default 40)"))

import numpy as np
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE

import matcalc
from matcalc import batched, batching
from matcalc.calculations.many import relax_many


def main() -> None:
    c.header("Benchmark 5: host cost per structure-step, instant model (harmonic wells)", args)
    names = args.names if args.structures != ",".join(c.HCMOF) else ["MOF-5"]
    reference = matcalc.load_structure(names[0])
    pot = c.HarmonicWells(reference)
    cells = c.rattled_cells(args.n, names[:1], args.rattle)
    n_atoms = len(reference)
    steps = args.steps
    kw = {"model": pot, "optimizer": "FIRE", "fmax": 1e-9, "max_steps": steps, "relax_cell": True, "progress": False}
    print(f"{len(cells)} x {names[0]} ({n_atoms} atoms), FIRE + FrechetCellFilter, {steps} steps each")

    def plain():
        for atoms in cells:
            a = atoms.copy()
            a.calc = pot.calculator()
            FIRE(FrechetCellFilter(a), logfile=None).run(fmax=1e-9, steps=steps)

    def many():
        res = relax_many(cells, **kw)
        for r in res:
            if isinstance(r, Exception):
                raise r
        return res

    def many_ase():
        with batched.disabled():
            return many()

    # warm-up (imports, first calls) and agreement check
    ref = many_ase()
    got = many()
    de = max(abs(a.final_energy_eV - b.final_energy_eV) / n_atoms for a, b in zip(ref, got, strict=True))
    dv = max(abs(a.final_volume_A3 - b.final_volume_A3) / a.final_volume_A3 for a, b in zip(ref, got, strict=True))
    same_steps = all(a.steps == b.steps for a, b in zip(ref, got, strict=True))
    print(f"agreement batched vs ASE loops: max |dE| {de:.1e} eV/atom, max |dV|/V {dv:.1e}, same steps: {same_steps}")
    paths = {"plain ASE": plain, "relax_many (ASE loops)": many_ase, "relax_many (batched)": many}
    host: dict[str, list[float]] = {k: [] for k in paths}
    for rep in range(args.repeat):
        order = list(paths) if rep % 2 == 0 else list(paths)[::-1]
        for name in order:
            pot.reset_stats()
            wall, _ = c.clock(paths[name])
            model = pot.stats.model_time_s
            structure_steps = len(cells) * (steps + 1)
            ms = 1000.0 * (wall - model) / structure_steps
            host[name].append(ms)
            print(f"run {rep + 1} {name:<24} wall {wall:7.2f} s | model {model:6.2f} s | host {ms:6.2f} ms "
                  f"per structure-step | {pot.stats.calls} model calls")
    med = {k: float(np.median(v)) for k, v in host.items()}
    base = med["plain ASE"]
    for name, v in med.items():
        print(f"RESULT host ms per structure-step, {name}: {v:.2f} ms ({base / v:.1f}x under plain ASE)")
    verdict = "meets" if med["relax_many (batched)"] <= 2.0 else "ABOVE"
    print(f"RESULT target <= 2 ms per structure-step (batched): {verdict}; "
          f"batched vs matcalc before: {med['relax_many (ASE loops)'] / med['relax_many (batched)']:.1f}x")
    batching.shutdown()


if __name__ == "__main__":
    main()
