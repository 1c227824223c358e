"""Batched LBFGS: ``ase.optimize.LBFGS`` (no line search) for every structure of a batch at once.

Histories live in a ring of ``memory`` slots shared by the batch: every structure writes one slot per step
(structures in their first step write zeros they never read), so the two-loop recursion runs over the ring
once for all structures, each masked to its own history length.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from matcalc.batched.base import BatchedOptimizer


class BatchedLBFGS(BatchedOptimizer):
    """Limited-memory BFGS as ASE implements it (inverse Hessian ``I / alpha``, step capped per atom row).

    Same parameters and defaults as `ase.optimize.LBFGS`: ``maxstep`` (Å, the longest row of a
    structure's step), ``memory`` (pairs kept), ``damping``, ``alpha`` (eV/Å², initial curvature).
    """

    name = "LBFGS"
    structure_fields: ClassVar = {"iteration": (np.int64, 0), "count": (np.int64, 0)}
    row_fields: ClassVar = {"s": 1, "y": 1, "r0": 0, "f0": 0}

    def __init__(self, *, maxstep: float = 0.2, memory: int = 100, damping: float = 1.0,
                 alpha: float = 70.0) -> None:
        if maxstep > 1.0:
            raise ValueError(f"You are using a much too large value for the maximum step size: {maxstep:.1f} Angstrom")
        self.maxstep, self.memory, self.damping, self.alpha = maxstep, int(memory), damping, alpha
        super().__init__()
        self.rho = np.zeros((self.memory, 0))
        self.head = 0
        """Ring slot the next history pair goes to."""

    def row_shape(self, name: str) -> tuple[int, ...]:
        return (self.memory, 3) if name in ("s", "y") else (3,)

    def _empty_rows(self, name: str, axis: int) -> np.ndarray:
        if name in ("s", "y"):
            return np.zeros((self.memory, 0, 3))
        return np.zeros((0, 3))

    def add(self, sizes: list[int]) -> None:  # type: ignore[override]
        super().add(sizes)
        self.rho = np.concatenate([self.rho, np.zeros((self.memory, len(sizes)))], axis=1)

    def keep(self, keep: np.ndarray) -> None:
        if not np.asarray(keep).all():
            self.rho = self.rho[:, np.asarray(keep, dtype=bool)]
        super().keep(keep)

    def step(self, x: np.ndarray, f: np.ndarray) -> np.ndarray:
        lay = self.layout
        # update: a new (s, y) pair for every structure past its first step
        has = self.iteration > 0
        has_rows = lay.expand(has)[:, None]
        h = self.head
        s0 = np.where(has_rows, x - self.r0, 0.0)
        y0 = np.where(has_rows, self.f0 - f, 0.0)  # gradient - gradient0
        self.s[h] = s0
        self.y[h] = y0
        with np.errstate(divide="ignore"):
            self.rho[h] = np.where(has, 1.0 / lay.dot(y0, s0), 0.0)
        self.count = np.where(has, np.minimum(self.count + 1, self.memory), self.count)
        self.head = (h + 1) % self.memory
        # two-loop recursion on the gradient
        q = -f
        n_hist = int(self.count.max(initial=0))
        alphas = np.zeros((n_hist, len(lay)))
        slots = [(self.head - 1 - k) % self.memory for k in range(n_hist)]  # newest first
        for k, slot in enumerate(slots):
            valid = k < self.count
            a_k = np.where(valid, self.rho[slot] * lay.dot(self.s[slot], q), 0.0)
            alphas[k] = a_k
            q = q - lay.expand(a_k)[:, None] * self.y[slot]
        z = q * (1.0 / self.alpha)
        for k in range(n_hist - 1, -1, -1):  # oldest first
            slot = slots[k]
            valid = k < self.count
            b = self.rho[slot] * lay.dot(self.y[slot], z)
            coef = np.where(valid, alphas[k] - b, 0.0)
            z = z + self.s[slot] * lay.expand(coef)[:, None]
        self.iteration = self.iteration + 1
        p = -z
        # determine_step: scale so that the longest row is at most maxstep
        longest = lay.row_norm_max(p)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(longest >= self.maxstep, self.maxstep / longest, 1.0)
        dr = np.where(lay.expand(longest >= self.maxstep)[:, None], p * lay.expand(scale)[:, None], p)
        dr = dr * self.damping
        self.r0 = x.copy()
        self.f0 = f.copy()
        return x + dr


__all__ = ["BatchedLBFGS"]
