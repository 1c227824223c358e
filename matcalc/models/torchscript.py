"""Any energy model exported as TorchScript: the family of user models that follow matcalc's contract.

The module's ``forward(positions, numbers, cell, pbc)`` takes positions (N, 3) in Å (float64), atomic numbers (N,)
int64, the cell (3, 3) in Å (rows are lattice vectors) and pbc (3,) bool, and returns the total energy in eV
(a scalar tensor). The model handles periodic images itself. Forces (eV/Å) are -dE/dpositions and the stress
(eV/Å³, ASE sign) is (1/V) dE/dstrain, both by autograd, so they are conservative by construction.
TorchScript archives hold TorchScript code and tensors only: loading one never runs Python code.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.stress import full_3x3_to_voigt_6_stress

from matcalc.models.base import Evaluation, Potential
from matcalc.models.weights import Family


class TorchScriptPotential(Potential):
    """A TorchScript energy module (see the module docstring for its contract), one structure per call."""

    family = "torchscript"
    package = "torch"
    supports_batching = False

    def __init__(self, path: str | Path, name: str = "torchscript", device: str = "cpu", *,
                 dtype: str = "float64", elements: Sequence[str] | None = None,
                 cutoff_A: float | None = None) -> None:
        import torch

        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        super().__init__(name, device=device, elements=frozenset(elements) if elements else None,
                         cutoff_A=cutoff_A, dtype=dtype)
        self.weights_path = Path(path)
        self.module = torch.jit.load(str(path), map_location=device)
        self.module.eval()
        self._torch_dtype = torch.float64 if dtype == "float64" else torch.float32
        self._lock = threading.Lock()

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        with self._lock:
            return [self._one(a) for a in atoms_list]

    def _one(self, atoms: Atoms) -> Evaluation:
        import torch

        kw: dict[str, Any] = {"dtype": self._torch_dtype, "device": self.device}
        pos = torch.tensor(atoms.positions, **kw)
        cell = torch.tensor(np.asarray(atoms.cell), **kw)
        numbers = torch.tensor(atoms.numbers, dtype=torch.int64, device=self.device)
        pbc = torch.tensor(atoms.pbc, dtype=torch.bool, device=self.device)
        periodic = bool(atoms.pbc.all())
        strain = torch.zeros((3, 3), requires_grad=True, **kw)
        pos.requires_grad_(True)
        deform = torch.eye(3, **kw) + strain
        energy = self.module(pos @ deform, numbers, cell @ deform, pbc)
        if energy.numel() != 1:
            raise RuntimeError(f"{self.name}: forward() must return one energy, got shape {tuple(energy.shape)}")
        d_pos, d_strain = torch.autograd.grad(energy.sum(), [pos, strain], allow_unused=True)
        forces = -d_pos.detach().cpu().double().numpy() if d_pos is not None else np.zeros((len(atoms), 3))
        stress = None
        if periodic:
            g = d_strain.detach().cpu().double().numpy() if d_strain is not None else np.zeros((3, 3))
            stress = full_3x3_to_voigt_6_stress(0.5 * (g + g.T) / atoms.get_volume())
        return Evaluation(float(energy.detach().cpu().double().item()), forces, stress)


def load(path: Path | None, *, name: str, device: str, **options: Any) -> Potential:
    """Load a TorchScript energy module from ``path`` (options: dtype, elements, cutoff_A)."""
    if path is None:
        raise FileNotFoundError("a TorchScript model needs a file")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such TorchScript file: {path}")
    return TorchScriptPotential(path, name=name, device=device, **options)


FAMILY = Family(
    name="torchscript",
    requires=("torch",),
    install_hint="pip install torch",
    loader=load,
    catalogue=(),
    supports_batching=False,
    custom_formats=("torchscript",),
)
