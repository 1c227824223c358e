"""Batched FIRE: ``ase.optimize.FIRE`` (defaults, no downhill check) for every structure of a batch at once."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from matcalc.batched.base import BatchedOptimizer


class BatchedFIRE(BatchedOptimizer):
    """FIRE (Bitzek et al. 2006) as ASE implements it: one ``dt``, mixing ``a`` and counter per structure.

    Same parameters and defaults as `ase.optimize.FIRE` (``maxstep`` in Å, caps the norm of each
    structure's whole step vector).
    """

    name = "FIRE"
    structure_fields: ClassVar = {"dt": (float, 0.0), "a": (float, 0.0), "n_steps": (np.int64, 0),
                                  "started": (bool, False)}
    row_fields: ClassVar = {"vel": 0}

    def __init__(self, *, dt: float = 0.1, maxstep: float = 0.2, dtmax: float = 1.0, Nmin: int = 5,
                 finc: float = 1.1, fdec: float = 0.5, astart: float = 0.1, fa: float = 0.99,
                 a: float = 0.1) -> None:
        self.dt0, self.maxstep, self.dtmax, self.Nmin = dt, maxstep, dtmax, Nmin
        self.finc, self.fdec, self.astart, self.fa, self.a0 = finc, fdec, astart, fa, a
        super().__init__()

    def initial(self, name: str) -> float:
        return {"dt": self.dt0, "a": self.a0}.get(name, super().initial(name))

    def step(self, x: np.ndarray, f: np.ndarray) -> np.ndarray:
        lay = self.layout
        started = self.started
        if started.any():
            vf = lay.dot(f, self.vel)
            grad2 = lay.dot(f, f)
            vv = lay.dot(self.vel, self.vel)
            uphill = started & ~(vf > 0.0)
            downhill = started & (vf > 0.0)
            with np.errstate(divide="ignore", invalid="ignore"):
                mix = np.where(downhill, np.sqrt(vv) / np.sqrt(grad2), 0.0)
            a_rows = lay.expand(np.where(downhill, self.a, 0.0))[:, None]
            mixed = (1.0 - a_rows) * self.vel + a_rows * f * lay.expand(mix)[:, None]
            self.vel = np.where(lay.expand(downhill)[:, None], mixed,
                                np.where(lay.expand(uphill)[:, None], 0.0, self.vel))
            grow = downhill & (self.n_steps > self.Nmin)
            self.dt = np.where(grow, np.minimum(self.dt * self.finc, self.dtmax), self.dt)
            self.a = np.where(grow, self.a * self.fa, self.a)
            self.n_steps = np.where(downhill, self.n_steps + 1, self.n_steps)
            self.a = np.where(uphill, self.astart, self.a)
            self.dt = np.where(uphill, self.dt * self.fdec, self.dt)
            self.n_steps = np.where(uphill, 0, self.n_steps)
        # first step of a structure: velocities start at zero (they are zero-initialised on add)
        self.started = np.ones(len(lay), dtype=bool)
        dt_rows = lay.expand(self.dt)[:, None]
        self.vel = self.vel + dt_rows * f
        dr = dt_rows * self.vel
        normdr = np.sqrt(lay.dot(dr, dr))
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(normdr > self.maxstep, self.maxstep / normdr, 1.0)
        dr = np.where(lay.expand(normdr > self.maxstep)[:, None], dr * lay.expand(scale)[:, None], dr)
        return x + dr


__all__ = ["BatchedFIRE"]
