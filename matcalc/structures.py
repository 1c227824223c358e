"""Read and validate crystal structures from any common input into ``ase.Atoms``.

Accepted inputs (:func:`load_structure`):

* a path (``str`` or :class:`pathlib.Path`) to a CIF, POSCAR/CONTCAR, XYZ or extended-XYZ file;
* the *contents* of such a file as a string;
* an :class:`ase.Atoms` (copied, never modified);
* a :class:`pymatgen.core.Structure`;
* the name of a structure shipped with matcalc (:func:`list_builtins`), e.g. ``"CALF-20"``.

Every problem raises :class:`StructureError` (a ``ValueError``) whose message names it.
A structure's identity is :func:`structure_hash`: sha256 of a canonical form that does not
depend on atom order, on periodic images or on float noise below 1e-5 Å.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

log = logging.getLogger(__name__)

DEFAULT_MAX_ATOMS = 10_000
"""Largest structure accepted by default (atoms)."""
MIN_DISTANCE_A = 0.5
"""Two atoms closer than this (Å) mean a broken or disordered structure."""

_FORMATS = ("cif", "vasp", "extxyz", "xyz")
_SUFFIX_FORMAT = {
    ".cif": "cif",
    ".vasp": "vasp",
    ".poscar": "vasp",
    ".xyz": "extxyz",
    ".extxyz": "extxyz",
}
_VASP_NAMES = ("POSCAR", "CONTCAR")


class StructureError(ValueError):
    """A structure could not be read or failed validation; the message names the problem."""


# --------------------------------------------------------------------------- builtins
def _builtin_dir() -> Path:
    return Path(str(resources.files("matcalc") / "data" / "structures"))


def list_builtins() -> list[str]:
    """Names of the structures shipped with matcalc (DFT-optimized MOF cells)."""
    return sorted(p.stem for p in _builtin_dir().glob("*.cif"))


def builtin_path(name: str) -> Path:
    """Path of the builtin structure ``name`` (case-insensitive)."""
    lookup = {n.lower(): n for n in list_builtins()}
    key = name.lower().removesuffix(".cif")
    if key not in lookup:
        raise StructureError(f"unknown builtin structure {name!r}; builtins: {', '.join(list_builtins())}")
    return _builtin_dir() / f"{lookup[key]}.cif"


# --------------------------------------------------------------------------- reading
def detect_format(text: str) -> str:
    """Guess the file format of structure text: ``cif``, ``extxyz`` or ``vasp``."""
    stripped = text.lstrip()
    if not stripped:
        raise StructureError("empty structure text")
    if re.search(r"^\s*data_", text, re.M) and "_atom_site" in text:
        return "cif"
    first = stripped.splitlines()[0].strip()
    if first.isdigit():
        return "extxyz"
    lines = stripped.splitlines()
    if len(lines) >= 8:
        try:
            float(lines[1].split()[0])
            return "vasp"
        except (ValueError, IndexError):
            pass
    raise StructureError(
        "could not recognise the structure format (expected CIF with data_ and _atom_site, "
        "XYZ/extXYZ starting with the atom count, or POSCAR)"
    )


def _check_cif_occupancy(text: str) -> None:
    from ase.io.cif import parse_cif

    try:
        blocks = list(parse_cif(io.StringIO(text)))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a malformed CIF
        raise StructureError(f"malformed CIF: {exc}") from exc
    for block in blocks:
        occ = block.get("_atom_site_occupancy") if hasattr(block, "get") else None
        if occ is None:
            continue
        values = np.asarray([_cif_float(v) for v in occ], dtype=float)
        if np.any(values < 1.0 - 1e-6):
            n = int(np.sum(values < 1.0 - 1e-6))
            raise StructureError(
                f"partial occupancy: {n} site(s) have occupancy < 1 (disordered structure); "
                "order the structure first"
            )


def _cif_float(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    s = str(value).split("(")[0]
    try:
        return float(s)
    except ValueError:
        return 1.0  # '.' or '?': unknown means fully occupied


def _read_text(text: str, fmt: str | None) -> Atoms:
    from ase.io import read

    fmt = fmt or detect_format(text)
    if fmt not in _FORMATS:
        raise StructureError(f"unsupported format {fmt!r}; use one of {', '.join(_FORMATS)}")
    if fmt == "cif":
        _check_cif_occupancy(text)
    try:
        images = read(io.StringIO(text), format=fmt, index=":")
    except Exception as exc:  # noqa: BLE001 - ASE raises many types for bad files
        raise StructureError(f"malformed {fmt.upper()} structure: {exc}") from exc
    if not images:
        raise StructureError(f"no structure found in the {fmt.upper()} text")
    if len(images) > 1:
        log.info("structure text holds %d frames; using the last one", len(images))
    atoms = images[-1]
    if len(atoms) == 0:
        raise StructureError(f"the {fmt.upper()} text holds no atoms")
    return atoms


def _read_path(path: Path, fmt: str | None) -> Atoms:
    if not path.is_file():
        raise StructureError(f"no such structure file: {path}")
    if path.stat().st_size == 0:
        raise StructureError(f"empty file: {path}")
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError) as exc:
        raise StructureError(f"unreadable file {path}: {exc}") from exc
    if fmt is None:
        fmt = _SUFFIX_FORMAT.get(path.suffix.lower())
        if fmt is None and path.name.upper().startswith(_VASP_NAMES):
            fmt = "vasp"
    try:
        return _read_text(text, fmt)
    except StructureError as exc:
        raise StructureError(f"{path.name}: {exc}") from exc


def _looks_like_path(s: str) -> bool:
    return "\n" not in s and len(s) < 4096 and (os.sep in s or "." in s or Path(s).exists())


def read_structure(source: Any, *, fmt: str | None = None) -> Atoms:
    """Read ``source`` into a fresh :class:`ase.Atoms` without validating it."""
    if isinstance(source, Atoms):
        return source.copy()
    try:
        from pymatgen.core import IStructure, Structure

        if isinstance(source, (Structure, IStructure)):
            if not source.is_ordered:
                raise StructureError("partial occupancy: pymatgen Structure is disordered; order it first")
            from pymatgen.io.ase import AseAtomsAdaptor

            return AseAtomsAdaptor.get_atoms(source)
    except ImportError:  # pragma: no cover - pymatgen is a core dependency
        pass
    if isinstance(source, Path):
        return _read_path(source, fmt)
    if isinstance(source, bytes):
        try:
            source = source.decode()
        except UnicodeDecodeError as exc:
            raise StructureError(f"structure bytes are not text: {exc}") from exc
    if isinstance(source, str):
        if not source.strip():
            raise StructureError("empty structure text")
        if "\n" not in source.strip():
            name = source.strip()
            if name.lower().removesuffix(".cif") in {n.lower() for n in list_builtins()} and not Path(name).is_file():
                return _read_path(builtin_path(name), "cif")
            if _looks_like_path(name) or Path(name).exists():
                return _read_path(Path(name).expanduser(), fmt)
            raise StructureError(
                f"{name!r} is neither a file, structure text, nor a builtin "
                f"({', '.join(list_builtins())})"
            )
        return _read_text(source, fmt)
    raise StructureError(
        f"cannot read a structure from {type(source).__name__}; give a path, file text, "
        "ase.Atoms, pymatgen Structure or builtin name"
    )


# --------------------------------------------------------------------------- validation
def validate_structure(
    atoms: Atoms,
    *,
    require_cell: bool = True,
    max_atoms: int | None = DEFAULT_MAX_ATOMS,
    min_distance_A: float = MIN_DISTANCE_A,
    elements: Iterable[str] | None = None,
) -> Atoms:
    """Check ``atoms`` and return it; raise :class:`StructureError` naming the first problem.

    Args:
        require_cell: the calculation needs a 3D periodic cell.
        max_atoms: largest accepted number of atoms (``None``: no limit).
        min_distance_A: smallest accepted interatomic distance (Å).
        elements: chemical symbols the chosen model supports (``None``: any).
    """
    n = len(atoms)
    if n == 0:
        raise StructureError("structure has no atoms")
    if max_atoms is not None and n > max_atoms:
        raise StructureError(f"too many atoms: {n} > limit {max_atoms}")
    pos = atoms.get_positions()
    if not np.all(np.isfinite(pos)):
        bad = int(np.sum(~np.isfinite(pos).all(axis=1)))
        raise StructureError(f"non-finite (NaN/inf) coordinates on {bad} atom(s)")
    cell = np.asarray(atoms.cell)
    if not np.all(np.isfinite(cell)):
        raise StructureError("non-finite (NaN/inf) cell vectors")
    if require_cell:
        if not atoms.pbc.all():
            raise StructureError("no periodic cell: the structure is not periodic in 3D (pbc must be True)")
        if abs(atoms.cell.volume) < 1e-3:
            raise StructureError("no periodic cell: the cell is missing or degenerate (volume ~ 0 Å^3)")
    if elements is not None:
        allowed = set(elements)
        unsupported = sorted(set(atoms.get_chemical_symbols()) - allowed)
        if unsupported:
            raise StructureError(f"elements not supported by the model: {', '.join(unsupported)}")
    if n > 1 and min_distance_A > 0:
        dmin = _min_distance(atoms, min_distance_A)
        if dmin is not None:
            raise StructureError(
                f"atoms too close: smallest distance {dmin:.3f} Å < {min_distance_A} Å "
                "(overlapping atoms or disorder)"
            )
    return atoms


def _min_distance(atoms: Atoms, cutoff: float) -> float | None:
    """Smallest distance below ``cutoff`` (Å), or ``None`` if there is none."""
    from ase.neighborlist import neighbor_list

    probe = atoms
    if not atoms.pbc.all() and abs(atoms.cell.volume) < 1e-3:
        probe = atoms.copy()
        probe.pbc = False
        probe.cell = np.eye(3) * (np.ptp(atoms.positions, axis=0).max() + 10.0)
    d = neighbor_list("d", probe, cutoff, self_interaction=False)
    return float(d.min()) if len(d) else None


def load_structure(
    source: Any,
    *,
    fmt: str | None = None,
    require_cell: bool = True,
    max_atoms: int | None = DEFAULT_MAX_ATOMS,
    min_distance_A: float = MIN_DISTANCE_A,
    elements: Iterable[str] | None = None,
) -> Atoms:
    """Read and validate a structure (see module docs for the accepted inputs).

    Args:
        source: path, file text, ``ase.Atoms``, pymatgen ``Structure`` or builtin name.
        fmt: force a format (``cif``, ``vasp``, ``xyz``, ``extxyz``); default: by suffix and content.
        require_cell: the calculation needs a 3D periodic cell.
        max_atoms: largest accepted number of atoms (``None``: no limit).
        min_distance_A: smallest accepted interatomic distance (Å).
        elements: chemical symbols the chosen model supports (``None``: any).

    Returns:
        A new ``ase.Atoms`` (the input is never modified), with no calculator attached.
    """
    atoms = read_structure(source, fmt=fmt)
    atoms.calc = None
    return validate_structure(
        atoms,
        require_cell=require_cell,
        max_atoms=max_atoms,
        min_distance_A=min_distance_A,
        elements=elements,
    )


# --------------------------------------------------------------------------- identity & text
def structure_hash(atoms: Atoms, *, decimals: int = 5) -> str:
    """sha256 (hex) of a canonical form of ``atoms``.

    Invariant to atom order, to wrapping positions into the cell and to noise below
    ``10**-decimals`` (Å for the cell, fractional coordinates otherwise).
    """
    numbers = atoms.get_atomic_numbers()
    periodic = bool(atoms.pbc.all())
    if periodic:
        frac = atoms.get_scaled_positions(wrap=False)
        coords = np.round(np.mod(np.round(frac, decimals + 1), 1.0), decimals) % 1.0
    else:
        coords = np.round(atoms.get_positions() - atoms.get_positions().mean(axis=0), decimals)
    coords = coords + 0.0  # turn -0.0 into 0.0
    order = np.lexsort((coords[:, 2], coords[:, 1], coords[:, 0], numbers))
    h = hashlib.sha256()
    h.update(b"pbc" if periodic else b"mol")
    h.update(np.round(np.asarray(atoms.cell), decimals).astype("<f8").tobytes() if periodic else b"")
    h.update(numbers[order].astype("<i8").tobytes())
    h.update(np.ascontiguousarray(coords[order]).astype("<f8").tobytes())
    return h.hexdigest()


def to_text(atoms: Atoms, fmt: str = "extxyz") -> str:
    """Serialise ``atoms`` as structure text (``extxyz`` keeps cell and pbc losslessly)."""
    from ase.io import write

    buf = io.StringIO()
    clean = atoms.copy()
    clean.calc = None
    write(buf, clean, format=fmt)
    return buf.getvalue()


def atoms_to_dict(atoms: Atoms) -> dict[str, Any]:
    """JSON-safe dict of an ``Atoms`` (symbols, positions Å, cell Å, pbc)."""
    return {
        "symbols": atoms.get_chemical_symbols(),
        "positions_A": atoms.get_positions().tolist(),
        "cell_A": np.asarray(atoms.cell).tolist(),
        "pbc": [bool(p) for p in atoms.pbc],
    }


def atoms_from_dict(data: dict[str, Any]) -> Atoms:
    """Inverse of :func:`atoms_to_dict`."""
    return Atoms(
        symbols=data["symbols"],
        positions=data["positions_A"],
        cell=data["cell_A"],
        pbc=data["pbc"],
    )


def formula(atoms: Atoms) -> str:
    """Empirical-order chemical formula, e.g. ``C10H2Co2O8``."""
    return atoms.get_chemical_formula(mode="hill", empirical=False)


def mass_g_per_mol(atoms: Atoms) -> float:
    """Molar mass of the cell (g/mol)."""
    return float(np.sum(atoms.get_masses()))


__all__ = [
    "DEFAULT_MAX_ATOMS",
    "MIN_DISTANCE_A",
    "StructureError",
    "atoms_from_dict",
    "atoms_to_dict",
    "builtin_path",
    "detect_format",
    "formula",
    "list_builtins",
    "load_structure",
    "mass_g_per_mol",
    "read_structure",
    "structure_hash",
    "to_text",
    "validate_structure",
]

