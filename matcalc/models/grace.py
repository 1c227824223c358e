"""GRACE foundation models (``tensorpotential``, TensorFlow; the ``[grace]`` extra).

A GRACE model is a TensorFlow SavedModel *folder* (``saved_model.pb``, ``variables/``, ``metadata.yaml``),
the folder tensorpotential's ``grace_models download <NAME>`` leaves in ``~/.cache/grace/<NAME>``. Copy it
whole into the models dir; matcalc loads it with tensorpotential's own ``TPCalculator`` and never calls
``grace_fm`` (which downloads).

Batched inference: the SavedModel's ``compute`` function evaluates one disconnected graph, so the
neighbour data of several structures (built by tensorpotential's ``GeometricalDataBuilder``) are joined into
one graph, padded to a bucketed shape (bounds XLA recompiles) and evaluated in one call; per-structure
energies are sums of the predicted atomic energies, and per-structure virials are sums over each
structure's bonds of the predicted pair forces times the bond vectors.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from matcalc.models.base import Evaluation, Potential
from matcalc.models.weights import Family, WeightsEntry
from matcalc.version import install_hint

log = logging.getLogger(__name__)

SAVED_MODEL_FILE = "saved_model.pb"
CPU_MAX_BATCH_ATOMS = 512
"""Largest CPU call (atoms): GRACE has ~50-100 neighbours per atom at its 6 Å cutoff."""
GPU_MAX_BATCH_ATOMS = 4096
_ATOMIC_ENERGY = "atomic_energy"  # tensorpotential.constants.PREDICT_ATOMIC_ENERGY
_PAIR_FORCES = "z_pair_f"  # "z_" + constants.PREDICT_PAIR_FORCES (how ComputeStructureEnergyAndForcesAndVirial names it)


def saved_model_dir(path: str | Path) -> Path:
    """The SavedModel folder of ``path`` (the folder itself, or its ``saved_model.pb``).

    Raises:
        FileNotFoundError: no ``saved_model.pb`` there.
    """
    p = Path(path).expanduser()
    folder = p.parent if p.name == SAVED_MODEL_FILE else p
    if not (folder / SAVED_MODEL_FILE).is_file():
        raise FileNotFoundError(f"no GRACE SavedModel at {p}: expected the model folder holding {SAVED_MODEL_FILE}")
    return folder


def _bucket(n: int, minimum: int = 16) -> int:
    """``n`` rounded up to one of 8 sizes per power of two (≤12.5% padding, few distinct XLA shapes)."""
    if n <= minimum:
        return minimum
    step = 2 ** max(0, math.floor(math.log2(n)) - 3)
    return int(math.ceil(n / step) * step)


def _tf_device(device: str) -> str:
    """TensorFlow's name for a torch-style device string (``cuda:1`` -> ``/GPU:1``)."""
    kind, _, index = str(device).partition(":")
    return f"/GPU:{index or 0}" if kind in ("cuda", "gpu") else "/CPU:0"


def _allow_gpu_memory_growth() -> None:
    """Let TensorFlow take GPU memory as needed instead of all of it (no-op once TF has started)."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # devices already initialised
            pass


def _structure_virials(pair_f: np.ndarray, bonds: np.ndarray, bond_struct: np.ndarray,
                       n_structures: int) -> np.ndarray:
    """Per-structure virials (eV), tensorpotential's order xx, yy, zz, xy, xz, yz: Σ_bonds f_pair ⊗ r."""
    comps = np.stack([pair_f[:, 0] * bonds[:, 0], pair_f[:, 1] * bonds[:, 1], pair_f[:, 2] * bonds[:, 2],
                      pair_f[:, 1] * bonds[:, 0], pair_f[:, 2] * bonds[:, 0], pair_f[:, 2] * bonds[:, 1]], axis=1)
    out = np.zeros((n_structures, 6))
    np.add.at(out, bond_struct, comps)
    return out


class GRACEPotential(Potential):
    """A GRACE SavedModel evaluated through tensorpotential's ``compute`` function, many structures per call."""

    family = "grace"
    supports_batching = True

    def __init__(self, name: str, path: str | Path, device: str = "cpu", *, max_batch_atoms: int | None = None,
                 **kwargs: Any) -> None:
        folder = saved_model_dir(path)
        # tensorpotential before tensorflow: it configures TensorFlow on import
        from tensorpotential.calculator import TPCalculator

        if str(device).startswith(("cuda", "gpu")):
            _allow_gpu_memory_growth()

        if max_batch_atoms is None:
            max_batch_atoms = CPU_MAX_BATCH_ATOMS if str(device).startswith("cpu") else GPU_MAX_BATCH_ATOMS
        self._tf_device = _tf_device(device)
        with _device_scope(self._tf_device):
            # the family's own loader: tf.saved_model.load + metadata.yaml (cutoff, element map) + data builders
            self._calc = TPCalculator(model=str(folder), mode="diverse", enable_uq_if_available=False)
        self._model = self._calc.models[0]
        self._specs = self._input_specs()
        super().__init__(name, device=device, elements=frozenset(self._calc.element_map),
                         cutoff_A=float(self._calc.cutoff), dtype=_param_dtype(folder),
                         max_batch_atoms=max_batch_atoms, **kwargs)
        self.path = folder
        outputs = self._model.signatures["compute"].structured_outputs
        self._fused = _ATOMIC_ENERGY in outputs and _PAIR_FORCES in outputs
        if not self._fused:
            self.supports_batching = False
            log.warning("%s: SavedModel returns no atomic energies/pair forces; one structure per call", name)
        self._lock = threading.Lock()

    def _input_specs(self) -> dict[str, Any]:
        """TensorSpecs of the ``compute`` inputs (names and dtypes)."""
        sig = self._model.signatures["compute"]
        return dict(sig.structured_input_signature[1])

    def _graph(self, atoms_list: Sequence[Atoms]) -> dict[str, np.ndarray]:
        """tensorpotential's joined, padded neighbour data of ``atoms_list`` (one disconnected graph)."""
        from tensorpotential import constants as c

        per_structure = []
        for atoms in atoms_list:
            self.check_elements(atoms)
            a = atoms.copy()  # tensorpotential gives a non-periodic structure a cell and centres it in place
            data: dict[str, Any] = {}
            for builder in self._calc.data_builders:
                data.update(builder.extract_from_ase_atoms(a))
            per_structure.append(data)
        batch: dict[str, Any] = {}
        for builder in self._calc.data_builders:
            batch.update(builder.join_to_batch(per_structure))
        n_atoms = int(batch[c.N_ATOMS_BATCH_REAL])
        n_bonds = int(batch[c.N_NEIGHBORS_REAL])
        # one fake atom (+ fake bonds beyond the cutoff) and one fake structure take the padding
        pad = {c.PAD_MAX_N_STRUCTURES: len(atoms_list) + 1, c.PAD_MAX_N_ATOMS: _bucket(n_atoms + 1),
               c.PAD_MAX_N_NEIGHBORS: _bucket(n_bonds + 1, minimum=256)}
        for builder in self._calc.data_builders:
            builder.pad_batch(batch, pad)
        return batch

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        inputs = {k: tf.constant(np.asarray(batch[k]), dtype=spec.dtype) for k, spec in self._specs.items()}
        with self._lock, _device_scope(self._tf_device):
            out = self._model.compute(inputs)
        return {k: v.numpy() for k, v in out.items()}

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        if not self._fused and len(atoms_list) > 1:
            return [e for a in atoms_list for e in self._evaluate_batch([a])]
        from tensorpotential import constants as c

        batch = self._graph(atoms_list)
        out = self._run(batch)
        n = len(atoms_list)
        n_atoms, n_bonds = int(batch[c.N_ATOMS_BATCH_REAL]), int(batch[c.N_NEIGHBORS_REAL])
        if self._fused:
            atom_struct = np.asarray(batch[c.ATOMS_TO_STRUCTURE_MAP])[:n_atoms]
            energies = np.bincount(atom_struct, weights=out[_ATOMIC_ENERGY].reshape(-1)[:n_atoms].astype(np.float64),
                                   minlength=n)
            virials = _structure_virials(out[_PAIR_FORCES][:n_bonds].astype(np.float64),
                                         np.asarray(batch[c.BOND_VECTOR])[:n_bonds],
                                         np.asarray(batch[c.BONDS_TO_STRUCTURE_MAP])[:n_bonds], n)
        else:
            energies = out[c.PREDICT_TOTAL_ENERGY].reshape(-1)[:1].astype(np.float64)
            virials = out[c.PREDICT_VIRIAL].reshape(1, 6).astype(np.float64)
        forces = out[c.PREDICT_FORCES][:n_atoms].astype(np.float64)
        results = []
        start = 0
        for i, atoms in enumerate(atoms_list):
            f = forces[start:start + len(atoms)]
            start += len(atoms)
            stress = None
            if atoms.pbc.all():
                # ASE sign and Voigt order (xx, yy, zz, yz, xz, xy): stress = -virial / V
                stress = -virials[i][[0, 1, 2, 5, 4, 3]] / atoms.get_volume()
            results.append(Evaluation(float(energies[i]), f.copy(), stress))
        return results


class _device_scope:
    """``tf.device(name)`` as a context manager that imports TensorFlow only when entered."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._ctx: Any = None

    def __enter__(self) -> None:
        import tensorflow as tf

        self._ctx = tf.device(self.name)
        self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def _param_dtype(folder: Path) -> str:
    """``"float32"`` or ``"float64"``: the precision of the SavedModel's weights (from its variables checkpoint)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(folder / "variables" / "variables"))
    floats = {d.name for d in reader.get_variable_to_dtype_map().values() if d.is_floating}
    return "float32" if floats == {"float32"} else "float64"


def load(path: Path | None, *, name: str, device: str = "cpu", **options: Any) -> Potential:
    """Load a GRACE SavedModel folder (or its ``saved_model.pb``) from the local disk."""
    if path is None:
        raise FileNotFoundError("GRACE weights do not ship with tensorpotential: give the SavedModel folder")
    return GRACEPotential(name, path, device=device, **options)


def _entry(name: str, folder: str, description: str) -> WeightsEntry:
    return WeightsEntry(
        name=name,
        filename=f"{folder}/{SAVED_MODEL_FILE}",
        description=description,
        elements="the OMat24 elements (read from the model folder when loaded)",
        cutoff_A=6.0,
        dtype="float64",
        source=(f"the whole {folder} SavedModel folder: `grace_models download {folder}` (tensorpotential) "
                f"writes it to ~/.cache/grace/{folder}"),
    )


FAMILY = Family(
    name="grace",
    requires=("tensorpotential", "tensorflow"),
    install_hint=(install_hint("grace") + " (pulls CUDA TensorFlow); CPU only: pip install tensorflow-cpu==2.20.0 "
                  "matscipy sympy scikit-learn questionary rich && pip install --no-deps tensorpotential tf_keras==2.20.1"),
    loader=load,
    catalogue=(
        _entry("grace-2l-oam", "GRACE-2L-OAM",
               "GRACE 2-layer, OMat24 pre-fit, fine-tuned on sAlex+MPtrj"),
        _entry("grace-2l-omat", "GRACE-2L-OMAT", "GRACE 2-layer, fitted on OMat24"),
        _entry("grace-1l-oam", "GRACE-1L-OAM",
               "GRACE 1-layer (local), OMat24 pre-fit, fine-tuned on sAlex+MPtrj"),
    ),
    supports_batching=True,
    # A SavedModel is a folder of TensorFlow graph code, not a single weights file: its graph can hold file
    # and process ops (tf.io.read_file/write_file, ...), and no "weights only" loader exists, so user uploads
    # are not accepted for this family.
    custom_formats=(),
)
