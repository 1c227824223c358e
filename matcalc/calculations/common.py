"""Shared set-up for every calculation: load the model, read and validate the structure,
get the evaluator (where the batching engine plugs in) and fill the common result fields."""

from __future__ import annotations

import contextvars
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ase import Atoms
from ase.calculators.calculator import Calculator

from matcalc.models import Evaluator, Potential, get_model
from matcalc.structures import DEFAULT_MAX_ATOMS, formula, load_structure, structure_hash


@dataclass
class Prepared:
    """A validated structure with its model, ready to compute."""

    atoms: Atoms
    potential: Potential
    label: str
    structure_hash: str
    t0: float = field(default_factory=time.perf_counter)

    @property
    def evaluator(self) -> Evaluator:
        return evaluator_for(self.potential)

    def calculator(self) -> Calculator:
        """A fresh ASE calculator over the (possibly batched) evaluator."""
        return self.potential.calculator(self.evaluator)

    def common(self, protocol: str, parameters: dict[str, Any], warnings: list[str] | None = None) -> dict[str, Any]:
        """The `Result` base fields."""
        return {
            "model": self.potential.name,
            "formula": formula(self.atoms),
            "n_atoms": len(self.atoms),
            "structure_hash": self.structure_hash,
            "protocol": protocol,
            "parameters": dict(parameters),
            "wall_time_s": time.perf_counter() - self.t0,
            "warnings": list(warnings or []),
            "label": self.label,
        }


def evaluator_for(potential: Potential) -> Evaluator:
    """The evaluator calculations send force requests to: the process-wide batching engine of
    ``potential`` (`matcalc.batching.engine_for`), or the potential itself when batching is
    disabled (``MATCALC_BATCHING=0`` or `matcalc.batching.set_enabled`)."""
    from matcalc import batching

    return batching.engine_for(potential) if batching.enabled() else potential


T = TypeVar("T")
R = TypeVar("R")


def map_threads(fn: Callable[[T], R], items: Iterable[T], max_workers: int | None = None) -> list[R]:
    """``[fn(x) for x in items]`` run concurrently in threads, results in input order.

    Each thread runs in a copy of the caller's context (so progress reporting and stop
    requests reach it). Concurrent force requests are what the batching engine fuses.
    The first exception is re-raised after all threads finished.
    """
    items = list(items)
    if len(items) <= 1:
        return [fn(x) for x in items]
    workers = max_workers or min(len(items), max(4, 4 * (os.cpu_count() or 1)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="matcalc") as pool:
        futures = [pool.submit(contextvars.copy_context().run, fn, x) for x in items]
        return [f.result() for f in futures]


def label_of(structure: Any) -> str:
    if isinstance(structure, Path):
        return structure.stem
    if isinstance(structure, str) and "\n" not in structure.strip():
        return Path(structure.strip()).stem
    if isinstance(structure, Atoms):
        return str(structure.info.get("label", ""))
    return ""


def prepare(structure: Any, model: str | Potential, device: str | None = None, *, require_cell: bool = True,
            max_atoms: int | None = DEFAULT_MAX_ATOMS, label: str | None = None) -> Prepared:
    """Load the model, then read and validate ``structure`` against it."""
    t0 = time.perf_counter()
    potential = get_model(model, device)
    atoms = load_structure(structure, require_cell=require_cell, max_atoms=max_atoms, elements=potential.elements)
    return Prepared(atoms, potential, label if label is not None else label_of(structure), structure_hash(atoms), t0)
