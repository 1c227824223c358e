"""FAIRChem (the ``[fairchem]`` extra, package ``fairchem-core`` 2.x): UMA and eSEN inference checkpoints.

A checkpoint loads from a local file with fairchem's own ``load_predict_unit`` (never a hub name) in its
``"batch"`` inference mode (mixture-of-linear-experts left unmerged, so any mix of compositions can share one
call). One call turns every structure into an ``AtomicData`` graph for the chosen task head (``"omat"`` for
inorganic materials and MOFs), fuses them with ``atomicdata_list_to_batch`` and runs one
``predict_unit.predict``; energies (eV), forces (eV/Å) and stresses (eV/Å³, ASE sign, as ``FAIRChemCalculator``
reports them) are split per structure.

Two file layouts load:

* fairchem's native inference checkpoint (an ``MLIPInferenceCheckpoint`` pickle, e.g. ``uma-s-1p1.pt``):
  fairchem unpickles it fully, so only the catalogue files in the models dir load this way;
* the same four fields as a plain dict (``model_config``, ``model_state_dict``, ``ema_state_dict``,
  ``tasks_config``), which ``torch.load(weights_only=True)`` reads (the ``"weights_only"`` upload format).
  Untrusted files of either layout are read with ``weights_only=True`` (the checkpoint dataclass is the one
  extra global allowed), their hydra configs are checked against an allow-list (fairchem model, head, task,
  normaliser and loss classes only; no interpolation, no fine-tune or file references), and a fresh native
  checkpoint written from the checked content is what fairchem loads. `export_weights_only` turns a
  trusted native checkpoint into this layout.

eqV2 and the OMat24 eSEN-30M-OAM checkpoints are fairchem-core 1.x files (``OCPCalculator``); fairchem-core 2.x
has no code for them, so their catalogue entries stay unavailable with that reason.
"""

from __future__ import annotations

import logging
import random
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress

from matcalc.models.base import Evaluation, Potential
from matcalc.models.weights import Family, WeightsEntry
from matcalc.version import install_hint

log = logging.getLogger(__name__)

DEFAULT_TASK = "omat"
CPU_MAX_BATCH_ATOMS = 256
GPU_MAX_BATCH_ATOMS = 4096
CHECKPOINT_FIELDS = ("model_config", "model_state_dict", "ema_state_dict", "tasks_config")

_UMA_SOURCE = "Hugging Face facebook/UMA, checkpoints/{} (gated: accept the licence there)"
_OMAT24_SOURCE = "Hugging Face facebook/OMAT24, {}"
_V1_REASON = ("{file} is a fairchem-core 1.x checkpoint ({model}); fairchem-core 2.x, which matcalc's fairchem "
              "adapter uses, cannot load it: run it in an environment with fairchem-core<2 (OCPCalculator)")


class FAIRChemPotential(Potential):
    """A fairchem-core 2.x checkpoint (UMA, eSEN, ...) on one task head, batched through ``predict_unit.predict``.

    ``task`` is the dataset head (``"omat"``, ``"omol"``, ``"oc20"``, ``"odac"``, ``"omc"``); precision is the
    checkpoint's (float32 for the released models).
    """

    family = "fairchem"
    supports_batching = True

    def __init__(self, path: str | Path, name: str = "fairchem", device: str = "cpu", *, task: str = DEFAULT_TASK,
                 inference_settings: str = "batch", max_batch_atoms: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"fairchem checkpoint not found: {path}")
        import torch

        dev = torch.device(device)
        if max_batch_atoms is None:
            max_batch_atoms = CPU_MAX_BATCH_ATOMS if dev.type == "cpu" else GPU_MAX_BATCH_ATOMS
        self.predict_unit = _load_predict_unit(path, dev, inference_settings)
        tasks = self.predict_unit.dataset_to_tasks
        if task not in tasks:
            raise ValueError(f"{path.name} has no task {task!r}; its tasks: {', '.join(sorted(tasks))}")
        properties = {t.property for t in tasks[task]}
        if not {"energy", "forces"} <= properties:
            raise ValueError(f"{path.name}: task {task!r} predicts {sorted(properties)}, not energy and forces")
        backbone = self.predict_unit.model.module.backbone
        n_elements = int(getattr(backbone, "max_num_elements", len(chemical_symbols)))
        dtype = self.predict_unit.inference_settings.base_precision_dtype
        super().__init__(name, device=device, elements=frozenset(chemical_symbols[1:n_elements]),
                         cutoff_A=float(getattr(backbone, "cutoff", 6.0)), dtype=str(dtype).removeprefix("torch."),
                         max_batch_atoms=max_batch_atoms)
        self.task = task
        self.has_stress = "stress" in properties
        self._torch_dtype = dtype
        self._lock = threading.Lock()

    def _graph(self, atoms: Atoms) -> Any:
        """One structure as fairchem's ``AtomicData`` for this task (as ``FAIRChemCalculator`` builds it)."""
        from fairchem.core.datasets.atomic_data import AtomicData

        a = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        a.info = {k: atoms.info[k] for k in ("charge", "spin") if k in atoms.info}
        self.predict_unit.validate_atoms_data(a, self.task)  # default charge and spin, as the calculator does
        return AtomicData.from_ase(a, task_name=self.task, r_edges=False, r_data_keys=["spin", "charge"],
                                   target_dtype=self._torch_dtype)

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        # fairchem answers a lone isolated atom from reference tables (which a checkpoint file does not hold),
        # and only when it is alone in its batch
        lone = [i for i, a in enumerate(atoms_list) if len(a) == 1 and not a.pbc.any()]
        if lone and not self.predict_unit.atom_refs:
            raise ValueError(f"{self.name}: fairchem cannot evaluate an isolated single atom (structure {lone[0]}) "
                             "without isolated-atom reference energies, which the checkpoint does not hold")
        rest = [i for i in range(len(atoms_list)) if i not in lone]
        out: dict[int, Evaluation] = {}
        for group in [[i] for i in lone] + ([rest] if rest else []):
            for i, ev in zip(group, self._predict([atoms_list[i] for i in group]), strict=True):
                out[i] = ev
        return [out[i] for i in range(len(atoms_list))]

    def _predict(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        """One ``predict_unit.predict`` over the fused graph of ``atoms_list``."""
        from fairchem.core.datasets.atomic_data import atomicdata_list_to_batch

        batch = atomicdata_list_to_batch([self._graph(a) for a in atoms_list])
        with self._lock:  # one predict unit, one device queue
            pred = self.predict_unit.predict(batch)
        energy = pred["energy"].detach().double().cpu().numpy().reshape(-1)
        forces = pred["forces"].detach().double().cpu().numpy().reshape(-1, 3)
        stress = pred["stress"].detach().double().cpu().numpy().reshape(-1, 3, 3) if "stress" in pred else None
        offsets = np.cumsum([0] + [len(a) for a in atoms_list])
        out = []
        for i, atoms in enumerate(atoms_list):
            s = full_3x3_to_voigt_6_stress(stress[i]) if stress is not None and atoms.pbc.all() else None
            out.append(Evaluation(float(energy[i]), forces[offsets[i]:offsets[i + 1]].copy(), s))
        return out


@contextmanager
def _preserved_rng() -> Iterator[None]:
    """Restore the global Python, NumPy and torch random states (fairchem's predict unit reseeds them)."""
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _load_predict_unit(path: Path, device: Any, inference_settings: str) -> Any:
    """fairchem's ``load_predict_unit`` on a local file, on ``device`` (``cuda:N`` selects GPU N)."""
    import torch
    from fairchem.core.units.mlip_unit import load_predict_unit

    gpu = torch.cuda.device(device.index) if device.type == "cuda" and device.index is not None else None
    with _preserved_rng():
        if gpu is None:
            return load_predict_unit(str(path), inference_settings=inference_settings, device=device.type)
        with gpu:
            return load_predict_unit(str(path), inference_settings=inference_settings, device=device.type)


# ---------------------------------------------------------------- untrusted files: weights-only + config checks

class UnsafeCheckpointError(ValueError):
    """A fairchem checkpoint whose content is not plain weights and an allow-listed model configuration."""


_ALLOWED_TARGETS = frozenset({
    "fairchem.core.models.base.HydraModel",
    "fairchem.core.units.mlip_unit.mlip_unit.Task",
    "fairchem.core.units.mlip_unit.mlip_unit.OutputSpec",
    "fairchem.core.modules.normalization.normalizer.Normalizer",
    "fairchem.core.modules.normalization.element_references.ElementReferences",
    "torch.tensor",
})
"""Hydra ``_target_`` values a checked config may instantiate (plus the loss classes of fairchem.core.modules.loss)."""
_REGISTRY_KEYS = ("model", "module", "head_cls")
"""Config keys that fairchem resolves through its model registry (backbone, head wrapper, head class)."""
_FORBIDDEN_KEYS = frozenset({"finetune_config", "file", "checkpoint", "starting_checkpoint"})
"""Keys that make fairchem read another file (a fine-tune start or a normaliser file)."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The four checkpoint fields of a native or dict-layout file, read with ``torch.load(weights_only=True)``."""
    import pickle

    import torch
    from fairchem.core.units.mlip_unit.api.inference import MLIPInferenceCheckpoint

    try:
        with torch.serialization.safe_globals([MLIPInferenceCheckpoint]):
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{Path(path).name}: not a weights-only fairchem checkpoint: "
                                    f"{str(exc).splitlines()[-1]}") from exc
    fields = vars(raw) if isinstance(raw, MLIPInferenceCheckpoint) else raw
    if not isinstance(fields, dict) or any(k not in fields for k in CHECKPOINT_FIELDS):
        raise UnsafeCheckpointError(f"{Path(path).name}: a fairchem checkpoint holds {', '.join(CHECKPOINT_FIELDS)}")
    return {k: fields[k] for k in CHECKPOINT_FIELDS}


def _walk(node: Any, where: str = "config") -> Iterator[tuple[str, str | None, Any]]:
    """``(where, key, value)`` of every mapping entry and ``(where, None, text)`` of every string, depth first."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield where, str(k), v
            yield from _walk(v, f"{where}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _walk(v, f"{where}[{i}]")
    elif isinstance(node, str):
        yield where, None, node


def _resolves_to_fairchem_module(name: str) -> bool:
    """True when fairchem's registry maps ``name`` to a ``torch.nn.Module`` class defined in fairchem.core.models."""
    import torch
    from fairchem.core.common.registry import registry

    try:
        cls = registry.get_model_class(name)
    except Exception:  # noqa: BLE001 - any failure to resolve means "not allowed"
        return False
    return (isinstance(cls, type) and issubclass(cls, torch.nn.Module)
            and cls.__module__.startswith("fairchem.core.models."))


def check_config(fields: dict[str, Any]) -> None:
    """Raise `UnsafeCheckpointError` unless the hydra configs only build allow-listed fairchem classes."""
    for where, key, value in _walk({"model_config": fields["model_config"], "tasks_config": fields["tasks_config"]}):
        if key is None:  # a string value
            if "${" in value:
                raise UnsafeCheckpointError(f"config interpolation at {where}: {value!r}")
            continue
        if key in _FORBIDDEN_KEYS:
            raise UnsafeCheckpointError(f"{where}.{key} would make fairchem read another file")
        if key == "_target_":
            ok = isinstance(value, str) and (value in _ALLOWED_TARGETS
                                             or value.startswith("fairchem.core.modules.loss."))
            if not ok:
                raise UnsafeCheckpointError(f"{where}._target_ {value!r} is not an allowed fairchem class")
        elif key in _REGISTRY_KEYS and isinstance(value, str) and not _resolves_to_fairchem_module(value):
            raise UnsafeCheckpointError(f"{where}.{key} {value!r} is not a fairchem model class")



def _checked_copy(path: Path, folder: Path) -> Path:
    """A native checkpoint written from the weights-only, config-checked content of ``path``."""
    import torch
    from fairchem.core.units.mlip_unit.api.inference import MLIPInferenceCheckpoint

    fields = read_checkpoint(path)
    check_config(fields)
    if not isinstance(fields["model_config"], dict):
        raise UnsafeCheckpointError(f"{path.name}: model_config must be a mapping")
    out = folder / "checked.pt"
    torch.save(MLIPInferenceCheckpoint(**fields), out)
    return out


def export_weights_only(native: str | Path, out: str | Path) -> Path:
    """Write a TRUSTED native fairchem checkpoint as the weights-only dict layout (the upload format).

    The native file is fully unpickled (run this only on files from a source you trust, e.g. the UMA release);
    its configs are turned into plain containers so that ``torch.load(out, weights_only=True)`` reads the result.
    """
    import torch
    from omegaconf import OmegaConf

    checkpoint = torch.load(str(native), map_location="cpu", weights_only=False)
    fields = {k: getattr(checkpoint, k) for k in CHECKPOINT_FIELDS}
    for key in ("model_config", "tasks_config"):
        if OmegaConf.is_config(fields[key]):
            fields[key] = OmegaConf.to_container(fields[key], resolve=True)
    torch.save(fields, str(out))
    return Path(out)


# ---------------------------------------------------------------- family loader and catalogue

def _is_catalogue_file(path: Path) -> bool:
    """True when ``path`` is the weights file of a (loadable) catalogue entry, i.e. one the operator placed."""
    files = [e.path() for e in CATALOGUE if not isinstance(e, LegacyEntry)]
    return any(f is not None and f.is_file() and f.resolve() == path.resolve() for f in files)


def load(path: Path | None, *, name: str, device: str, task: str = DEFAULT_TASK, legacy: str | None = None,
         **options: Any) -> Potential:
    """The fairchem family loader: the checkpoint at ``path`` on its ``task`` head.

    A catalogue file (in the models dir, placed by the operator) goes straight to fairchem's loader; any other
    file is read weights-only and config-checked first (see the module docstring). ``legacy`` marks a
    fairchem-core 1.x checkpoint, which this adapter cannot load. ``options``: ``inference_settings``,
    ``max_batch_atoms`` (see `FAIRChemPotential`).
    """
    if path is None:
        raise FileNotFoundError(f"{name}: fairchem ships no weights; a local checkpoint file is needed")
    path = Path(path)
    if legacy:
        raise ImportError(_V1_REASON.format(file=path.name, model=legacy))
    if not path.is_file():
        raise FileNotFoundError(f"fairchem checkpoint not found: {path}")
    if _is_catalogue_file(path):
        return FAIRChemPotential(path, name, device, task=task, **options)
    with tempfile.TemporaryDirectory(prefix="matcalc-fairchem-") as tmp:
        return FAIRChemPotential(_checked_copy(path, Path(tmp)), name, device, task=task, **options)


@dataclass(frozen=True)
class LegacyEntry(WeightsEntry):
    """A fairchem-core 1.x checkpoint: listed with its file and source, always unavailable here (with why)."""

    def missing_reason(self) -> str | None:
        return _V1_REASON.format(file=self.filename, model=self.options.get("legacy", "fairchem v1")) + (
            f"; source: {self.source}" if self.source else "")


def _uma(name: str, size: str, description: str) -> WeightsEntry:
    filename = f"{name}.pt"
    return WeightsEntry(name, filename, description=f"{description} ({size}), task head omat (fairchem-core 2.x)",
                        elements="H-Es (Z 1-99)", cutoff_A=6.0, dtype="float32",
                        source=_UMA_SOURCE.format(filename), options={"task": DEFAULT_TASK})


CATALOGUE = (
    _uma("uma-s-1p1", "small, 6.6M active parameters", "UMA 1.1 universal model for atoms"),
    _uma("uma-m-1p1", "medium, 50M active parameters", "UMA 1.1 universal model for atoms"),
    LegacyEntry("esen-30m-oam", "esen_30m_oam.pt",
                description="eSEN-30M-OAM (OMat24 + MPtrj + sAlex), conservative forces; fairchem-core 1.x file",
                elements="H-Es (Z 1-99)", cutoff_A=6.0, dtype="float32",
                source=_OMAT24_SOURCE.format("esen_30m_oam.pt"), options={"legacy": "eSEN"}),
    LegacyEntry("eqv2-m-oam", "eqV2_86M_omat_mp_salex.pt",
                description="EquiformerV2-86M-OAM (OMat24 + MPtrj + sAlex), direct forces; fairchem-core 1.x file",
                elements="H-Es (Z 1-99)", cutoff_A=6.0, dtype="float32",
                source=_OMAT24_SOURCE.format("eqV2_86M_omat_mp_salex.pt"),
                options={"legacy": "EquiformerV2"}),
)

FAMILY = Family(
    name="fairchem",
    requires=("fairchem",),  # find_spec of a dotted name raises when the parent is absent; load() imports .core
    install_hint=install_hint("fairchem"),
    loader=load,
    catalogue=CATALOGUE,
    supports_batching=True,
    custom_formats=("weights_only",),
)
