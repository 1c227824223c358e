"""Geometry optimisation with ASE optimizers (and ``FrechetCellFilter`` for the cell), shared by
``relax`` and the pre-relaxation step of every other property."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.constraints import FixAtoms
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, FIRE, LBFGS, MDMin
from ase.optimize.optimize import Optimizer

from matcalc import progress
from matcalc.calculations import checks

log = logging.getLogger(__name__)

# FrechetCellFilter takes a matrix log of the 3x3 deformation gradient every step; scipy warns about
# estimated errors of ~1e-13, which is harmless and floods notebooks and logs.
warnings.filterwarnings("ignore", message="logm result may be inaccurate", category=RuntimeWarning)

OPTIMIZERS: dict[str, type[Optimizer]] = {"FIRE": FIRE, "BFGS": BFGS, "LBFGS": LBFGS, "MDMin": MDMin}


@dataclass
class OptimizationTrace:
    """What happened during one optimisation."""

    converged: bool
    steps: int
    final_fmax_eV_per_A: float
    energies_eV: list[float] = field(default_factory=list)
    fmax_eV_per_A: list[float] = field(default_factory=list)
    stopped_early: bool = False

    def warning(self, what: str, fmax: float) -> str | None:
        """The warning a result carries when ``what`` did not converge (``None`` when it did)."""
        if self.converged:
            return None
        return (f"{what} not converged: fmax {self.final_fmax_eV_per_A:.3g} eV/Å > {fmax} after {self.steps} steps"
                + (" (stopped early)" if self.stopped_early else ""))


def check_optimizer_params(fmax: float, max_steps: int, optimizer: str) -> str:
    checks.positive("fmax", fmax)
    checks.integer("max_steps", max_steps, minimum=1)
    return checks.choice("optimizer", optimizer, OPTIMIZERS)


def fixed_mask(atoms: Atoms, fixed_atoms: Sequence[int] | Sequence[bool] | np.ndarray | None) -> np.ndarray | None:
    """Boolean mask of fixed atoms from indices or a mask; ``ValueError`` when out of range."""
    if fixed_atoms is None:
        return None
    arr = np.asarray(fixed_atoms)
    n = len(atoms)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"fixed_atoms mask must have length {n} (number of atoms), got {arr.shape}")
        return arr
    if arr.size == 0:
        return np.zeros(n, dtype=bool)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError("fixed_atoms must be atom indices (integers) or a boolean mask")
    if arr.min() < -n or arr.max() >= n:
        raise ValueError(f"fixed_atoms indices must be in [0, {n - 1}], got {arr.min()}..{arr.max()}")
    mask = np.zeros(n, dtype=bool)
    mask[arr] = True
    return mask


def optimize(
    atoms: Atoms,
    calculator: Calculator,
    *,
    fmax: float,
    max_steps: int,
    optimizer: str = "LBFGS",
    relax_cell: bool = True,
    fixed: np.ndarray | None = None,
    stage: str = "relax",
) -> OptimizationTrace:
    """Optimise ``atoms`` in place (positions, and the cell when ``relax_cell``).

    Converged means max |F| <= ``fmax`` (eV/Å) on every degree of freedom the optimizer sees
    (for the cell, ``FrechetCellFilter``'s virial-derived forces).
    """
    opt_cls = OPTIMIZERS[check_optimizer_params(fmax, max_steps, optimizer)]
    atoms.calc = calculator
    if fixed is not None and fixed.any():
        atoms.set_constraint(FixAtoms(mask=fixed))
    target = FrechetCellFilter(atoms) if relax_cell else atoms
    opt = opt_cls(target, logfile=None)
    trace = OptimizationTrace(converged=False, steps=0, final_fmax_eV_per_A=float("nan"))

    def observe() -> None:
        energy = float(atoms.get_potential_energy())
        f = target.get_forces()
        fm = float(np.sqrt((f**2).sum(axis=1).max())) if len(f) else 0.0
        trace.energies_eV.append(energy)
        trace.fmax_eV_per_A.append(fm)
        step = len(trace.energies_eV) - 1
        log.debug("%s step %d E=%.6f eV fmax=%.4g eV/A", stage, step, energy, fm,
                  extra={"stage": stage, "step": step, "energy_eV": energy, "fmax_eV_per_A": fm})
        progress.report(stage, step, max_steps, energy_eV=energy, fmax_eV_per_A=fm)
        if progress.should_stop():
            trace.stopped_early = True

    opt.attach(observe, interval=1)
    converged = False
    for converged in opt.irun(fmax=fmax, steps=max_steps):
        if trace.stopped_early:
            break
    trace.converged = bool(converged) and not trace.stopped_early
    trace.steps = int(opt.nsteps)
    trace.final_fmax_eV_per_A = trace.fmax_eV_per_A[-1] if trace.fmax_eV_per_A else float("nan")
    log.info("%s: %s after %d steps, fmax %.3g eV/A", stage, "converged" if trace.converged else "NOT converged",
             trace.steps, trace.final_fmax_eV_per_A,
             extra={"stage": stage, "steps": trace.steps, "converged": trace.converged})
    return trace
