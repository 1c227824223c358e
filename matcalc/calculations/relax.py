"""Structure optimisation: ASE optimizer + ``FrechetCellFilter`` (MOFSimBench: LBFGS, fmax 1e-3 eV/Å)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from ase import Atoms

from matcalc.calculations.contract import (
    STEPS,
    Choice,
    FilePath,
    Flag,
    Indices,
    ModelInfo,
    Param,
    Property,
    Run,
    fmax_param,
)
from matcalc.calculations.optimize import OPTIMIZERS, fixed_mask, optimize
from matcalc.calculations.results import Result
from matcalc.structures import trajectory_format

if TYPE_CHECKING:
    from matplotlib.axes import Axes

VOLUME_WARNING_PERCENT = 10.0
"""A relaxation whose cell volume changes by more than this (|ΔV|, % of the input) warns: a DFT-optimised cell
barely moves under a good potential (MOFSimBench: a few %), so a larger change points to a model that does not
describe the structure (or an input far from its minimum). The same threshold as MD stability's."""


def volume_warning(what: str, v0_A3: float, v1_A3: float) -> str | None:
    """The warning when the volume went from ``v0_A3`` to ``v1_A3`` (Å³) by more than
    `VOLUME_WARNING_PERCENT`; ``None`` otherwise."""
    dv = 100.0 * (v1_A3 - v0_A3) / v0_A3
    if not abs(dv) > VOLUME_WARNING_PERCENT:
        return None
    return (f"volume {'grew' if dv > 0 else 'shrank'} by {abs(dv):.1f} % during the {what} ({v0_A3:.1f} -> "
            f"{v1_A3:.1f} Å³; more than {VOLUME_WARNING_PERCENT:g} %): check the final structure; the model may not "
            "describe this material")


@dataclass(kw_only=True)
class RelaxResult(Result):
    """Outcome of a relaxation. Energies eV, lengths Å, angles degrees, volumes Å³."""

    kind: ClassVar[str] = "relax"

    converged: bool
    steps: int
    initial_energy_eV: float
    final_energy_eV: float
    final_energy_per_atom_eV: float
    final_fmax_eV_per_A: float
    initial_volume_A3: float
    final_volume_A3: float
    volume_change_percent: float
    a_A: float
    b_A: float
    c_A: float
    alpha_deg: float
    beta_deg: float
    gamma_deg: float
    rmsd_A: float
    """Root-mean-square displacement of the atoms (minimum image, drift removed)."""
    max_displacement_A: float
    final_structure: Atoms = field(repr=False)
    energies_eV: np.ndarray = field(repr=False)
    """Energy after every optimizer step (index 0 = initial)."""
    fmax_eV_per_A: np.ndarray = field(repr=False)

    def _plot(self, ax: Axes) -> None:
        ax.plot(np.arange(len(self.energies_eV)), self.energies_eV - self.final_energy_eV, marker=".")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("E − E_final (eV)")
        ax.set_yscale("symlog", linthresh=1e-4)
        state = "converged" if self.converged else "not converged"
        ax.set_title(f"{self.formula} ({self.model}): {state} in {self.steps} steps")


def displacements(initial: Atoms, final: Atoms) -> np.ndarray:
    """Per-atom displacement vectors (Å): minimum image in fractional space, mean drift removed."""
    if initial.pbc.all():
        dfrac = final.get_scaled_positions(wrap=False) - initial.get_scaled_positions(wrap=False)
        dfrac -= np.round(dfrac)
        disp = dfrac @ np.asarray(final.cell)
    else:
        disp = final.get_positions() - initial.get_positions()
    return disp - disp.mean(axis=0)


def _check_structure(params: dict[str, Any], atoms: Atoms, model: ModelInfo) -> None:
    mask = fixed_mask(atoms, params.get("fixed_atoms"))  # ValueError when out of range
    if mask is not None:
        params["fixed_atoms"] = np.flatnonzero(mask).tolist()


def _check(params: dict[str, Any]) -> None:
    if params.get("trajectory") is not None:
        trajectory_format(params["trajectory"])  # ValueError naming the suffixes, before anything runs


def _compute(run: Run) -> dict[str, Any]:
    p = run.params
    mask = fixed_mask(run.atoms, p.get("fixed_atoms"))
    initial = run.atoms.copy()
    atoms = run.atoms
    trace = optimize(atoms, run.calculator(), fmax=p["fmax"], max_steps=p["max_steps"], optimizer=p["optimizer"],
                     relax_cell=p["relax_cell"], fixed=mask, trajectory=p.get("trajectory"))
    if (w := trace.warning("relaxation", p["fmax"])) is not None:
        run.warnings.append(w)
    final = atoms.copy()
    final.calc = None
    disp = displacements(initial, final)
    norms = np.linalg.norm(disp, axis=1)
    v0, v1 = initial.get_volume(), final.get_volume()
    if p["relax_cell"] and (w := volume_warning("relaxation", v0, v1)) is not None:
        run.warnings.append(w)
    a, b, c, alpha, beta, gamma = final.cell.cellpar()
    energies = np.asarray(trace.energies_eV)
    return {
        "converged": trace.converged,
        "steps": trace.steps,
        "initial_energy_eV": float(energies[0]),
        "final_energy_eV": float(energies[-1]),
        "final_energy_per_atom_eV": float(energies[-1]) / len(final),
        "final_fmax_eV_per_A": trace.final_fmax_eV_per_A,
        "initial_volume_A3": float(v0),
        "final_volume_A3": float(v1),
        "volume_change_percent": float(100.0 * (v1 - v0) / v0),
        "a_A": float(a), "b_A": float(b), "c_A": float(c),
        "alpha_deg": float(alpha), "beta_deg": float(beta), "gamma_deg": float(gamma),
        "rmsd_A": float(np.sqrt(np.mean(norms**2))),
        "max_displacement_A": float(norms.max()),
        "final_structure": final,
        "energies_eV": energies,
        "fmax_eV_per_A": np.asarray(trace.fmax_eV_per_A),
    }


PROPERTY = Property(
    name="relax",
    task_type="optimization",
    client_method="optimization",
    summary="Relax positions (and the cell) of `structure` with `model`.",
    details="""ASE optimizer (LBFGS by default, as MOFSimBench) on `FrechetCellFilter(atoms)` when the cell
    relaxes; converged means max |F| <= `fmax` on every degree of freedom the optimizer sees. A volume change
    of more than 10 % (`VOLUME_WARNING_PERCENT`) adds a warning. `trajectory` writes every step (energy, forces,
    stress, cell) to an ASE `.traj` or extended XYZ file as the run goes (ASE's GUI, OVITO); such a run uses ASE's
    own optimizer loop instead of the batched stepping.""",
    result=RelaxResult,
    params=(
        fmax_param(),
        Param("max_steps", STEPS, "optimizer step limit", default=5000, presets={"fast": 500}),
        Param("optimizer", Choice(tuple(OPTIMIZERS)), "ASE optimizer", default="LBFGS"),
        Param("relax_cell", Flag(), "also relax the cell (FrechetCellFilter)", default=True),
        Param("fixed_atoms", Indices(mask=True), "atoms kept fixed (indices or a boolean mask)"),
        Param("trajectory", FilePath(), "write the optimisation here, one frame per step (`.traj`: ASE "
              "trajectory; `.xyz`/`.extxyz`: extended XYZ)", remote=False),
    ),
    compute=_compute,
    check=_check,
    check_structure=_check_structure,
)
relax = PROPERTY.function


__all__ = ["OPTIMIZERS", "PROPERTY", "VOLUME_WARNING_PERCENT", "RelaxResult", "displacements", "relax",
           "volume_warning"]
