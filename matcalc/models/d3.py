"""Grimme D3(BJ) dispersion (torch-dftd, PBE parameters), summed onto a model as ``"<model>+d3"``.

This is how MOFSimBench adds dispersion to uMLIPs trained on PBE data. All structures of a request are evaluated
in one torch-dftd call (``TorchDFTD3Calculator.batch_calculate``: neighbour lists per structure, one batched
energy and one backward pass for forces and stresses), not one structure at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
from ase import Atoms

from matcalc.models.base import ASECalculatorPotential, Evaluation

D3_PROPERTIES = ["energy", "forces", "stress"]

D3_CUTOFF_A = 95 * 0.52917721  # torch-dftd default cutoff (95 bohr)


class D3Potential(ASECalculatorPotential):
    """Dispersion-only potential: D3 with Becke-Johnson damping and PBE parameters, batched."""

    family = "d3"
    supports_batching = True
    package = "torch_dftd"

    def __init__(self, name: str = "d3", device: str = "cpu", *, xc: str = "pbe", damping: str = "bj",
                 **kwargs: Any) -> None:
        from torch_dftd.torch_dftd3_calculator import TorchDFTD3Calculator

        factory = partial(TorchDFTD3Calculator, xc=xc, damping=damping, device=device)
        super().__init__(name, factory, device=device, cutoff_A=D3_CUTOFF_A, **kwargs)

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        """One ``batch_calculate`` for the whole list (the same numbers as one ``calculate`` per structure)."""
        if not atoms_list:
            return []
        with self._lock:
            results = self._calc.batch_calculate(list(atoms_list), properties=D3_PROPERTIES)
        out = []
        for atoms, r in zip(atoms_list, results, strict=True):
            stress = np.array(r["stress"], dtype=float) if atoms.pbc.all() and "stress" in r else None
            out.append(Evaluation(float(r["energy"]), np.array(r["forces"], dtype=float).reshape(-1, 3), stress))
        return out
