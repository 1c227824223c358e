"""Base class of the batched optimizers: per-structure state over a `Layout`.

A batched optimizer holds the state of *one* ASE algorithm for every structure of a batch and advances all
of them with one `BatchedOptimizer.step` (numpy over the stacked rows). The loop around it (evaluate,
check convergence per structure, drop finished ones, admit new ones) lives in
`matcalc.batched.runner`; subclasses only implement the step and declare their state:

* ``structure_fields``: arrays with one entry per structure along axis 0 (time step, mixing, counters);
* ``row_fields``: arrays with one entry per row along ``row_axis`` (velocities, history vectors);
* ``list_fields``: Python lists with one object per structure (e.g. BFGS Hessians of different sizes).

`keep` (structures leave) and `add` (structures join) work on those fields generically, so a
structure's state never depends on which other structures share its batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from matcalc.batched.layout import Layout


class BatchedOptimizer(ABC):
    """One optimizer algorithm stepping every structure of a batch at once.

    Coordinates ``x`` and forces ``f`` (minus the gradient) are ``(rows, 3)`` arrays laid out by
    `layout`; ASE's optimizers see the same numbers flattened per structure.
    """

    name: ClassVar[str] = ""
    structure_fields: ClassVar[dict[str, tuple[Any, Any]]] = {}
    """Field -> (dtype, initial value) for one value per structure."""
    row_fields: ClassVar[dict[str, int]] = {}
    """Field -> axis of the rows (the arrays are ``(..., rows, 3, ...)``)."""
    list_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.layout = Layout([])
        for name, (dtype, _) in self.structure_fields.items():
            setattr(self, name, np.zeros(0, dtype=dtype))
        for name, axis in self.row_fields.items():
            setattr(self, name, self._empty_rows(name, axis))
        for name in self.list_fields:
            setattr(self, name, [])

    def _empty_rows(self, name: str, axis: int) -> np.ndarray:
        shape = list(self.row_shape(name))
        shape.insert(axis, 0)
        return np.zeros(shape)

    def row_shape(self, name: str) -> tuple[int, ...]:
        """Shape of a row field without its row axis (default ``(3,)``; histories add a leading axis)."""
        return (3,)

    def initial(self, name: str) -> Any:
        """Initial value of a structure field for a new structure (default: the declared constant)."""
        return self.structure_fields[name][1]

    # ------------------------------------------------------------------ membership
    def add(self, sizes: Sequence[int]) -> None:
        """Append new structures (``sizes``: rows of each) with fresh state."""
        sizes = [int(s) for s in sizes]
        if not sizes:
            return
        n_rows = sum(sizes)
        for name, (dtype, _) in self.structure_fields.items():
            new = np.full(len(sizes), self.initial(name), dtype=dtype)
            setattr(self, name, np.concatenate([getattr(self, name), new]))
        for name, axis in self.row_fields.items():
            old = getattr(self, name)
            shape = list(old.shape)
            shape[axis] = n_rows
            setattr(self, name, np.concatenate([old, np.zeros(shape)], axis=axis))
        for name in self.list_fields:
            getattr(self, name).extend([None] * len(sizes))
        self.layout = self.layout.extended(sizes)

    def keep(self, keep: np.ndarray) -> None:
        """Keep only the structures where ``keep`` is True (the others left the batch)."""
        keep = np.asarray(keep, dtype=bool)
        if keep.all():
            return
        rows = np.flatnonzero(self.layout.row_mask(keep))
        for name in self.structure_fields:
            setattr(self, name, getattr(self, name)[keep])
        for name, axis in self.row_fields.items():
            setattr(self, name, np.take(getattr(self, name), rows, axis=axis))
        for name in self.list_fields:
            values = getattr(self, name)
            setattr(self, name, [v for v, k in zip(values, keep, strict=True) if k])
        self.layout = self.layout.subset(keep)

    # ------------------------------------------------------------------ the algorithm
    @abstractmethod
    def step(self, x: np.ndarray, f: np.ndarray) -> np.ndarray:
        """New coordinates for every structure from coordinates ``x`` and forces ``f`` (both ``(rows, 3)``)."""


__all__ = ["BatchedOptimizer"]
