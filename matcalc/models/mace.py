"""MACE (``mace-torch``, the ``[mace]`` extra): local ``.model`` files, many structures per forward pass.

Catalogue files are MACE's own ``.model`` files (a full pickle of the ``torch.nn.Module``, as MACE's training
and its foundation-model releases write them); a user upload must be TorchScript (what ``mace_run_train``
writes as ``*_compiled.model``, i.e. ``e3nn.util.jit.compile`` of the model). Nothing here downloads.

Batched inference is MACE's own: one ``mace.data.AtomicData`` graph per structure (MACE's neighbour list),
collated by ``mace.tools.torch_geometric.Batch`` into one graph, one forward pass with ``compute_stress``,
then energies, forces and stresses are split per graph.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ase import Atoms

from matcalc.models.base import Evaluation, Potential
from matcalc.models.weights import Family, WeightsEntry
from matcalc.version import install_hint

CPU_MAX_BATCH_ATOMS = 512
"""Largest MACE call on a CPU (atoms). Measured: a model of MACE-MP medium's size (128x0e+128x1o, L=3,
r_max 6 Å, float64) needs ~5 MB per atom of MOF-5 with forces and stress (~2.5 GB at 512 atoms)."""
GPU_MAX_BATCH_ATOMS = 4096
"""~20 GB at the same ~5 MB per atom; the batching engine refines the budget from free device memory."""
_DTYPES = ("float32", "float64")
_NO_WEIGHTS_ONLY_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def _import_mace() -> tuple[Any, Any, Any]:
    """``(mace.data, mace.tools.torch_geometric, mace.tools.utils)``.

    ``import mace`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for the whole process (e3nn 0.4.4 reads its
    constants with a bare ``torch.load`` at import), which would turn every later ``torch.load(path)`` without
    an explicit ``weights_only`` into a full unpickle; mace and e3nn are imported here with the variable set,
    and then it is put back as it was.
    """
    before = os.environ.get(_NO_WEIGHTS_ONLY_ENV)
    try:
        os.environ[_NO_WEIGHTS_ONLY_ENV] = "1"
        import e3nn.o3  # noqa: F401  (its import-time torch.load needs the variable)
        import mace.modules  # noqa: F401  (the classes a pickled .model refers to)
        from mace import data
        from mace.tools import torch_geometric, utils
    finally:
        if before is None:
            os.environ.pop(_NO_WEIGHTS_ONLY_ENV, None)
        else:
            os.environ[_NO_WEIGHTS_ONLY_ENV] = before
    return data, torch_geometric, utils


@contextlib.contextmanager
def _default_dtype(dtype: Any) -> Iterator[None]:
    """Torch's default dtype set to ``dtype`` inside the block (MACE builds its graph tensors in it)."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def is_torchscript(path: Path) -> bool:
    """True when ``path`` is a TorchScript archive (``torch.jit.save``), not a pickled module."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _read_module(path: Path, device: str, allow_pickle: bool) -> Any:
    """The MACE ``torch.nn.Module`` in ``path``: TorchScript, or (``allow_pickle``) a full ``.model`` pickle."""
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"MACE model file not found: {path} (matcalc never downloads weights)")
    if is_torchscript(path):
        return torch.jit.load(str(path), map_location=device)
    if not allow_pickle:
        raise ValueError(f"{path} is not a TorchScript MACE model; a pickled .model file runs code when it is "
                         "loaded, so only catalogue files (or allow_pickle=True for a file you trust) are unpickled")
    _import_mace()  # the pickle refers to mace's classes
    return torch.load(path, map_location=device, weights_only=False)


def _forward_arguments(model: Any) -> set[str]:
    if hasattr(model.forward, "schema"):  # TorchScript
        return {a.name for a in model.forward.schema.arguments}
    return set(inspect.signature(model.forward).parameters)


def _check_energy_model(model: Any, path: Path) -> None:
    missing = [a for a in ("atomic_numbers", "r_max") if not hasattr(model, a)]
    if missing or "compute_stress" not in _forward_arguments(model):
        kind = getattr(model, "original_name", type(model).__name__)
        raise ValueError(f"{path} holds a {kind}, not a MACE energy model (forward(data, compute_stress=...) "
                         "with atomic_numbers and r_max); LAMMPS exports are not supported")


def _select_head(heads: list[str], head: str | None) -> str:
    """The model head to evaluate (MACE's rule: the one given, the only one, or the one called 'default')."""
    if head is not None:
        if head not in heads:
            raise ValueError(f"head {head!r} not in the model's heads {heads}")
        return head
    if len(heads) == 1:
        return heads[0]
    default = [h for h in heads if h.lower() == "default"]
    if not default:
        raise ValueError(f"the model has heads {heads} and none is 'default': pass head=...")
    return default[0]


class MACEPotential(Potential):
    """A MACE model from a local file, batched through MACE's own graph collation.

    Energies in eV, forces in eV/Å, stress in eV/Å³ (MACE's units and ASE's sign already).
    ``dtype`` ``None`` keeps the precision the file was saved in (the foundation models: float64);
    ``"float32"`` or ``"float64"`` converts the model.
    """

    family = "mace"
    supports_batching = True

    def __init__(self, name: str, path: Path | str, device: str = "cpu", *, dtype: str | None = None,
                 head: str | None = None, allow_pickle: bool = False, max_batch_atoms: int | None = None,
                 elements: Sequence[str] | None = None, cutoff_A: float | None = None, **kwargs: Any) -> None:
        import torch
        from ase.data import chemical_symbols

        path = Path(path)
        model = _read_module(path, device, allow_pickle)
        _check_energy_model(model, path)
        stored = str(next(model.parameters()).dtype).removeprefix("torch.")
        dtype = dtype or stored
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        if dtype != stored:
            model = model.double() if dtype == "float64" else model.float()
        model = model.to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)

        if max_batch_atoms is None:
            max_batch_atoms = CPU_MAX_BATCH_ATOMS if str(device).startswith("cpu") else GPU_MAX_BATCH_ATOMS
        zs = [int(z) for z in model.atomic_numbers]
        known = frozenset(chemical_symbols[z] for z in zs)
        r_max = float(model.r_max)
        if cutoff_A is not None and abs(cutoff_A - r_max) > 1e-6:
            raise ValueError(f"cutoff_A={cutoff_A} given, but the model's r_max is {r_max} Å")
        if elements is not None and not set(elements) <= known:
            raise ValueError(f"elements {sorted(set(elements) - known)} are not in the model's table {sorted(known)}")
        super().__init__(name, device=device, elements=frozenset(elements) if elements is not None else known,
                         cutoff_A=r_max, dtype=dtype, max_batch_atoms=max_batch_atoms, **kwargs)
        self.model = model
        self.path = path
        self.heads = list(getattr(model, "heads", None) or ["Default"])
        self.head = _select_head(self.heads, head)
        self._torch_dtype = torch.float64 if dtype == "float64" else torch.float32
        self._data, self._geometric, utils = _import_mace()
        self._z_table = utils.AtomicNumberTable(zs)
        # the keys MACE's own calculator reads (charge/spin/field, used only by models that embed them)
        self._keyspec = self._data.KeySpecification(
            info_keys={"total_spin": "spin", "total_charge": "charge", "external_field": "external_field"},
            arrays_keys={"Qs": "charges"})
        self._lock = threading.Lock()

    def _graph(self, atoms: Atoms) -> Any:
        """MACE's graph of one structure (neighbour list within r_max); tensors in the default dtype."""
        config = self._data.config_from_atoms(atoms, key_specification=self._keyspec, head_name=self.head)
        return self._data.AtomicData.from_config(config, z_table=self._z_table, cutoff=self.cutoff_A,
                                                 heads=self.heads)

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        from ase.stress import full_3x3_to_voigt_6_stress

        for atoms in atoms_list:
            self.check_elements(atoms)
        periodic = [bool(a.pbc.all()) for a in atoms_list]
        with self._lock:
            # torch's default dtype is process-wide: it is changed only while MACE builds the graphs
            with _default_dtype(self._torch_dtype):
                graphs = [self._graph(a) for a in atoms_list]
                batch = self._geometric.Batch.from_data_list(graphs).to(self.device)
            out = self.model(batch.to_dict(), compute_stress=any(periodic), training=False)
        if out.get("energy") is None or out.get("forces") is None:
            raise RuntimeError(f"{self.name}: the MACE model returned no energy or forces")
        ptr = batch["ptr"].tolist()
        energy = out["energy"].detach().cpu().double().numpy()
        forces = out["forces"].detach().cpu().double().numpy()
        stress = out["stress"].detach().cpu().double().numpy() if any(periodic) else None
        results = []
        for i, pbc in enumerate(periodic):
            s = full_3x3_to_voigt_6_stress(stress[i]) if pbc and stress is not None else None
            results.append(Evaluation(float(energy[i]), forces[ptr[i]:ptr[i + 1]].copy(), s))
        return results


def load(path: Path | None, *, name: str = "mace", device: str = "cpu", **options: Any) -> MACEPotential:
    """The family loader: a MACE model from ``path`` (TorchScript; a ``.model`` pickle with ``allow_pickle``).

    Options: ``dtype`` (``None`` = as saved, ``"float32"``, ``"float64"``), ``head`` (multi-head models),
    ``allow_pickle``, ``max_batch_atoms``; ``elements`` (restricts the model's element table) and ``cutoff_A``
    (must equal the model's r_max) are checked against what the file declares.
    """
    if path is None:
        raise ValueError("MACE models load from a file: no weights ship inside mace-torch")
    return MACEPotential(name, path, device=device, **options)


_RELEASES = "https://github.com/ACEsuit"
_CACHE_HINT = "; a copy fetched earlier by mace's mace_mp() lies in ~/.cache/mace/"


def _entry(name: str, filename: str, url: str, description: str, elements: str = "89 elements (H-Pu)") -> WeightsEntry:
    return WeightsEntry(name=name, filename=filename, description=description, elements=elements, cutoff_A=6.0,
                        dtype="float64", source=f"download {url}{_CACHE_HINT}", options={"allow_pickle": True})


CATALOGUE = (
    _entry("mace-mp-0-medium", "2023-12-03-mace-128-L1_epoch-199.model",
           f"{_RELEASES}/mace-mp/releases/download/mace_mp_0/2023-12-03-mace-128-L1_epoch-199.model",
           "MACE-MP-0 medium (MPtrj, PBE+U), MIT licence"),
    _entry("mace-mp-0b3-medium", "mace-mp-0b3-medium.model",
           f"{_RELEASES}/mace-mp/releases/download/mace_mp_0b3/mace-mp-0b3-medium.model",
           "MACE-MP-0b3 medium (MPtrj, PBE+U), MIT licence"),
    _entry("mace-mpa-0-medium", "mace-mpa-0-medium.model",
           f"{_RELEASES}/mace-mp/releases/download/mace_mpa_0/mace-mpa-0-medium.model",
           "MACE-MPA-0 medium (MPtrj + sAlex, PBE+U), MIT licence"),
    _entry("mace-omat-0-medium", "mace-omat-0-medium.model",
           f"{_RELEASES}/mace-mp/releases/download/mace_omat_0/mace-omat-0-medium.model",
           "MACE-OMAT-0 medium (OMat24, PBE+U), Academic Software License"),
    _entry("mace-matpes-pbe-0", "MACE-matpes-pbe-omat-ft.model",
           f"{_RELEASES}/mace-foundations/releases/download/mace_matpes_0/MACE-matpes-pbe-omat-ft.model",
           "MACE-MATPES-PBE-0 (OMat-0 fine-tuned on MatPES PBE, no +U), Academic Software License"),
    _entry("mace-matpes-r2scan-0", "MACE-matpes-r2scan-omat-ft.model",
           f"{_RELEASES}/mace-foundations/releases/download/mace_matpes_0/MACE-matpes-r2scan-omat-ft.model",
           "MACE-MATPES-r2SCAN-0 (OMat-0 fine-tuned on MatPES r2SCAN), Academic Software License"),
)

FAMILY = Family(
    name="mace",
    requires=("mace", "e3nn"),
    install_hint=install_hint("mace") + " (its own environment: mace-torch pins e3nn 0.4.4)",
    loader=load,
    catalogue=CATALOGUE,
    supports_batching=True,
    custom_formats=("torchscript",),
)
