"""Batched BFGS: ``ase.optimize.BFGS`` for every structure of a batch at once.

Each structure keeps its full Hessian (``3 rows x 3 rows``). Hessians of the same size are diagonalised
together (``np.linalg.eigh`` on the stack: LAPACK per matrix, the same numbers as ASE's one-by-one calls);
the cost is the eigendecomposition itself, as in ASE.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from matcalc.batched.base import BatchedOptimizer


class BatchedBFGS(BatchedOptimizer):
    """BFGS with ASE's step (``-V (g V / |w|)`` from the Hessian's eigenpairs, longest row <= ``maxstep``).

    Same parameters and defaults as `ase.optimize.BFGS`: ``maxstep`` (Å), ``alpha`` (eV/Å², the
    initial Hessian ``alpha I``).
    """

    name = "BFGS"
    row_fields: ClassVar = {"pos0": 0, "forces0": 0}
    list_fields: ClassVar = ("hessian",)

    def __init__(self, *, maxstep: float = 0.2, alpha: float = 70.0) -> None:
        self.maxstep, self.alpha = maxstep, alpha
        super().__init__()

    def step(self, x: np.ndarray, f: np.ndarray) -> np.ndarray:
        lay = self.layout
        dpos = np.empty_like(x)
        by_size: dict[int, list[int]] = {}
        for i in range(len(lay)):
            sl = lay.slice(i)
            pos = x[sl].ravel()
            forces = f[sl].ravel()
            if self.hessian[i] is None:
                self.hessian[i] = np.eye(pos.size) * self.alpha
            else:
                self._update(i, pos, -forces, self.pos0[sl].ravel(), -self.forces0[sl].ravel())
            by_size.setdefault(pos.size, []).append(i)
        self.pos0 = x.copy()
        self.forces0 = f.copy()
        for idx in by_size.values():
            omega, vectors = np.linalg.eigh(np.stack([self.hessian[i] for i in idx]))
            for k, i in enumerate(idx):
                sl = lay.slice(i)
                gradient = -f[sl].ravel()
                v = vectors[k]
                dpos[sl] = (-v @ (gradient @ v / np.fabs(omega[k]))).reshape(-1, 3)
        longest = lay.row_norm_max(dpos)
        scale = np.where(longest >= self.maxstep, self.maxstep / np.where(longest > 0, longest, 1.0), 1.0)
        dpos = np.where(lay.expand(longest >= self.maxstep)[:, None], dpos * lay.expand(scale)[:, None], dpos)
        return x + dpos

    def _update(self, i: int, pos: np.ndarray, gradient: np.ndarray, pos0: np.ndarray,
                gradient0: np.ndarray) -> None:
        dpos = pos - pos0
        if np.abs(dpos).max() < 1e-7:
            return
        dgradient = gradient - gradient0
        a = dpos @ dgradient
        h = self.hessian[i]
        dg = h @ dpos
        b = dpos @ dg
        h += np.outer(dgradient, dgradient) / a - np.outer(dg, dg) / b


__all__ = ["BatchedBFGS"]
