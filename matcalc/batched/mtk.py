"""Batched isotropic MTK NPT: ``ase.md.nose_hoover_chain.IsotropicMTKNPT`` for every structure of a batch at once.

Martyna-Tobias-Klein equations with Nose-Hoover chains on the particles and on the barostat, integrated with
ASE's factorisation (fourth-order Suzuki-Yoshida chain steps); chain variables are ``(B, chain)`` arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms, units
from ase.md.nose_hoover_chain import FOURTH_ORDER_COEFFS
from scipy.special import exprel

from matcalc.batched.integrator import BatchedIntegrator


@dataclass
class MTKParams:
    """One structure's parameters, in ASE units (as `IsotropicMTKNPT`)."""

    timestep: float
    temperature_K: float
    pressure_au: float
    """External pressure, eV/Å³."""
    tdamp: float
    pdamp: float


class BatchedIsotropicMTKNPT(BatchedIntegrator):
    """Isotropic MTK NPT (no constraints, as in ASE); ``tchain``/``pchain``/``tloop``/``ploop`` per batch."""

    needs_stress = True

    def __init__(self, tchain: int = 3, pchain: int = 3, tloop: int = 1, ploop: int = 1) -> None:
        super().__init__()
        if tchain < 1 or pchain < 1:
            raise ValueError("tchain and pchain must be >= 1")
        self.tchain, self.pchain, self.tloop, self.ploop = tchain, pchain, tloop, ploop
        z = np.zeros(0)
        self.dt, self.kT, self.p_ext, self.volume0, self.n = z, z, z, z, z
        self.eps, self.p_eps, self.W = z, z, z
        self.cell0 = np.zeros((0, 3, 3))
        self.Q = np.zeros((0, tchain))
        self.eta = np.zeros((0, tchain))
        self.p_eta = np.zeros((0, tchain))
        self.R = np.zeros((0, pchain))
        self.xi = np.zeros((0, pchain))
        self.p_xi = np.zeros((0, pchain))

    def _add(self, atoms_list: Sequence[Atoms], params: Sequence[MTKParams]) -> None:
        for a in atoms_list:
            if a.constraints:
                raise NotImplementedError("Current implementation does not support constraints")
        n = np.array([float(len(a)) for a in atoms_list])
        kt = np.array([units.kB * p.temperature_K for p in params])
        tdamp = np.array([p.tdamp for p in params])
        pdamp = np.array([p.pdamp for p in params])
        q = np.empty((len(params), self.tchain))
        q[:, 0] = 3 * n * kt * tdamp**2
        q[:, 1:] = (kt * tdamp**2)[:, None]
        r = np.empty((len(params), self.pchain))
        r[:, 0] = 9 * kt * pdamp**2
        r[:, 1:] = (kt * pdamp**2)[:, None]
        cat = np.concatenate
        self.dt = cat([self.dt, [p.timestep for p in params]])
        self.kT = cat([self.kT, kt])
        self.p_ext = cat([self.p_ext, [p.pressure_au for p in params]])
        self.volume0 = cat([self.volume0, [a.get_volume() for a in atoms_list]])
        self.cell0 = cat([self.cell0, np.stack([np.array(a.get_cell()) for a in atoms_list])])
        self.n = cat([self.n, n])
        self.eps = cat([self.eps, np.zeros(len(params))])
        self.p_eps = cat([self.p_eps, np.zeros(len(params))])
        self.W = cat([self.W, (3 * n + 3) * kt * pdamp**2])
        self.Q = cat([self.Q, q])
        self.eta = cat([self.eta, np.zeros_like(q)])
        self.p_eta = cat([self.p_eta, np.zeros_like(q)])
        self.R = cat([self.R, r])
        self.xi = cat([self.xi, np.zeros_like(r)])
        self.p_xi = cat([self.p_xi, np.zeros_like(r)])

    def _keep(self, keep: np.ndarray, rows: np.ndarray) -> None:
        for name in ("dt", "kT", "p_ext", "volume0", "cell0", "n", "eps", "p_eps", "W", "Q", "eta", "p_eta", "R",
                     "xi", "p_xi"):
            setattr(self, name, getattr(self, name)[keep])

    # ------------------------------------------------------------------ thermostat on the particles
    def _nhc(self, p: np.ndarray, delta: np.ndarray) -> np.ndarray:
        for _ in range(self.tloop):
            for coeff in FOURTH_ORDER_COEFFS:
                p = self._nhc_loop(p, coeff * delta / self.tloop)
        return p

    def _nhc_loop(self, p: np.ndarray, delta: np.ndarray) -> np.ndarray:
        delta2, delta4 = delta / 2, delta / 4
        for j in range(self.tchain):
            self._p_eta_j(p, self.tchain - j - 1, delta2, delta4)
        self.eta = self.eta + delta[:, None] * self.p_eta / self.Q
        p = p * self.layout.expand(np.exp(-delta * self.p_eta[:, 0] / self.Q[:, 0]))[:, None]
        for j in range(self.tchain):
            self._p_eta_j(p, j, delta2, delta4)
        return p

    def _p_eta_j(self, p: np.ndarray, j: int, delta2: np.ndarray, delta4: np.ndarray) -> None:
        last = j == self.tchain - 1
        if not last:
            self.p_eta[:, j] *= np.exp(-delta4 * self.p_eta[:, j + 1] / self.Q[:, j + 1])
        if j == 0:
            g = self.layout.sum((p**2 / self.masses).sum(axis=1)) - 3 * self.n * self.kT
        else:
            g = self.p_eta[:, j - 1] ** 2 / self.Q[:, j - 1] - self.kT
        self.p_eta[:, j] += delta2 * g
        if not last:
            self.p_eta[:, j] *= np.exp(-delta4 * self.p_eta[:, j + 1] / self.Q[:, j + 1])

    # ------------------------------------------------------------------ thermostat on the barostat
    def _nhc_baro(self, p_eps: np.ndarray, delta: np.ndarray) -> np.ndarray:
        for _ in range(self.ploop):
            for coeff in FOURTH_ORDER_COEFFS:
                p_eps = self._nhc_baro_loop(p_eps, coeff * delta / self.ploop)
        return p_eps

    def _nhc_baro_loop(self, p_eps: np.ndarray, delta: np.ndarray) -> np.ndarray:
        delta2, delta4 = delta / 2, delta / 4
        for j in range(self.pchain):
            self._p_xi_j(p_eps, self.pchain - j - 1, delta2, delta4)
        self.xi = self.xi + delta[:, None] * self.p_xi / self.R
        p_eps = p_eps * np.exp(-delta * self.p_xi[:, 0] / self.R[:, 0])
        for j in range(self.pchain):
            self._p_xi_j(p_eps, j, delta2, delta4)
        return p_eps

    def _p_xi_j(self, p_eps: np.ndarray, j: int, delta2: np.ndarray, delta4: np.ndarray) -> None:
        last = j == self.pchain - 1
        if not last:
            self.p_xi[:, j] *= np.exp(-delta4 * self.p_xi[:, j + 1] / self.R[:, j + 1])
        if j == 0:
            g = p_eps**2 / self.W - self.kT
        else:
            g = self.p_xi[:, j - 1] ** 2 / self.R[:, j - 1] - self.kT
        self.p_xi[:, j] += delta2 * g
        if not last:
            self.p_xi[:, j] *= np.exp(-delta4 * self.p_xi[:, j + 1] / self.R[:, j + 1])

    # ------------------------------------------------------------------ particles and cell
    def _pressure(self, stresses: np.ndarray) -> np.ndarray:
        """``-trace(stress + kinetic stress) / 3`` (``Atoms.get_stress(include_ideal_gas=True)``)."""
        kinetic = self.layout.sum(self.momenta**2 / self.masses) / self.volumes()[:, None]
        return -((stresses[:, :3] - kinetic).sum(axis=1)) / 3

    def _p_cell(self, stresses: np.ndarray, delta: np.ndarray) -> None:
        volume = self.volume0 * np.exp(3 * self.eps)
        g = 3 * volume * (self._pressure(stresses) - self.p_ext) + self.layout.sum(
            (self.momenta**2 / self.masses).sum(axis=1)) / self.n
        self.p_eps = self.p_eps + delta * g

    def _p(self, forces: np.ndarray, delta: np.ndarray) -> None:
        x = self.layout.expand((1 + 1 / self.n) * self.p_eps * delta / self.W)[:, None]
        self.momenta = self.momenta * np.exp(-x) + self.layout.expand(delta)[:, None] * forces * exprel(-x)

    def pre_step(self, forces: np.ndarray, stresses: np.ndarray) -> None:
        dt2 = self.dt / 2
        lay = self.layout
        self.p_eps = self._nhc_baro(self.p_eps, dt2)
        self.momenta = self._nhc(self.momenta, dt2)
        self._p_cell(stresses, dt2)
        self._p(forces, dt2)
        x = lay.expand(self.dt * self.p_eps / self.W)[:, None]
        self.positions = self.positions * np.exp(x) + self.momenta * lay.expand(self.dt)[:, None] / self.masses \
            * exprel(x)
        self.eps = self.eps + self.dt * self.p_eps / self.W
        self.cells = self.cell0 * np.exp(self.eps)[:, None, None]

    def post_step(self, forces: np.ndarray, stresses: np.ndarray, running: np.ndarray) -> None:
        before = {k: getattr(self, k).copy() for k in ("momenta", "p_eps", "eta", "p_eta", "xi", "p_xi")}
        dt2 = self.dt / 2
        self._p(forces, dt2)
        self._p_cell(stresses, dt2)
        self.momenta = self._nhc(self.momenta, dt2)
        self.p_eps = self._nhc_baro(self.p_eps, dt2)
        if not running.all():  # structures that just joined were evaluated at their start state: keep it
            rows = self.layout.expand(running)[:, None]
            self.momenta = np.where(rows, self.momenta, before["momenta"])
            self.p_eps = np.where(running, self.p_eps, before["p_eps"])
            for k in ("eta", "p_eta", "xi", "p_xi"):
                setattr(self, k, np.where(running[:, None], getattr(self, k), before[k]))


__all__ = ["BatchedIsotropicMTKNPT", "MTKParams"]
