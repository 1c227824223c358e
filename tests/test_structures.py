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


@pytest.mark.parametrize("cutoff", [0.5, 1.2, 2.5])
def test_smallest_distance_equals_ase_neighbor_list(cutoff: float) -> None:
    """The check's smallest distance equals ASE's neighbour list (periodic MOF cell, slab, molecule, a cell
    narrower than the cutoff, where an atom is close to its own image, atoms 10⁴ Å apart)."""
    from ase.neighborlist import neighbor_list

    from matcalc.structures import smallest_distance

    mof = load_structure("RSM0009")
    mof.rattle(0.3, seed=1)
    slab = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.9]], cell=[5, 5, 5], pbc=[True, True, False])
    thin = Atoms("H", cell=[0.45, 5, 5], pbc=True)
    far = mof + Atoms("C", positions=[[-1e4, -1e4, -1e4]])  # a guest placed 10⁴ Å out: no 20 GB search grid
    apart = molecule("CO2") + Atoms("CO", positions=[[1e4, 0, 0], [1e4, 0, 1.13]])
    for atoms in (mof, slab, molecule("CH4"), thin, bulk("Cu", "fcc", a=3.6), far, apart):
        probe = atoms
        if not atoms.pbc.all():
            probe = atoms.copy()
            if abs(atoms.cell.volume) < 1e-3:
                probe.cell = np.eye(3) * 20.0
        d = neighbor_list("d", probe, cutoff, self_interaction=False)
        expected = float(d.min()) if len(d) else None
        got = smallest_distance(atoms, cutoff)
        assert (got is None) == (expected is None), atoms.get_chemical_formula()
        if expected is not None:
            assert got == pytest.approx(expected, abs=1e-10)


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


# ----------------------------------------------------------------- symmetry: size known before expansion
def symmetric_cif(number: int, sites: list[tuple[str, tuple[float, float, float]]], *, explicit: bool = False,
                  cellpar: tuple[float, ...] = (10.0, 10.0, 10.0, 90.0, 90.0, 90.0)) -> str:
    """CIF text of ``sites`` in space group ``number``; ``explicit``: the operations listed as x,y,z strings
    (formatted here from ASE's tables), else only the group's number."""
    from fractions import Fraction

    from ase.spacegroup import Spacegroup

    tags = ["length_a", "length_b", "length_c", "angle_alpha", "angle_beta", "angle_gamma"]
    lines = ["data_test", *[f"_cell_{t} {v}" for t, v in zip(tags, cellpar, strict=True)],
             f"_symmetry_Int_Tables_number {number}"]
    if explicit:
        lines += ["loop_", "_symmetry_equiv_pos_as_xyz"]
        for rot, trans in Spacegroup(number).get_symop():
            comps = []
            for i in range(3):
                terms = "".join(("+" if rot[i, j] > 0 else "-") + "xyz"[j] for j in range(3) if rot[i, j])
                shift = Fraction(float(trans[i])).limit_denominator(24)
                comps.append(terms + (f"+{shift}" if shift else ""))
            lines.append("'" + ",".join(comps) + "'")
    lines += ["loop_", "_atom_site_label", "_atom_site_type_symbol", "_atom_site_fract_x", "_atom_site_fract_y",
              "_atom_site_fract_z"]
    lines += [f"{sym}{i} {sym} {x:.6f} {y:.6f} {z:.6f}" for i, (sym, (x, y, z)) in enumerate(sites)]
    return "\n".join(lines) + "\n"


def _ase_read(text: str) -> Atoms:
    import io
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read(io.StringIO(text), format="cif")


SYMMETRIC = {
    "fcc Cu (225, number only)": symmetric_cif(225, [("Cu", (0, 0, 0))], cellpar=(3.6,) * 3 + (90,) * 3),
    "CsCl-like on special positions (221, explicit)": symmetric_cif(221, [("Cs", (0, 0, 0)), ("Cl", (0.5, 0.5, 0.5))],
                                                                    explicit=True, cellpar=(4.1,) * 3 + (90,) * 3),
    "diamond (227)": symmetric_cif(227, [("C", (0, 0, 0))], cellpar=(3.57,) * 3 + (90,) * 3),
    "skutterudite CoSb3 (204)": symmetric_cif(204, [("Co", (0.25, 0.25, 0.25)), ("Sb", (0, 0.335, 0.158))],
                                             cellpar=(9.04,) * 3 + (90,) * 3),
    "hcp Mg (194)": symmetric_cif(194, [("Mg", (1 / 3, 2 / 3, 0.25))], cellpar=(3.21, 3.21, 5.21, 90, 90, 120)),
    "MOF-5-like Fm-3m sites (225, explicit)": symmetric_cif(
        225, [("Zn", (0.2934, 0.2066, 0.2066)), ("O", (0.25, 0.25, 0.25)), ("C", (0.3889, 0.1111, 0.1111)),
              ("H", (0.41, 0.17, 0.03))], explicit=True, cellpar=(25.8,) * 3 + (90,) * 3),
    "monoclinic general positions (14)": symmetric_cif(14, [("C", (0.11, 0.23, 0.37)), ("O", (0.41, 0.07, 0.29))],
                                                        cellpar=(9.0, 11.0, 7.0, 90, 101, 90)),
    "P1 with a duplicate site across the boundary": symmetric_cif(1, [("Cu", (0, 0, 0)), ("Cu", (1e-7, 0, 1.0)),
                                                                      ("Cu", (0.5, 0.5, 0.5))]),
}


@pytest.mark.parametrize("name", sorted(SYMMETRIC))
def test_cif_expansion_equals_ase(name: str) -> None:
    """matcalc expands CIF symmetry itself (ASE's loop is quadratic in the sites); same atoms, same order."""
    from matcalc.structures import cif_atom_count, read_structure

    text = SYMMETRIC[name]
    ours, ref = read_structure(text), _ase_read(text)
    assert ours.get_chemical_symbols() == ref.get_chemical_symbols()
    np.testing.assert_allclose(ours.positions, ref.positions, atol=1e-9)
    np.testing.assert_allclose(ours.cell, ref.cell, atol=1e-12)
    import io

    from ase.io.cif import parse_cif

    block = list(parse_cif(io.StringIO(text)))[-1]
    assert cif_atom_count(block, block.get_spacegroup(True), len(block["_atom_site_label"])) >= len(ref)


def test_high_symmetry_cif_within_the_limit_is_read_although_sites_x_ops_exceed_it() -> None:
    from matcalc.structures import read_structure

    text = SYMMETRIC["fcc Cu (225, number only)"]  # 1 site x 192 operations, 4 atoms
    assert len(read_structure(text, max_atoms=10)) == len(_ase_read(text)) == 4


def test_symmetry_bomb_cif_is_refused_before_expansion(monkeypatch) -> None:
    """25 kB: 192 operations x 560 sites ~ 10^5 atoms; refused from the counts alone."""
    import ase.io.cif

    from matcalc.structures import TooManyAtomsError, read_structure

    rng = np.random.default_rng(1)
    text = symmetric_cif(225, [("C", tuple(rng.random(3))) for _ in range(560)], explicit=True,
                         cellpar=(60.0,) * 3 + (90,) * 3)
    assert 20_000 < len(text.encode()) < 30_000

    def no_expansion(*_a, **_k):
        raise AssertionError("the CIF was expanded")

    monkeypatch.setattr(ase.io.cif.CIFBlock, "get_atoms", no_expansion)
    monkeypatch.setattr("matcalc.structures.equivalent_sites", no_expansion)
    with pytest.raises(TooManyAtomsError, match=r"expands to \d+ atoms \(560 sites x 192 symmetry operations\) "
                                                r"> limit 10000") as info:
        load_structure(text)
    # random sites are general positions (192 images each) but for the few within 1e-3 of a mirror
    assert 0.97 * 107_520 < info.value.n_atoms <= 107_520 and info.value.max_atoms == 10_000
    with pytest.raises(TooManyAtomsError):
        read_structure(text, max_atoms=100_000)


@pytest.mark.parametrize(("fmt", "text", "match"), [
    ("vasp", "Cu\n1.0\n3.6 0 0\n0 3.6 0\n0 0 3.6\nCu\n10000000\nDirect\n0 0 0\n", "10000000 \\(POSCAR counts line\\)"),
    ("extxyz", '10000000\nLattice="3.6 0 0 0 3.6 0 0 0 3.6" Properties=species:S:1:pos:R:3 pbc="T T T"\nCu 0 0 0\n',
     "10000000 \\(XYZ header, line 1\\)"),
])
def test_poscar_and_xyz_counts_bound_the_atoms_before_reading(fmt: str, text: str, match: str) -> None:
    """A 100-byte file claiming 10^7 atoms: refused by its header (ASE would allocate the arrays first)."""
    from matcalc.structures import TooManyAtomsError, read_structure

    with pytest.raises(TooManyAtomsError, match=match):
        read_structure(text, fmt=fmt, max_atoms=10_000)
    with pytest.raises(StructureError, match="says 10000000 atoms but"):  # without a limit: inconsistent
        read_structure(text, fmt=fmt)


CU_SITE = "loop_\n_atom_site_label\n_atom_site_type_symbol\n_atom_site_fract_x\n_atom_site_fract_y\n" \
          "_atom_site_fract_z\n{label} {symbol} {x} 0 0\n"
CU_CELL = "data_x\n_cell_length_a 3.6\n_cell_length_b 3.6\n_cell_length_c 3.6\n_cell_angle_alpha 90\n" \
          "_cell_angle_beta 90\n_cell_angle_gamma 90\n"


@pytest.mark.parametrize(("text", "match"), [
    (CU_CELL + CU_SITE.format(label="cu1", symbol="1", x=0), "site type_symbol '1' names no chemical element"),
    (CU_CELL + CU_SITE.format(label="Xx1", symbol="Xx", x=0), "unknown element 'Xx'"),
    (CU_CELL + CU_SITE.format(label="Cu1", symbol="Cu", x="abc"), "_atom_site_fract_x value is not a number"),
    (CU_CELL.replace("_cell_length_b 3.6\n", "") + CU_SITE.format(label="Cu1", symbol="Cu", x=0),
     "incomplete cell, missing _cell_length_b"),
    (CU_CELL.replace("_cell_angle_beta 90", "_cell_angle_beta 190") + CU_SITE.format(label="Cu1", symbol="Cu", x=0),
     "_cell_angle_beta = 190 is out of range"),
    (CU_CELL + "loop_\n_symmetry_equiv_pos_as_xyz\n'x,y,z'\n'a,b,c'\n" + CU_SITE.format(label="Cu1", symbol="Cu", x=0),
     "symmetry operation 'a,b,c'"),
    (CU_CELL + "loop_\n_symmetry_equiv_pos_as_xyz\n'x,y,z,w'\n" + CU_SITE.format(label="Cu1", symbol="Cu", x=0),
     "symmetry operation 'x,y,z,w'"),
    (CU_CELL + "_symmetry_space_group_name_H-M 'P 1'\nloop_\n_symmetry_equiv_pos_as_xyz\n'x,x,z'\n" + CU_SITE.format(label="Cu1", symbol="Cu", x=0),
     "not rotations"),
    (CU_CELL + "_symmetry_space_group_name_H-M 'Q 9'\n" + CU_SITE.format(label="Cu1", symbol="Cu", x=0),
     "space group"),
])
def test_malformed_cif_names_the_problem(text: str, match: str) -> None:
    err = _raises(match, text)
    assert "NoneType" not in str(err) and str(err).startswith("malformed CIF")


def test_cif_parser_complaints_are_in_the_error_not_warnings() -> None:
    """ASE's CIF parser warns about a loop row with the wrong number of tokens and goes on; that text names the
    problem, so it goes into our StructureError and no third-party warning reaches the user."""
    import warnings

    text = CU_CELL + "loop_\n_atom_site_label\n_atom_site_fract_x\nC1 0.1 0.2\n"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        err = _raises("no structure found", text)
    assert "Wrong number 3 of tokens, expected 2" in str(err)
    assert not seen, [str(w.message) for w in seen]


def test_symmetric_cif_reads_without_ase_setting_warning(tmp_path) -> None:
    """ASE warns "crystal system 'cubic' is not interpreted for space group ..." for every symmetric CIF; our
    reader gives the same atoms without it (the warning says nothing a user can act on)."""
    import warnings

    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.cif import CifWriter

    path = tmp_path / "cu.cif"
    text = str(CifWriter(AseAtomsAdaptor.get_structure(bulk("Cu", "fcc", a=3.6, cubic=True)), symprec=0.01))
    path.write_text(text.replace("_symmetry_space_group_name_H-M", "_symmetry_cell_setting   cubic\n"
                                 "_symmetry_space_group_name_H-M", 1))  # as CSD-derived CIFs (MOFSimBench's) have
    with warnings.catch_warnings(record=True) as plain:
        warnings.simplefilter("always")
        expected = read(path)
    assert any("crystal system" in str(w.message) for w in plain)  # the noise exists: the check can fail
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atoms = load_structure(path)
    assert len(atoms) == len(expected) == 4
    np.testing.assert_allclose(atoms.cell.cellpar(), expected.cell.cellpar(), atol=1e-8)


def test_slab_info_is_written_without_ase_warning(tmp_path) -> None:
    """``ase.build`` slabs carry ``info["adsorbate_info"]``, which ASE's extxyz writer skips with a warning:
    our writers skip it quietly and keep cell, pbc and positions."""
    import warnings

    from ase.build import fcc111

    from matcalc.structures import to_text, write_structures

    slab = fcc111("Cu", (2, 2, 3), vacuum=6.0, periodic=True)
    assert "adsorbate_info" in slab.info
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = to_text(slab)
        path = write_structures(tmp_path / "slab.extxyz", slab)
    for back in (load_structure(text), read(path)):
        np.testing.assert_allclose(back.positions, slab.positions, atol=1e-6)
        np.testing.assert_allclose(back.cell[:], slab.cell[:], atol=1e-6)
