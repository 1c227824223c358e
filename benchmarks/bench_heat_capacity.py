"""Benchmark 3: heat capacity of Zn-MOF-74 (54 atoms, 1x1x1 supercell), batched displacements vs serial phonopy.

peer    : phonopy, displacements 0.01 Å, forces of each displaced cell with CHGNet's ASE calculator one by one,
          force constants, mesh 100, thermal properties 0-1000 K, Cv at 300 K
matcalc : ``matcalc.heat_capacity(..., relax_first=False)`` - all displacements in one engine request
          (also timed: the displacement evaluation alone, engine vs serial calculator)
No pre-relaxation on either side (the same input cell), so only the phonon part is compared.
"""

from __future__ import annotations

import _common as c

args = c.parse(__doc__.splitlines()[0], n_default=1,
               extra=lambda p: p.add_argument("--structure", default="Zn-MOF-74", help="builtin or file"))

import time  # noqa: E402

import numpy as np  # noqa: E402
from ase import Atoms  # noqa: E402

import matcalc  # noqa: E402
from matcalc import batching  # noqa: E402
from matcalc.models import get_model  # noqa: E402
from matcalc.structures import mass_g_per_mol  # noqa: E402


def peer(atoms, calc):
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    unit = PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=np.asarray(atoms.cell),
                        scaled_positions=atoms.get_scaled_positions(), masses=atoms.get_masses())
    ph = Phonopy(unit, supercell_matrix=np.eye(3, dtype=int), primitive_matrix=np.eye(3))
    ph.generate_displacements(distance=0.01)
    forces = []
    t0 = time.perf_counter()
    for sc in ph.supercells_with_displacements:
        a = Atoms(sc.symbols, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True)
        a.calc = calc
        forces.append(a.get_forces())
    t_forces = time.perf_counter() - t0
    ph.forces = np.array(forces)
    ph.produce_force_constants()
    ph.run_mesh(100)
    ph.run_thermal_properties(t_min=0, t_max=1000, t_step=10)
    tp = ph.get_thermal_properties_dict()
    cv300 = float(np.interp(300.0, tp["temperatures"], tp["heat_capacity"]))
    return cv300 / mass_g_per_mol(atoms), len(forces), t_forces


def main() -> None:
    c.header("Benchmark 3: heat capacity, batched displacements vs serial phonopy loop", args)
    pot = get_model(args.model, args.device)
    calc = c.peer_calculator(pot, args.device)
    atoms = matcalc.load_structure(args.structure)
    engine = batching.engine_for(pot)
    print(f"{args.structure}: {len(atoms)} atoms, supercell 1x1x1; engine budget {engine.budget_atoms} atoms")
    peer_t, ours_t, pf_t, of_t = [], [], [], []
    for rep in range(args.repeat):
        if rep % 2 == 0:
            tp, (cv_ref, n_disp, tpf) = c.clock(lambda: peer(atoms, calc))
        engine.reset_stats()
        to, res = c.clock(lambda: matcalc.heat_capacity(atoms, model=pot, relax_first=False))
        s = engine.stats_snapshot()
        if rep % 2 == 1:
            tp, (cv_ref, n_disp, tpf) = c.clock(lambda: peer(atoms, calc))
        peer_t.append(tp), ours_t.append(to), pf_t.append(tpf), of_t.append(s.model_time_s)
        print(f"run {rep + 1}: peer {tp:.1f} s (forces {tpf:.1f} s, {n_disp} displacements) | matcalc "
              f"{to:.1f} s (model {s.model_time_s:.1f} s in {s.calls} calls, mean batch "
              f"{s.mean_batch_size:.1f}) | {tp / to:.2f}x, displacement forces {tpf / s.model_time_s:.2f}x")
    print(f"agreement: Cv(300 K) peer {cv_ref:.5f} J/(K g), matcalc {res.cv_300K_J_per_K_g:.5f} J/(K g), "
          f"diff {abs(cv_ref - res.cv_300K_J_per_K_g) / cv_ref * 100:.3f} % (matcalc removes force drift "
          f"{res.max_drift_eV_per_A:.1e} eV/A; imaginary modes {res.imaginary_modes})")
    print(c.summary_line("heat capacity (whole calculation)", peer_t, ours_t, 1.0))
    print(c.summary_line("heat capacity (displacement forces only)", pf_t, of_t, 1.0))
    batching.shutdown()


if __name__ == "__main__":
    main()
