"""Host–guest interaction energy: equals three single points done here with plain ASE
calculators (EMT, CHGNet), vanishes for a guest far beyond the cutoff, the ways of naming
the guest agree, and bad input raises ValueError naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import fcc111, molecule
from ase.calculators.emt import EMT
from ase.geometry import get_distances

from matcalc.calculations.interaction import EV_TO_KJ_PER_MOL, InteractionEnergyResult, interaction_energy
from matcalc.calculations.results import Result


def slab(vacuum: float = 7.0) -> Atoms:
    """Cu(111), 3x3 surface, 3 layers, periodic in 3D with ``2*vacuum`` Å of vacuum."""
    return fcc111("Cu", (3, 3, 3), vacuum=vacuum, periodic=True)


def above_top_site(host: Atoms, height: float) -> np.ndarray:
    top = host.positions[np.argmax(host.positions[:, 2])]
    return top + [0.0, 0.0, height]


def emt_energy(atoms: Atoms) -> float:
    a = atoms.copy()
    a.calc = EMT()
    return float(a.get_potential_energy())


def test_emt_equals_three_plain_single_points():
    host = slab()
    pos = above_top_site(host, 3.0)  # CO2 along z: lower O ~1.84 Å above the top Cu
    r = interaction_energy(host, "CO2", "emt", position=pos)
    guest = molecule("CO2")
    placed = guest.copy()
    placed.translate(pos - guest.get_center_of_mass())
    placed.cell, placed.pbc = host.cell, True
    complex_ = host + placed
    e_c, e_h = emt_energy(complex_), emt_energy(host)
    e_g = emt_energy(guest)  # non-periodic, no box at all
    assert r.complex_energy_eV == pytest.approx(e_c, abs=1e-9)
    assert r.host_energy_eV == pytest.approx(e_h, abs=1e-9)
    assert r.guest_energy_eV == pytest.approx(e_g, abs=1e-9)
    assert r.interaction_energy_eV == pytest.approx(e_c - e_h - e_g, abs=1e-9)
    assert abs(r.interaction_energy_eV) > 0.05  # close enough to interact
    assert r.interaction_energy_kJ_per_mol == pytest.approx(r.interaction_energy_eV * 96.485332, rel=1e-6)
    assert EV_TO_KJ_PER_MOL == pytest.approx(96.485332, rel=1e-6)
    complex_.calc = EMT()
    np.testing.assert_allclose(r.forces_eV_per_A, complex_.get_forces(), atol=1e-9)
    assert r.guest_indices == [27, 28, 29] and r.guest_formula == "CO2"
    assert r.n_atoms == 30 and r.formula == "CCu27O2"
    d = get_distances(complex_.positions[27:], host.positions, cell=host.cell, pbc=True)[1].min()
    assert r.min_host_guest_distance_A == pytest.approx(d)
    assert r.parameters["position_A"] == pytest.approx(list(pos))
    assert r.warnings == []


def test_emt_guest_far_from_the_host_does_not_interact():
    host = slab(vacuum=15.0)  # 30 Å of vacuum between the slab and its image
    r = interaction_energy(host, "CO2", "emt")  # default position: the middle of the vacuum
    assert r.min_host_guest_distance_A > 12.0
    assert abs(r.interaction_energy_eV) < 1e-9


def test_indices_tags_and_separate_guest_agree():
    host = slab()
    sep = interaction_energy(host, "H2O", "emt", position=above_top_site(host, 2.6))
    complex_ = sep.complex_structure
    assert list(complex_.get_tags()) == [0] * 27 + [1] * 3  # GoldDAC convention
    by_indices = interaction_energy(complex_, model="emt", guest_indices=[27, 28, 29])
    by_default_tags = interaction_energy(complex_, model="emt")
    by_tag = interaction_energy(complex_, model="emt", guest_tag=1)
    untagged = complex_.copy()
    untagged.set_tags(0)
    shuffled = untagged[[27] + list(range(27)) + [28, 29]]  # guest atoms need not be last
    by_shuffled_indices = interaction_energy(shuffled, model="emt", guest_indices=[0, 28, 29])
    for r in (by_indices, by_default_tags, by_tag, by_shuffled_indices):
        assert r.interaction_energy_eV == pytest.approx(sep.interaction_energy_eV, abs=1e-9)
        assert r.guest_formula == "H2O"
    assert by_shuffled_indices.guest_indices == [0, 28, 29]


def test_close_contact_warns():
    host = slab()
    r = interaction_energy(host, "N2", "emt", position=above_top_site(host, 1.8))  # N 1.25 Å from Cu
    assert r.min_host_guest_distance_A < 1.5
    assert any("unphysically close" in w for w in r.warnings)


def test_result_round_trip_and_plot():
    host = slab()
    r = interaction_energy(host, "CH4", "emt", position=above_top_site(host, 3.0))
    back = Result.from_dict(r.to_dict())
    assert isinstance(back, InteractionEnergyResult)
    assert back.interaction_energy_eV == r.interaction_energy_eV and back.guest_indices == r.guest_indices
    np.testing.assert_allclose(back.forces_eV_per_A, r.forces_eV_per_A)
    assert r.to_frame().iloc[0]["guest_formula"] == "CH4"
    fig = r.plot()
    assert fig.axes[0].get_ylabel() == "energy (eV)"
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["complex", "host", "guest", "interaction"]


@pytest.mark.parametrize(("args", "kw", "match"), [
    ((), {"guest_indices": [27, 30]}, "guest_indices"),
    ((), {"guest_indices": [-1]}, "guest_indices"),
    ((), {"guest_indices": []}, "guest_indices"),
    ((), {"guest_indices": list(range(30))}, "all atoms"),
    ((), {"guest_indices": [27, 27]}, "duplicates"),
    ((), {"guest_indices": [27], "guest_tag": 1}, "guest_tag"),
    ((), {"guest_tag": 5}, "guest_tag"),
    (("Xe2",), {}, "guest must be one of"),
    (("CO2",), {"position": [1.0, 2.0]}, "position"),
    (("CO2",), {"position": [1.0, 2.0, np.nan]}, "position"),
    (("CO2",), {"guest_indices": [0]}, "guest_indices"),
    ((), {"position": [1.0, 2.0, 3.0], "guest_indices": [27]}, "position"),
    (("CO2",), {"box_A": 5.0}, "box_A"),
    (("CO2",), {"box_A": -1.0}, "box_A"),
])
def test_bad_parameters_raise(args, kw, match):
    host = slab()
    complex_ = interaction_energy(host, "CO2", "emt", position=above_top_site(host, 3.0)).complex_structure
    target = host if args else complex_
    with pytest.raises(ValueError, match=match):
        interaction_energy(target, *args, model="emt", **kw)


def test_no_guest_and_no_tags_raises():
    layered = slab()  # fcc111 tags the layers 1, 2, 3
    with pytest.raises(ValueError, match="every atom has a non-zero tag"):
        interaction_energy(layered, model="emt")
    layered.set_tags(0)
    with pytest.raises(ValueError, match="no guest given"):
        interaction_energy(layered, model="emt")


def test_guest_on_top_of_a_host_atom_is_rejected():
    host = slab()
    with pytest.raises(ValueError, match="too close"):  # StructureError is a ValueError
        interaction_energy(host, "CO2", "emt", position=above_top_site(host, 1.3))  # O 0.14 Å from Cu


@pytest.mark.slow
def test_chgnet_co2_in_calf20_equals_plain_single_points_and_vanishes_far_away(chgnet):
    from chgnet.model.dynamics import CHGNetCalculator

    from matcalc import load_structure

    calc = CHGNetCalculator(model=chgnet.model, use_device="cpu")

    def plain(atoms: Atoms) -> float:
        a = atoms.copy()
        a.calc = calc
        return float(a.get_potential_energy())

    # CO2 in the pore of CALF-20 (default position: the pore centre)
    host = load_structure("CALF-20")
    r = interaction_energy(host, "CO2", chgnet)
    assert r.min_host_guest_distance_A > 2.0 and r.warnings == []
    guest = molecule("CO2")
    guest.cell, guest.pbc = np.eye(3) * r.guest_box_A, True  # CHGNet needs a cell: a vacuum box
    e_c, e_h, e_g = plain(r.complex_structure), plain(host), plain(guest)
    assert r.complex_energy_eV == pytest.approx(e_c, abs=2e-3)
    assert r.host_energy_eV == pytest.approx(e_h, abs=2e-3)
    assert r.guest_energy_eV == pytest.approx(e_g, abs=1e-4)
    assert r.interaction_energy_eV == pytest.approx(e_c - e_h - e_g, abs=3e-3)
    assert -1.0 < r.interaction_energy_eV < 0.2  # physisorption scale, not a clash

    # far away: a RSM0010 slab (2x1x1, 28 Å of vacuum added normal to the a-b plane)
    mof = load_structure("RSM0010").repeat((2, 1, 1))
    cell = np.asarray(mof.cell)
    normal = np.cross(cell[0], cell[1])
    normal /= np.linalg.norm(normal)
    cell[2] += 28.0 * normal * np.sign(cell[2] @ normal)
    mof.set_cell(cell, scale_atoms=False)
    far = interaction_energy(mof, "CO2", chgnet)  # default position: the middle of the vacuum
    assert far.min_host_guest_distance_A > 12.0
    assert abs(far.interaction_energy_eV) < 1e-3
