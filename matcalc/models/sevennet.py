"""SevenNet (the ``[sevennet]`` extra, package ``sevenn``): batched inference on local checkpoints only.

Two file formats load:

* a SevenNet checkpoint (``.pth``, what ``sevenn`` trains and releases): read with
  ``torch.load(weights_only=True)``; the only globals allowed are numpy's array/scalar reconstructors and numeric
  dtypes (released checkpoints store numpy arrays in their config), so no pickled code ever runs;
* a deployed TorchScript model (``sevenn get_model`` / ``sevenn.scripts.deploy.deploy``, the LAMMPS ``e3gnn``
  serial format), evaluated with the same edge-gradient forces and virial stress as ``pair_e3gnn``.

Either way the structures of one call are turned into SevenNet graphs (``AtomGraphData``, as
``SevenNetCalculator`` builds them), fused into one graph batch and evaluated in one forward/backward pass;
energies, forces and stresses are split per structure. Multi-fidelity checkpoints (``7net-mf-ompa``,
``7net-omni``) need the fidelity (``modal``), e.g. ``"mpa"``.
"""

from __future__ import annotations

import logging
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from matcalc.models.base import Evaluation, Potential
from matcalc.models.weights import Family, WeightsEntry
from matcalc.version import install_hint

log = logging.getLogger(__name__)

CPU_MAX_BATCH_ATOMS = 512
"""Largest SevenNet call on a CPU (atoms). Measured on HKUST-1 (156 atoms, CPU, forces and stress): ~3.6 MB per
atom for 7net-0, ~7.6 MB per atom for 7net-l3i5."""
GPU_MAX_BATCH_ATOMS = 4096

SHIPPED_CHECKPOINTS = {
    "7net-0": "SEVENNET_0_11Jul2024",
    "7net-0_11jul2024": "SEVENNET_0_11Jul2024",
    "7net-0_22may2024": "SEVENNET_0_22May2024",
    "7net-l3i5": "SEVENNET_l3i5",
    "7net-mf-0": "SEVENNET_MF_0",
}
"""Checkpoint keywords -> the ``sevenn._const`` attribute naming the file inside the installed wheel."""

_RELEASES = "https://github.com/MDIL-SNU/SevenNet/releases/download"


def shipped_checkpoint(keyword: str) -> Path:
    """The checkpoint file shipped inside the installed ``sevenn`` wheel for ``keyword`` (e.g. ``"7net-0"``).

    Raises:
        ValueError: ``keyword`` is not a shipped checkpoint keyword.
        FileNotFoundError: this ``sevenn`` version does not ship it (matcalc never downloads it).
    """
    import sevenn._const as consts

    attr = SHIPPED_CHECKPOINTS.get(keyword.lower().replace("sevennet", "7net"))
    if attr is None:
        raise ValueError(f"unknown shipped SevenNet checkpoint {keyword!r}; known: {', '.join(SHIPPED_CHECKPOINTS)}")
    path = Path(getattr(consts, attr, "") or "")
    if not path.is_file():
        raise FileNotFoundError(f"the installed sevenn does not ship {keyword!r} (expected {path})")
    return path


def weights_only_globals() -> list[Any]:
    """Globals a released SevenNet checkpoint needs under ``weights_only=True``: numpy arrays and scalars only."""
    core = getattr(np, "_core", None) or np.core
    dtypes = dict.fromkeys(t for t in vars(np.dtypes).values()
                           if isinstance(t, type) and issubclass(getattr(t, "type", object), (np.number, np.bool_)))
    # released checkpoints were written with numpy 1.x (numpy.core...), new ones with numpy 2 (numpy._core...)
    return [(core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
            (core.multiarray.scalar, "numpy.core.multiarray.scalar"),
            core.multiarray._reconstruct, core.multiarray.scalar,
            np.ndarray, np.dtype, *dtypes]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A SevenNet checkpoint as a dict, read with ``torch.load(weights_only=True)`` (numpy arrays allowed)."""
    import torch

    with torch.serialization.safe_globals(weights_only_globals()):
        cp = torch.load(str(path), weights_only=True, map_location="cpu")
    if not isinstance(cp, dict) or "config" not in cp or "model_state_dict" not in cp:
        raise ValueError(f"{path} is not a SevenNet checkpoint (a dict with 'config' and 'model_state_dict')")
    return cp


def is_torchscript(path: str | Path) -> bool:
    """True when ``path`` is a TorchScript archive (a zip holding ``constants.pkl`` and ``code/``)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def build_model(cp: dict[str, Any]) -> Any:
    """An ``AtomGraphSequential`` from a checkpoint dict, built by sevenn's own model builder (plain e3nn)."""
    from sevenn.checkpoint import SevenNetCheckpoint, _config_cp_routine

    class _Loaded(SevenNetCheckpoint):  # feeds the already (safely) read dict to sevenn's checkpoint logic
        def _load(self) -> None:
            self._config_original = cp["config"]
            self._config = _config_cp_routine(dict(cp["config"]))
            self._model_state_dict = cp["model_state_dict"]
            self._optimizer_state_dict = cp.get("optimizer_state_dict", {})
            self._scheduler_state_dict = cp.get("scheduler_state_dict", {})
            self._epoch, self._time, self._hash = cp.get("epoch"), cp.get("time", ""), cp.get("hash", "")
            self._loaded = True

    return _Loaded("<weights-only checkpoint>").build_model()


def _symbols(atomic_numbers: Any) -> frozenset[str]:
    from ase.data import chemical_symbols

    return frozenset(chemical_symbols[int(z)] for z in atomic_numbers)


def _select_modal(modal_map: dict[str, int] | None, modal: str | None, name: str) -> str | None:
    if modal_map:
        if not modal:
            raise ValueError(f"{name}: a multi-fidelity SevenNet model needs modal= one of {sorted(modal_map)}")
        match = {m.lower(): m for m in modal_map}.get(modal.lower())
        if match is None:
            raise ValueError(f"{name}: unknown modal {modal!r}; this model has {sorted(modal_map)}")
        return match
    if modal:
        log.warning("%s: modal=%r ignored: the model has a single fidelity", name, modal)
    return None


class SevenNetPotential(Potential):
    """SevenNet from a checkpoint (path or shipped keyword, default ``"7net-0"``), batched; float32.

    One call builds each structure's graph as ``SevenNetCalculator`` does, collates them into a
    ``torch_geometric`` ``Batch`` and runs one forward pass with batch-mode force/stress output.
    """

    family = "sevennet"
    supports_batching = True

    def __init__(self, name: str = "sevennet", device: str = "cpu", *, checkpoint: str | Path = "7net-0",
                 modal: str | None = None, max_batch_atoms: int | None = None, **kwargs: Any) -> None:
        path = Path(checkpoint)
        if not path.is_file():
            path = shipped_checkpoint(str(checkpoint))
        model = build_model(read_checkpoint(path))
        self.modal = _select_modal(model.modal_map, modal, name)
        if max_batch_atoms is None:
            max_batch_atoms = CPU_MAX_BATCH_ATOMS if str(device).startswith("cpu") else GPU_MAX_BATCH_ATOMS
        super().__init__(name, device=device, elements=_symbols(model.type_map), cutoff_A=float(model.cutoff),
                         dtype="float32", max_batch_atoms=max_batch_atoms, **kwargs)
        model.set_is_batch_data(True)
        self.model = model.to(device).eval()
        self.checkpoint_path = path
        self._lock = threading.Lock()

    def _graphs(self, atoms_list: Sequence[Atoms]) -> Any:
        import sevenn._keys as KEY
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.train.dataload import unlabeled_atoms_to_graph
        from torch_geometric.data import Batch  # type: ignore[import-untyped]

        graphs = []
        for atoms in atoms_list:
            self.check_elements(atoms)
            graph = AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, self.cutoff_A, with_shift=False))
            if self.modal:
                graph[KEY.DATA_MODALITY] = self.modal
            graphs.append(graph)
        return Batch.from_data_list(graphs).to(self.device)

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        import sevenn._keys as KEY

        batch = self._graphs(atoms_list)
        with self._lock:
            out = self.model(batch)
        energies = out[KEY.PRED_TOTAL_ENERGY].detach().cpu().double().numpy().reshape(-1)
        forces = out[KEY.PRED_FORCE].detach().cpu().double().numpy()
        # sevenn's stress is -(ASE stress) in the order xx yy zz xy yz zx
        stresses = -out[KEY.PRED_STRESS].detach().cpu().double().numpy().reshape(-1, 6)[:, [0, 1, 2, 4, 5, 3]]
        return _split(atoms_list, energies, forces, stresses)


def _split(atoms_list: Sequence[Atoms], energies: np.ndarray, forces: np.ndarray,
           stresses: np.ndarray) -> list[Evaluation]:
    out, start = [], 0
    for i, atoms in enumerate(atoms_list):
        n = len(atoms)
        stress = stresses[i].copy() if atoms.pbc.all() else None
        out.append(Evaluation(float(energies[i]), forces[start:start + n].copy(), stress))
        start += n
    return out


class DeployedSevenNetPotential(Potential):
    """A deployed (TorchScript, ``sevenn get_model``) serial SevenNet model, batched as one disjoint graph.

    The deployed model returns atomic energies; forces and the virial come from the gradient of the total energy
    with respect to the edge vectors, exactly as LAMMPS ``pair_e3gnn`` computes them. The fidelity of a
    multi-fidelity model was fixed when it was deployed.
    """

    family = "sevennet"
    supports_batching = True

    def __init__(self, name: str, device: str = "cpu", *, path: str | Path, max_batch_atoms: int | None = None,
                 **kwargs: Any) -> None:
        import torch
        from ase.data import atomic_numbers

        meta: dict[str, Any] = {"chemical_symbols_to_index": "", "cutoff": "", "dtype": ""}  # filled with bytes
        self.model = torch.jit.load(str(path), map_location=device, _extra_files=meta)
        symbols = meta["chemical_symbols_to_index"].decode().split()
        if not symbols or not meta["cutoff"]:
            raise ValueError(f"{path} is TorchScript but not a deployed SevenNet model (no chemical_symbols_to_index)")
        self.type_index = {atomic_numbers[s]: i for i, s in enumerate(symbols)}
        if max_batch_atoms is None:
            max_batch_atoms = CPU_MAX_BATCH_ATOMS if str(device).startswith("cpu") else GPU_MAX_BATCH_ATOMS
        super().__init__(name, device=device, elements=frozenset(symbols), cutoff_A=float(meta["cutoff"].decode()),
                         dtype="float32", max_batch_atoms=max_batch_atoms, **kwargs)
        self.checkpoint_path = Path(path)
        self._lock = threading.Lock()

    def _inputs(self, atoms_list: Sequence[Atoms]) -> tuple[dict[str, Any], Any, list[float]]:
        """One disjoint graph of all structures, the graph index of every edge, and the cell volumes (Å³)."""
        import torch
        from sevenn.train.dataload import unlabeled_atoms_to_graph

        types, src, dst, vec, edge_graph, volumes, offset = [], [], [], [], [], [], 0
        for i, atoms in enumerate(atoms_list):
            self.check_elements(atoms)
            g = unlabeled_atoms_to_graph(atoms, self.cutoff_A)
            types.append([self.type_index[int(z)] for z in atoms.numbers])
            src.append(g["edge_index"][0] + offset)
            dst.append(g["edge_index"][1] + offset)
            vec.append(g["edge_vec"])
            edge_graph.append(np.full(len(g["edge_vec"]), i))
            volumes.append(float(atoms.cell.volume))
            offset += len(atoms)
        dev = self.device
        n = torch.tensor([offset], dtype=torch.int64)
        inputs = {
            "x": torch.tensor(np.concatenate(types), dtype=torch.int64, device=dev),
            "edge_index": torch.tensor(np.stack([np.concatenate(src), np.concatenate(dst)]), dtype=torch.int64,
                                       device=dev),
            "edge_vec": torch.tensor(np.concatenate(vec), dtype=torch.float32, device=dev).requires_grad_(True),
            "num_atoms": n.to(dev),
            "nlocal": n,
        }
        return inputs, np.concatenate(edge_graph), volumes

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        import torch

        inputs, edge_graph, volumes = self._inputs(atoms_list)
        edge_vec, edge_index = inputs["edge_vec"], inputs["edge_index"]
        with self._lock:
            out = self.model(dict(inputs))
            atomic = out["atomic_energy"].reshape(-1)
            (dE_dr,) = torch.autograd.grad([atomic.sum()], [edge_vec], allow_unused=True)
        if dE_dr is None:  # no edge within the cutoff in any structure
            dE_dr = torch.zeros_like(edge_vec)
        n_atoms = atomic.shape[0]
        forces = torch.zeros(n_atoms, 3, dtype=dE_dr.dtype, device=dE_dr.device)
        forces.index_add_(0, edge_index[0], dE_dr)
        forces.index_add_(0, edge_index[1], -dE_dr)
        r, f = edge_vec.detach().double().cpu().numpy(), dE_dr.double().cpu().numpy()
        # per-edge virial r_a f_b in ASE Voigt order (xx yy zz yz xz xy); stress = virial / V
        virial = np.stack([r[:, 0] * f[:, 0], r[:, 1] * f[:, 1], r[:, 2] * f[:, 2],
                           r[:, 1] * f[:, 2], r[:, 2] * f[:, 0], r[:, 0] * f[:, 1]], axis=1)
        per_graph = np.zeros((len(atoms_list), 6))
        np.add.at(per_graph, edge_graph, virial)
        stresses = per_graph / np.maximum(np.asarray(volumes), 1e-3)[:, None]
        sizes = [len(a) for a in atoms_list]
        graph_of_atom = np.repeat(np.arange(len(atoms_list)), sizes)
        energies = np.bincount(graph_of_atom, weights=atomic.detach().double().cpu().numpy(),
                               minlength=len(atoms_list))
        return _split(atoms_list, energies, forces.detach().double().cpu().numpy(), stresses)


def load(path: str | Path | None, *, name: str, device: str, modal: str | None = None,
         checkpoint: str = "7net-0", **kwargs: Any) -> Potential:
    """The family loader: a SevenNet checkpoint (``.pth``) or deployed TorchScript at ``path``, or, when ``path``
    is ``None`` or a shipped keyword (``"7net-0"``, ``"7net-l3i5"``, ``"7net-mf-0"``), the checkpoint inside
    the ``sevenn`` wheel. Never downloads: a missing file raises ``FileNotFoundError``.
    """
    source: str | Path = checkpoint if path is None else path
    p = Path(source)
    if not p.is_file():
        if str(source).lower().replace("sevennet", "7net") in SHIPPED_CHECKPOINTS:
            p = shipped_checkpoint(str(source))
        else:
            raise FileNotFoundError(f"SevenNet model file not found: {p}")
    if is_torchscript(p):
        if modal:
            log.warning("%s: modal=%r ignored: a deployed model's fidelity was fixed when it was deployed", name, modal)
        return DeployedSevenNetPotential(name, device, path=p, **kwargs)
    return SevenNetPotential(name, device, checkpoint=p, modal=modal, **kwargs)


_ELEMENTS_89 = "89 elements, H-Pu except Po-Ra"


def _entry(name: str, filename: str, description: str, *, cutoff_A: float, source: str = "",
           elements: str = _ELEMENTS_89, **options: Any) -> WeightsEntry:
    return WeightsEntry(name=name, filename=filename, description=description, elements=elements, cutoff_A=cutoff_A,
                        dtype="float32", source=source, options=options)


FAMILY = Family(
    name="sevennet",
    requires=("sevenn", "torch_geometric"),
    install_hint=install_hint("sevennet"),
    loader=load,
    catalogue=(
        _entry("7net-0", "", "SevenNet-0 (11Jul2024, MPtrj), weights in the sevenn wheel", cutoff_A=5.0,
               checkpoint="7net-0"),
        _entry("7net-l3i5", "", "SevenNet-l3i5 (MPtrj, lmax 3, 5 layers), weights in the sevenn wheel", cutoff_A=5.0,
               checkpoint="7net-l3i5"),
        _entry("7net-omat", "checkpoint_sevennet_omat.pth", "SevenNet-omat (OMat24)", cutoff_A=6.0,
               source=f"{_RELEASES}/v0.11.0.cp/checkpoint_sevennet_omat.pth"),
        _entry("7net-mf-ompa", "checkpoint_sevennet_mf_ompa.pth",
               "SevenNet-MF-ompa (multi-fidelity MPtrj+sAlex/OMat24), 'mpa' fidelity", cutoff_A=6.0,
               source=f"{_RELEASES}/v0.11.0.cp/checkpoint_sevennet_mf_ompa.pth", modal="mpa"),
        _entry("7net-omni", "checkpoint_sevennet_omni.pth", "SevenNet-Omni (multi-task), 'mpa' task", cutoff_A=6.0,
               source=f"{_RELEASES}/v0.12.0.cp/checkpoint_sevennet_omni.pth", elements="read from the checkpoint",
               modal="mpa"),
    ),
    supports_batching=True,
    weights_only_globals=weights_only_globals,
    custom_formats=("weights_only", "torchscript"),
)
