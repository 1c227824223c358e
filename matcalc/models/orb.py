"""ORB (``orb-models``): local checkpoint files only, batched through orb's own graph batching.

An ORB checkpoint is a plain ``state_dict`` (orb itself loads it with ``torch.load(weights_only=True)``), so it
does not say which architecture it belongs to: the loader takes ``architecture``, the name of the orb
pretrained function that builds the matching model (``"orb_v3_conservative_inf_omat"``, ``"orb_v2"``, ...;
hyphenated catalogue names such as ``"orb-v3-direct-inf-omat"`` are accepted too). That function also fixes
the graph construction (6 Å radius, 20 or 120 neighbours). matcalc passes it the local file, so orb never
fetches anything.

Conservative orb-v3 models give forces and stress as gradients of the energy (``grad_forces``,
``grad_stress``), as orb's own ``ORBCalculator`` does; direct models (orb-v3 direct, orb-v2) read them from
their force and stress heads.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ase import Atoms
from ase.data import chemical_symbols

from matcalc.models.base import Evaluation, Potential
from matcalc.models.weights import Family, WeightsEntry
from matcalc.version import install_hint

ORB_ELEMENTS = frozenset(chemical_symbols[1:118])
"""Atomic numbers 1-117: orb one-hot encodes Z into 118 classes."""
PRECISIONS = {"float32-high": "float32", "float32-highest": "float32", "float64": "float64"}
CPU_MAX_BATCH_ATOMS = 256
"""Largest ORB call on a CPU (atoms). Measured (full-size orb-v3, random weights, 106-atom MOF, 28 edges per
atom): 3.5 MB per atom conservative, 1.1 MB direct; dense solids reach the 120-neighbour cap, ~4x that."""
GPU_MAX_BATCH_ATOMS = 4096
"""~60 GB at worst (dense, conservative); the batching engine refines it from free device memory."""
_URL = "https://orbitalmaterials-public-models.s3.us-west-1.amazonaws.com/forcefields/"


class ORBPotential(Potential):
    """An orb model evaluated on many structures per call (orb ``AtomGraphs`` batched into one graph).

    Units: orb predicts total energy (eV), forces (eV/Å) and stress (eV/Å³, Voigt, ASE's sign), which is
    the matcalc contract as is.
    """

    family = "orb"
    supports_batching = True

    def __init__(self, name: str, model: Any, *, device: str = "cpu", dtype: str = "float32",
                 max_batch_atoms: int | None = None) -> None:
        import torch

        if max_batch_atoms is None:
            max_batch_atoms = CPU_MAX_BATCH_ATOMS if str(device).startswith("cpu") else GPU_MAX_BATCH_ATOMS
        cutoff = float(model.system_config.radius)
        super().__init__(name, device=device, elements=ORB_ELEMENTS, cutoff_A=cutoff, dtype=dtype,
                         max_batch_atoms=max_batch_atoms)
        self.model = model.eval()
        self.system_config = model.system_config
        self.torch_dtype = torch.float64 if dtype == "float64" else torch.float32
        self.conservative = hasattr(model, "grad_forces_name")
        conditioner = getattr(model.model, "conditioner", None)
        self.needs_charge_spin = conditioner is not None and type(conditioner).__name__ == "ChargeSpinConditioner"
        self._lock = threading.Lock()

    def _keys(self) -> tuple[str, str, str | None]:
        """Names of the energy, force and stress outputs of ``model.predict``."""
        m = self.model
        if self.conservative:
            has_stress = getattr(m, "has_stress", True)  # orb-models 0.5.0 has no flag: always stress
            return m.energy_name, m.grad_forces_name, (m.grad_stress_name if has_stress else None)
        return "energy", "forces", ("stress" if "stress" in m.heads else None)

    def _graph(self, atoms: Atoms) -> Any:
        """orb's own featurisation of one structure (plain copy: no constraints, no stray ``info``)."""
        from orb_models.forcefield.atomic_system import ase_atoms_to_atom_graphs

        clean = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        if self.needs_charge_spin:
            if "charge" not in atoms.info or "spin" not in atoms.info:
                raise ValueError(f"model {self.name!r} needs atoms.info['charge'] and atoms.info['spin']")
            clean.info.update(charge=atoms.info["charge"], spin=atoms.info["spin"])
        return ase_atoms_to_atom_graphs(clean, self.system_config, device=self.device,
                                        output_dtype=self.torch_dtype, graph_construction_dtype=self.torch_dtype)

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        import torch
        from orb_models.forcefield.base import batch_graphs

        e_key, f_key, s_key = self._keys()
        graphs = [self._graph(a) for a in atoms_list]
        with self._lock:  # one model, one device queue: calls are serialised
            batch = batch_graphs(graphs).to(self.device)
            with torch.set_grad_enabled(self.conservative):  # conservative forces are autograd gradients
                out = self.model.predict(batch)
        energies = out[e_key].detach().reshape(-1).double().cpu().numpy()
        forces = torch.split(out[f_key].detach().double().cpu(), [len(a) for a in atoms_list])
        stresses = out[s_key].detach().double().cpu().reshape(len(atoms_list), 6).numpy() if s_key else None
        results = []
        for i, atoms in enumerate(atoms_list):
            stress = stresses[i].copy() if stresses is not None and atoms.pbc.all() else None
            results.append(Evaluation(float(energies[i]), forces[i].numpy().copy(), stress))
        return results


def _builder(architecture: str) -> Any:
    """The orb pretrained function named ``architecture`` (function or hyphenated catalogue name)."""
    from orb_models.forcefield import pretrained

    by_name = {fn.__name__: fn for fn in pretrained.ORB_PRETRAINED_MODELS.values()}
    fn = pretrained.ORB_PRETRAINED_MODELS.get(architecture) or by_name.get(architecture)
    if fn is None or fn.__name__.endswith("v1") or "v1_" in fn.__name__:
        usable = sorted(n for n in by_name if "v1" not in n)
        raise ValueError(f"unknown orb architecture {architecture!r}; one of: {', '.join(usable)}")
    return fn


def load(path: Path | None, *, name: str, device: str = "cpu", architecture: str = "",
         precision: str = "float32-high", max_batch_atoms: int | None = None) -> ORBPotential:
    """Load an orb ``state_dict`` checkpoint from the local file ``path``.

    Args:
        path: the checkpoint (``.ckpt``, a ``state_dict`` saved with ``torch.save``); never a URL.
        name: the model name in matcalc.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
        architecture: the orb pretrained function whose architecture the weights fit, e.g.
            ``"orb_v3_conservative_inf_omat"``, ``"orb_v3_direct_20_omat"``, ``"orb_v2"`` (required).
        precision: ``"float32-high"`` (orb's default), ``"float32-highest"`` or ``"float64"``.
        max_batch_atoms: atoms per model call (default 256 on CPU, 4096 on GPU).

    Raises:
        FileNotFoundError: ``path`` is not an existing file (checked before orb sees it: nothing downloads).
        ValueError: unknown ``architecture`` or ``precision``.
    """
    if path is None or "://" in str(path):
        raise ValueError(f"orb model {name!r} needs a local checkpoint file, got {path!r} (matcalc never downloads)")
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"orb checkpoint not found: {path}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not architecture:
        raise ValueError(f"orb model {name!r}: pass architecture= (the orb pretrained function name, "
                         "e.g. 'orb_v3_conservative_inf_omat'): an orb checkpoint does not record it")
    build = _builder(architecture)
    model = _build_restoring_globals(build, path, device, precision)
    return ORBPotential(name, model, device=device, dtype=PRECISIONS[precision], max_batch_atoms=max_batch_atoms)


def _build_restoring_globals(build: Any, path: Path, device: str, precision: str) -> Any:
    """Run orb's loader (``torch.load(weights_only=True)``, strict ``load_state_dict``, no compile).

    orb's loader sets the process-wide torch default dtype and float32 matmul precision; both are
    restored afterwards so that other models in the same process are unaffected.
    """
    import torch

    dtype, matmul = torch.get_default_dtype(), torch.get_float32_matmul_precision()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(default dtype|precision=float32-high).*")
            return build(weights_path=str(path), device=device, precision=precision, compile=False)
    finally:
        torch.set_default_dtype(dtype)
        torch.set_float32_matmul_precision(matmul)


def _entry(name: str, filename: str, description: str, trained_on: str) -> WeightsEntry:
    sub = "orb-v3/" if name.startswith("orb-v3") else ""
    return WeightsEntry(
        name=name,
        filename=filename,
        description=description,
        elements=f"Z 1-117 embedded; trained on {trained_on}",
        cutoff_A=6.0,
        dtype="float32",
        source=f"download {_URL}{sub}{filename}",
        options={"architecture": name.replace("-", "_")},
    )


FAMILY = Family(
    name="orb",
    requires=("orb_models",),
    install_hint=install_hint("orb"),
    loader=load,
    catalogue=(
        _entry("orb-v3-conservative-inf-omat", "orb-v3-conservative-inf-omat-20250404.ckpt",
               "ORB v3 conservative, all neighbours within 6 Å (OMat24); forces and stress by autograd",
               "OMat24"),
        _entry("orb-v3-conservative-inf-mpa", "orb-v3-conservative-inf-mpa-20250404.ckpt",
               "ORB v3 conservative, all neighbours within 6 Å (MPtrj + Alexandria); autograd forces",
               "MPtrj + Alexandria"),
        _entry("orb-v3-direct-inf-omat", "orb-v3-direct-inf-omat-20250404.ckpt",
               "ORB v3 direct (force and stress heads), all neighbours within 6 Å (OMat24)", "OMat24"),
        _entry("orb-v3-conservative-20-omat", "orb-v3-conservative-20-omat-20250404.ckpt",
               "ORB v3 conservative, 20 nearest neighbours within 6 Å (OMat24); autograd forces", "OMat24"),
        _entry("orb-v2", "orb-v2-20241011.ckpt",
               "ORB v2 direct (force and stress heads), 20 neighbours within 6 Å (MPtrj + Alexandria)",
               "MPtrj + Alexandria"),
    ),
    supports_batching=True,
    custom_formats=("weights_only",),
)
