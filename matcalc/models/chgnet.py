"""CHGNet (pretrained weights ship inside the ``chgnet`` wheel): matcalc's default real model."""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress

from matcalc.models.base import EV_PER_A3_TO_GPA, Evaluation, Potential
from matcalc.quiet import quiet_warnings

log = logging.getLogger(__name__)

CHGNET_ELEMENTS = frozenset(chemical_symbols[1:95])
CHGNET_VERSION = "0.3.0"
CPU_MAX_BATCH_ATOMS = 256
"""Largest CHGNet call on a CPU (atoms): ~3 GB of activations for MOF-like graphs."""
GPU_MAX_BATCH_ATOMS = 4096

CHGNET_NOISE = "Converting a tensor with requires_grad"
"""Start of the torch warning CHGNet's batching raises (its ``BatchedGraph.from_graphs`` makes a tensor of cell
volumes that require grad): harmless, and nothing a user can act on."""


def _quiet() -> contextlib.AbstractContextManager[None]:
    """Silence `CHGNET_NOISE` inside the block only (`quiet_warnings`): around CHGNet's graph batching (host work
    under the GIL), never the model's forward or backward pass."""
    return quiet_warnings(CHGNET_NOISE)


class CHGNetPotential(Potential):
    """CHGNet (float32), batched through ``CHGNet.predict_structure``.

    CHGNet predicts energy per atom and stress in GPa; both are converted to the matcalc
    contract (total energy in eV, stress in eV/Å³).
    """

    family = "chgnet"
    package = "chgnet"
    supports_batching = True

    def __init__(self, name: str = "chgnet", device: str = "cpu", *, model_version: str = CHGNET_VERSION,
                 max_batch_atoms: int | None = None, **kwargs: Any) -> None:
        from chgnet.model import CHGNet

        if max_batch_atoms is None:
            # measured on MOF cells (dense graphs: ~1500 bonds and angles per 22 atoms): ~11 MB per atom with
            # forces and stress; a 2048-atom CPU batch peaked above 22 GB. The GPU budget is refined by the
            # batching engine from free device memory.
            max_batch_atoms = CPU_MAX_BATCH_ATOMS if str(device).startswith("cpu") else GPU_MAX_BATCH_ATOMS

        super().__init__(name, device=device, elements=CHGNET_ELEMENTS, cutoff_A=5.0, dtype="float32",
                         max_batch_atoms=max_batch_atoms, **kwargs)
        with contextlib.redirect_stdout(io.StringIO()) as said:  # CHGNet prints "initialized with N parameters"
            self.model = CHGNet.load(model_name=model_version, use_device=device, verbose=False)
        log.debug("%s", said.getvalue().strip())
        self.model.eval()
        self.version = model_version
        self._lock = threading.Lock()
        self._fast = True
        """One-backward inference (see `_efs_one_backward`); thread-safe, so calls may overlap."""
        self.concurrent_calls = str(device).startswith("cpu")  # on a GPU one queue serves the device

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        from pymatgen.io.ase import AseAtomsAdaptor

        if self._fast:
            try:
                return self._efs_one_backward(atoms_list)
            except (AttributeError, TypeError, KeyError) as exc:  # CHGNet internals changed: use its public API
                log.warning("CHGNet fast path unavailable (%s); using predict_structure", exc)
                self._fast = False
                self.concurrent_calls = False
        structures = [AseAtomsAdaptor.get_structure(a) for a in atoms_list]
        with self._lock, _quiet():  # predict_structure: one call at a time
            preds = self.model.predict_structure(structures, task="efs", batch_size=len(structures))
        if isinstance(preds, dict):
            preds = [preds]
        out = []
        for atoms, p in zip(atoms_list, preds, strict=True):
            energy = float(np.asarray(p["e"]).item()) * len(atoms)
            stress = full_3x3_to_voigt_6_stress(np.asarray(p["s"], dtype=float)) / EV_PER_A3_TO_GPA
            out.append(Evaluation(energy, np.asarray(p["f"], dtype=float), stress))
        return out

    def _energies_batch(self, atoms_list: Sequence[Atoms]) -> list[float]:
        """Energies only: CHGNet's forward pass without gradients (no forces, no stress), the same forward as
        `_efs_one_backward` (same numbers to float32 round-off); for Widom insertions."""
        if not self._fast:
            return super()._energies_batch(atoms_list)
        import torch
        from chgnet.model.model import BatchedGraph

        model = self.model
        try:
            with torch.no_grad():
                graphs = self.graphs(atoms_list)
                bg = BatchedGraph.from_graphs(graphs, bond_basis_expansion=model.bond_basis_expansion,
                                              angle_basis_expansion=model.angle_basis_expansion, compute_stress=False)
                pred = model._compute(bg, compute_force=False, compute_stress=False)
                comp = model.composition_model(graphs) if model.composition_model is not None else 0.0
                total = pred["e"] + comp
                if model.is_intensive:
                    total = total * pred["atoms_per_graph"]
        except (AttributeError, TypeError, KeyError) as exc:  # CHGNet internals changed: use its public API
            log.warning("CHGNet energy-only path unavailable (%s); using energy, forces and stress", exc)
            return super()._energies_batch(atoms_list)
        return [float(x) for x in total.detach().cpu().double().numpy()]

    def graphs(self, atoms_list: Sequence[Atoms]) -> list[Any]:
        """CHGNet's crystal graphs of ``atoms_list``, built vectorised from the arrays
        (`matcalc.models.chgnet_graph.crystal_graph`: the same tensors as CHGNet's converter, ~20x
        faster); CHGNet's own converter for a structure the fast builder declines."""
        from pymatgen.io.ase import AseAtomsAdaptor

        from matcalc.models.chgnet_graph import crystal_graph

        converter = self.model.graph_converter
        out = []
        for atoms in atoms_list:
            graph = crystal_graph(atoms, converter)
            if graph is None:
                graph = converter(AseAtomsAdaptor.get_structure(atoms))
            out.append(graph.to(self.device))
        return out

    def _efs_one_backward(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        """Energy, forces and stress with ONE backward pass and no double-backward graph.

        CHGNet's ``predict_structure`` takes forces and stress in two ``autograd.grad`` calls with
        ``create_graph=True`` (kept for training); at inference that doubles the backward cost. Here the
        same forward (CHGNet's ``BatchedGraph`` and ``_compute``) is followed by one gradient of the total
        energy with respect to all positions and strains: same numbers to float32 round-off (tested
        against ``CHGNetCalculator``), ~1.6x faster on a CPU.
        """
        import torch
        from chgnet.model.model import BatchedGraph

        model = self.model
        graphs = self.graphs(atoms_list)
        with _quiet():
            bg = BatchedGraph.from_graphs(graphs, bond_basis_expansion=model.bond_basis_expansion,
                                          angle_basis_expansion=model.angle_basis_expansion, compute_stress=True)
        pred = model._compute(bg, compute_force=False, compute_stress=False)
        n_atoms = pred["atoms_per_graph"]
        energy = pred["e"] * n_atoms if model.is_intensive else pred["e"]  # eV per structure
        grads = torch.autograd.grad(energy.sum(), [*bg.atom_positions, *bg.strains])
        comp = model.composition_model(graphs) if model.composition_model is not None else 0.0
        total = (pred["e"] + comp).detach()
        if model.is_intensive:
            total = total * n_atoms
        k = len(graphs)
        out = []
        for i in range(k):
            forces = -grads[i].detach().cpu().double().numpy()
            virial = (grads[k + i] / bg.volumes[i]).detach().cpu().double().numpy()
            out.append(Evaluation(float(total[i].item()), forces, full_3x3_to_voigt_6_stress(virial)))
        return out
