"""Single-point energy, forces and stress."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from matcalc.calculations.contract import Property, Run
from matcalc.calculations.results import Result
from matcalc.models import EV_PER_A3_TO_GPA

if TYPE_CHECKING:
    from matplotlib.axes import Axes


@dataclass(kw_only=True)
class SinglePointResult(Result):
    """Energy (eV), forces (eV/Å) and stress (GPa, Voigt xx yy zz yz xz xy, positive = tensile)."""

    kind: ClassVar[str] = "single_point"

    energy_eV: float
    energy_per_atom_eV: float
    forces_eV_per_A: np.ndarray = field(repr=False)
    stress_GPa: np.ndarray | None = None
    max_force_eV_per_A: float
    pressure_GPa: float | None = None
    """-trace(stress)/3 (positive = compressed)."""

    def _plot(self, ax: Axes) -> None:
        norms = np.linalg.norm(self.forces_eV_per_A, axis=1)
        ax.bar(np.arange(len(norms)), norms)
        ax.set_xlabel("atom index")
        ax.set_ylabel("|F| (eV/Å)")
        ax.set_title(f"{self.formula} ({self.model}): E = {self.energy_eV:.4f} eV")


def _compute(run: Run) -> dict[str, Any]:
    ev = run.prep.evaluator.evaluate([run.atoms])[0]
    return single_point_fields(len(run.atoms), ev.energy_eV, ev.forces_eV_per_A, ev.stress_eV_per_A3)


PROPERTY = Property(
    name="single_point",
    task_type="single-point",
    summary="Energy, forces and stress of `structure` with `model` (no relaxation).",
    details="Non-periodic structures are accepted (no stress is reported for them).",
    result=SinglePointResult,
    params=(),
    compute=_compute,
    requires_cell=False,
)
single_point = PROPERTY.function


def single_point_fields(n_atoms: int, energy_eV: float, forces: np.ndarray,
                        stress_eV_per_A3: np.ndarray | None) -> dict[str, Any]:
    """The `SinglePointResult` fields of one evaluation (stress converted to GPa)."""
    forces = np.asarray(forces, dtype=float)
    stress = None if stress_eV_per_A3 is None else np.asarray(stress_eV_per_A3, dtype=float) * EV_PER_A3_TO_GPA
    return {
        "energy_eV": float(energy_eV),
        "energy_per_atom_eV": float(energy_eV) / n_atoms,
        "forces_eV_per_A": forces,
        "stress_GPa": stress,
        "max_force_eV_per_A": float(np.linalg.norm(forces, axis=1).max()) if n_atoms else 0.0,
        "pressure_GPa": None if stress is None else float(-stress[:3].mean()),
    }


__all__ = ["PROPERTY", "SinglePointResult", "single_point", "single_point_fields"]
