"""Batched Langevin NVT: ``ase.md.langevin.Langevin`` (``fixcm=False``) for every structure of a batch at once.

Each structure keeps its own random generator and draws exactly what ASE's step draws from it
(``standard_normal((n, 3))`` twice per step, ``xi`` then ``eta``), so trajectories equal ASE's for the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms, units

from matcalc.batched.integrator import BatchedIntegrator


@dataclass
class LangevinParams:
    """One structure's Langevin parameters, in ASE units (as `ase.md.langevin.Langevin` takes them)."""

    timestep: float
    temperature_K: float
    friction: float
    """Inverse ASE time units (e.g. ``0.01 / units.fs``)."""
    rng: Any = None
    """Anything with ``standard_normal(size=...)`` (``numpy.random.Generator``); ``None``: ``numpy.random``."""


class BatchedLangevin(BatchedIntegrator):
    """The quasi-symplectic Langevin propagator of ASE (Vanden-Eijnden & Ciccotti 2006, eq. 23)."""

    def __init__(self) -> None:
        super().__init__()
        self.dt = np.zeros(0)
        self.c1 = np.zeros(0)
        self.c2 = np.zeros(0)
        self.c3 = np.zeros((0, 1))
        self.c4 = np.zeros((0, 1))
        self.c5 = np.zeros((0, 1))
        self.rngs: list[Any] = []
        self.v = np.zeros((0, 3))
        self.rnd_vel = np.zeros((0, 3))

    def _add(self, atoms_list: Sequence[Atoms], params: Sequence[LangevinParams]) -> None:
        dt, c1, c2, c3, c4, c5 = [], [], [], [], [], []
        for a, p in zip(atoms_list, params, strict=True):
            t, fr = units.kB * p.temperature_K, p.friction
            masses = a.get_masses()[:, None]
            sigma = np.sqrt(2 * t * fr / masses)  # ASE's updatevars, term by term
            dt.append(p.timestep)
            c1.append(p.timestep / 2.0 - p.timestep * p.timestep * fr / 8.0)
            c2.append(p.timestep * fr / 2 - p.timestep * p.timestep * fr * fr / 8.0)
            c3.append(np.sqrt(p.timestep) * sigma / 2.0 - p.timestep**1.5 * fr * sigma / 8.0)
            c5_ = p.timestep**1.5 * sigma / (2 * np.sqrt(3))
            c5.append(c5_)
            c4.append(fr / 2.0 * c5_)
            self.rngs.append(p.rng if p.rng is not None else np.random)
        self.dt = np.concatenate([self.dt, dt])
        self.c1 = np.concatenate([self.c1, c1])
        self.c2 = np.concatenate([self.c2, c2])
        self.c3 = np.concatenate([self.c3, *c3])
        self.c4 = np.concatenate([self.c4, *c4])
        self.c5 = np.concatenate([self.c5, *c5])
        n = sum(len(a) for a in atoms_list)
        self.v = np.concatenate([self.v, np.zeros((n, 3))])
        self.rnd_vel = np.concatenate([self.rnd_vel, np.zeros((n, 3))])

    def _keep(self, keep: np.ndarray, rows: np.ndarray) -> None:
        self.dt, self.c1, self.c2 = self.dt[keep], self.c1[keep], self.c2[keep]
        self.c3, self.c4, self.c5 = self.c3[rows], self.c4[rows], self.c5[rows]
        self.v, self.rnd_vel = self.v[rows], self.rnd_vel[rows]
        self.rngs = [r for r, k in zip(self.rngs, keep, strict=True) if k]

    def pre_step(self, forces: np.ndarray, stresses: np.ndarray) -> None:
        lay = self.layout
        m = self.masses
        v = self.momenta / m
        xi = np.empty_like(v)
        eta = np.empty_like(v)
        for i, (rng, n) in enumerate(zip(self.rngs, lay.sizes, strict=True)):  # ASE's order: xi, then eta
            sl = lay.slice(i)
            xi[sl] = rng.standard_normal(size=(int(n), 3))
            eta[sl] = rng.standard_normal(size=(int(n), 3))
        rnd_pos = self.c5 * eta
        self.rnd_vel = self.c3 * xi - self.c4 * eta
        c1 = lay.expand(self.c1)[:, None]
        c2 = lay.expand(self.c2)[:, None]
        dt = lay.expand(self.dt)[:, None]
        v = v + (c1 * forces / m - c2 * v + self.rnd_vel)
        x = self.positions
        new = self.constrain_positions(x, x + dt * v + rnd_pos)
        self.v = (new - x - rnd_pos) / dt
        self.positions = new

    def post_step(self, forces: np.ndarray, stresses: np.ndarray, running: np.ndarray) -> None:
        lay = self.layout
        c1 = lay.expand(self.c1)[:, None]
        c2 = lay.expand(self.c2)[:, None]
        v = self.v + (c1 * forces / self.masses - c2 * self.v + self.rnd_vel)
        p = self.constrain_momenta(v * self.masses)
        self.momenta = np.where(lay.expand(running)[:, None], p, self.momenta)


__all__ = ["BatchedLangevin", "LangevinParams"]
