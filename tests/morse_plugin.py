"""A model plugin for the tests (``MATCALC_PLUGINS=morse_plugin``, with tests/ on PYTHONPATH).

Registers ``plugin-morse``: ASE's Morse pair potential (copper-like parameters), an instant model that the
tests compare with ``ase.calculators.morse.MorsePotential`` called directly.
"""

from __future__ import annotations

from functools import partial

from matcalc import register_model
from matcalc.models import ASECalculatorPotential

NAME = "plugin-morse"
MORSE = {"epsilon": 0.3429, "r0": 2.866, "rho0": 1.3588 * 2.866, "rcut1": 5.0, "rcut2": 6.0}
"""Morse parameters (eV, Å): D, r0, rho0 = alpha·r0 of Cu (Girifalco & Weizer), smooth cut-off 5-6 Å."""


def calculator():
    from ase.calculators.morse import MorsePotential

    return MorsePotential(**MORSE)


def _factory(name: str, device: str) -> ASECalculatorPotential:
    return ASECalculatorPotential(name, partial(calculator), device="cpu", elements=None, cutoff_A=MORSE["rcut2"])


register_model(NAME, _factory, family="plugin", description="Morse pair potential (test plugin)", cutoff_A=6.0,
               overwrite=True)
