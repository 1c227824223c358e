"""elastic_tensor: checked against plain ASE stress–strain computations written here (EMT Cu; EMT hcp with
relaxed ions), pymatgen's ElasticTensor fitted to stresses computed here (CHGNet on a small MOF), the
analytic eigenvalues of a cubic tensor, and the clamped-ion >= relaxed-ion bound."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE, LBFGS
from ase.units import GPa

import matcalc as mc
from matcalc.calculations.elastic import ElasticTensorResult, elastic_tensor
from matcalc.calculations.results import Result


def deform(atoms: Atoms, eps: np.ndarray) -> Atoms:
    """``atoms`` under the symmetric deformation gradient I + eps (3x3), fractional positions kept."""
    out = atoms.copy()
    out.set_cell(atoms.cell[:] @ (np.eye(3) + eps).T, scale_atoms=True)
    return out


def ase_stress_GPa(atoms: Atoms, relax: bool = False) -> np.ndarray:
    a = atoms.copy()
    a.calc = EMT()
    if relax:
        FIRE(a, logfile=None).run(fmax=1e-4, steps=3000)
    return a.get_stress(voigt=True) / GPa


def relaxed_cu() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = EMT()
    LBFGS(FrechetCellFilter(atoms), logfile=None).run(fmax=1e-3, steps=1000)
    atoms.calc = None
    return atoms


@pytest.fixture(scope="module")
def cu_elastic() -> ElasticTensorResult:
    return elastic_tensor(bulk("Cu", "fcc", a=3.6, cubic=True), "emt", cache=False)


def test_emt_cu_equals_plain_ase_stress_strain(cu_elastic):
    r = cu_elastic
    ref = relaxed_cu()
    strains = np.linspace(-0.01, 0.01, 5)
    sxx = np.array([ase_stress_GPa(deform(ref, np.diag([e, 0, 0]))) for e in strains])
    shear = []
    for g in strains:  # engineering shear strain gamma_yz = g: eps_yz = eps_zy = g / 2
        eps = np.zeros((3, 3))
        eps[1, 2] = eps[2, 1] = g / 2
        shear.append(ase_stress_GPa(deform(ref, eps)))
    c11 = np.polyfit(strains, sxx[:, 0], 1)[0]
    c12 = np.polyfit(strains, sxx[:, 1], 1)[0]
    c44 = np.polyfit(strains, np.array(shear)[:, 3], 1)[0]
    C = r.C_GPa
    assert C[0, 0] == pytest.approx(c11, rel=0.01) and C[1, 1] == pytest.approx(c11, rel=0.01)
    assert C[0, 1] == pytest.approx(c12, rel=0.01) and C[1, 2] == pytest.approx(c12, rel=0.01)
    assert C[3, 3] == pytest.approx(c44, rel=0.01) and C[5, 5] == pytest.approx(c44, rel=0.01)
    assert 150 < c11 < 200 and 100 < c12 < 130 and 75 < c44 < 100  # EMT Cu (exp. 168, 121, 75 GPa)
    off = np.ones((6, 6), bool)
    off[:3, :3] = False
    off[[3, 4, 5], [3, 4, 5]] = False
    assert np.abs(C[off]).max() < 1e-3 * C[0, 0]  # cubic: nothing else
    assert r.mechanically_stable and r.warnings == [] and r.min_fit_r2 > 0.999
    assert r.n_strained_cells == 6 * 4 + 1 and r.cells_converged == r.n_strained_cells
    assert np.abs(r.residual_stress_GPa).max() < 0.05


def test_cubic_eigenvalues_moduli_and_pymatgen(cu_elastic):
    from pymatgen.analysis.elasticity import ElasticTensor

    r = cu_elastic
    c11, c12, c44 = r.C_GPa[0, 0], r.C_GPa[0, 1], r.C_GPa[3, 3]
    # a cubic Voigt matrix has eigenvalues C11 + 2 C12 (once), C11 - C12 (twice), C44 (three times)
    expected = np.sort([c11 + 2 * c12, c11 - c12, c11 - c12, c44, c44, c44])
    np.testing.assert_allclose(r.eigenvalues_GPa, expected, rtol=1e-3)
    np.testing.assert_allclose(r.compliance_per_GPa @ r.C_GPa, np.eye(6), atol=1e-9)
    assert r.bulk_modulus_voigt_GPa == pytest.approx((c11 + 2 * c12) / 3, rel=1e-3)  # cubic: K_V = K_R
    assert r.bulk_modulus_reuss_GPa == pytest.approx((c11 + 2 * c12) / 3, rel=1e-3)
    assert r.shear_modulus_voigt_GPa == pytest.approx((c11 - c12 + 3 * c44) / 5, rel=1e-3)
    assert r.shear_modulus_reuss_GPa == pytest.approx(5 * (c11 - c12) * c44 / (4 * c44 + 3 * (c11 - c12)), rel=1e-3)
    pm = ElasticTensor.from_voigt(r.C_GPa)
    assert r.bulk_modulus_vrh_GPa == pytest.approx(pm.k_vrh, rel=1e-9)
    assert r.shear_modulus_vrh_GPa == pytest.approx(pm.g_vrh, rel=1e-9)
    assert r.poisson_ratio == pytest.approx(pm.homogeneous_poisson, rel=1e-9)
    k, g = pm.k_vrh, pm.g_vrh
    assert r.youngs_modulus_GPa == pytest.approx(9 * k * g / (3 * k + g), rel=1e-9)
    # the EOS bulk modulus of the same model agrees with the elastic one
    assert r.bulk_modulus_vrh_GPa == pytest.approx(134.0, rel=0.03)


def test_relaxed_ions_hcp_equals_plain_ase_and_is_softer():
    """hcp: atoms are not inversion centres, so shear relaxes them; relaxed-ion C <= clamped-ion C."""
    start = bulk("Cu", "hcp", a=2.55, c=4.16)
    relaxed = elastic_tensor(start, "emt", n_strains=2, strain_max=0.01, cache=False)
    clamped = elastic_tensor(start, "emt", n_strains=2, strain_max=0.01, relax_strained=False, cache=False)
    ref = relaxed.relaxed_structure
    for j in (0, 5):  # xx, and the xy shear
        sig = []
        for e in (-0.01, 0.0, 0.01):
            v = np.zeros(6)
            v[j] = e
            eps = np.array([[v[0], v[5] / 2, v[4] / 2], [v[5] / 2, v[1], v[3] / 2], [v[4] / 2, v[3] / 2, v[2]]])
            sig.append(ase_stress_GPa(deform(ref, eps), relax=True))
        slope = np.polyfit([-0.01, 0.0, 0.01], np.array(sig), 1)[0]
        np.testing.assert_allclose(relaxed.C_GPa[:, j], slope, atol=0.01 * np.abs(slope).max())
    diff = clamped.C_GPa - relaxed.C_GPa
    assert np.linalg.eigvalsh(diff).min() > -0.5  # positive semi-definite up to fit noise (GPa)
    assert diff[5, 5] > 1.0  # the xy shear (C66) really relaxes
    assert relaxed.mechanically_stable and clamped.mechanically_stable


def test_chgnet_mof_equals_pymatgen_fit_of_stresses_computed_here(chgnet):
    from pymatgen.analysis.elasticity import ElasticTensor, Strain

    r = elastic_tensor("RSM0010", chgnet, relax_first=False, relax_strained=False, n_strains=2, strain_max=0.01,
                       cache=False)
    atoms = mc.load_structure("RSM0010")
    calc = chgnet.calculator()
    strains, stresses = [], []
    for j in range(6):
        for e in (-0.01, 0.01):
            v = np.zeros(6)
            v[j] = e
            s = Strain.from_voigt(v)  # pymatgen's own Voigt -> tensor convention (engineering shear)
            a = deform(atoms, np.asarray(s))
            a.calc = calc
            strains.append(s)
            stresses.append(a.get_stress(voigt=False) / GPa)
    a0 = atoms.copy()
    a0.calc = calc
    eq = a0.get_stress(voigt=False) / GPa
    pm = ElasticTensor.from_independent_strains(strains, stresses, eq_stress=eq)
    np.testing.assert_allclose(r.C_GPa, (pm.voigt + pm.voigt.T) / 2, atol=0.01)
    assert np.abs(r.C_GPa).max() > 10  # a real tensor, not noise
    sym = ElasticTensor.from_voigt(r.C_GPa)
    assert r.bulk_modulus_vrh_GPa == pytest.approx(sym.k_vrh, rel=1e-9)
    assert r.shear_modulus_vrh_GPa == pytest.approx(sym.g_vrh, rel=1e-9)
    assert r.poisson_ratio == pytest.approx(sym.homogeneous_poisson, rel=1e-9)
    np.testing.assert_allclose(r.residual_stress_GPa, [eq[0, 0], eq[1, 1], eq[2, 2], eq[1, 2], eq[0, 2], eq[0, 1]],
                               atol=1e-4)
    assert r.mechanically_stable == bool(np.all(np.linalg.eigvalsh(r.C_GPa) > 0))


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"strain_max": 0}, "strain_max"), ({"strain_max": -0.01}, "strain_max"), ({"strain_max": 0.1}, "strain_max"),
    ({"strain_max": 0.2}, "strain_max"), ({"n_strains": 3}, "n_strains"), ({"n_strains": 0}, "n_strains"),
    ({"n_strains": 40}, "n_strains"), ({"relax_strained": 1}, "relax_strained"), ({"fmax": 0}, "fmax"),
    ({"fixed_cell_optimizer": "SD"}, "fixed_cell_optimizer"),
])
def test_bad_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        elastic_tensor(bulk("Cu", "fcc", a=3.6), "emt", **kwargs)


def test_non_periodic_structure_is_refused():
    molecule = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.5]])
    with pytest.raises(ValueError, match="periodic"):
        elastic_tensor(molecule, "emt")


def test_round_trip_and_plot(cu_elastic):
    back = Result.from_dict(json.loads(json.dumps(cu_elastic.to_dict())))
    assert isinstance(back, ElasticTensorResult)
    np.testing.assert_array_equal(back.C_GPa, cu_elastic.C_GPa)
    np.testing.assert_array_equal(back.stresses_GPa, cu_elastic.stresses_GPa)
    assert back.mechanically_stable is True and back.parameters["strain_max"] == 0.01
    ax = cu_elastic.plot().axes[0]
    assert "strain" in ax.get_xlabel() and "%" in ax.get_xlabel() and "GPa" in ax.get_ylabel()
    assert len(ax.lines) >= 12  # six data sets and their fitted lines
