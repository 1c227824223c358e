"""Base class of the batched MD integrators: positions, momenta and cells of a batch as stacked arrays.

An integrator step is split around its one force evaluation: `BatchedIntegrator.pre_step` (everything
before it: kicks with the current forces, drift, cell update) and `BatchedIntegrator.post_step`
(everything after: kicks with the new forces, thermostat). The loop (`matcalc.batched.md`) evaluates all
structures between the two, so structures that join a running batch get their first evaluation in the same
model request as the others' mid-step one.

Constraints: ``FixAtoms`` (fixed positions, zero momenta) and ``FixCom`` (centre of mass fixed), applied as
ASE's ``Atoms.set_positions`` / ``set_momenta`` do; `supported_constraints` says whether a structure's
constraints are covered.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
from ase import Atoms
from ase.constraints import FixAtoms, FixCom

from matcalc.batched.layout import Layout
from matcalc.batched.targets import work_copy


def supported_constraints(atoms: Atoms) -> bool:
    """True when ``atoms`` has no constraint, or only one ``FixAtoms`` or one ``FixCom`` (all atoms)."""
    cons = atoms.constraints
    if not cons:
        return True
    if len(cons) > 1:
        return False
    c = cons[0]
    return isinstance(c, FixAtoms) or (type(c) is FixCom)


class BatchedIntegrator(ABC):
    """Stacked MD state of a batch (positions Å, momenta amu·Å/ASE-time, masses amu, cells Å)."""

    needs_stress: bool = False
    """The integrator moves the cell from the stress (a model without stress is an error, as in ASE)."""

    def __init__(self) -> None:
        self.layout = Layout([])
        self.positions = np.zeros((0, 3))
        self.momenta = np.zeros((0, 3))
        self.masses = np.zeros((0, 1))
        self.cells = np.zeros((0, 3, 3))
        self.fixed = np.zeros(0, dtype=bool)
        self.fixcom = np.zeros(0, dtype=bool)
        self.dof = np.zeros(0)
        """Degrees of freedom (``Atoms.get_number_of_degrees_of_freedom``) per structure."""
        self.work: list[Atoms] = []

    def __len__(self) -> int:
        return len(self.work)

    def add(self, atoms_list: Sequence[Atoms], params: Sequence[Any]) -> None:
        """Append structures (current positions, momenta, cells and constraints) with their parameters."""
        if not atoms_list:
            return
        works = [work_copy(a) for a in atoms_list]
        self.work.extend(works)
        self.layout = self.layout.extended([len(a) for a in atoms_list])
        self.positions = np.concatenate([self.positions, *[a.get_positions() for a in atoms_list]])
        self.momenta = np.concatenate([self.momenta, *[a.get_momenta() for a in atoms_list]])
        self.masses = np.concatenate([self.masses, *[a.get_masses()[:, None] for a in atoms_list]])
        self.cells = np.concatenate([self.cells, np.stack([np.array(a.cell) for a in atoms_list])])
        fixed, fixcom = [], []
        for a in atoms_list:
            mask = np.zeros(len(a), dtype=bool)
            for c in a.constraints:
                if isinstance(c, FixAtoms):
                    mask[c.index] = True
            fixed.append(mask)
            fixcom.append(any(type(c) is FixCom for c in a.constraints))
        self.fixed = np.concatenate([self.fixed, *fixed])
        self.fixcom = np.concatenate([self.fixcom, fixcom])
        self.dof = np.concatenate([self.dof, [float(a.get_number_of_degrees_of_freedom()) for a in atoms_list]])
        self._add(atoms_list, params)

    def keep(self, keep: np.ndarray) -> None:
        keep = np.asarray(keep, dtype=bool)
        if keep.all():
            return
        rows = self.layout.row_mask(keep)
        self.positions, self.momenta, self.masses = self.positions[rows], self.momenta[rows], self.masses[rows]
        self.fixed = self.fixed[rows]
        self.cells, self.fixcom, self.dof = self.cells[keep], self.fixcom[keep], self.dof[keep]
        self.work = [w for w, k in zip(self.work, keep, strict=True) if k]
        self._keep(keep, rows)
        self.layout = self.layout.subset(keep)

    def sync(self) -> list[Atoms]:
        """Current positions and cells into the work structures (in place, for the model)."""
        lay = self.layout
        for i, w in enumerate(self.work):
            w.arrays["positions"][:] = self.positions[lay.slice(i)]
            w.cell.array[:] = self.cells[i]
        return self.work

    # ------------------------------------------------------------------ constraints, as ASE applies them
    def constrain_positions(self, old: np.ndarray, new: np.ndarray) -> np.ndarray:
        """``Atoms.set_positions(new)`` from positions ``old``: fixed atoms stay, the centre of mass stays."""
        if self.fixed.any():
            new = np.where(self.fixed[:, None], old, new)
        if self.fixcom.any():
            lay = self.layout
            m = self.masses
            total = lay.sum(m[:, 0])
            old_cm = lay.sum(m * old) / total[:, None]
            new_cm = lay.sum(m * new) / total[:, None]
            new = new + np.where(self.fixcom[:, None], old_cm - new_cm, 0.0)[lay.owner]
        return new

    def constrain_momenta(self, p: np.ndarray) -> np.ndarray:
        """``Atoms.set_momenta(p)``: zero for fixed atoms, no centre-of-mass momentum under ``FixCom``."""
        if self.fixed.any():
            p = np.where(self.fixed[:, None], 0.0, p)
        if self.fixcom.any():
            lay = self.layout
            v_com = lay.sum(p) / lay.sum(self.masses[:, 0])[:, None]
            p = p - np.where(self.fixcom[:, None], v_com, 0.0)[lay.owner] * self.masses
        return p

    # ------------------------------------------------------------------ observables
    def kinetic_energy(self) -> np.ndarray:
        """Per structure (eV): ``0.5 p . v`` as ``Atoms.get_kinetic_energy``."""
        return 0.5 * self.layout.dot(self.momenta, self.momenta / self.masses)

    def volumes(self) -> np.ndarray:
        return np.abs(np.linalg.det(self.cells))

    # ------------------------------------------------------------------ subclasses
    @abstractmethod
    def _add(self, atoms_list: Sequence[Atoms], params: Sequence[Any]) -> None: ...

    @abstractmethod
    def _keep(self, keep: np.ndarray, rows: np.ndarray) -> None: ...

    @abstractmethod
    def pre_step(self, forces: np.ndarray, stresses: np.ndarray) -> None:
        """The part of a step before the force evaluation, for every structure (forces, stresses: current)."""

    @abstractmethod
    def post_step(self, forces: np.ndarray, stresses: np.ndarray, running: np.ndarray) -> None:
        """The part after it, for the structures where ``running`` is True (forces, stresses: new)."""


__all__ = ["BatchedIntegrator", "supported_constraints"]
