"""Benchmark 6: Widom insertions of CO2 into a MOF, matcalc's batched henry_coefficient vs a plain ASE loop.

Both sides evaluate the same insertions (henry_coefficient's seeded random stream; overlapping insertions are
skipped on both sides) on the same loaded CHGNet model:

peer     : CHGNet's ASE calculator (``CHGNetCalculator``), one ``get_potential_energy()`` per complex and for the
           two references (what a plain ASE Widom loop does), E_int = E(complex) - E(framework) - E(guest in box)
peer-e   : the same loop with CHGNet's own energy-only call (``predict_structure(task="e")``), for reference
matcalc  : ``henry_coefficient(framework, "CO2", n_insertions=N)``: the whole property (references, overlap
           screen, energy-only batched requests through the engine, statistics, trace)
"""

from __future__ import annotations

import _common as c


def _extra(p) -> None:
    p.add_argument("--guest", default="CO2", help="builtin guest (default CO2)")
    p.add_argument("--per-request", type=int, default=256, help="insertions per engine request (default 256)")
    p.add_argument("--no-peer-e", action="store_true", help="skip the energy-only peer loop")


args = c.parse(__doc__.splitlines()[0], n_default=2000, extra=_extra)
if args.structures == ",".join(c.HCMOF):
    args.names = ["CALF-20"]

import os

import numpy as np

import matcalc as mc
from matcalc import batching
from matcalc.calculations.henry import (
    Insertions,
    OverlapCheck,
    boxed_guest,
    complex_template,
    complexes,
)
from matcalc.calculations.interaction import guest_box_A, guest_molecule
from matcalc.models import get_model


def peer(cells, calc):
    out = []
    for atoms in cells:
        a = atoms.copy()
        a.calc = calc
        out.append(float(a.get_potential_energy()))
    c.sync(args.device)
    return np.array(out)


def peer_energy_only(cells, model):
    from pymatgen.io.ase import AseAtomsAdaptor

    out = []
    for atoms in cells:
        pred = model.predict_structure(AseAtomsAdaptor.get_structure(atoms), task="e")
        out.append(float(np.asarray(pred["e"]).item()) * len(atoms))
    c.sync(args.device)
    return np.array(out)


def main() -> None:
    c.header("Benchmark 6: Widom insertions (henry_coefficient), batched vs a plain ASE loop of single points", args)
    pot = get_model(args.model, args.device)
    calc = c.peer_calculator(pot, args.device)
    fw = mc.load_structure(args.names[0])
    guest = guest_molecule(args.guest)
    n = args.n
    draws = Insertions.draw(fw, guest, n, 0)
    free = np.flatnonzero(~OverlapCheck(fw, 1.5)(draws.positions))
    cells = complexes(complex_template(fw, guest), len(fw), draws.positions[free])
    box = boxed_guest(guest, guest_box_A({}, guest, pot.cutoff_A))
    print(f"{args.names[0]} ({len(fw)} atoms) + {args.guest}: {n} insertions, {len(free)} evaluated "
          f"({n - len(free)} overlaps); engine budget {batching.engine_for(pot).budget_atoms} atoms, "
          f"{len(cells[0])} atoms per complex")

    def ours():
        r = mc.henry_coefficient(fw, args.guest, model=pot, n_insertions=n, seed=0, insertions_per_request=args.per_request,
                                 cache=False)
        c.sync(args.device)
        return r

    work = [fw, box, *cells]  # a plain Widom loop evaluates the two references too
    peer([box], calc)  # warm-up both sides (a structure none of the timed ones equals: no cached result)
    mc.henry_coefficient(fw, args.guest, model=pot, n_insertions=4, seed=1, cache=False)
    peer_t, ours_t, peer_e_t = [], [], []
    for rep in range(args.repeat):
        load0 = os.getloadavg()[0]
        if rep % 2 == 0:
            tp, e_peer = c.clock(lambda: peer(work, calc))
        to, res = c.clock(ours)
        if rep % 2 == 1:  # alternate the order: the shared machine's load drifts
            tp, e_peer = c.clock(lambda: peer(work, calc))
        te = float("nan")
        if not args.no_peer_e:
            te, _ = c.clock(lambda: peer_energy_only(work, pot.model))
            peer_e_t.append(te)
        peer_t.append(tp), ours_t.append(to)
        print(f"run {rep + 1}: peer {tp:.2f} s | matcalc henry_coefficient {to:.2f} s ({tp / to:.2f}x) | "
              f"peer energy-only loop {te:.2f} s ({te / to:.2f}x) | load1 {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    e_int_peer = e_peer[2:] - e_peer[0] - e_peer[1]
    ours_e = res.insertion_energies_eV[free]
    de = float(np.max(np.abs(ours_e - e_int_peer)))
    ok = de <= 1e-3 and res.n_overlaps == n - len(free)
    print(f"agreement: max |dE_int| {de:.2e} eV over {len(free)} insertions ({'within' if ok else 'OUTSIDE'} 1e-3 eV); "
          f"overlaps {res.n_overlaps} both; K_H {res.henry_mol_per_kg_Pa:.4g} ± {res.henry_error_mol_per_kg_Pa:.2g} "
          f"mol/(kg Pa), Q_st {res.heat_of_adsorption_kJ_per_mol:.2f} kJ/mol")
    print(c.summary_line(f"Widom {args.guest} in {args.names[0]} (henry_coefficient)", peer_t, ours_t, 3.0))
    if peer_e_t:
        print(c.summary_line("same, vs CHGNet's own energy-only loop", peer_e_t, ours_t, 1.0))
    batching.shutdown()


if __name__ == "__main__":
    main()
