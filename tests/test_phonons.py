"""phonons: band frequencies, DOS and force constants equal plain phonopy driven here on force sets computed
here (EMT fcc Cu; EMT on a real 30-atom MOF cell, Cu/C/H/N, low symmetry, with imaginary modes), the thermal
properties equal heat_capacity's, the standard fcc path, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from phonopy import Phonopy
from phonopy.structure.atoms import PhonopyAtoms

import matcalc as mc
from matcalc.calculations.heat_capacity import heat_capacity
from matcalc.calculations.phonons import PhononResult, phonons
from matcalc.calculations.results import Result


def plain_phonopy(atoms: Atoms, supercell, distance: float = 0.01, symmetrize: bool = False) -> Phonopy:
    """phonopy driven directly: EMT forces of its displaced supercells, one by one (ASE's masses, as matcalc:
    phonopy's own table differs in the 5th digit for H)."""
    unitcell = PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=atoms.cell[:],
                            scaled_positions=atoms.get_scaled_positions(), masses=atoms.get_masses())
    ph = Phonopy(unitcell, supercell_matrix=np.diag(supercell), primitive_matrix="P")
    ph.generate_displacements(distance=distance)
    forces = []
    for sc in ph.supercells_with_displacements:
        a = Atoms(sc.symbols, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True)
        a.calc = EMT()
        forces.append(a.get_forces())
    ph.forces = forces
    ph.produce_force_constants()
    if symmetrize:
        ph.symmetrize_force_constants()
    return ph


def segments_of(r: PhononResult) -> list[np.ndarray]:
    starts = np.cumsum([0, *r.band_segment_sizes[:-1]])
    return [r.band_qpoints[s:s + n] for s, n in zip(starts, r.band_segment_sizes, strict=True)]


def compare_with_plain(r: PhononResult, ph: Phonopy, mesh, *, band_atol: float, dos_rtol: float,
                       tetrahedron: bool = True) -> None:
    bands = ph.run_band_structure(segments_of(r))
    np.testing.assert_allclose(np.concatenate(bands.frequencies), r.band_frequencies_THz, atol=band_atol)
    np.testing.assert_allclose(np.concatenate(bands.distances), r.band_distances_per_A, atol=1e-10)
    ph.run_mesh(mesh)
    ph.run_total_dos(use_tetrahedron_method=tetrahedron)
    np.testing.assert_allclose(ph.total_dos.frequency_points, r.dos_frequencies_THz, atol=band_atol)
    np.testing.assert_allclose(r.dos_states_per_THz, ph.total_dos.dos, rtol=dos_rtol,
                               atol=dos_rtol * ph.total_dos.dos.max())


@pytest.fixture(scope="module")
def cu_ph() -> PhononResult:
    return phonons(bulk("Cu", "fcc", a=3.6), "emt", supercell=(3, 3, 3), mesh=20, t_max=1000.0, cache=False)


def test_emt_cu_equals_plain_phonopy(cu_ph):
    r = cu_ph
    ph = plain_phonopy(r.relaxed_structure, (3, 3, 3))
    assert r.n_displacements == len(ph.displacements)
    compare_with_plain(r, ph, 20, band_atol=1e-5, dos_rtol=1e-4)  # Γ acoustic: sqrt of ~1e-10 noise
    # the standard fcc path (Setyawan-Curtarolo) of the primitive cell, labels where the segments meet
    assert r.band_path == "GXWKGLUWLK,UX"
    assert r.band_labels == ["Γ", "X", "W", "K", "Γ", "L", "U", "W", "L", "K|U", "X"]
    assert len(r.band_label_distances_per_A) == len(r.band_labels)
    assert r.band_frequencies_THz.shape == (sum(r.band_segment_sizes), 3) and r.band_segment_sizes == [51] * 10
    np.testing.assert_allclose(r.band_frequencies_THz[0], 0.0, atol=1e-3)  # acoustic modes at Γ
    assert 6.5 < r.band_frequencies_THz.max() < 9.0  # EMT Cu (experiment 7.2 THz at X)
    # DOS per input cell integrates to 3 modes per atom
    assert np.trapezoid(r.dos_states_per_THz, r.dos_frequencies_THz) == pytest.approx(3.0, rel=1e-2)
    assert r.imaginary_modes == 0 and r.band_imaginary_modes == 0 and len(r.imaginary_qpoints) == 0
    assert r.warnings == []


def test_thermal_properties_equal_heat_capacity(cu_ph):
    hc = heat_capacity(bulk("Cu", "fcc", a=3.6), "emt", supercell=(3, 3, 3), mesh=20, t_max=1000.0, cache=False)
    for name in ("temperatures_K", "cv_J_per_K_mol", "cv_J_per_K_g", "entropy_J_per_K_mol", "free_energy_kJ_per_mol"):
        np.testing.assert_allclose(getattr(cu_ph, name), getattr(hc, name), rtol=1e-9, atol=1e-12, err_msg=name)
    assert cu_ph.cv_300K_J_per_K_g == pytest.approx(hc.cv_300K_J_per_K_g, rel=1e-9)
    assert cu_ph.mesh_numbers == hc.mesh_numbers and cu_ph.n_displacements == hc.n_displacements


def test_to_phonopy_continues_in_phonopy(cu_ph):
    back = Result.from_dict(json.loads(json.dumps(cu_ph.to_dict())))
    assert isinstance(back, PhononResult)
    for r in (cu_ph, back):
        ph = r.to_phonopy()
        assert ph.force_constants.shape == (1, 27, 3, 3)
        ph.run_band_structure(segments_of(r))
        np.testing.assert_allclose(np.concatenate(ph.band_structure.frequencies), cu_ph.band_frequencies_THz,
                                   atol=1e-9)
    np.testing.assert_array_equal(back.dos_states_per_THz, cu_ph.dos_states_per_THz)
    assert back.band_labels == cu_ph.band_labels and back.band_distances.shape == cu_ph.band_distances_per_A.shape


def test_mof_cell_equals_plain_phonopy_with_imaginary_modes():
    """A real MOF cell (RSM0020, 30 atoms, P1) with EMT, not relaxed: low symmetry and many imaginary modes."""
    atoms = mc.load_structure("RSM0020")
    r = phonons(atoms, "emt", relax_first=False, mesh=8, band_points=11, symmetrize_fc=True, cache=False)
    ph = plain_phonopy(r.relaxed_structure, (1, 1, 1), symmetrize=True)
    assert r.n_displacements == len(ph.displacements) == 180
    compare_with_plain(r, ph, 8, band_atol=1e-5, dos_rtol=1e-5)
    assert r.band_labels[0] == "X" and "Γ" in r.band_labels  # triclinic standard path
    # imaginary modes: the q-points are where plain phonopy has them, lowest first
    freqs = ph.mesh.frequencies
    assert r.imaginary_modes > 0 and len(r.imaginary_qpoints) > 0
    assert any("imaginary" in w for w in r.warnings)
    assert np.all(np.diff(r.imaginary_qpoint_frequencies_THz) >= 0)
    for q, f in zip(r.imaginary_qpoints, r.imaginary_qpoint_frequencies_THz, strict=True):
        i = int(np.argmin(np.abs(ph.mesh.qpoints - q).sum(axis=1)))
        at_gamma = np.allclose(q, np.round(q))  # Γ's three acoustic modes are not counted
        assert np.allclose(ph.mesh.qpoints[i], q) and np.sort(freqs[i])[3 if at_gamma else 0] == pytest.approx(f, abs=1e-5)
    # symmetrised force constants: acoustic sum rule, so the three Γ acoustic modes are zero
    gamma = int(np.flatnonzero(np.all(np.abs(r.band_qpoints) < 1e-12, axis=1))[0])
    np.testing.assert_allclose(np.sort(np.abs(r.band_frequencies_THz[gamma]))[:3], 0.0, atol=1e-3)


def test_explicit_path_and_bad_paths():
    r = phonons(bulk("Cu", "fcc", a=3.6), "emt", supercell=(2, 2, 2), mesh=8, band_path="GXL", band_points=5,
                relax_first=False, cache=False)
    assert r.band_labels == ["Γ", "X", "L"] and r.band_segment_sizes == [5, 5]
    np.testing.assert_allclose(r.band_qpoints[4], [0.5, 0.0, 0.5])  # X of the fcc primitive cell
    for bad in ("GQ", "G-X", "G", "", 3, "GX,,L"):
        with pytest.raises(ValueError, match="band_path"):
            phonons(bulk("Cu", "fcc", a=3.6), "emt", band_path=bad)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"supercell": (2, 0, 2)}, "supercell"), ({"displacement": 0}, "displacement"), ({"mesh": 0.5}, "mesh"),
    ({"band_points": 1}, "band_points"), ({"band_points": 5000}, "band_points"), ({"symmetrize_fc": "yes"}, "symmetrize_fc"),
    ({"t_min": 500, "t_max": 100}, "t_max"), ({"supercell": (20, 20, 20)}, "supercell"),
])
def test_bad_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        phonons(bulk("Cu", "fcc", a=3.6), "emt", **kwargs)


def test_non_periodic_structure_is_refused():
    with pytest.raises(ValueError, match="periodic"):
        phonons(Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.5]]), "emt")


def test_smeared_dos_equals_plain_phonopy_and_none_skips_it(cu_ph):
    """dos="smearing": phonopy's Gaussian DOS (its default width) on the same force sets; dos="none": no DOS,
    the same bands and thermal properties, a bands-only plot."""
    kw = {"supercell": (3, 3, 3), "mesh": 20, "t_max": 1000.0, "cache": False}
    smeared = phonons(bulk("Cu", "fcc", a=3.6), "emt", dos="smearing", **kw)
    ph = plain_phonopy(smeared.relaxed_structure, (3, 3, 3))
    compare_with_plain(smeared, ph, 20, band_atol=1e-5, dos_rtol=1e-4, tetrahedron=False)
    assert not np.allclose(smeared.dos_states_per_THz, cu_ph.dos_states_per_THz)  # not the tetrahedron DOS
    assert np.trapezoid(smeared.dos_states_per_THz, smeared.dos_frequencies_THz) == pytest.approx(3.0, rel=2e-2)
    bare = phonons(bulk("Cu", "fcc", a=3.6), "emt", dos="none", **kw)
    assert len(bare.dos_frequencies_THz) == len(bare.dos_states_per_THz) == 0
    np.testing.assert_array_equal(bare.band_frequencies_THz, cu_ph.band_frequencies_THz)
    np.testing.assert_array_equal(bare.cv_J_per_K_mol, cu_ph.cv_J_per_K_mol)
    fig = bare.plot()
    assert len(fig.axes) == 1 and "THz" in fig.axes[0].get_ylabel()
    back = Result.from_dict(json.loads(json.dumps(bare.to_dict())))
    assert len(back.dos_states_per_THz) == 0
    with pytest.raises(ValueError, match="dos must be one of"):
        phonons(bulk("Cu", "fcc", a=3.6), "emt", dos="gaussian", **kw)


def test_plot_bands_beside_dos(cu_ph):
    fig = cu_ph.plot()
    bands, dos = fig.axes[:2]
    assert "THz" in bands.get_ylabel() and "1/Å" in bands.get_xlabel()
    assert "states/THz" in dos.get_xlabel()
    assert [t.get_text() for t in bands.get_xticklabels()] == cu_ph.band_labels
