"""Structure optimisation: ASE optimizer + ``FrechetCellFilter`` (MOFSimBench: LBFGS, fmax 1e-3 eV/Å)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from ase import Atoms

from matcalc.calculations import protocols
from matcalc.calculations.common import prepare
from matcalc.calculations.optimize import OPTIMIZERS, check_optimizer_params, fixed_mask, optimize
from matcalc.calculations.results import Result
from matcalc.models import Potential

if TYPE_CHECKING:
    from matplotlib.axes import Axes


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


def relax(
    structure: Any,
    model: str | Potential = "chgnet",
    *,
    fmax: float | None = None,
    max_steps: int | None = None,
    optimizer: str | None = None,
    relax_cell: bool | None = None,
    fixed_atoms: Sequence[int] | Sequence[bool] | np.ndarray | None = None,
    protocol: str | None = None,
    device: str | None = None,
) -> RelaxResult:
    """Relax positions (and the cell) of ``structure`` with ``model``.

    Args:
        structure: anything :func:`matcalc.load_structure` reads.
        model: model name (``"chgnet"``, ``"emt"``, ``"chgnet+d3"``...) or a loaded Potential.
        fmax: force convergence threshold (eV/Å); default 1e-3 (``"fast"``: 0.05).
        max_steps: optimizer step limit; default 5000 (``"fast"``: 500).
        optimizer: ``FIRE``, ``BFGS``, ``LBFGS`` (default) or ``MDMin``.
        relax_cell: also relax the cell with ``FrechetCellFilter`` (default True).
        fixed_atoms: indices or boolean mask of atoms to keep fixed.
        protocol: ``"mofsimbench"`` (default) or ``"fast"``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default: a GPU if torch sees one.
    """
    name, params = protocols.resolve("relax", protocol, fmax=fmax, max_steps=max_steps, optimizer=optimizer,
                                     relax_cell=relax_cell)
    params["optimizer"] = check_optimizer_params(params["fmax"], params["max_steps"], params["optimizer"])
    prep = prepare(structure, model, device)
    mask = fixed_mask(prep.atoms, fixed_atoms)
    if mask is not None:
        params["fixed_atoms"] = np.flatnonzero(mask).tolist()
    initial = prep.atoms.copy()
    atoms = prep.atoms
    trace = optimize(atoms, prep.calculator(), fmax=params["fmax"], max_steps=params["max_steps"],
                     optimizer=params["optimizer"], relax_cell=bool(params["relax_cell"]), fixed=mask)
    w = trace.warning("relaxation", params["fmax"])
    warnings = [] if w is None else [w]
    final = atoms.copy()
    final.calc = None
    disp = displacements(initial, final)
    norms = np.linalg.norm(disp, axis=1)
    v0, v1 = initial.get_volume(), final.get_volume()
    a, b, c, alpha, beta, gamma = final.cell.cellpar()
    energies = np.asarray(trace.energies_eV)
    return RelaxResult(
        **prep.common(name, params, warnings),
        converged=trace.converged,
        steps=trace.steps,
        initial_energy_eV=float(energies[0]),
        final_energy_eV=float(energies[-1]),
        final_energy_per_atom_eV=float(energies[-1]) / len(final),
        final_fmax_eV_per_A=trace.final_fmax_eV_per_A,
        initial_volume_A3=float(v0),
        final_volume_A3=float(v1),
        volume_change_percent=float(100.0 * (v1 - v0) / v0),
        a_A=float(a), b_A=float(b), c_A=float(c),
        alpha_deg=float(alpha), beta_deg=float(beta), gamma_deg=float(gamma),
        rmsd_A=float(np.sqrt(np.mean(norms**2))),
        max_displacement_A=float(norms.max()),
        final_structure=final,
        energies_eV=energies,
        fmax_eV_per_A=np.asarray(trace.fmax_eV_per_A),
    )


__all__ = ["OPTIMIZERS", "RelaxResult", "displacements", "relax"]
