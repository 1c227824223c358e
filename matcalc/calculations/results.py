"""Result dataclasses: units in field names, JSON-safe ``to_dict()``, pandas rows, plots.

Every property's result derives from `Result`. ``Result.from_dict(d)`` rebuilds the
same dataclass from ``to_dict()`` output (this is how the REST client returns the same types).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Self, get_type_hints

import numpy as np
from ase import Atoms

from matcalc.structures import atoms_from_dict, atoms_to_dict, write_structures

if TYPE_CHECKING:
    import os
    from pathlib import Path

    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_RESULT_TYPES: dict[str, type[Result]] = {}


def jsonable(value: Any) -> Any:
    """``value`` as JSON-safe data: Atoms as symbol/position dicts, arrays as lists, NaN/±inf as ``None``,
    dataclasses as dicts."""
    if isinstance(value, Atoms):
        return atoms_to_dict(value)
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in fields(value)}
    return value


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str, np.integer, np.floating, np.bool_)) or value is None


def _restore(tp: Any, value: Any) -> Any:
    if value is None:  # to_dict wrote NaN/inf as null: a plain float (or array element) comes back as NaN
        return math.nan if tp is float else None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _restore(inner[0], value) if len(inner) == 1 else value
    if tp is Atoms:
        return atoms_from_dict(value)
    if tp is np.ndarray:
        return np.asarray(value, dtype=float)  # null elements (NaN in to_dict) become NaN at any depth
    if tp is float:
        return float(value)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = get_type_hints(tp)
        return tp(**{k: _restore(hints.get(k, Any), v) for k, v in value.items() if k in hints})
    if origin is dict and args and isinstance(value, dict):
        return {k: _restore(args[1], v) for k, v in value.items()}
    if origin is list and args and isinstance(value, list):
        return [_restore(args[0], v) for v in value]
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


@dataclass(kw_only=True)
class Result:
    """Fields every result carries (identity of the input, model, protocol, timing, warnings)."""

    kind: ClassVar[str] = "result"

    model: str
    """Name of the model that produced the result."""
    formula: str
    n_atoms: int
    structure_hash: str
    """sha256 of the canonical input structure (`matcalc.structures.structure_hash`)."""
    protocol: str = "mofsimbench"
    parameters: dict[str, Any] = field(default_factory=dict)
    """Every protocol parameter actually used (units in the names)."""
    wall_time_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    label: str = ""
    """Free-form name of the input (e.g. the file stem or builtin name)."""
    provenance: dict[str, Any] = field(default_factory=dict, repr=False)
    """How the result was made, to reproduce it: ``matcalc_version``; ``model`` (name, family, version,
    package and its version, weights file and its sha256, dtype, loader options, device); ``dtype``,
    ``device``; ``versions`` of python, numpy, torch, ase, phonopy, pymatgen and the model's package;
    ``property``, ``protocol`` and every resolved ``parameters``; ``structure_hash``; ``started_at`` and
    ``finished_at`` (UTC, ISO 8601); ``host``; ``cached`` (True when served from the result cache, with the
    original timestamps) and ``cache_key`` (see `matcalc.cache`)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            _RESULT_TYPES[cls.kind] = cls

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (NaN/inf become ``None``; Atoms become symbol/position dicts)."""
        d = {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}
        d["kind"] = self.kind
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Rebuild a result from `to_dict` output; on ``Result`` it dispatches on ``kind``."""
        target: type[Result] = cls
        if cls is Result or "kind" not in cls.__dict__:
            kind = data.get("kind")
            if kind not in _RESULT_TYPES:
                raise ValueError(f"unknown result kind {kind!r}; known: {', '.join(sorted(_RESULT_TYPES))}")
            target = _RESULT_TYPES[kind]
        hints = get_type_hints(target)
        kwargs = {f.name: _restore(hints[f.name], data[f.name]) for f in fields(target) if f.name in data}
        return typing.cast(Self, target(**kwargs))

    def row(self) -> dict[str, Any]:
        """The scalar fields, as one row of a results table."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("parameters", "provenance"):
                continue
            if f.name == "warnings":
                out["warnings"] = "; ".join(value)
            elif _is_scalar(value):
                out[f.name] = value.item() if isinstance(value, np.generic) else value
        out.update(provenance_columns(self.provenance))
        return out

    def to_frame(self) -> pd.DataFrame:
        """A one-row pandas DataFrame of `row`."""
        import pandas as pd

        return pd.DataFrame([self.row()])

    # ---------------------------------------------------------------- structures
    @classmethod
    def structure_fields(cls) -> tuple[str, ...]:
        """The fields that hold structures, in declaration order: typed ``Atoms`` (or ``Atoms | None``), a list
        of ``Atoms``, or a list of dataclasses with one ``Atoms`` field (e.g. binding sites)."""
        return _structure_fields(cls)

    def structures(self) -> dict[str, list[Atoms]]:
        """The structures this result holds, by field (only fields that hold at least one)."""
        out: dict[str, list[Atoms]] = {}
        for name in self.structure_fields():
            frames = _frames(getattr(self, name))
            if frames:
                out[name] = frames
        return out

    def default_structure_field(self) -> str | None:
        """What `write_structure` writes without ``which``: ``final_structure`` when the result has one,
        else its only structure field; ``None`` when it has none or several."""
        held = self.structures()
        if "final_structure" in held:
            return "final_structure"
        return next(iter(held)) if len(held) == 1 else None

    def write_structure(self, path: str | os.PathLike[str], which: str | None = None, *,
                        index: int | None = None) -> Path:
        """Write a structure of this result to ``path``, the format from its suffix: ``.cif``, ``.vasp`` /
        ``.poscar`` / ``POSCAR``, ``.xyz`` / ``.extxyz`` (extended XYZ: cell and pbc kept), ``.traj`` (ASE).

        Args:
            path: the file to write (its folder must exist).
            which: the field to write (see `structures`; default: `default_structure_field`:
                ``final_structure``, else the result's only structure). Results with several structures and no
                final one (e.g. binding sites: ``sites`` and ``relaxed_guest``) need it.
            index: one structure of a field holding several (``sites``, ``lowest_structures``); default all of
                them, in order, in one file (extxyz, traj, cif).

        Returns:
            The path written.

        Raises:
            ValueError: no such structure, several candidates without ``which``, or a format that cannot hold
                what is written (see `matcalc.structures.write_structures`).
        """
        held = self.structures()
        if which is None:
            which = self.default_structure_field()
            if which is None:
                if not held:
                    raise ValueError(f"this {self.kind} result holds no structure")
                raise ValueError(f"this {self.kind} result holds several structures: {', '.join(held)}; say which "
                                 "one with which=")
        if which not in self.structure_fields():
            raise ValueError(f"which must be one of {', '.join(self.structure_fields()) or '(none)'}, got {which!r}")
        frames = held.get(which)
        if not frames:
            raise ValueError(f"{which} is empty in this result")
        if index is not None:
            if not -len(frames) <= index < len(frames):
                raise ValueError(f"index {index} is out of range: {which} holds {len(frames)} structure(s)")
            frames = [frames[index]]
        return write_structures(path, frames)

    # ---------------------------------------------------------------- plotting
    def plot(self, ax: Axes | None = None) -> Figure:
        """A matplotlib Figure of the result (axes labelled with units)."""
        fig, ax = _figure(ax)
        self._plot(ax)
        return fig

    def _plot(self, ax: Axes) -> None:
        ax.text(0.5, 0.5, f"{self.kind}: nothing to plot", ha="center", va="center", transform=ax.transAxes)


@dataclass(kw_only=True)
class PreRelaxedResult(Result):
    """The fields of a property with a pre-relaxation (`matcalc.calculations.contract.PreRelax`)."""

    relax_converged: bool | None = None
    """Pre-relaxation converged (``None`` when it was skipped: ``relax_first=False``)."""
    relax_steps: int = 0
    """Optimizer steps of the pre-relaxation."""
    relaxed_structure: Atoms | None = field(default=None, repr=False)
    """The structure the property's own step started from: after the pre-relaxation (the input when
    ``relax_first=False``)."""


def _unoptional(tp: Any) -> Any:
    """``X`` for ``X | None`` (anything else unchanged)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return tp


def _atoms_type(tp: Any) -> bool:
    """``Atoms`` or ``Atoms | None``."""
    return _unoptional(tp) is Atoms


def _structure_fields(cls: type) -> tuple[str, ...]:
    hints = get_type_hints(cls)
    out = []
    for f in fields(cls):
        tp = _unoptional(hints.get(f.name))
        if _atoms_type(tp):
            out.append(f.name)
        elif typing.get_origin(tp) is list and typing.get_args(tp):
            item = typing.get_args(tp)[0]
            if item is Atoms or (dataclasses.is_dataclass(item) and len(_atoms_members(item)) == 1):
                out.append(f.name)
    return tuple(out)


def _atoms_members(cls: type) -> list[str]:
    hints = get_type_hints(cls)
    return [f.name for f in fields(cls) if _atoms_type(hints.get(f.name))]


def _frames(value: Any) -> list[Atoms]:
    """The structures in a structure field's value (a dataclass list: each item's one Atoms field)."""
    if value is None:
        return []
    if isinstance(value, Atoms):
        return [value]
    frames = []
    for item in value:
        if isinstance(item, Atoms):
            frames.append(item)
        elif dataclasses.is_dataclass(item):
            inner = getattr(item, _atoms_members(type(item))[0])
            if inner is not None:
                frames.append(inner)
    return frames


def provenance_columns(provenance: dict[str, Any]) -> dict[str, Any]:
    """The few provenance columns of a results table: matcalc and model versions, weights sha256, dtype,
    device, when it finished (UTC) and whether it came from the cache."""
    if not provenance:
        return {}
    model = provenance.get("model") or {}
    parts = model.get("components") or [model]
    return {"matcalc_version": provenance.get("matcalc_version"),
            "model_version": " + ".join(_model_version(m) for m in parts),
            "weights_sha256": (" + ".join(m.get("weights_sha256") or "-" for m in parts)
                               if any(m.get("weights_sha256") for m in parts) else None),
            "dtype": provenance.get("dtype"),
            "device": provenance.get("device"), "finished_at": provenance.get("finished_at"),
            "cached": bool(provenance.get("cached", False))}


def _model_version(model: dict[str, Any]) -> str:
    """``0.3.0 (chgnet 0.4.2)``: the model's version and its package's."""
    version = str(model.get("version") or "")
    if model.get("package"):
        version = f"{version} ({model['package']} {model.get('package_version')})".strip()
    return version or "-"


def _figure(ax: Axes | None) -> tuple[Figure, Axes]:
    if ax is not None:
        return typing.cast("Figure", ax.figure), ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    return fig, fig.add_subplot()


def results_frame(results: typing.Iterable[Result | BaseException | None]) -> pd.DataFrame:
    """One row per result; failed entries (exceptions) become rows with an ``error`` column."""
    import pandas as pd

    rows = []
    for r in results:
        if isinstance(r, Result):
            rows.append(r.row())
        elif isinstance(r, BaseException):
            rows.append({"error": f"{type(r).__name__}: {r}"})
        elif r is None:
            rows.append({"error": "not computed"})
    return pd.DataFrame(rows)


def result_types() -> dict[str, type[Result]]:
    """Known result kinds -> dataclass."""
    return dict(_RESULT_TYPES)
