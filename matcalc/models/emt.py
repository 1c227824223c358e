"""ASE's Effective Medium Theory: an instant classical potential for tests and demos."""

from __future__ import annotations

from typing import Any

from matcalc.models.base import ASECalculatorPotential

EMT_ELEMENTS = frozenset({"Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt", "H", "C", "N", "O"})


class EMTPotential(ASECalculatorPotential):
    """ASE EMT (fcc metals Al, Cu, Ag, Au, Ni, Pd, Pt; H, C, N, O only as a toy)."""

    family = "emt"
    package = "ase"

    def __init__(self, name: str = "emt", device: str = "cpu", **kwargs: Any) -> None:
        from ase.calculators.emt import EMT

        super().__init__(name, EMT, device="cpu", elements=EMT_ELEMENTS, cutoff_A=None, **kwargs)
