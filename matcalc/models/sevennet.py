"""SevenNet-0 (weights ship inside the ``sevenn`` wheel; the ``[sevennet]`` extra)."""

from __future__ import annotations

from functools import partial
from typing import Any

from matcalc.models.base import ASECalculatorPotential


class SevenNetPotential(ASECalculatorPotential):
    """SevenNet through its own ASE calculator (one structure per call)."""

    family = "sevennet"

    def __init__(self, name: str = "sevennet", device: str = "cpu", *, checkpoint: str = "7net-0",
                 modal: str | None = None, **kwargs: Any) -> None:
        from sevenn.calculator import SevenNetCalculator

        factory = partial(SevenNetCalculator, checkpoint, device=device, modal=modal)
        super().__init__(name, factory, device=device, cutoff_A=5.0, dtype="float32", **kwargs)
        self.elements = _sevennet_elements(self._calc)


def _sevennet_elements(calc: Any) -> frozenset[str] | None:
    from ase.data import chemical_symbols

    type_map = getattr(calc, "type_map", None)
    if not type_map:
        return None
    return frozenset(chemical_symbols[int(z)] for z in type_map)
