"""MatterSim (``mattersim``, the ``[mattersim]`` extra): local checkpoints, many structures per forward pass.

The ``mattersim`` wheel ships no weights (its loader downloads them from GitHub); matcalc reads the
checkpoint from a local file only. A MatterSim checkpoint is a ``torch.save`` dict of plain data
(``model_name``, ``model`` state dict, ``model_args``, optimizer/EMA/scheduler state, metrics), so it is
read with ``torch.load(weights_only=True)``: catalogue files and user uploads alike, no code is unpickled.

The model is MatterSim's own ``M3Gnet`` inside its ``Potential``; batched inference is MatterSim's own:
``build_dataloader`` turns all structures into graphs collated into one batch, ``batch_to_dict`` and
``Potential.forward(include_forces, include_stresses)`` run one forward/backward pass, and energies,
forces and stresses are split per graph. MatterSim reports stress in GPa with ASE's sign; it is converted
to eV/Å³ exactly as ``MatterSimCalculator`` does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ase import Atoms

from matcalc.models.base import Evaluation, Potential
from matcalc.models.weights import Family, WeightsEntry
from matcalc.version import install_hint

log = logging.getLogger(__name__)

CPU_MAX_BATCH_ATOMS = 512
"""Largest MatterSim call on a CPU (atoms). Measured on the six MOFs of ../shared/data/mofs (float32, forces and
stress, random weights): 2 MB per atom on MOF-5 for a 4-block, 128-unit M3GNet (1.2M parameters, the 1M
model's size) and 3.6-5.6 MB per atom for 256 units (4.5M parameters, the 5M model's): up to ~3 GB at 512."""
GPU_MAX_BATCH_ATOMS = 4096
"""~23 GB for the 5M model at the same cost per atom; the batching engine refines it from free device memory."""
SOURCE = "https://github.com/microsoft/mattersim, folder pretrained_models/"


def _default_max_batch_atoms(device: str) -> int:
    """Atom budget of one call on ``device`` (see `CPU_MAX_BATCH_ATOMS`)."""
    return CPU_MAX_BATCH_ATOMS if str(device).startswith("cpu") else GPU_MAX_BATCH_ATOMS


def read_checkpoint(path: Path | str) -> dict[str, Any]:
    """The MatterSim checkpoint dict in ``path``, read with ``torch.load(weights_only=True)`` on the CPU.

    Raises:
        FileNotFoundError: no file at ``path`` (matcalc never downloads weights).
        ValueError: the file is not a MatterSim M3GNet checkpoint.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MatterSim checkpoint not found: {path} (matcalc never downloads weights)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not _is_checkpoint(checkpoint):
        raise ValueError(f"{path} is not a MatterSim checkpoint (a dict with 'model' state dict and 'model_args')")
    model_name = str(checkpoint.get("model_name", "m3gnet"))
    if model_name.lower() != "m3gnet":
        raise ValueError(f"{path} holds a MatterSim {model_name!r} model; only 'm3gnet' is supported")
    return dict(checkpoint)


def _is_checkpoint(obj: Any) -> bool:
    """True for a dict holding a ``model`` state dict and ``model_args`` (MatterSim's checkpoint layout)."""
    return isinstance(obj, Mapping) and all(isinstance(obj.get(k), Mapping) for k in ("model", "model_args"))


def _build_model(checkpoint: Mapping[str, Any], device: str, path: Path) -> Any:
    """MatterSim's ``Potential`` around an ``M3Gnet`` built from the checkpoint's args and weights."""
    from mattersim.forcefield.m3gnet.m3gnet import M3Gnet
    from mattersim.forcefield.potential import Potential as MatterSimModel

    model = M3Gnet(device=device, **dict(checkpoint["model_args"])).to(device)
    # MatterSim loads non-strictly (older checkpoints lack some buffers); every parameter must be there.
    result = model.load_state_dict(checkpoint["model"], strict=False)
    parameters = {name for name, _ in model.named_parameters()}
    missing = sorted(set(result.missing_keys) & parameters)
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks parameters of the M3GNet it describes: {missing[:5]}")
    if result.missing_keys or result.unexpected_keys:
        log.warning("%s: missing buffers %s, unexpected keys %s", path, result.missing_keys,
                    result.unexpected_keys)
    model.eval()
    potential = MatterSimModel(model, device=device, model_name="m3gnet")
    potential.eval()
    return potential


class MatterSimPotential(Potential):
    """A MatterSim (M3GNet) checkpoint from a local file, float32, batched through MatterSim's dataloader.

    Energies in eV, forces in eV/Å, stress in eV/Å³ (ASE sign; ``None`` for non-periodic structures).
    """

    family = "mattersim"
    supports_batching = True

    def __init__(self, name: str, path: Path | str, device: str = "cpu", *, max_batch_atoms: int | None = None,
                 **kwargs: Any) -> None:
        from ase.data import chemical_symbols

        path = Path(path)
        checkpoint = read_checkpoint(path)
        self.model = _build_model(checkpoint, device, path)
        args = self.model.model.model_args
        max_z = int(args["max_z"])
        super().__init__(name, device=device, elements=frozenset(chemical_symbols[1:max_z + 1]),
                         cutoff_A=float(args["cutoff"]), dtype="float32",
                         max_batch_atoms=max_batch_atoms or _default_max_batch_atoms(device), **kwargs)
        self.threebody_cutoff_A = float(args["threebody_cutoff"])
        self.path = path
        self.description = str(checkpoint.get("description", ""))
        self._lock = threading.Lock()

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        import torch
        from ase.stress import full_3x3_to_voigt_6_stress
        from ase.units import GPa
        from mattersim.datasets.utils.build import build_dataloader
        from mattersim.forcefield.potential import batch_to_dict

        loader = build_dataloader(list(atoms_list), model_type="m3gnet", cutoff=self.cutoff_A,
                                  threebody_cutoff=self.threebody_cutoff_A, batch_size=len(atoms_list),
                                  only_inference=True)
        graphs = list(loader)
        if len(graphs) != 1 or int(graphs[0].num_graphs) != len(atoms_list):
            raise RuntimeError(f"{self.name}: MatterSim built {len(graphs)} batches for {len(atoms_list)} structures")
        with self._lock, torch.enable_grad():  # one model, one device queue: calls are serialised
            inputs = batch_to_dict(graphs[0], device=self.device)
            result = self.model.forward(inputs, include_forces=True, include_stresses=True)
            energies = result["total_energy"].detach().cpu().numpy().astype(float)
            forces = result["forces"].detach().cpu().numpy().astype(float)
            stresses_GPa = result["stresses"].detach().cpu().numpy().astype(float)
        out = []
        start = 0
        for i, atoms in enumerate(atoms_list):
            n = len(atoms)
            stress = full_3x3_to_voigt_6_stress(stresses_GPa[i]) * GPa if atoms.pbc.all() else None
            out.append(Evaluation(float(energies[i]), forces[start:start + n], stress))
            start += n
        return out


def load(path: Path | None, *, name: str, device: str, max_batch_atoms: int | None = None,
         dtype: str | None = None) -> Potential:
    """The family loader: a MatterSim checkpoint at ``path`` (catalogue file or weights-only upload).

    ``max_batch_atoms`` overrides the atom budget of one call; ``dtype`` may only be ``"float32"``
    (MatterSim builds its graphs in float32).
    """
    if path is None:
        raise FileNotFoundError("MatterSim needs a checkpoint file: the mattersim package ships no weights")
    if dtype not in (None, "float32"):
        raise ValueError(f"MatterSim computes in float32; dtype {dtype!r} is not supported")
    return MatterSimPotential(name, path, device, max_batch_atoms=max_batch_atoms)


def _entry(name: str, size: str, filename: str) -> WeightsEntry:
    return WeightsEntry(
        name=name,
        filename=filename,
        description=f"MatterSim v1.0.0 {size} (Microsoft; M3GNet trained across elements, temperatures and pressures)",
        elements="H-Pu (Z 1-94)",
        cutoff_A=5.0,
        dtype="float32",
        source=f"{SOURCE}{filename}",
    )


FAMILY = Family(
    name="mattersim",
    requires=("mattersim",),
    install_hint=install_hint("mattersim"),
    loader=load,
    catalogue=(
        _entry("mattersim-v1-1m", "1M", "mattersim-v1.0.0-1M.pth"),
        _entry("mattersim-v1-5m", "5M", "mattersim-v1.0.0-5M.pth"),
    ),
    supports_batching=True,
    custom_formats=("weights_only",),
)
