"""bulk_modulus: checked against a plain ase.eos computation with the same protocol, EMT's known
Cu value, and physical consistency between EOS forms."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.eos import EquationOfState
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE, LBFGS
from ase.units import GPa

from matcalc.calculations.bulk_modulus import EOS_TYPES, BulkModulusResult, bulk_modulus, fit_eos
from matcalc.calculations.results import Result

LATTICE = {"Cu": 3.6, "Ni": 3.5, "Pt": 3.9}


def plain_ase_eos(atoms: Atoms, eos: str = "birchmurnaghan", strain: float = 0.04, n: int = 11,
                  fmax: float = 1e-3, relax_first: bool = True) -> dict:
    """The MOFSimBench E(V) protocol written directly with ASE (no matcalc code)."""
    ref = atoms.copy()
    if relax_first:
        ref.calc = EMT()
        LBFGS(FrechetCellFilter(ref), logfile=None).run(fmax=fmax, steps=1000)
    cell = ref.get_cell()
    volumes, energies = [], []
    for s in np.linspace(1 - strain, 1 + strain, n):
        a = ref.copy()
        a.calc = EMT()
        a.set_cell(cell * s ** (1 / 3), scale_atoms=True)
        FIRE(a, logfile=None).run(fmax=fmax, steps=1000)
        volumes.append(a.get_volume())
        energies.append(a.get_potential_energy())
    fit = EquationOfState(volumes, energies, eos=eos)
    v0, e0, b = fit.fit()
    return {"B": b / GPa, "v0": v0, "e0": e0, "volumes": np.array(volumes), "energies": np.array(energies),
            "bp": fit.eos_parameters[2] if eos != "sj" else None, "v_ref": ref.get_volume()}


@pytest.fixture(scope="module")
def cu_results() -> dict[str, BulkModulusResult]:
    return {eos: bulk_modulus(bulk("Cu", "fcc", a=3.6), "emt", eos=eos) for eos in EOS_TYPES}


@pytest.mark.parametrize("element", ["Cu", "Ni", "Pt"])
def test_equals_plain_ase_eos(element):
    atoms = bulk(element, "fcc", a=LATTICE[element])
    r = bulk_modulus(atoms, "emt")
    ref = plain_ase_eos(atoms)
    assert r.bulk_modulus_GPa == pytest.approx(ref["B"], abs=0.5)
    assert r.pressure_derivative == pytest.approx(ref["bp"], abs=0.05)
    assert r.equilibrium_volume_A3 == pytest.approx(ref["v0"], rel=1e-5)
    assert r.equilibrium_energy_eV == pytest.approx(ref["e0"], abs=1e-6)
    assert r.relaxed_volume_A3 == pytest.approx(ref["v_ref"], rel=1e-5)
    np.testing.assert_allclose(r.volumes_A3, ref["volumes"], rtol=1e-6)
    np.testing.assert_allclose(r.energies_eV, ref["energies"], atol=1e-6)
    assert len(r.volumes_A3) == 11
    assert r.volumes_A3[0] == pytest.approx(0.96 * r.relaxed_volume_A3)
    assert r.volumes_A3[-1] == pytest.approx(1.04 * r.relaxed_volume_A3)
    assert r.fit_residual_eV < 1e-4
    assert r.relax_converged
    assert r.points_converged == 11
    assert r.warnings == []


def test_cu_near_emt_literature_value(cu_results):
    # ASE's EMT gives B(Cu) ≈ 134 GPa (ASE equation-of-state tutorial; experiment ≈ 137-140 GPa).
    # Across EOS forms over ±4 % volume we see 134.36-134.47 GPa; ±2 GPa covers the reference's rounding
    # while still failing on a unit or strain-grid error (e.g. strain in lattice constant, not volume).
    for eos, r in cu_results.items():
        assert r.bulk_modulus_GPa == pytest.approx(134.0, abs=2.0), eos


@pytest.mark.parametrize("eos", EOS_TYPES)
def test_each_eos(cu_results, eos):
    r = cu_results[eos]
    bm = cu_results["birchmurnaghan"]
    assert r.eos == eos
    assert r.warnings == []
    # All forms describe the same smooth E(V) over ±4 %: B within 0.3 GPa, V0 within 1e-4, B' within 0.05.
    assert r.bulk_modulus_GPa == pytest.approx(bm.bulk_modulus_GPa, abs=0.3)
    assert r.equilibrium_volume_A3 == pytest.approx(bm.equilibrium_volume_A3, rel=1e-4)
    assert r.pressure_derivative == pytest.approx(bm.pressure_derivative, abs=0.05)
    assert 3.0 < r.pressure_derivative < 6.0
    # fitted curve passes through the points
    np.testing.assert_allclose(r.fitted_energies(r.volumes_A3), r.energies_eV, atol=1e-5)


def test_sj_pressure_derivative_from_numerical_eos(cu_results):
    """B' of the SJEOS cubic, independently: B(V) = V E''(V) and P(V) = -E'(V) by finite differences."""
    r = cu_results["sj"]
    v0 = r.equilibrium_volume_A3
    h = 1e-3 * v0

    def e(v):
        return float(r.fitted_energies(np.array([v]))[0])

    def p(v):
        return -(e(v + h) - e(v - h)) / (2 * h)

    def b(v):
        return -v * (p(v + h) - p(v - h)) / (2 * h)

    bp = (b(v0 + h) - b(v0 - h)) / (p(v0 + h) - p(v0 - h))
    assert b(v0) / GPa == pytest.approx(r.bulk_modulus_GPa, rel=1e-3)
    assert r.pressure_derivative == pytest.approx(bp, rel=1e-2)


def test_positions_relaxed_at_fixed_cell():
    """A rattled 4-atom cell (no pre-relaxation): each strained cell must relax back to the perfect
    lattice, so its energies are 4x those of the 1-atom cell at the same volume per atom."""
    prim = bulk("Cu", "fcc", a=3.6)
    prim.calc = EMT()
    LBFGS(FrechetCellFilter(prim), logfile=None).run(fmax=1e-4, steps=200)
    a0 = (4 * prim.get_volume()) ** (1 / 3)
    conv = bulk("Cu", "fcc", a=a0, cubic=True)
    conv.rattle(0.05, seed=1)
    r = bulk_modulus(conv, "emt", relax_first=False)
    ref = plain_ase_eos(bulk("Cu", "fcc", a=a0), relax_first=False)
    np.testing.assert_allclose(r.volumes_A3 / 4, ref["volumes"], rtol=1e-6)
    np.testing.assert_allclose(r.energies_eV / 4, ref["energies"], atol=2e-5)
    assert r.bulk_modulus_GPa == pytest.approx(ref["B"], abs=0.5)
    assert r.relax_converged is None
    assert r.points_converged == 11


def test_warns_when_minimum_off_centre():
    # +3 % volume and no pre-relaxation: the E(V) minimum is ~3 % below the strain centre.
    atoms = bulk("Cu", "fcc", a=3.59 * 1.01)
    r = bulk_modulus(atoms, "emt", relax_first=False, n_points=7)
    assert r.minimum_offset_percent < -1.0
    assert any("from the input volume" in w for w in r.warnings), r.warnings
    assert np.isfinite(r.bulk_modulus_GPa)
    # centred run gives no such warning
    assert not any("from the" in w for w in bulk_modulus(bulk("Cu", "fcc", a=3.6), "emt", n_points=7).warnings)


def test_fit_failure_is_reported_not_silent():
    v = np.linspace(10, 12, 7)
    fit = fit_eos(v, -0.5 * v, "sj")  # monotonic: no minimum
    assert np.isnan(fit.b_GPa) and any("failed" in m for m in fit.messages)
    fit = fit_eos(v, -0.5 * v, "birchmurnaghan")
    assert fit.messages  # either failed or minimum outside the sampled volumes / non-physical B
    # far-off cell through the public function: warnings, never a silent NaN
    r = bulk_modulus(bulk("Cu", "fcc", a=3.59 * 1.15), "emt", relax_first=False, n_points=5, eos="sj")
    assert r.warnings
    if not np.isfinite(r.bulk_modulus_GPa):
        assert any("failed" in w for w in r.warnings)


def test_protocol_fast_and_explicit_override():
    r = bulk_modulus(bulk("Cu", "fcc", a=3.6), "emt", protocol="fast")
    assert r.protocol == "fast" and len(r.volumes_A3) == 7 and r.parameters["fmax"] == 0.05
    r = bulk_modulus(bulk("Cu", "fcc", a=3.6), "emt", protocol="fast", n_points=5, strain=0.02)
    assert len(r.volumes_A3) == 5
    assert r.volumes_A3[-1] / r.volumes_A3[0] == pytest.approx(1.02 / 0.98)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"strain": 0}, "strain"), ({"strain": -0.01}, "strain"), ({"strain": 0.5}, "strain"),
    ({"n_points": 4}, "n_points"), ({"n_points": 6.5}, "n_points"), ({"eos": "quartic"}, "eos"),
    ({"fmax": 0}, "fmax"), ({"fmax": -1e-3}, "fmax"), ({"relax_max_steps": 0}, "max_steps"),
    ({"fixed_cell_optimizer": "SD"}, "optimizer"), ({"protocol": "slow"}, "protocol"),
])
def test_bad_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        bulk_modulus(bulk("Cu", "fcc", a=3.6), "emt", **kwargs)


def test_round_trip_and_plot(cu_results):
    r = cu_results["vinet"]
    d = json.loads(json.dumps(r.to_dict()))
    back = Result.from_dict(d)
    assert isinstance(back, BulkModulusResult)
    assert back.bulk_modulus_GPa == r.bulk_modulus_GPa and back.eos == "vinet"
    np.testing.assert_array_equal(back.energies_eV, r.energies_eV)
    np.testing.assert_allclose(back.fitted_energies(r.volumes_A3), r.fitted_energies(r.volumes_A3))
    row = r.row()
    assert row["bulk_modulus_GPa"] == r.bulk_modulus_GPa and "volumes_A3" not in row
    fig = r.plot()
    ax = fig.axes[0]
    assert "Å³" in ax.get_xlabel() and "eV" in ax.get_ylabel()
    assert len(ax.lines) >= 2  # points and fitted curve
