"""Validation of a model before it may run calculations: physics checks on small reference structures.

Checks: finite energies, forces and stresses; forces = -dE/dx and stress = (1/V) dE/dstrain by central
finite differences (ASE's); rotation invariance (energy unchanged, forces rotate with the structure);
a batch of structures gives what each gives alone. `validate_model_file` runs them in a separate
Python process, so a model that crashes, hangs or leaks cannot take the caller down.
Tolerances follow the model's precision (float32 or float64).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.build import bulk

from matcalc.models.base import Potential


@dataclass
class Check:
    """One validation check: the worst deviation found and the tolerance it had to stay under."""

    name: str
    passed: bool
    value: float
    tolerance: float
    unit: str
    message: str = ""


@dataclass
class ValidationReport:
    """The outcome of validating one model (``passed`` only when every check passed)."""

    model: str
    family: str
    passed: bool
    checks: list[Check] = field(default_factory=list)
    structures: list[str] = field(default_factory=list)
    dtype: str = ""
    wall_time_s: float = 0.0
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ValidationReport:
        d = dict(d)
        d["checks"] = [Check(**c) for c in d.get("checks", [])]
        return cls(**d)

    def summary(self) -> str:
        """One line per failed check (or the error), for error messages."""
        if self.error:
            return self.error
        bad = [c for c in self.checks if not c.passed]
        if not bad:
            return f"all {len(self.checks)} checks passed"
        return "; ".join(f"{c.name}: {c.value:.3g} {c.unit} > {c.tolerance:.3g} ({c.message})".rstrip(" ()")
                         for c in bad)


_TOL = {
    # (float64, float32)
    "energy_per_atom": (1e-6, 1e-4),  # eV/atom: rotation and batch consistency
    "forces": (1e-4, 5e-3),  # eV/Å: rotation and batch consistency
    "fd_forces": (1e-3, 2e-2),  # eV/Å + 2 % of the largest force
    "fd_stress": (1e-4, 1e-3),  # eV/Å³ + 2 % of the largest component
}


FD_ATOMS = 6
"""Atoms whose forces are checked by finite differences (6 x 3 x 2 energy evaluations)."""


def _tol(kind: str, dtype: str) -> float:
    return _TOL[kind][0 if dtype == "float64" else 1]


def reference_structures(elements: frozenset[str] | None = None, cutoff_A: float | None = None) -> list[Atoms]:
    """Small rattled periodic cells the model supports: a metal, a covalent and an ionic crystal, a MOF.

    When the model supports none of them, the ground-state crystals of (up to two of) its elements
    (ASE's reference states), repeated so that every cell width is at least twice the model's cutoff.
    """
    from matcalc.structures import load_structure

    candidates = [
        bulk("Cu", "fcc", a=3.6, cubic=True),
        bulk("Si", "diamond", a=5.43, cubic=True),
        bulk("NaCl", "rocksalt", a=5.64, cubic=True),
        load_structure("RSM0009"),
    ]
    out = [a for a in candidates if elements is None or set(a.get_chemical_symbols()) <= set(elements)]
    if not out and elements:
        for symbol in sorted(elements)[:2]:
            try:
                atoms = bulk(symbol, cubic=True)
            except (ValueError, KeyError, RuntimeError):
                try:
                    atoms = bulk(symbol)
                except (ValueError, KeyError, RuntimeError):
                    continue
            out.append(_big_enough(atoms, cutoff_A))
    if len(out) == 1:  # the batch check needs two structures: add a supercell of the one there is
        out.append(out[0].repeat((2, 1, 1)))
    for i, atoms in enumerate(out):
        atoms.rattle(0.03, seed=11 + i)
    return out


def _big_enough(atoms: Atoms, cutoff_A: float | None, max_atoms: int = 256) -> Atoms:
    """``atoms`` repeated until each cell width is >= 2 x cutoff (and it has >= 4 atoms), within ``max_atoms``."""
    widths = 1.0 / np.linalg.norm(np.linalg.inv(atoms.cell.array), axis=0)
    need = 2.0 * (cutoff_A or 0.0)
    reps = [max(1, int(np.ceil(need / w))) for w in widths]
    while len(atoms) * int(np.prod(reps)) < 4:
        reps[int(np.argmin(np.array(reps) * widths))] += 1
    if len(atoms) * int(np.prod(reps)) > max_atoms:
        return atoms.repeat((2, 2, 2)) if len(atoms) * 8 <= max_atoms else atoms
    return atoms.repeat(tuple(reps))


def _rotation() -> np.ndarray:
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    angle = 0.7
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _check(name: str, value: float, tolerance: float, unit: str, message: str = "") -> Check:
    ok = bool(np.isfinite(value) and value <= tolerance)
    return Check(name, ok, float(value), float(tolerance), unit, "" if ok else message)


def validate_potential(potential: Potential, structures: Sequence[Atoms] | None = None) -> ValidationReport:
    """Run every check on ``potential`` (reference structures by default); never raises for a bad model."""
    t0 = time.perf_counter()
    dtype = potential.dtype if potential.dtype in ("float32", "float64") else "float32"
    report = ValidationReport(model=potential.name, family=potential.family, passed=False, dtype=dtype)
    structures = (list(structures) if structures is not None
                  else reference_structures(potential.elements, potential.cutoff_A))
    report.structures = [a.get_chemical_formula() for a in structures]
    if not structures:
        report.error = (f"none of the reference structures (Cu, Si, NaCl, a Zn/C/H/O MOF) is made of elements the "
                        f"model supports ({', '.join(sorted(potential.elements or []))})")
        return report
    try:
        _run_checks(potential, structures, dtype, report.checks)
    except Exception as exc:  # noqa: BLE001 - a broken model is a failed validation, not a crash
        report.error = f"the model raised {type(exc).__name__}: {exc}"
    report.passed = not report.error and all(c.passed for c in report.checks)
    report.wall_time_s = time.perf_counter() - t0
    return report


def _run_checks(potential: Potential, structures: list[Atoms], dtype: str, checks: list[Check]) -> None:
    batch = potential.evaluate(structures)
    finite = all(np.isfinite(e.energy_eV) and np.isfinite(e.forces_eV_per_A).all()
                 and (e.stress_eV_per_A3 is None or np.isfinite(e.stress_eV_per_A3).all()) for e in batch)
    shapes = all(np.shape(e.forces_eV_per_A) == (len(a), 3) for a, e in zip(structures, batch, strict=True))
    checks.append(Check("finite", finite and shapes, 0.0 if finite and shapes else float("inf"), 0.0, "",
                        "" if finite and shapes else "energies, forces or stresses are not finite or mis-shaped"))
    if not (finite and shapes):
        return

    # batch = one by one
    single = [potential.evaluate([a])[0] for a in structures]
    de = max(abs(b.energy_eV - s.energy_eV) / len(a) for a, b, s in zip(structures, batch, single, strict=True))
    df = max(float(np.abs(b.forces_eV_per_A - s.forces_eV_per_A).max())
             for b, s in zip(batch, single, strict=True))
    checks.append(_check("batch_energy", de, _tol("energy_per_atom", dtype), "eV/atom",
                         "a structure's energy depends on the others in its batch"))
    checks.append(_check("batch_forces", df, _tol("forces", dtype), "eV/A",
                         "forces depend on the other structures in the batch"))

    # rotation invariance
    rot = _rotation()
    de_rot, df_rot = 0.0, 0.0
    for atoms, ref in zip(structures, single, strict=True):
        turned = atoms.copy()
        turned.set_cell(atoms.cell.array @ rot.T, scale_atoms=False)
        turned.positions = atoms.positions @ rot.T
        ev = potential.evaluate([turned])[0]
        de_rot = max(de_rot, abs(ev.energy_eV - ref.energy_eV) / len(atoms))
        df_rot = max(df_rot, float(np.abs(ev.forces_eV_per_A - ref.forces_eV_per_A @ rot.T).max()))
    checks.append(_check("rotation_energy", de_rot, _tol("energy_per_atom", dtype), "eV/atom",
                         "the energy changes when the structure is rotated"))
    checks.append(_check("rotation_forces", df_rot, _tol("forces", dtype), "eV/A",
                         "forces do not rotate with the structure"))

    # forces and stress are derivatives of the energy (smallest cell; ASE's central differences on up to
    # FD_ATOMS atoms, spread over the cell)
    from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress

    small = min(structures, key=len).copy()
    small.calc = potential.calculator()
    forces = small.get_forces()
    picked = sorted({int(i) for i in np.linspace(0, len(small) - 1, min(FD_ATOMS, len(small)))})
    d = 1e-3 if dtype == "float64" else 1e-2
    numeric = calculate_numerical_forces(small, eps=d, iatoms=picked)
    tol_f = _tol("fd_forces", dtype) + 0.02 * float(np.abs(forces).max())
    checks.append(_check("forces_are_gradient", float(np.abs(forces[picked] - numeric).max()), tol_f, "eV/A",
                         "forces are not -dE/dx (sign, units or a non-conservative force head?)"))
    if small.pbc.all():
        stress = small.get_stress(voigt=True)
        numeric_s = calculate_numerical_stress(small, eps=1e-5 if dtype == "float64" else 1e-3, voigt=True,
                                               force_consistent=False)
        tol_s = _tol("fd_stress", dtype) + 0.02 * float(np.abs(stress).max())
        checks.append(_check("stress_is_strain_derivative", float(np.abs(stress - numeric_s).max()), tol_s,
                             "eV/A^3", "stress is not (1/V) dE/dstrain (sign or units: GPa instead of eV/A^3?)"))


# --------------------------------------------------------------------------- isolated process
def validate_model_file(path: str | Path, family: str, *, name: str = "custom", options: dict[str, Any] | None = None,
                        device: str = "cpu", timeout_s: float = 900.0) -> ValidationReport:
    """Load ``path`` with the ``family`` loader in a separate Python process and validate it there.

    A crash, a hang past ``timeout_s`` (s) or unreadable output is a failed report, never an exception.
    """
    cmd = [sys.executable, "-m", "matcalc.models.validation", "--path", str(path), "--family", family,
           "--name", name, "--device", device, "--options", json.dumps(options or {})]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS", "1"))
    fail = ValidationReport(model=name, family=family, passed=False)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        fail.error = f"validation timed out after {timeout_s:.0f} s (the worker process was killed)"
        fail.wall_time_s = time.perf_counter() - t0
        return fail
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return ValidationReport.from_dict(json.loads(lines[-1]))
    tail = proc.stderr.strip().splitlines()[-3:]
    how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited with status {proc.returncode}")
    fail.error = f"the validation worker {how}" + (f": {' | '.join(tail)}" if tail else "")
    fail.wall_time_s = time.perf_counter() - t0
    return fail


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matcalc.models.validation")
    parser.add_argument("--path", required=True)
    parser.add_argument("--family", required=True)
    parser.add_argument("--name", default="custom")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--options", default="{}")
    args = parser.parse_args(argv)
    from matcalc.models.registry import get_family

    report = ValidationReport(model=args.name, family=args.family, passed=False)
    try:
        family = get_family(args.family)
        potential = family.loader(Path(args.path), name=args.name, device=args.device, **json.loads(args.options))
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        report.error = f"the model failed to load: {type(exc).__name__}: {exc}"
    else:
        report = validate_potential(potential)
    print(json.dumps(report.to_dict()), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - run by validate_model_file
    raise SystemExit(_main())
