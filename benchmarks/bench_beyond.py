"""Benchmark 8: elastic_tensor, phonons, thermal_expansion vs matcalc MVL 0.7 ElasticityCalc, PhononCalc, QHACalc.

peer    : MVL matcalc 0.7 in its own environment (same import name as ours, so in a subprocess: ``--peer-python``,
          default /work/peer-venv/bin/python; benchmarks/peers/mvl_beyond.py) with CHGNet's ASE calculator: one
          structure per model call, ASE's FIRE per strained cell / volume, one after the other
matcalc : the same protocol in this process: all strained cells / volumes relaxed in one batch
          (optimize_many), all displacements (of all volumes) in one batched request

Same cell for both sides: the first builtin MOF of --structures (default RSM0009, 22 atoms, P1) relaxed once here (LBFGS +
FrechetCellFilter, --fmax), then no pre-relaxation on either side. Matched protocols:
  elastic : normal and (engineering) shear strains +-0.005, +-0.01 (MVL: DeformedStructureSet with F = I + e_ij,
            whose engineering shear strain is the same number; ours F = I + eps symmetric), positions relaxed in
            every strained cell with FIRE to --fmax (<= 500 steps), straight-line fits with the unstrained stress
  phonons : 1x1x1 supercell, 0.01 A displacements, mesh 100, T 0-1000 K step 10 (ours also bands along the
            standard path; the total DOS with --dos tetrahedron|smearing: MVL's PhononCalc computes none)
  qha     : 5 volumes 0.97-1.03 V0 (MVL: lattice scale factors f^(1/3)), positions relaxed at fixed cell (FIRE,
            --fmax), phonons as above, vinet EOS, T 0-1000 K step 10
Agreement: C (max |dC| GPa), K and G (VRH); Cv(T) and band frequencies on Gamma->a*/2, b*/2, c*/2 (from
MVL's phonopy object and ours' to_phonopy()); V(300 K) and beta(300 K).
Usage: python benchmarks/bench_beyond.py [--what elastic,phonons,qha] [--structures RSM0009] [--fmax 0.01]
       [--torch-threads 1]  (on a loaded machine: 2 OpenMP threads per process spin-wait; both sides get the same)
"""

from __future__ import annotations

import _common as c

args = c.parse(__doc__.splitlines()[0], n_default=1, extra=lambda p: (
    p.add_argument("--peer-python", default="/work/peer-venv/bin/python"),
    p.add_argument("--what", default="elastic,phonons,qha"),
    p.add_argument("--fmax", type=float, default=0.01),
    p.add_argument("--strains", default="0.005,0.01", help="elastic: positive strains (both signs applied)"),
    p.add_argument("--mesh", type=float, default=100.0),
    p.add_argument("--dos", default="none", choices=("tetrahedron", "smearing", "none"),
                   help="phonons: matcalc's total DOS (default none: the same work as MVL's PhononCalc, which "
                        "computes no DOS; tetrahedron is matcalc's default)"),
    p.add_argument("--clamped", action="store_true", help="elastic: clamped ions (no relaxation of strained cells)")))

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from ase.io import write  # noqa: E402

import matcalc as mc  # noqa: E402
from matcalc.models import get_model  # noqa: E402

PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "mvl_beyond.py"
STRAINS = tuple(sorted(float(x) for x in args.strains.split(",")))
VOLUMES = np.linspace(0.97, 1.03, 5)
PATHS = [[[0, 0, 0], [0.5, 0, 0]], [[0, 0, 0], [0, 0.5, 0]], [[0, 0, 0], [0, 0, 0.5]]]


def peer(path: str, what: str) -> dict:
    cmd = [args.peer_python, str(PEER_SCRIPT), path, what, "--strains", ",".join(map(str, STRAINS)),
           "--fmax", str(args.fmax), "--max-steps", "500", "--t-max", "1000", "--t-step", "10",
           "--scale-factors", ",".join(f"{f ** (1 / 3):.12f}" for f in VOLUMES)] + (["--clamped"] if args.clamped else [])
    env = dict(os.environ)
    if args.torch_threads > 0:  # the same torch (OpenMP) thread count on both sides
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=7200, check=False,
                         env=env)
    if out.returncode != 0:
        raise SystemExit(f"peer failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ours(cell, pot, what: str):
    common = {"relax_first": False, "cache": False}
    if what == "elastic":
        return c.clock(lambda: mc.elastic_tensor(cell, pot, strain_max=STRAINS[-1], n_strains=2 * len(STRAINS),
                                                 fmax=args.fmax, fixed_cell_max_steps=500,
                                                 fixed_cell_optimizer="FIRE", relax_strained=not args.clamped,
                                                 **common))
    if what == "phonons":
        return c.clock(lambda: mc.phonons(cell, pot, supercell=(1, 1, 1), displacement=0.01, mesh=args.mesh,
                                          t_max=1000.0, t_step=10.0, dos=args.dos, **common))
    return c.clock(lambda: mc.thermal_expansion(cell, pot, n_volumes=len(VOLUMES), volume_range=(0.97, 1.03),
                                                supercell=(1, 1, 1), displacement=0.01, mesh=args.mesh, t_max=1000.0,
                                                t_step=10.0, fmax=args.fmax, fixed_cell_max_steps=500,
                                                fixed_cell_optimizer="FIRE", eos="vinet", **common))


def agreement(what: str, r, p: dict) -> str:
    if what == "elastic":
        dc = np.abs(r.C_GPa - np.asarray(p["C_GPa"])).max()
        return (f"max |dC| {dc:.3f} GPa of max |C| {np.abs(r.C_GPa).max():.2f} GPa | K_VRH {r.bulk_modulus_vrh_GPa:.3f} "
                f"vs {p['K_vrh_GPa']:.3f} GPa ({100 * (r.bulk_modulus_vrh_GPa / p['K_vrh_GPa'] - 1):+.2f}%) | G_VRH "
                f"{r.shear_modulus_vrh_GPa:.3f} vs {p['G_vrh_GPa']:.3f} GPa "
                f"({100 * (r.shear_modulus_vrh_GPa / p['G_vrh_GPa'] - 1):+.2f}%)")
    if what == "phonons":
        t, cv = np.asarray(p["temperatures_K"]), np.asarray(p["cv_J_per_K_mol"])
        keep = t >= 50
        dcv = np.abs(r.cv_J_per_K_mol[keep] / cv[keep] - 1).max()
        ph = r.to_phonopy()
        ph.run_band_structure(PATHS)
        df = np.abs(np.concatenate(ph.band_structure.frequencies) - np.asarray(p["band_frequencies_THz"])).max()
        return (f"Cv(T>=50 K) max rel diff {100 * dcv:.3f}% | Cv(300 K) {r.cv_300K_J_per_K_mol:.3f} vs "
                f"{np.interp(300, t, cv):.3f} J/(K mol) | band frequencies max |df| {df:.4f} THz | displacements "
                f"{r.n_displacements} vs {p['n_displacements']}")
    v = np.interp(300, p["temperatures_K"], p["volume_A3"])
    b = np.interp(300, p["temperatures_K"], p["expansion_per_K"])
    return (f"V(300 K) {r.volume_300K_A3:.4f} vs {v:.4f} A^3 ({100 * (r.volume_300K_A3 / v - 1):+.4f}%) | "
            f"beta(300 K) {r.volumetric_expansion_300K_per_K:.4e} vs {b:.4e} 1/K "
            f"({100 * (r.volumetric_expansion_300K_per_K / b - 1):+.2f}%) | volumes {np.round(r.volumes_A3, 3)} vs "
            f"{np.round(p['volumes_A3'], 3)}")


def main() -> None:
    c.header("Benchmark 8: elastic_tensor / phonons / thermal_expansion vs MVL matcalc 0.7", args)
    pot = get_model(args.model, args.device)
    name = args.names[0]
    relaxed = mc.relax(name, pot, fmax=args.fmax, optimizer="LBFGS", cache=False).final_structure
    print(f"cell: {name} ({len(relaxed)} atoms), relaxed here to fmax {args.fmax} eV/A; fixed-cell fmax {args.fmax}")
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "cell.extxyz")
        write(path, relaxed, format="extxyz")
        for what in [w.strip() for w in args.what.split(",") if w.strip()]:
            peer_s, ours_s = [], []
            result = p = None
            for rep in range(args.repeat):
                order = ("peer", "ours") if rep % 2 == 0 else ("ours", "peer")
                for side in order:
                    if side == "peer":
                        p = peer(path, what)
                        peer_s.append(p["wall_s"])
                    else:
                        t, result = ours(relaxed, pot, what)
                        ours_s.append(t)
                print(f"{what} run {rep + 1}: peer {peer_s[-1]:.1f} s, matcalc {ours_s[-1]:.1f} s", flush=True)
            print(f"AGREEMENT {what}: {agreement(what, result, p)}")
            if result.warnings:
                print(f"  matcalc warnings: {'; '.join(w[:160] for w in result.warnings)}")
            print(c.summary_line(what, peer_s, ours_s, 1.5), flush=True)


if __name__ == "__main__":
    main()
