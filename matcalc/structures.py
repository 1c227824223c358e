"""Read and validate crystal structures from any common input into ``ase.Atoms``.

Accepted inputs (`load_structure`):

* a path (``str`` or `pathlib.Path`) to a CIF, POSCAR/CONTCAR, XYZ or extended-XYZ file;
* the *contents* of such a file as a string;
* an `ase.Atoms` (copied, never modified);
* a `pymatgen.core.Structure`;
* the name of a structure shipped with matcalc (`list_builtins`), e.g. ``"CALF-20"``.

Every problem raises `StructureError` (a ``ValueError``) whose message names it.
A structure's identity is `structure_hash`: sha256 of a canonical form that does not
depend on atom order, on periodic images or on float noise below 1e-5 Å.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Self

import numpy as np
from ase import Atoms

from matcalc.quiet import quiet_warnings

log = logging.getLogger(__name__)

DEFAULT_MAX_ATOMS = 10_000
"""Largest structure accepted by default (atoms)."""
MIN_DISTANCE_A = 0.5
"""Two atoms closer than this (Å) mean a broken or disordered structure."""
MAX_SEARCH_CUBES = 2_000_000
"""Beyond this many cutoff-sized cubes in the box of the atoms (atoms 10⁴ Å apart, a huge cell),
`smallest_distance` uses ASE's neighbour list, which caps its bins, instead of pymatgen's dense grid."""
CIF_SETTING_NOISE = "crystal system"
"""Start of ASE's "crystal system 'cubic' is not interpreted for space group ..." warning, raised for every
symmetric CIF whatever its setting (matcalc expands the symmetry operations the file lists); silenced."""
EXTXYZ_INFO_NOISE = "Skipping unhashable information"
"""ASE's extxyz writer skips ``atoms.info`` entries it cannot store (e.g. ``adsorbate_info`` of
``ase.build`` slabs) with this warning; the skip is what we want, the warning is noise."""

FORMATS = ("cif", "vasp", "extxyz")
"""Structure text formats read (canonical names)."""
FORMAT_ALIASES = {"poscar": "vasp", "xyz": "extxyz"}
"""Other names of `FORMATS` that are accepted too."""
INPUT_FORMATS = (*FORMATS, *FORMAT_ALIASES)
"""Every accepted format name."""
SUFFIX_FORMATS: dict[str, str] = {
    ".cif": "cif",
    ".vasp": "vasp",
    ".poscar": "vasp",
    ".xyz": "extxyz",
    ".extxyz": "extxyz",
}
_VASP_NAMES = ("POSCAR", "CONTCAR")


class StructureError(ValueError):
    """A structure could not be read or failed validation; the message names the problem."""


class TooManyAtomsError(StructureError):
    """The structure has (or would expand to) more atoms than the limit.

    ``n_atoms`` is the count, known *before* any expansion for CIF (symmetry operations × sites),
    POSCAR (the counts line) and XYZ (the frame headers).
    """

    def __init__(self, message: str, *, n_atoms: int, max_atoms: int) -> None:
        super().__init__(message)
        self.n_atoms = n_atoms
        self.max_atoms = max_atoms


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
    if re.search(r"^\s*data_", text, re.MULTILINE) and "_atom_site" in text:
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


_CIF_SYMPREC = 1e-3
"""Fractional tolerance under which two symmetry images are one atom (ASE's ``crystal`` default)."""
_MAX_SPACE_GROUP_OPS = 192
"""No space group has more symmetry operations (Fm-3m, Im-3m ... with centring)."""
_SYMOP_TERM = r"(?:\d+(?:\.\d*)?(?:/\d+(?:\.\d*)?)?|\.\d+|[xyz]|\d*(?:\.\d*)?\*?[xyz])"
_SYMOP_COMPONENT = re.compile(rf"^[+-]?{_SYMOP_TERM}(?:[+-]{_SYMOP_TERM})*$")
_SYMOP_TAGS = ("_space_group_symop_operation_xyz", "_space_group_symop.operation_xyz", "_symmetry_equiv_pos_as_xyz")
_SITE_FRACT = ("_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z")
_SITE_CARTN = ("_atom_site_cartn_x", "_atom_site_cartn_y", "_atom_site_cartn_z")


def _parse_cif_blocks(text: str) -> tuple[list[Any], list[str]]:
    """ASE's CIF blocks and what its parser complained about (``UserWarning`` text, e.g. a loop row with the wrong
    number of tokens: kept for the error message, never shown as a warning)."""
    import warnings

    from ase.io.cif import parse_cif

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            blocks = list(parse_cif(io.StringIO(text)))
        notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        for note in notes:
            log.debug("CIF parser: %s", note)
        return blocks, notes
    except IndexError as exc:  # ASE pops past the last line
        raise StructureError(f"malformed CIF: the text ends in the middle of an item or loop (truncated?): {exc}") \
            from exc
    except Exception as exc:  # noqa: BLE001 - any parse failure is a malformed CIF
        raise StructureError(f"malformed CIF: {exc}") from exc


def _cif_site_symbols(block: Any) -> list[str] | None:
    """Element symbols of the sites (as ASE reads them), ``None`` when the block has no sites;
    a label naming no element is an error here, not an AttributeError deep in ASE."""
    from ase.data import atomic_numbers

    for tag in ("_atom_site_type_symbol", "_atom_site_label"):
        labels = block.get(tag)
        if labels is None:
            continue
        if isinstance(labels, (str, int, float)):
            labels = [labels]
        symbols = []
        for label in labels:
            text = str(label)
            if text in (".", "?"):
                return None
            m = re.search(r"[A-Z][a-z]?", text)
            if m is None:
                raise StructureError(f"malformed CIF: site {tag[11:]} {text!r} names no chemical element "
                                     "(expected e.g. 'Zn' or 'Zn1')")
            if m.group(0) not in atomic_numbers and m.group(0) != "D":
                raise StructureError(f"malformed CIF: site {tag[11:]} {text!r}: unknown element {m.group(0)!r}")
            symbols.append(m.group(0))
        return symbols
    return None


def _cif_float(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    s = str(value).split("(")[0]
    try:
        return float(s)
    except ValueError:
        return 1.0  # '.' or '?': unknown means fully occupied


def _cif_number(value: Any, what: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).split("(")[0]
    try:
        return float(text)
    except ValueError:
        raise StructureError(f"malformed CIF: {what} is not a number: {value!r}") from None


def _check_cif_block(block: Any, n_sites: int) -> None:
    """Cell, coordinates and symmetry operations are complete and well formed (clear errors, no ASE crash)."""
    present = [t for t in block.cell_tags if t in block]
    if present and len(present) < len(block.cell_tags):
        missing = [t for t in block.cell_tags if t not in block]
        raise StructureError(f"malformed CIF: incomplete cell, missing {', '.join(missing)}")
    for tag in present:
        v = _cif_number(block[tag], tag)
        if not (np.isfinite(v) and v > 0 and (v < 180 or "length" in tag)):
            raise StructureError(f"malformed CIF: {tag} = {v:g} is out of range")
    coords = _SITE_FRACT if all(t in block for t in _SITE_FRACT) else _SITE_CARTN
    for tag in coords:
        values = block.get(tag)
        values = values if isinstance(values, list) else [values]
        if len(values) != n_sites:
            raise StructureError(f"malformed CIF: {len(values)} values of {tag} for {n_sites} sites")
        for v in values:
            if not np.isfinite(_cif_number(v, f"{tag} value")):
                raise StructureError(f"malformed CIF: {tag} value {v!r} is not finite")
    for tag in _SYMOP_TAGS:
        ops = block.get(tag)
        if ops is None:
            continue
        for op in [ops] if isinstance(ops, str) else ops:
            parts = str(op).replace(" ", "").lower().split(",")
            if len(parts) != 3 or not all(_SYMOP_COMPONENT.match(p) for p in parts):
                raise StructureError(f"malformed CIF: symmetry operation {op!r} ({tag}) is not of the form "
                                     "'x, y, z' / '-y+1/2, x, z+1/4'")


def _cif_spacegroup(block: Any) -> Any:
    try:
        spg = block.get_spacegroup(True)
    except AssertionError:
        raise StructureError("malformed CIF: the space-group number does not match its symbol") from None
    except Exception as exc:  # noqa: BLE001 - SpacegroupNotFoundError, ZeroDivisionError, ...
        raise StructureError(f"malformed CIF: space group / symmetry operations: {type(exc).__name__}: {exc}") \
            from exc
    rot, _ = _symmetry_operations(spg)
    det = np.rint(np.linalg.det(rot.astype(float)))
    if not np.all(np.abs(det) == 1):
        bad = int(np.sum(np.abs(det) != 1))
        raise StructureError(f"malformed CIF: {bad} symmetry operation(s) are not rotations (determinant not ±1)")
    if len(rot) > _MAX_SPACE_GROUP_OPS:
        raise StructureError(f"malformed CIF: {len(rot)} distinct symmetry operations; no space group has more "
                             f"than {_MAX_SPACE_GROUP_OPS}")
    return spg


def _symmetry_operations(spacegroup: Any) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rotations (n, 3, 3) and translations (n, 3), in the order ASE's ``equivalent_sites``
    first applies them (an operation listed twice, e.g. inversions given explicitly *and* implied by a
    centrosymmetric group, adds no image)."""
    ops = spacegroup.get_symop()
    rot = np.array([r for r, _ in ops]).reshape(-1, 3, 3)
    trans = np.array([t for _, t in ops], dtype=float).reshape(-1, 3)
    key = np.concatenate([rot.reshape(len(rot), 9), np.mod(np.round(np.mod(trans, 1.0) * 1e6), 1e6)], axis=1)
    _, first = np.unique(key, axis=0, return_index=True)
    first.sort()
    return rot[first], trans[first]


def cif_atom_count(block: Any, spacegroup: Any, n_sites: int) -> int:
    """Atoms the block expands to (an upper bound: images closer than 1e-3 in fractional coordinates
    are one atom, as in ASE), from the sites and symmetry operations alone, without building them."""
    rot, trans = _symmetry_operations(spacegroup)
    frac = block.get_unsymmetrized_structure().get_scaled_positions(wrap=False)[:n_sites]
    grid = round(1.0 / _CIF_SYMPREC)
    total = 0
    for start in range(0, len(frac), 256):  # (sites, ops, 3) in chunks: memory stays small
        images = np.einsum("oij,sj->soi", rot, frac[start:start + 256]) + trans[None, :, :]
        cells = np.mod(np.floor(np.mod(images, 1.0) * grid + 0.5).astype(np.int64), grid)
        keys = (cells[..., 0] * grid + cells[..., 1]) * grid + cells[..., 2]
        keys += np.arange(len(keys), dtype=np.int64)[:, None] * grid**3
        total += len(np.unique(keys))
    return total


def _read_cif(text: str, max_atoms: int | None) -> Atoms:
    """The last structure of a CIF; its size is checked from symmetry operations x sites *before* ASE expands it."""
    blocks, notes = _parse_cif_blocks(text)
    found = [(b, sym) for b in blocks if (sym := _cif_site_symbols(b)) is not None and b.has_structure()]
    if not found:
        raise StructureError("no structure found in the CIF text (no block with _atom_site labels and coordinates)"
                             + "".join(f"; {n}" for n in notes[:3]))
    if len(found) > 1:
        log.info("CIF holds %d structures; using the last one", len(found))
    block, symbols = found[-1]
    n_sites = len(symbols)
    _check_cif_block(block, n_sites)
    occ = block.get("_atom_site_occupancy")
    if occ is not None:
        values = np.asarray([_cif_float(v) for v in (occ if isinstance(occ, list) else [occ])], dtype=float)
        if np.any(values < 1.0 - 1e-6):
            n = int(np.sum(values < 1.0 - 1e-6))
            raise StructureError(
                f"partial occupancy: {n} site(s) have occupancy < 1 (disordered structure); "
                "order the structure first"
            )
    if block.get_cell().rank == 3:
        spg = _cif_spacegroup(block)
        n_ops = len(_symmetry_operations(spg)[0])
        if max_atoms is not None and n_sites * n_ops > max_atoms:
            n = cif_atom_count(block, spg, n_sites)
            if n > max_atoms:
                raise TooManyAtomsError(
                    f"too many atoms: the CIF expands to {n} atoms ({n_sites} sites x {n_ops} symmetry "
                    f"operations) > limit {max_atoms}", n_atoms=n, max_atoms=max_atoms)
    try:
        if block.get_cell().rank != 3:
            return block.get_atoms()  # no cell: the sites as given
        return _expand_cif(block, spg, symbols)
    except StructureError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever ASE still trips over is the file's fault
        raise StructureError(f"malformed CIF: {type(exc).__name__}: {exc}") from exc


def equivalent_sites(frac: np.ndarray, rotations: np.ndarray, translations: np.ndarray,
                     symprec: float = _CIF_SYMPREC) -> tuple[np.ndarray, list[int]]:
    """The symmetry images of the sites ``frac`` (fractional), as ``ase.spacegroup.Spacegroup.equivalent_sites``
    with ``onduplicates="keep"`` computes them (same images, same order), in O(sites x operations) instead of
    ASE's O(sites²) Python loop (a 2000-site P1 CIF took ASE a minute).

    Returns ``(sites, kinds)``: the images in [0, 1) and the index of the input site of each.
    """
    from scipy.spatial import cKDTree

    frac = np.asarray(frac, dtype=float).reshape(-1, 3)
    n_ops = len(rotations)
    orbits: list[np.ndarray] = []
    for start in range(0, len(frac), 64):
        cand = (np.einsum("oij,sj->soi", rotations, frac[start:start + 64]) + translations % 1.0) % 1.0
        if n_ops == 1:
            orbits.extend(cand)
            continue
        diff = cand[:, :, None, :] - cand[:, None, :, :]
        diff -= np.rint(diff)
        same = np.all(np.abs(diff) < symprec, axis=-1)  # (sites, ops, ops)
        for c, eq in zip(cand, same, strict=True):
            if eq.sum() == n_ops:  # general position: every image distinct
                orbits.append(c)
                continue
            keep = np.zeros(n_ops, dtype=bool)
            keep[0] = True
            for m in range(1, n_ops):  # ASE's rule: an image is new unless it equals one kept before it
                keep[m] = not np.any(eq[m, :m] & keep[:m])
            orbits.append(c[keep])
    # a site that is an image of an earlier kept site's orbit adds nothing (ASE's "keep")
    owner = np.concatenate([np.full(len(o), k) for k, o in enumerate(orbits)])
    points = np.concatenate(orbits) % 1.0
    points[points >= 1.0] = 0.0
    tree = cKDTree(points, boxsize=1.0)
    wrapped = frac % 1.0
    wrapped[wrapped >= 1.0] = 0.0
    hits = tree.query_ball_point(wrapped, r=symprec * (1 - 1e-9), p=np.inf)
    kept: list[int] = []
    kept_set: set[int] = set()
    for k in range(len(frac)):
        if not any(owner[h] < k and owner[h] in kept_set for h in hits[k]):
            kept.append(k)
            kept_set.add(k)
    sites = np.concatenate([orbits[k] for k in kept], axis=0)
    kinds = [k for k in kept for _ in range(len(orbits[k]))]
    return sites, kinds


def _expand_cif(block: Any, spacegroup: Any, symbols: list[str]) -> Atoms:
    """The conventional cell of a CIF block: what ``CIFBlock.get_atoms()`` builds (fully occupied sites), fast."""
    basis = block.get_unsymmetrized_structure()
    rot, trans = _symmetry_operations(spacegroup)
    sites, kinds = equivalent_sites(basis.get_scaled_positions(wrap=False), rot, trans)
    deuterium = np.array([symbols[k] == "D" for k in kinds])
    atoms = Atoms([("H" if symbols[k] == "D" else symbols[k]) for k in kinds], scaled_positions=sites,
                  cell=basis.cell, pbc=True, info={"spacegroup": spacegroup, "unit_cell": "conventional"})
    if deuterium.any():
        masses = atoms.get_masses()
        masses[deuterium] = 2.01355
        atoms.set_masses(masses)
    return atoms


def _check_poscar_size(text: str, max_atoms: int | None) -> None:
    """The counts line bounds the atoms (and must match the coordinate lines) before ASE allocates them."""
    lines = text.strip("\n").splitlines()
    for i in (5, 6):
        if i < len(lines):
            fields = lines[i].split()
            if fields and all(f.isdigit() for f in fields):
                n = sum(int(f) for f in fields)
                break
    else:
        return  # no counts line where VASP puts it: ASE's reader says what is wrong
    if max_atoms is not None and n > max_atoms:
        raise TooManyAtomsError(f"too many atoms: {n} (POSCAR counts line) > limit {max_atoms}", n_atoms=n,
                                max_atoms=max_atoms)
    left = len(lines) - i - 2
    if n > left:
        raise StructureError(f"malformed POSCAR: the counts line says {n} atoms but at most {left} coordinate "
                             "lines follow")


def _check_xyz_size(text: str, max_atoms: int | None) -> None:
    """Each frame's header count bounds its atoms (and must fit in the text) before ASE allocates them."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        head = lines[i].strip()
        if not head:
            i += 1
            continue
        try:
            n = int(head)
        except ValueError:
            raise StructureError(f"malformed XYZ: line {i + 1} should be an atom count, got {head[:40]!r}") from None
        if n < 0:
            raise StructureError(f"malformed XYZ: negative atom count {n} on line {i + 1}")
        if max_atoms is not None and n > max_atoms:
            raise TooManyAtomsError(f"too many atoms: {n} (XYZ header, line {i + 1}) > limit {max_atoms}",
                                    n_atoms=n, max_atoms=max_atoms)
        if i + 2 + n > len(lines):
            raise StructureError(f"malformed XYZ: the frame at line {i + 1} says {n} atoms but only "
                                 f"{max(0, len(lines) - i - 2)} lines follow")
        i += 2 + n


def _read_text(text: str, fmt: str | None, max_atoms: int | None = None) -> Atoms:
    from ase.io import read

    fmt = fmt or detect_format(text)
    if fmt not in INPUT_FORMATS:
        raise StructureError(f"unsupported format {fmt!r}; use one of {', '.join(INPUT_FORMATS)}")
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if fmt == "cif":
        with quiet_warnings(CIF_SETTING_NOISE):
            atoms = _read_cif(text, max_atoms)
    else:
        (_check_poscar_size if fmt == "vasp" else _check_xyz_size)(text, max_atoms)
        try:
            images = read(io.StringIO(text), format=fmt, index=":")
        except Exception as exc:  # noqa: BLE001 - ASE raises many types for bad files
            raise StructureError(f"malformed {fmt.upper()} structure: {exc}") from exc
        if not images:
            raise StructureError(f"no structure found in the {fmt.upper()} text")
        if len(images) > 1:
            log.info("structure text holds %d frames; using the last one", len(images))
        atoms = images[-1]
        assert isinstance(atoms, Atoms)
    if len(atoms) == 0:
        raise StructureError(f"the {fmt.upper()} text holds no atoms")
    if max_atoms is not None and len(atoms) > max_atoms:
        raise TooManyAtomsError(f"too many atoms: {len(atoms)} > limit {max_atoms}", n_atoms=len(atoms),
                                max_atoms=max_atoms)
    return atoms


def _read_path(path: Path, fmt: str | None, max_atoms: int | None = None) -> Atoms:
    if not path.is_file():
        raise StructureError(f"no such structure file: {path}")
    if path.stat().st_size == 0:
        raise StructureError(f"empty file: {path}")
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError) as exc:
        raise StructureError(f"unreadable file {path}: {exc}") from exc
    if fmt is None:
        fmt = SUFFIX_FORMATS.get(path.suffix.lower())
        if fmt is None and path.name.upper().startswith(_VASP_NAMES):
            fmt = "vasp"
    try:
        return _read_text(text, fmt, max_atoms)
    except TooManyAtomsError as exc:
        raise TooManyAtomsError(f"{path.name}: {exc}", n_atoms=exc.n_atoms, max_atoms=exc.max_atoms) from exc
    except StructureError as exc:
        raise StructureError(f"{path.name}: {exc}") from exc


def _looks_like_path(s: str) -> bool:
    return "\n" not in s and len(s) < 4096 and (os.sep in s or "." in s or Path(s).exists())


def read_structure(source: Any, *, fmt: str | None = None, max_atoms: int | None = None) -> Atoms:
    """Read ``source`` into a fresh `ase.Atoms` without validating it.

    With ``max_atoms``, file text whose atom count exceeds it is refused with `TooManyAtomsError`
    *before* it is expanded or allocated: a CIF by its sites x symmetry operations, a POSCAR by its
    counts line, an XYZ by its frame headers.
    """
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
        return _read_path(source, fmt, max_atoms)
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
                return _read_path(builtin_path(name), "cif", max_atoms)
            if _looks_like_path(name) or Path(name).exists():
                return _read_path(Path(name).expanduser(), fmt, max_atoms)
            raise StructureError(
                f"{name!r} is neither a file, structure text, nor a builtin "
                f"({', '.join(list_builtins())})"
            )
        return _read_text(source, fmt, max_atoms)
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
    """Check ``atoms`` and return it; raise `StructureError` naming the first problem.

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
        raise TooManyAtomsError(f"too many atoms: {n} > limit {max_atoms}", n_atoms=n, max_atoms=max_atoms)
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
        dmin = smallest_distance(atoms, min_distance_A)
        if dmin is not None:
            raise StructureError(
                f"atoms too close: smallest distance {dmin:.3f} Å < {min_distance_A} Å "
                "(overlapping atoms or disorder)"
            )
    return atoms


def smallest_distance(atoms: Atoms, cutoff: float) -> float | None:
    """Smallest distance below ``cutoff`` (Å), or ``None`` if there is none (pymatgen's compiled neighbour
    search: ~0.1 ms for a MOF cell where ASE's ``neighbor_list`` takes several ms, per structure of a screen)."""
    from pymatgen.optimization.neighbors import find_points_in_spheres

    cell = np.asarray(atoms.cell, dtype=float)
    pbc = np.asarray(atoms.pbc, dtype=np.int64)
    if abs(atoms.cell.volume) < 1e-3:  # no usable cell (none, or degenerate): a box around the atoms
        cell = np.eye(3) * (np.ptp(atoms.positions, axis=0).max() + 10.0)
        pbc = np.zeros(3, dtype=np.int64)
    cart = np.asarray(atoms.positions, dtype=float)
    if pbc.any():  # wrap periodic directions into the cell: same distances, a bounded search box
        scaled = np.linalg.solve(cell.T, cart.T).T
        scaled[:, pbc.astype(bool)] %= 1.0
        cart = scaled @ cell
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) @ cell
    box = np.ptp(np.vstack([cart, corners if pbc.any() else cart]), axis=0)
    if np.prod(np.maximum(box, cutoff) / cutoff) > MAX_SEARCH_CUBES:  # pymatgen bins the box densely
        from ase.neighborlist import neighbor_list

        probe = atoms.copy()
        probe.cell, probe.pbc = cell, pbc.astype(bool)
        d = neighbor_list("d", probe, cutoff, self_interaction=False)
        return float(d.min()) if len(d) else None
    cart = np.ascontiguousarray(cart)
    centre, neighbour, image, distance = find_points_in_spheres(cart, cart, r=float(cutoff), pbc=pbc,
                                                                lattice=np.ascontiguousarray(cell), tol=1e-8)
    other = (centre != neighbour) | np.any(image != 0, axis=1)  # not an atom with itself
    d = distance[other]
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
    atoms = read_structure(source, fmt=fmt, max_atoms=max_atoms)
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
    with quiet_warnings(EXTXYZ_INFO_NOISE):
        write(buf, clean, format=fmt)
    return buf.getvalue()


OUTPUT_SUFFIXES: dict[str, str] = {**SUFFIX_FORMATS, ".traj": "traj"}
"""File suffix -> format of the structure files matcalc writes (``POSCAR``/``CONTCAR`` names: VASP)."""
MULTI_IMAGE_FORMATS = ("extxyz", "traj", "cif")
"""Formats that hold several structures in one file."""


def output_format(path: str | os.PathLike[str]) -> str:
    """The format of a structure file to write, from its suffix (`OUTPUT_SUFFIXES`); ``ValueError`` when
    the suffix says none."""
    p = Path(path)
    fmt = OUTPUT_SUFFIXES.get(p.suffix.lower())
    if fmt is None and p.name.upper().startswith(_VASP_NAMES):
        fmt = "vasp"
    if fmt is None:
        raise ValueError(f"cannot tell a structure format from the file name {p.name!r}: end it in "
                         f"{', '.join(sorted(OUTPUT_SUFFIXES))} (or name it POSCAR)")
    return fmt


def bare_copy(atoms: Atoms) -> Atoms:
    """A copy of ``atoms`` without calculator or constraints: what a calculation relaxes, strains or stores."""
    out = atoms.copy()
    out.calc = None
    out.set_constraint()
    return out


def write_structures(path: str | os.PathLike[str], images: Atoms | Sequence[Atoms]) -> Path:
    """Write one structure or several (one file, in order) to ``path``, the format from its suffix
    (`output_format`: CIF, POSCAR, extended XYZ, ASE trajectory). Returns the path.

    Raises:
        ValueError: the suffix names no format, several structures for a one-structure format (POSCAR), or a
            structure without a periodic cell for CIF or POSCAR (use ``.xyz``).
    """
    from ase.io import write

    frames = [images] if isinstance(images, Atoms) else list(images)
    if not frames:
        raise ValueError("no structure to write")
    fmt = output_format(path)
    if len(frames) > 1 and fmt not in MULTI_IMAGE_FORMATS:
        raise ValueError(f"{Path(path).name}: {fmt} holds one structure, got {len(frames)}: write one of them "
                         f"(index=) or use one of {', '.join(MULTI_IMAGE_FORMATS)}")
    if fmt in ("cif", "vasp") and not all(a.pbc.all() and a.cell.rank == 3 for a in frames):
        raise ValueError(f"{Path(path).name}: {fmt} needs a periodic cell; a molecule goes to .xyz")
    clean = [bare_copy(a) for a in frames]
    out = Path(path)
    with quiet_warnings(EXTXYZ_INFO_NOISE):
        write(out, clean if len(clean) > 1 else clean[0], format=fmt)
    return out


TRAJECTORY_SUFFIXES: dict[str, str] = {".traj": "traj", ".xyz": "extxyz", ".extxyz": "extxyz"}
"""File suffix -> format of a trajectory (ASE's binary ``.traj``, or extended XYZ, one frame after another)."""


def trajectory_format(path: str | os.PathLike[str]) -> str:
    """The format of a trajectory file from its suffix (`TRAJECTORY_SUFFIXES`); ``ValueError`` otherwise."""
    fmt = TRAJECTORY_SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"trajectory must end in {', '.join(TRAJECTORY_SUFFIXES)} (ASE trajectory or extended "
                         f"XYZ), got {Path(path).name!r}")
    return fmt


class TrajectoryWriter:
    """Frames written to a trajectory file as they come: ASE's ``Trajectory`` for ``.traj``, extended XYZ for
    ``.xyz``/``.extxyz`` (flushed after every frame, so ASE's GUI or OVITO can open a run still going). Each
    frame keeps the cell, pbc and, when the structure has them, its energy, forces and stress."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.format = trajectory_format(path)
        self.frames = 0
        self._traj: Any = None
        self._fh: Any = None
        if self.format == "traj":
            from ase.io import Trajectory

            self._traj = Trajectory(str(self.path), "w")
        else:
            self._fh = self.path.open("w", encoding="utf-8")

    def write(self, atoms: Atoms) -> None:
        """Append ``atoms`` (with its calculator's results, when it has them) as the next frame."""
        if self._traj is not None:
            self._traj.write(atoms)
        else:
            from ase.io import write

            with quiet_warnings(EXTXYZ_INFO_NOISE):
                write(self._fh, atoms, format="extxyz")
            self._fh.flush()
        self.frames += 1

    def close(self) -> None:
        if self._traj is not None:
            self._traj.close()
        if self._fh is not None:
            self._fh.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def atoms_to_dict(atoms: Atoms) -> dict[str, Any]:
    """JSON-safe dict of an ``Atoms`` (symbols, positions Å, cell Å, pbc)."""
    return {
        "symbols": atoms.get_chemical_symbols(),
        "positions_A": atoms.get_positions().tolist(),
        "cell_A": np.asarray(atoms.cell).tolist(),
        "pbc": [bool(p) for p in atoms.pbc],
    }


def atoms_from_dict(data: dict[str, Any]) -> Atoms:
    """Inverse of `atoms_to_dict`."""
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
    "MULTI_IMAGE_FORMATS",
    "OUTPUT_SUFFIXES",
    "TRAJECTORY_SUFFIXES",
    "StructureError",
    "TooManyAtomsError",
    "TrajectoryWriter",
    "atoms_from_dict",
    "atoms_to_dict",
    "builtin_path",
    "cif_atom_count",
    "detect_format",
    "equivalent_sites",
    "formula",
    "list_builtins",
    "load_structure",
    "mass_g_per_mol",
    "output_format",
    "read_structure",
    "structure_hash",
    "to_text",
    "trajectory_format",
    "validate_structure",
    "write_structures",
]

