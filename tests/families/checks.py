"""Independent checks shared by the family tests: the family's own ASE calculator and ASE's finite differences."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.calculators.fd import calculate_numerical_forces

from matcalc.models import Potential


def assert_matches_calculator(potential: Potential, calc: Calculator, structures: Sequence[Atoms], *,
                              e_tol_eV_per_atom: float = 1e-5, f_tol_eV_per_A: float = 1e-4,
                              s_tol_eV_per_A3: float = 1e-5, one_call: bool = True) -> None:
    """``potential.evaluate(structures)`` equals ``calc`` run on each structure one by one.

    With ``one_call`` the structures must fit one model call (the fused path is the one under test).
    """
    potential.reset_stats()
    evals = potential.evaluate(list(structures))
    if one_call:
        assert potential.stats.calls == 1, f"expected one fused call, got {potential.stats.calls}"
    for atoms, ev in zip(structures, evals, strict=True):
        a = atoms.copy()
        a.calc = calc
        e_ref = a.get_potential_energy()
        f_ref = a.get_forces()
        assert abs(ev.energy_eV - e_ref) / len(a) < e_tol_eV_per_atom, (ev.energy_eV, e_ref)
        assert np.abs(ev.forces_eV_per_A - f_ref).max() < f_tol_eV_per_A
        if a.pbc.all() and ev.stress_eV_per_A3 is not None:
            assert np.abs(ev.stress_eV_per_A3 - a.get_stress(voigt=True)).max() < s_tol_eV_per_A3


def assert_forces_are_gradient(potential: Potential, atoms: Atoms, *, d: float = 1e-3,
                               tol_eV_per_A: float = 2e-3) -> None:
    """Forces = -dE/dx by ASE's central finite differences (and they are not all zero)."""
    calc = potential.calculator()
    a = atoms.copy()
    a.calc = calc
    forces = a.get_forces()
    numeric = calculate_numerical_forces(a, eps=d)
    assert np.abs(forces).max() > 10 * tol_eV_per_A, "forces vanish: the check would prove nothing"
    assert np.abs(forces - numeric).max() < tol_eV_per_A, np.abs(forces - numeric).max()
