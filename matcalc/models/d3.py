"""Grimme D3(BJ) dispersion (torch-dftd, PBE parameters), summed onto a model as ``"<model>+d3"``.

This is how MOFSimBench adds dispersion to uMLIPs trained on PBE data, with its arguments:
``TorchDFTD3Calculator(xc="pbe", damping="bj", cutoff=40 Bohr, cnthr=40 Bohr, abc=False)`` (float32)
(torch-dftd's own default pair cutoff is 95 Bohr). All structures of a request are evaluated
in one torch-dftd call (``TorchDFTD3Calculator.batch_calculate``: neighbour lists per structure, one batched
energy and one backward pass for forces and stresses), not one structure at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
from ase import Atoms
from ase.units import Bohr

from matcalc.models.base import ASECalculatorPotential, Evaluation
from matcalc.quiet import quiet_warnings

D3_PROPERTIES = ["energy", "forces", "stress"]

D3_CUTOFF_A = 40.0 * Bohr
"""Pair cutoff of the dispersion sum (Å): 40 Bohr ≈ 21.17 Å, MOFSimBench's ``dispersion_cutoff``."""
D3_CN_CUTOFF_A = 40.0 * Bohr
"""Cutoff of the coordination numbers (Å): 40 Bohr (torch-dftd's default, as MOFSimBench leaves it)."""
D3_NOISE = "Creating a tensor from a list of numpy.ndarrays is extremely slow"
"""torch's warning about how torch-dftd builds its input tensors: nothing a user can act on."""


class D3Potential(ASECalculatorPotential):
    """Dispersion-only potential: D3 with Becke-Johnson damping and PBE parameters, batched."""

    family = "d3"
    supports_batching = True
    package = "torch_dftd"

    def __init__(self, name: str = "d3", device: str = "cpu", *, xc: str = "pbe", damping: str = "bj",
                 cutoff_A: float = D3_CUTOFF_A, cn_cutoff_A: float = D3_CN_CUTOFF_A, three_body: bool = False,
                 **kwargs: Any) -> None:
        from torch_dftd.torch_dftd3_calculator import TorchDFTD3Calculator

        factory = partial(TorchDFTD3Calculator, xc=xc, damping=damping, device=device, cutoff=cutoff_A,
                          cnthr=cn_cutoff_A, abc=three_body)
        super().__init__(name, factory, device=device, cutoff_A=cutoff_A, **kwargs)

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        """One ``batch_calculate`` for the whole list (the same numbers as one ``calculate`` per structure)."""
        if not atoms_list:
            return []
        with self._lock, quiet_warnings(D3_NOISE):
            results = self._calc.batch_calculate(list(atoms_list), properties=D3_PROPERTIES)
        out = []
        for atoms, r in zip(atoms_list, results, strict=True):
            stress = np.array(r["stress"], dtype=float) if atoms.pbc.all() and "stress" in r else None
            out.append(Evaluation(float(r["energy"]), np.array(r["forces"], dtype=float).reshape(-1, 3), stress))
        return out
