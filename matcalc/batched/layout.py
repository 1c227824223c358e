"""Row layout of a batch: structures of different sizes stacked into one ``(rows, 3)`` array.

Structure ``i`` owns rows ``starts[i]:starts[i + 1]``. Per-structure reductions (sums, maxima) are
``np.add.reduceat`` / ``np.maximum.reduceat`` over those segments, so an algorithm written once over the
stacked array steps every structure of the batch in a handful of numpy calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class Layout:
    """Segments of rows, one per structure (every structure has at least one row)."""

    __slots__ = ("owner", "sizes", "starts")

    def __init__(self, sizes: Sequence[int] | np.ndarray) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
        if (self.sizes < 1).any():
            raise ValueError("every structure of a batch needs at least one row")
        self.starts = np.zeros(len(self.sizes) + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.starts[1:])
        self.owner = np.repeat(np.arange(len(self.sizes)), self.sizes)
        """Structure index of every row."""

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def rows(self) -> int:
        return int(self.starts[-1])

    def slice(self, i: int) -> slice:
        return slice(int(self.starts[i]), int(self.starts[i + 1]))

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Per-structure sums of ``values`` (rows along axis 0): shape ``(B, ...)``."""
        if len(self.sizes) == 0:
            return np.zeros((0, *values.shape[1:]), dtype=values.dtype)
        return np.add.reduceat(values, self.starts[:-1], axis=0)

    def max(self, values: np.ndarray) -> np.ndarray:
        """Per-structure maxima of ``values`` (rows along axis 0)."""
        if len(self.sizes) == 0:
            return np.zeros((0, *values.shape[1:]), dtype=values.dtype)
        return np.maximum.reduceat(values, self.starts[:-1], axis=0)

    def dot(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Per-structure dot products of two ``(rows, 3)`` arrays (each structure's rows as one vector)."""
        return self.sum(np.einsum("ij,ij->i", a, b))

    def row_norm_max(self, a: np.ndarray) -> np.ndarray:
        """Per-structure largest row norm of ``(rows, 3)`` (ASE's ``gradient_norm``, e.g. fmax)."""
        return self.max(np.linalg.norm(a, axis=1))

    def expand(self, per_structure: np.ndarray) -> np.ndarray:
        """Broadcast one value per structure to its rows: ``(B, ...) -> (rows, ...)``."""
        return per_structure[self.owner]

    def row_mask(self, keep: np.ndarray) -> np.ndarray:
        """Row mask of the structures where ``keep`` is True."""
        return keep[self.owner]

    def subset(self, keep: np.ndarray) -> Layout:
        return Layout(self.sizes[keep])

    def extended(self, sizes: Sequence[int]) -> Layout:
        return Layout(np.concatenate([self.sizes, np.asarray(sizes, dtype=np.int64)]))


__all__ = ["Layout"]
