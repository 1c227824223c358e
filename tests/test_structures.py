"""Reading every accepted input form, and one test per bad input (error type + message)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.io import read

from matcalc.structures import (
    StructureError,
    atoms_from_dict,
    atoms_to_dict,
    builtin_path,
    list_builtins,
    load_structure,
    structure_hash,
    to_text,
)

DATA = Path(__file__).parent / "data"
CIF = DATA / "RSM0009.cif"


def _same(a: Atoms, b: Atoms) -> None:
    assert a.get_chemical_symbols() == b.get_chemical_symbols()
    np.testing.assert_allclose(a.cell.cellpar(), b.cell.cellpar(), atol=1e-5)  # orientation may differ
    np.testing.assert_allclose(a.get_scaled_positions(), b.get_scaled_positions(), atol=1e-5)


@pytest.fixture(scope="module")
def reference() -> Atoms:
    return read(CIF)  # plain ASE, independent of matcalc's reader


@pytest.mark.parametrize("name", ["RSM0009.cif", "RSM0009.vasp", "RSM0009.extxyz"])
def test_file_formats_by_suffix(name: str, reference: Atoms) -> None:
    _same(load_structure(DATA / name), reference)
    _same(load_structure(str(DATA / name)), reference)


@pytest.mark.parametrize("name", ["RSM0009.cif", "RSM0009.vasp", "RSM0009.extxyz"])
def test_file_contents_by_content(name: str, reference: Atoms) -> None:
    _same(load_structure((DATA / name).read_text()), reference)


def test_poscar_named_file_without_suffix(tmp_path: Path, reference: Atoms) -> None:
    p = tmp_path / "POSCAR"
    p.write_text((DATA / "RSM0009.vasp").read_text())
    _same(load_structure(p), reference)


def test_atoms_are_copied_not_modified(reference: Atoms) -> None:
    original = reference.copy()
    loaded = load_structure(reference)
    loaded.positions += 1.0
    _same(reference, original)


def test_pymatgen_structure(reference: Atoms) -> None:
    from pymatgen.core import Structure

    _same(load_structure(Structure.from_file(str(CIF))), reference)


def test_builtins_all_load_and_match_their_files() -> None:
    names = list_builtins()
    assert {"CALF-20", "Zn-MOF-74", "MOF-5", "RSM0009"} <= set(names)
    for name in names:
        atoms = load_structure(name)
        _same(atoms, read(builtin_path(name)))
    assert len(load_structure("calf-20")) == 44  # case-insensitive


def test_hash_is_canonical(reference: Atoms) -> None:
    h = structure_hash(reference)
    perm = reference[np.random.default_rng(0).permutation(len(reference))]
    shifted = reference.copy()
    shifted.positions += reference.cell[0]  # a periodic image
    noisy = reference.copy()
    noisy.positions += 1e-8
    assert structure_hash(perm) == h
    assert structure_hash(shifted) == h
    assert structure_hash(noisy) == h
    moved = reference.copy()
    moved.positions[0] += 0.01
    assert structure_hash(moved) != h
    assert len(h) == 64


def test_text_and_dict_round_trips(reference: Atoms) -> None:
    _same(load_structure(to_text(reference)), reference)
    _same(atoms_from_dict(atoms_to_dict(reference)), reference)


def test_molecule_allowed_when_no_cell_needed() -> None:
    atoms = load_structure(DATA / "co2.xyz", require_cell=False)
    assert atoms.get_chemical_formula() == "CO2"


# ----------------------------------------------------------------- bad inputs
def _raises(match: str, source: object, **kw: object) -> StructureError:
    with pytest.raises(StructureError, match=match) as info:
        load_structure(source, **kw)
    assert isinstance(info.value, ValueError)
    return info.value


def test_missing_file() -> None:
    _raises("no such structure file", DATA / "does_not_exist.cif")


def test_empty_file() -> None:
    _raises("empty file", DATA / "empty.cif")


def test_empty_text() -> None:
    _raises("empty structure text", "   \n  ")


def test_truncated_cif() -> None:
    _raises("malformed CIF.*incomplete row", DATA / "truncated.cif")


def test_garbage_cif() -> None:
    _raises("malformed CIF", DATA / "garbage.cif")


def test_unrecognised_text() -> None:
    _raises("could not recognise the structure format", "hello\nworld\n")


def test_unknown_name() -> None:
    err = _raises("neither a file, structure text, nor a builtin", "NoSuchMOF")
    assert "CALF-20" in str(err)


def test_unreadable_type() -> None:
    _raises("cannot read a structure from int", 42)


def test_no_periodic_cell() -> None:
    _raises("no periodic cell", DATA / "co2.xyz")
    _raises("no periodic cell", molecule("H2O"))


def test_degenerate_cell() -> None:
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [2, 0, 0]], cell=[[3, 0, 0], [0, 3, 0], [0, 0, 0]], pbc=True)
    _raises("degenerate", atoms)


def test_nan_coordinates() -> None:
    atoms = bulk("Cu", cubic=True)
    atoms.positions[1, 0] = np.nan
    _raises("non-finite", atoms)


def test_inf_coordinates() -> None:
    atoms = bulk("Cu", cubic=True)
    atoms.positions[2, 2] = np.inf
    _raises("non-finite", atoms)


def test_atoms_too_close() -> None:
    atoms = bulk("Cu", cubic=True)
    atoms.positions[1] = atoms.positions[0] + [0.3, 0, 0]
    err = _raises("atoms too close", atoms)
    assert "0.300" in str(err)


def test_atoms_too_close_across_periodic_boundary() -> None:
    atoms = Atoms("Cu2", scaled_positions=[[0.01, 0, 0], [0.99, 0, 0]], cell=[10, 10, 10], pbc=True)
    _raises("atoms too close", atoms)


def test_partial_occupancy_cif() -> None:
    _raises("partial occupancy", DATA / "partial_occupancy.cif")


def test_disordered_pymatgen_structure() -> None:
    from pymatgen.core import Lattice, Structure

    s = Structure(Lattice.cubic(4.0), [{"Au": 0.5, "Ag": 0.5}], [[0, 0, 0]])
    _raises("partial occupancy", s)


def test_too_many_atoms() -> None:
    atoms = bulk("Cu", cubic=True).repeat((3, 3, 3))  # 108 atoms
    _raises("too many atoms: 108 > limit 100", atoms, max_atoms=100)
    assert len(load_structure(atoms, max_atoms=108)) == 108


def test_default_atom_limit_is_10000() -> None:
    atoms = bulk("Cu", cubic=True).repeat((14, 14, 13))  # 10 192 atoms
    _raises("too many atoms: 10192 > limit 10000", atoms)


def test_unsupported_elements() -> None:
    _raises("elements not supported by the model: Co", CIF, elements={"C", "H", "O"})
