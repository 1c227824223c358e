"""Peer side of bench_beyond.py: matcalc MVL 0.7 ``ElasticityCalc``, ``PhononCalc`` and ``QHACalc`` with CHGNet's
ASE calculator, on the cell given (already relaxed by the caller: no pre-relaxation on either side).

Run with the peer environment's python (its ``matcalc`` is MVL's, same import name as ours), from a directory that
does not shadow it:  /work/peer-venv/bin/python mvl_beyond.py cell.extxyz elastic --strains 0.005,0.01 ...
Prints one JSON line: the wall time of ``calc`` and the numbers bench_beyond.py compares.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

warnings.filterwarnings("ignore")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("structure")
    p.add_argument("what", choices=["elastic", "phonons", "qha"])
    p.add_argument("--strains", default="0.005,0.01", help="positive strains; both signs are applied")
    p.add_argument("--fmax", type=float, default=0.01)
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--displacement", type=float, default=0.01)
    p.add_argument("--scale-factors", default="", help="QHA: linear lattice scale factors")
    p.add_argument("--t-max", type=float, default=1000.0)
    p.add_argument("--t-step", type=float, default=10.0)
    p.add_argument("--clamped", action="store_true", help="elastic: no relaxation of the strained cells")
    a = p.parse_args()

    import numpy as np
    from ase.io import read
    from chgnet.model.dynamics import CHGNetCalculator

    import matcalc

    assert not matcalc.__file__.startswith("/work/main"), "this must run MVL's matcalc, not ours"
    atoms = read(a.structure)
    calc = CHGNetCalculator(use_device="cpu")
    out: dict = {"matcalc": matcalc.__version__}
    if a.what == "elastic":
        s = sorted({float(x) * sign for x in a.strains.split(",") for sign in (-1, 1)})
        ec = matcalc.ElasticityCalc(calc, norm_strains=s, shear_strains=s, fmax=a.fmax, relax_structure=False,
                                    relax_deformed_structures=not a.clamped, use_equilibrium=True, units_GPa=True,
                                    relax_calc_kwargs={"max_steps": a.max_steps, "optimizer": "FIRE"})
        t0 = time.perf_counter()
        r = ec.calc(atoms)
        out["wall_s"] = time.perf_counter() - t0
        out["C_GPa"] = np.asarray(r["elastic_tensor"].voigt).tolist()
        out["K_vrh_GPa"] = float(r["bulk_modulus_vrh"])
        out["G_vrh_GPa"] = float(r["shear_modulus_vrh"])
    elif a.what == "phonons":
        pc = matcalc.PhononCalc(calc, atom_disp=a.displacement, supercell_matrix=np.eye(3, dtype=int),
                                relax_structure=False, t_step=a.t_step, t_max=a.t_max, write_phonon=False)
        t0 = time.perf_counter()
        r = pc.calc(atoms)
        out["wall_s"] = time.perf_counter() - t0
        tp = r["thermal_properties"]
        out["temperatures_K"] = np.asarray(tp["temperatures"]).tolist()
        out["cv_J_per_K_mol"] = np.asarray(tp["heat_capacity"]).tolist()
        out["free_energy_kJ_per_mol"] = np.asarray(tp["free_energy"]).tolist()
        out["n_displacements"] = len(r["disp_supercells"])
        ph = r["phonon"]
        ph.run_band_structure([[[0, 0, 0], [0.5, 0, 0]], [[0, 0, 0], [0, 0.5, 0]], [[0, 0, 0], [0, 0, 0.5]]])
        out["band_frequencies_THz"] = np.concatenate(ph.band_structure.frequencies).tolist()
    else:
        factors = [float(x) for x in a.scale_factors.split(",")]
        qc = matcalc.QHACalc(calc, t_step=a.t_step, t_max=a.t_max, fmax=a.fmax, max_steps=a.max_steps,
                             optimizer="FIRE", eos="vinet", allow_shape_change=False, relax_structure=False,
                             scale_factors=factors, store_ha_phonon=False,
                             phonon_calc_kwargs={"atom_disp": a.displacement,
                                                 "supercell_matrix": np.eye(3, dtype=int)})
        t0 = time.perf_counter()
        r = qc.calc(atoms)
        out["wall_s"] = time.perf_counter() - t0
        out["temperatures_K"] = np.asarray(r["temperatures"]).tolist()
        out["volume_A3"] = np.asarray(r["qha"].volume_temperature).tolist()
        out["expansion_per_K"] = np.asarray(r["thermal_expansion_coefficients"]).tolist()
        out["volumes_A3"] = [float(v) for v in r["volumes"]]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
