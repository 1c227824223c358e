"""What a batched optimizer moves: atom positions only, or positions and cell (``FrechetCellFilter``).

A target keeps the state of every structure of a batch as stacked arrays and turns model results
(energies, raw forces, stresses) into the optimizer's forces, exactly as ASE's ``OptimizableAtoms`` and
``FrechetCellFilter`` do for one structure. It also keeps, per structure, a private unconstrained ``Atoms``
(``work``) that it updates in place before each model call, so no structure object is built per step.

Fixed atoms (``FixAtoms``): their forces are zeroed and their optimizer coordinates never move, as in ASE.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
from ase import Atoms
from ase.stress import voigt_6_to_full_3x3_stress

from matcalc.batched.layout import Layout
from matcalc.batched.linalg import expm, expm_frechet_adjoint, logm_near_identity
from matcalc.structures import bare_copy


def work_copy(atoms: Atoms) -> Atoms:
    """A bare copy for the model: no calculator, no constraints (the model returns raw forces)."""
    work = bare_copy(atoms)
    return work


class Target(ABC):
    """Stacked structures of a batch and their optimizer coordinates (``(rows, 3)``, `rows`)."""

    def __init__(self) -> None:
        self.atoms_layout = Layout([])
        """One segment of atom rows per structure."""
        self.rows = Layout([])
        """One segment of optimizer rows per structure."""
        self.positions = np.zeros((0, 3))
        self.cells = np.zeros((0, 3, 3))
        self.fixed = np.zeros(0, dtype=bool)
        self.work: list[Atoms] = []

    def __len__(self) -> int:
        return len(self.work)

    def add(self, atoms_list: Sequence[Atoms], fixed: Sequence[np.ndarray | None]) -> None:
        """Append structures (their current positions and cells) with their fixed-atom masks."""
        if not atoms_list:
            return
        works = [work_copy(a) for a in atoms_list]
        self.work.extend(works)
        self.atoms_layout = self.atoms_layout.extended([len(a) for a in works])
        self.positions = np.concatenate([self.positions, *[a.get_positions() for a in works]])
        self.cells = np.concatenate([self.cells, np.stack([np.array(a.cell) for a in works])])
        masks = [np.zeros(len(a), dtype=bool) if m is None else np.asarray(m, dtype=bool)
                 for a, m in zip(works, fixed, strict=True)]
        self.fixed = np.concatenate([self.fixed, *masks])
        self._added(works)

    def keep(self, keep: np.ndarray) -> None:
        """Keep only the structures where ``keep`` is True."""
        keep = np.asarray(keep, dtype=bool)
        if keep.all():
            return
        atom_rows = self.atoms_layout.row_mask(keep)
        self.positions = self.positions[atom_rows]
        self.fixed = self.fixed[atom_rows]
        self.cells = self.cells[keep]
        self.work = [w for w, k in zip(self.work, keep, strict=True) if k]
        self.atoms_layout = self.atoms_layout.subset(keep)
        self._kept(keep)

    def sync(self) -> list[Atoms]:
        """Write the current positions and cells into the work structures (in place) and return them."""
        lay = self.atoms_layout
        for i, w in enumerate(self.work):
            w.arrays["positions"][:] = self.positions[lay.slice(i)]
            w.cell.array[:] = self.cells[i]
        return self.work

    @abstractmethod
    def _added(self, works: list[Atoms]) -> None: ...

    @abstractmethod
    def _kept(self, keep: np.ndarray) -> None: ...

    @abstractmethod
    def get_x(self) -> np.ndarray:
        """Optimizer coordinates ``(rows, 3)``."""

    @abstractmethod
    def set_x(self, x: np.ndarray) -> None:
        """Move every structure to the optimizer coordinates ``x``."""

    @abstractmethod
    def forces(self, forces: np.ndarray, stresses: np.ndarray) -> np.ndarray:
        """Optimizer forces ``(rows, 3)`` from raw atom forces ``(atoms, 3)`` and Voigt stresses ``(B, 6)``."""


class PositionsTarget(Target):
    """Atom positions only (ASE's ``OptimizableAtoms``): coordinates are the positions."""

    def _added(self, works: list[Atoms]) -> None:
        self.rows = self.atoms_layout

    def _kept(self, keep: np.ndarray) -> None:
        self.rows = self.atoms_layout

    def get_x(self) -> np.ndarray:
        return self.positions.copy()

    def set_x(self, x: np.ndarray) -> None:
        self.positions = np.where(self.fixed[:, None], self.positions, x)

    def forces(self, forces: np.ndarray, stresses: np.ndarray) -> np.ndarray:
        return np.where(self.fixed[:, None], 0.0, forces)


class FrechetCellTarget(Target):
    """Positions and cell, as ``ase.filters.FrechetCellFilter`` with its defaults (full strain mask, no
    pressure, ``exp_cell_factor`` = number of atoms).

    Coordinates per structure: ``n`` atom rows ``r F^-T`` and three cell rows ``n log(n F)``, with ``F`` the
    deformation gradient from the cell at the start (``orig_cell``). The matrix logarithm is carried as state
    (ASE recomputes it from the cell every step: the same number up to round-off); the exponential and the
    Fréchet derivative of the cell forces are batched 3x3 algebra (`matcalc.batched.linalg`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.orig_cells = np.zeros((0, 3, 3))
        self.x = np.zeros((0, 3))
        self.deform = np.zeros((0, 3, 3))
        """Current deformation gradient ``F`` of every structure."""
        self.log_deform = np.zeros((0, 3, 3))
        """``logm(F)``."""
        self.n_atoms = np.zeros(0)

    def _index(self) -> None:
        """Row indices of atoms and cells inside the optimizer rows."""
        sizes = self.atoms_layout.sizes
        self.rows = Layout(sizes + 3)
        starts = self.rows.starts[:-1]
        self.atom_rows = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, sizes, strict=True)]
                                        ) if len(sizes) else np.zeros(0, dtype=np.int64)
        self.cell_rows = (starts[:, None] + sizes[:, None] + np.arange(3)).reshape(-1)

    def _added(self, works: list[Atoms]) -> None:
        new_cells = np.stack([np.array(a.cell) for a in works])
        new_f = np.linalg.solve(new_cells, new_cells).transpose(0, 2, 1)  # deform_grad(cell) with orig = cell
        n = np.array([float(len(a)) for a in works])
        log_f = logm_near_identity(new_f)
        x_atoms = [np.linalg.solve(f, a.get_positions().T).T for f, a in zip(new_f, works, strict=True)]
        x_cells = (np.log(n)[:, None, None] * np.eye(3) + log_f) * n[:, None, None]
        old_x = [self.x[self.rows.slice(i)] for i in range(len(self.rows))]
        self.orig_cells = np.concatenate([self.orig_cells, new_cells])
        self.deform = np.concatenate([self.deform, new_f])
        self.log_deform = np.concatenate([self.log_deform, log_f])
        self.n_atoms = np.concatenate([self.n_atoms, n])
        self._index()
        self.x = np.concatenate([*old_x, *[np.concatenate([xa, xc]) for xa, xc in zip(x_atoms, x_cells,
                                                                                     strict=True)]])

    def _kept(self, keep: np.ndarray) -> None:
        self.x = self.x[self.rows.row_mask(keep)]
        self.orig_cells = self.orig_cells[keep]
        self.deform = self.deform[keep]
        self.log_deform = self.log_deform[keep]
        self.n_atoms = self.n_atoms[keep]
        self._index()

    def get_x(self) -> np.ndarray:
        return self.x.copy()

    def set_x(self, x: np.ndarray) -> None:
        lay = self.atoms_layout
        x = x.copy()
        fixed_rows = self.atom_rows[self.fixed]
        x[fixed_rows] = self.x[fixed_rows]  # fixed atoms keep their coordinates (their forces are zero)
        n = self.n_atoms[:, None, None]
        log_nf = x[self.cell_rows].reshape(-1, 3, 3) / n  # x_cell / exp_cell_factor = log(n F)
        f = expm(log_nf) / n
        eye = np.eye(3)
        m = eye + (f - eye).transpose(0, 2, 1)  # I + deform, the full strain mask
        new_cells = self.orig_cells @ m
        x_atoms = x[self.atom_rows]
        new_pos = np.einsum("ni,nij->nj", x_atoms, m[lay.owner])
        if self.fixed.any():  # ASE: set_cell(scale_atoms=True) moves fixed atoms with the cell
            scale = np.linalg.solve(self.cells, new_cells)
            moved = np.einsum("ni,nij->nj", self.positions, scale[lay.owner])
            new_pos = np.where(self.fixed[:, None], moved, new_pos)
        self.x = x
        self.deform = f
        self.log_deform = log_nf - np.log(n) * eye
        self.cells = new_cells
        self.positions = new_pos

    def forces(self, forces: np.ndarray, stresses: np.ndarray) -> np.ndarray:
        lay = self.atoms_layout
        f = self.deform
        volume = np.abs(np.linalg.det(self.cells))
        virial = -volume[:, None, None] * voigt_6_to_full_3x3_stress(stresses)
        ucf_grad = virial @ np.linalg.inv(f.transpose(0, 2, 1))
        cell_forces = expm_frechet_adjoint(self.log_deform, ucf_grad) / self.n_atoms[:, None, None]
        atom_forces = np.where(self.fixed[:, None], 0.0, forces)
        out = np.empty((self.rows.rows, 3))
        out[self.atom_rows] = np.einsum("ni,nij->nj", atom_forces, f[lay.owner])
        out[self.cell_rows] = cell_forces.reshape(-1, 3)
        return out


__all__ = ["FrechetCellTarget", "PositionsTarget", "Target", "work_copy"]
