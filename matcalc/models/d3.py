"""Grimme D3(BJ) dispersion (torch-dftd, PBE parameters), summed onto a model as ``"<model>+d3"``.

This is how MOFSimBench adds dispersion to uMLIPs trained on PBE data.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from matcalc.models.base import ASECalculatorPotential

D3_CUTOFF_A = 95 * 0.52917721  # torch-dftd default cutoff (95 bohr)


class D3Potential(ASECalculatorPotential):
    """Dispersion-only potential: D3 with Becke-Johnson damping and PBE parameters."""

    family = "d3"

    def __init__(self, name: str = "d3", device: str = "cpu", *, xc: str = "pbe", damping: str = "bj",
                 **kwargs: Any) -> None:
        from torch_dftd.torch_dftd3_calculator import TorchDFTD3Calculator

        factory = partial(TorchDFTD3Calculator, xc=xc, damping=damping, device=device)
        super().__init__(name, factory, device=device, cutoff_A=D3_CUTOFF_A, **kwargs)
