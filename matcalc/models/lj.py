"""ASE's Lennard-Jones potential with argon parameters: instant, any element, physics only for Ar."""

from __future__ import annotations

from functools import partial
from typing import Any

from matcalc.models.base import ASECalculatorPotential

ARGON_SIGMA_A = 3.405
ARGON_EPSILON_EV = 0.0103
LJ_CUTOFF_A = 3.0 * ARGON_SIGMA_A


class LJPotential(ASECalculatorPotential):
    """Lennard-Jones (sigma 3.405 Å, epsilon 0.0103 eV, cutoff 10.2 Å, smooth) for every element."""

    family = "lj"
    package = "ase"

    def __init__(self, name: str = "lj", device: str = "cpu", **kwargs: Any) -> None:
        from ase.calculators.lj import LennardJones

        factory = partial(
            LennardJones, sigma=ARGON_SIGMA_A, epsilon=ARGON_EPSILON_EV, rc=LJ_CUTOFF_A, smooth=True
        )
        super().__init__(name, factory, device="cpu", elements=None, cutoff_A=LJ_CUTOFF_A, **kwargs)
