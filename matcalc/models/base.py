"""The model contract: a `Potential` evaluates a *batch* of structures at once.

Units everywhere: energy eV, forces eV/Å, stress eV/Å³ in ASE's Voigt order
(xx, yy, zz, yz, xz, xy) and ASE's sign convention (positive = tensile).
`Potential.calculator` gives an ordinary ASE calculator over any *evaluator*
(an object with ``evaluate(list[Atoms]) -> list[Evaluation]``), so ASE optimizers,
filters and MD integrators run unchanged on top of a batched engine.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from matcalc.models.identity import ModelIdentity

T = TypeVar("T")

log = logging.getLogger(__name__)

EV_PER_A3_TO_GPA = 160.21766208
"""Multiply a stress in eV/Å³ by this to get GPa."""


@dataclass
class Evaluation:
    """Energy, forces and stress of one structure."""

    energy_eV: float
    forces_eV_per_A: np.ndarray
    stress_eV_per_A3: np.ndarray | None = None
    """Voigt (xx, yy, zz, yz, xz, xy), ASE sign; ``None`` for non-periodic structures."""

    def __add__(self, other: Evaluation) -> Evaluation:
        stress = None
        if self.stress_eV_per_A3 is not None and other.stress_eV_per_A3 is not None:
            stress = self.stress_eV_per_A3 + other.stress_eV_per_A3
        return Evaluation(
            energy_eV=self.energy_eV + other.energy_eV,
            forces_eV_per_A=self.forces_eV_per_A + other.forces_eV_per_A,
            stress_eV_per_A3=stress,
        )


class Evaluator(Protocol):
    """Anything that turns a list of structures into a list of evaluations."""

    def evaluate(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]: ...


@dataclass
class ModelStats:
    """Counters of a potential's model calls (thread-safe updates via ``Potential``)."""

    calls: int = 0
    structures: int = 0
    atoms: int = 0
    model_time_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)


class Potential(ABC):
    """A loaded interatomic potential on one device.

    Subclasses implement `_evaluate_batch`; `evaluate` splits the request into
    chunks of at most `max_batch_atoms` atoms and keeps `stats`.
    """

    family: str = "generic"
    supports_batching: bool = False
    """True when one model call really evaluates many structures together."""
    concurrent_calls: bool = False
    """True when ``evaluate`` may run in several threads at once (the batching engine then runs one call
    per CPU core side by side); False serialises calls."""
    package: str = ""
    """Import name of the package implementing the model (its version goes into `identity`)."""

    def __init__(
        self,
        name: str,
        *,
        device: str = "cpu",
        elements: frozenset[str] | None = None,
        cutoff_A: float | None = None,
        dtype: str = "float64",
        max_batch_atoms: int = 4096,
    ) -> None:
        self.name = name
        self.device = device
        self.elements = elements
        self.cutoff_A = cutoff_A
        self.dtype = dtype
        self.max_batch_atoms = max_batch_atoms
        self.stats = ModelStats()
        self._stats_lock = threading.Lock()
        self.version: str = getattr(self, "version", "")
        """The model's own version or checkpoint name, when it has one."""
        self.weights_path: Path | None = None
        """The weights file the model was loaded from (``None``: shipped in `package`, or none)."""
        self.options: dict[str, Any] = {}
        """Loader options that change the model (set by the registry for catalogue and user models)."""
        self.registered: bool = False
        """Loaded through the registry (`matcalc.models.get_model`): its name identifies it."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device!r})"

    @abstractmethod
    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        """Evaluate all of ``atoms_list`` in one model call."""

    def chunks(self, atoms_list: Sequence[Atoms]) -> list[list[int]]:
        """Indices of ``atoms_list`` grouped into consecutive chunks within the atom budget."""
        if not self.supports_batching:
            return [[i] for i in range(len(atoms_list))]
        groups: list[list[int]] = []
        current: list[int] = []
        n_current = 0
        for i, atoms in enumerate(atoms_list):
            n = len(atoms)
            if current and n_current + n > self.max_batch_atoms:
                groups.append(current)
                current, n_current = [], 0
            current.append(i)
            n_current += n
        if current:
            groups.append(current)
        return groups

    def evaluate(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        """Energies, forces and stresses of every structure in ``atoms_list`` (input order)."""
        return self._chunked(atoms_list, self._evaluate_batch, "results")

    def energies(self, atoms_list: Sequence[Atoms]) -> list[float]:
        """Total energies (eV) of ``atoms_list`` (input order), skipping forces and stress where the model can
        (`_energies_batch`); same chunks and `stats` as `evaluate`. For work that needs
        energies only (e.g. Widom insertions)."""
        return [float(v) for v in self._chunked(atoms_list, self._energies_batch, "energies")]

    def _chunked(self, atoms_list: Sequence[Atoms], call: Callable[[Sequence[Atoms]], Sequence[T]],
                 what: str) -> list[T]:
        """``call`` on each chunk of `chunks` (timed into `stats`), its outputs back in input order."""
        out: list[T | None] = [None] * len(atoms_list)
        for group in self.chunks(atoms_list):
            batch = [atoms_list[i] for i in group]
            t0 = time.perf_counter()
            results = call(batch)
            dt = time.perf_counter() - t0
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: model returned {len(results)} {what} for {len(batch)} structures")
            with self._stats_lock:
                self.stats.calls += 1
                self.stats.structures += len(batch)
                self.stats.atoms += sum(len(a) for a in batch)
                self.stats.model_time_s += dt
                self.stats.batch_sizes.append(len(batch))
            for i, r in zip(group, results, strict=True):
                out[i] = r
        return [r for r in out if r is not None]

    def _energies_batch(self, atoms_list: Sequence[Atoms]) -> list[float]:
        """Energies (eV) of ``atoms_list`` in one model call. Default: `_evaluate_batch`'s; a model that
        can skip the backward pass (forces, stress) overrides it with the same numbers to round-off."""
        return [float(e.energy_eV) for e in self._evaluate_batch(atoms_list)]

    def identity(self) -> ModelIdentity:
        """Name, family, version, weights sha256 (or package version), dtype, options and device of this model.

        A potential built by hand (not loaded through the registry and without a weights file) is not
        ``cacheable``: its name alone does not tell two of them apart.
        """
        return ModelIdentity.of(name=self.name, family=self.family, dtype=self.dtype, version=self.version,
                                package=self.package, weights=self.weights_path, options=self.options,
                                device=self.device, cacheable=self.registered or self.weights_path is not None)

    def check_elements(self, atoms: Atoms) -> None:
        """Raise ``StructureError`` if ``atoms`` holds elements this model does not support."""
        if self.elements is None:
            return
        from matcalc.structures import StructureError

        bad = sorted(set(atoms.get_chemical_symbols()) - set(self.elements))
        if bad:
            raise StructureError(f"elements not supported by model {self.name!r}: {', '.join(bad)}")

    def calculator(self, evaluator: Evaluator | None = None) -> PotentialCalculator:
        """An ASE calculator over this potential, or over ``evaluator`` (e.g. a batching engine)."""
        return PotentialCalculator(evaluator or self, name=self.name)

    def reset_stats(self) -> None:
        with self._stats_lock:
            self.stats = ModelStats()


class PotentialCalculator(Calculator):
    """ASE calculator view of an evaluator: energy (eV), forces (eV/Å), stress (eV/Å³)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, evaluator: Evaluator, name: str = "matcalc", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.evaluator = evaluator
        self.model_name = name

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] | None = None,
        system_changes: Sequence[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties or ["energy"], system_changes)
        assert self.atoms is not None
        snapshot = self.atoms.copy()
        snapshot.calc = None
        snapshot.set_constraint()  # the model returns raw forces; ASE applies constraints itself
        result = self.evaluator.evaluate([snapshot])[0]
        self.results = {
            "energy": float(result.energy_eV),
            "free_energy": float(result.energy_eV),
            "forces": np.array(result.forces_eV_per_A, dtype=float),
        }
        if result.stress_eV_per_A3 is not None:
            self.results["stress"] = np.array(result.stress_eV_per_A3, dtype=float)


class ASECalculatorPotential(Potential):
    """A potential backed by an ordinary ASE calculator, evaluated one structure at a time, under a lock
    (ASE calculators keep state).

    A structure object that comes back call after call (the batched stepping of `matcalc.batched` sends
    the same ``Atoms`` every step) gets a calculator of its own from the second call on, so calculators that
    keep neighbour lists between calls (EMT, Lennard-Jones) update them instead of rebuilding them for every
    structure of an alternating batch; other structures share one calculator.
    """

    MAX_CALCULATORS = 512
    """Most structure-owned calculators kept at once (beyond that, structures share one)."""

    def __init__(self, name: str, factory: Any, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self._factory = factory
        self._calc = factory()
        self._lock = threading.Lock()
        self._owned: dict[int, tuple[Any, Calculator | None]] = {}
        """id(atoms) -> (weak reference to it, its calculator or None when seen once)."""

    def _calculator_for(self, atoms: Atoms) -> Calculator:
        key = id(atoms)
        entry = self._owned.get(key)
        if entry is not None and entry[0]() is atoms:
            if entry[1] is None:
                entry = (entry[0], self._factory())
                self._owned[key] = entry
            return entry[1]
        if len(self._owned) < self.MAX_CALCULATORS:
            try:
                ref = weakref.ref(atoms, lambda _r, k=key, owned=self._owned: owned.pop(k, None))
            except TypeError:  # pragma: no cover - not weak-referenceable
                return self._calc
            self._owned[key] = (ref, None)
        return self._calc

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        out = []
        with self._lock:
            for atoms in atoms_list:
                a = atoms.copy()
                a.calc = self._calculator_for(atoms)
                energy = float(a.get_potential_energy())
                forces = np.array(a.get_forces(), dtype=float)
                stress = np.array(a.get_stress(voigt=True), dtype=float) if a.pbc.all() else None
                out.append(Evaluation(energy, forces, stress))
        return out


class SumPotential(Potential):
    """Sum of two potentials (e.g. a uMLIP plus D3 dispersion); same units as its parts."""

    def __init__(self, name: str, first: Potential, second: Potential) -> None:
        elements = first.elements
        if elements is not None and second.elements is not None:
            elements = elements & second.elements
        super().__init__(
            name,
            device=first.device,
            elements=elements,
            cutoff_A=first.cutoff_A,
            dtype=first.dtype,
            max_batch_atoms=first.max_batch_atoms,
        )
        self.family = first.family
        self.supports_batching = first.supports_batching
        self.concurrent_calls = first.concurrent_calls and second.concurrent_calls
        self.parts = (first, second)

    def identity(self) -> ModelIdentity:
        """The identities of both parts under this sum's name."""
        return ModelIdentity.combine(self.name, *(p.identity() for p in self.parts))

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        a = self.parts[0].evaluate(atoms_list)
        b = self.parts[1].evaluate(atoms_list)
        return [x + y for x, y in zip(a, b, strict=True)]

    def _energies_batch(self, atoms_list: Sequence[Atoms]) -> list[float]:
        a = self.parts[0].energies(atoms_list)
        b = self.parts[1].energies(atoms_list)
        return [x + y for x, y in zip(a, b, strict=True)]
