"""thermal_expansion: V(T), beta(T), B(T), Cp(T) and G(T) equal plain phonopy.PhonopyQHA fed, in the test, with
phonopy thermal properties of the same volumes from EMT forces computed here; physical limits; the
out-of-range and imaginary-mode warnings; bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from phonopy import Phonopy, PhonopyQHA
from phonopy.structure.atoms import PhonopyAtoms

from matcalc.calculations.results import Result
from matcalc.calculations.thermal_expansion import ThermalExpansionResult, thermal_expansion

R = 8.314462618
KW = {"supercell": (3, 3, 3), "mesh": 20, "n_volumes": 7, "volume_range": (0.98, 1.08), "t_max": 800.0,
      "t_step": 20.0}


def plain_thermal(atoms: Atoms, temperatures: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """(E eV, F_ph kJ/mol, Cv J/K/mol, S J/K/mol) of one volume: phonopy driven directly, EMT forces one by one."""
    a = atoms.copy()
    a.calc = EMT()
    energy = a.get_potential_energy()
    unit = PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=atoms.cell[:],
                        scaled_positions=atoms.get_scaled_positions(), masses=atoms.get_masses())
    ph = Phonopy(unit, supercell_matrix=np.diag(KW["supercell"]), primitive_matrix="P")
    ph.generate_displacements(distance=0.01)
    forces = []
    for sc in ph.supercells_with_displacements:
        s = Atoms(sc.symbols, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True)
        s.calc = EMT()
        forces.append(s.get_forces())
    ph.forces = forces
    ph.produce_force_constants()
    ph.run_mesh(KW["mesh"])
    ph.run_thermal_properties(temperatures=temperatures, exclude_gamma_acoustic=True)
    tp = ph.thermal_properties
    return energy, tp.free_energy, tp.heat_capacity, tp.entropy


@pytest.fixture(scope="module")
def cu_qha() -> ThermalExpansionResult:
    return thermal_expansion(bulk("Cu", "fcc", a=3.6), "emt", cache=False, **KW)


def test_emt_cu_equals_plain_phonopy_qha(cu_qha):
    r = cu_qha
    ref = r.relaxed_structure  # the same volumes: the pre-relaxation has its own tests
    factors = np.linspace(0.98, 1.08, 7)
    temperatures = np.arange(0.0, 800.0 + 2 * 20.0 - 1e-9, 20.0)  # one extra point for the derivatives
    volumes, energies, fe, cv, s = [], [], [], [], []
    for f in factors:
        a = ref.copy()
        a.set_cell(ref.cell[:] * f ** (1 / 3), scale_atoms=True)  # 1-atom fcc: nothing to relax at fixed cell
        e, f_ph, c, ent = plain_thermal(a, temperatures)
        volumes.append(a.get_volume())
        energies.append(e)
        fe.append(f_ph)
        cv.append(c)
        s.append(ent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # PhonopyQHA: phonopy's older API, on purpose
        qha = PhonopyQHA(volumes, energies, temperatures=temperatures, free_energy=np.transpose(fe),
                         cv=np.transpose(cv), entropy=np.transpose(s), eos="vinet")
    n = len(qha.volume_temperature)
    assert n == len(r.temperatures_K) == 41
    np.testing.assert_allclose(r.temperatures_K, temperatures[:n])
    np.testing.assert_allclose(r.volumes_A3, volumes, rtol=1e-12)
    np.testing.assert_allclose(r.electronic_energies_eV, energies, atol=1e-9)
    np.testing.assert_allclose(r.volume_A3, qha.volume_temperature, rtol=1e-7)
    np.testing.assert_allclose(r.volumetric_expansion_per_K, qha.thermal_expansion, rtol=1e-4, atol=1e-10)
    np.testing.assert_allclose(r.bulk_modulus_GPa, qha.bulk_modulus_temperature, rtol=1e-5)  # EOS fit tolerance
    np.testing.assert_allclose(r.gibbs_free_energy_eV, qha.gibbs_temperature, atol=1e-7)
    np.testing.assert_allclose(r.cp_J_per_K_mol[1:], qha.heat_capacity_P_polyfit[1:n], rtol=1e-4, atol=1e-6)
    assert r.warnings == [] and r.imaginary_modes == [0] * 7 and r.n_displacements == 7


def test_physical_limits(cu_qha):
    r = cu_qha
    assert np.all(np.diff(r.volume_A3) > -1e-9)  # Cu expands on heating
    assert 3e-5 < r.volumetric_expansion_300K_per_K < 1e-4  # EMT Cu; experiment 5.0e-5 /K
    assert r.linear_expansion_per_K[15] == pytest.approx(r.volumetric_expansion_per_K[15] / 3)
    assert r.volume_A3[0] > r.volumes_A3[1]  # zero-point expansion beyond the static minimum (~V0)
    assert 100 < r.bulk_modulus_GPa[0] < 160 and r.bulk_modulus_GPa[-1] < r.bulk_modulus_GPa[0]  # softens
    assert r.volume_300K_A3 == pytest.approx(np.interp(300, r.temperatures_K, r.volume_A3))
    # Cp - Cv = T V beta^2 B (thermodynamic identity); Cv ~ 0.99 x 3R at 800 K (T ~ 2.4 theta_D)
    t, v, b, k = r.temperatures_K[-1], r.volume_A3[-1], r.volumetric_expansion_per_K[-1], r.bulk_modulus_GPa[-1]
    dilation = t * v * 1e-30 * b**2 * k * 1e9 * 6.02214076e23  # J/(K mol) of the 1-atom cell
    assert 2.0 < dilation < 8.0
    assert r.cp_J_per_K_mol[-1] == pytest.approx(0.99 * 3 * R + dilation, rel=0.02)
    assert r.cp_J_per_K_g[-1] == pytest.approx(r.cp_J_per_K_mol[-1] / 63.546, rel=1e-3)
    assert np.all(np.diff(r.gibbs_free_energy_eV[1:]) < 0)  # dG/dT = -S < 0
    assert r.max_temperature_in_range_K == 800.0


def test_minimum_leaving_the_volumes_is_warned():
    r = thermal_expansion(bulk("Cu", "fcc", a=3.6), "emt", supercell=(2, 2, 2), mesh=10, n_volumes=5,
                          volume_range=(0.97, 1.01), t_max=800.0, t_step=50.0, cache=False)
    assert any("leaves the sampled volumes" in w for w in r.warnings)
    assert r.max_temperature_in_range_K < 800.0 and r.volume_A3[-1] > r.volumes_A3.max()


def test_imaginary_modes_at_a_volume_are_warned():
    # +35 % volume (+10.5 % in lattice constant): EMT Cu's branches go soft (as in heat_capacity's test)
    r = thermal_expansion(bulk("Cu", "fcc", a=3.6), "emt", supercell=(2, 2, 2), mesh=10, n_volumes=5,
                          volume_range=(0.95, 1.35), t_max=300.0, t_step=50.0, cache=False)
    assert r.imaginary_modes[-1] > 0 and r.imaginary_modes[0] == 0 and r.lowest_frequency_THz[-1] < -0.1
    assert any("volume 5 of 5" in w and "imaginary" in w for w in r.warnings)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"n_volumes": 4}, "n_volumes"), ({"n_volumes": 2}, "n_volumes"), ({"n_volumes": 100}, "n_volumes"),
    ({"volume_range": (1.02, 1.1)}, "volume_range"), ({"volume_range": (0.9,)}, "volume_range"),
    ({"volume_range": (0.9, 0.8)}, "volume_range"), ({"volume_range": (0.1, 1.1)}, "volume_range"),
    ({"t_max": 0.0}, "t_max"), ({"t_step": 0}, "t_step"), ({"eos": "sj"}, "eos"),
    ({"pressure_GPa": 1e6}, "pressure_GPa"), ({"supercell": (30, 30, 30)}, "supercell"),
])
def test_bad_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        thermal_expansion(bulk("Cu", "fcc", a=3.6), "emt", **kwargs)


def test_non_periodic_structure_is_refused():
    with pytest.raises(ValueError, match="periodic"):
        thermal_expansion(Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.5]]), "emt")


def test_round_trip_and_plot(cu_qha):
    back = Result.from_dict(json.loads(json.dumps(cu_qha.to_dict())))
    assert isinstance(back, ThermalExpansionResult)
    np.testing.assert_array_equal(back.volume_A3, cu_qha.volume_A3)
    np.testing.assert_array_equal(back.helmholtz_free_energy_eV, cu_qha.helmholtz_free_energy_eV)
    assert back.parameters["volume_range"] == [0.98, 1.08]
    fig = cu_qha.plot()
    ax, twin = fig.axes[:2]
    assert "K" in ax.get_xlabel() and "Å³" in ax.get_ylabel() and "/K" in twin.get_ylabel()
