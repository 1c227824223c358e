"""Henry coefficients (Widom insertion) and binding sites, each checked against an independent computation:
a dense-grid integral of the Boltzmann factor, the ideal-gas limit, a plain ASE loop of single points on the
same random stream, CHGNet's own calculator, and a brute-force minimisation; bad input locally and over REST."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones, cutoff_function, d_cutoff_function
from ase.geometry import find_mic, get_distances
from ase.io import write
from scipy.optimize import minimize
from scipy.spatial.transform import Rotation

import matcalc as mc
from matcalc import batching, progress
from matcalc.models.base import Evaluation, Potential
from matcalc.models.lj import ARGON_EPSILON_EV, ARGON_SIGMA_A, LJ_CUTOFF_A

R_J_PER_MOL_K = 1.380649e-23 * 6.02214076e23
AMU_KG = 1.66053906660e-27


# ---------------------------------------------------------------------------------------------- test models
class BatchLJ(Potential):
    """ASE's smooth Lennard-Jones (one sigma/epsilon for every pair, ro = 0.66 rc), vectorised over a batch of
    structures: positions wrapped, pairs over the 27 cells around the home cell (exact while rc does not exceed
    the cell width)."""

    family = "test-lj"
    supports_batching = True

    def __init__(self, sigma: float = ARGON_SIGMA_A, epsilon: float = ARGON_EPSILON_EV, rc: float = 6.0) -> None:
        super().__init__("test-lj", cutoff_A=rc, max_batch_atoms=1_000_000)
        self.sigma, self.epsilon, self.rc = sigma, epsilon, rc

    def calc(self) -> LennardJones:
        return LennardJones(sigma=self.sigma, epsilon=self.epsilon, rc=self.rc, smooth=True)

    def _evaluate_batch(self, atoms_list):
        out: list = [None] * len(atoms_list)
        groups: dict = {}
        for k, a in enumerate(atoms_list):
            groups.setdefault((len(a), np.asarray(a.cell).tobytes()), []).append(k)
        for (n, _), idx in groups.items():
            cell = np.asarray(atoms_list[idx[0]].cell)
            shifts = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)]) @ cell
            pos = np.stack([atoms_list[k].get_positions(wrap=True) for k in idx])
            d = pos[:, None, :, None, :] + shifts[None, None, None] - pos[:, :, None, None, :]
            r2 = (d**2).sum(-1)
            r2[:, np.arange(n), np.arange(n), 13] = np.inf  # shift 13 = (0, 0, 0): no self pair
            rc2, ro2 = self.rc**2, (0.66 * self.rc) ** 2
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                c6 = (self.sigma**2 / r2) ** 3
                c12 = c6 * c6
                inside = r2 < rc2
                pe = np.where(inside, 4 * self.epsilon * (c12 - c6), 0.0)
                pf = np.where(inside, -24 * self.epsilon * (2 * c12 - c6) / r2, 0.0)
                fc, dfc = cutoff_function(r2, rc2, ro2), d_cutoff_function(r2, rc2, ro2)
                pf = fc * pf + 2 * dfc * pe
                e = 0.5 * (pe * fc).sum((1, 2, 3))
                f = (pf[..., None] * d).sum((2, 3))
            for b, k in enumerate(idx):
                out[k] = Evaluation(float(e[b]), f[b], None)
        return out


class Additive(Potential):
    """E = sum of a per-element constant: nothing interacts, so E_int = 0 exactly."""

    family = "test-additive"
    supports_batching = True

    def _evaluate_batch(self, atoms_list):
        return [Evaluation(float(-1.5 * a.numbers.sum()), np.zeros((len(a), 3)), np.zeros(6)) for a in atoms_list]


def lj_pair_energy(r2: np.ndarray, pot: BatchLJ) -> np.ndarray:
    """The pair energy of ASE's smooth LJ, written out (for the grid integral and the brute force)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        c6 = (pot.sigma**2 / r2) ** 3
        e = 4 * pot.epsilon * (c6 * c6 - c6) * cutoff_function(r2, pot.rc**2, (0.66 * pot.rc) ** 2)
    return np.where(r2 < pot.rc**2, e, 0.0)


def framework() -> Atoms:
    """A small, asymmetric LJ framework: four atoms in a cubic 8 Å cell."""
    return Atoms("C4", scaled_positions=[[0, 0, 0], [0.5, 0.1, 0], [0.1, 0.5, 0.3], [0.3, 0.2, 0.6]],
                 cell=[8.0, 8.0, 8.0], pbc=True)


def guest_field(fw: Atoms, points: np.ndarray, pot: BatchLJ) -> np.ndarray:
    """E_int (eV) of one LJ atom at each Cartesian point: its pair sum over the framework and 26 image cells
    (the guest's own images are beyond rc in an 8 Å cell)."""
    shifts = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)]) @ np.asarray(fw.cell)
    images = (fw.positions[:, None, :] + shifts[None]).reshape(-1, 3)
    out = np.empty(len(points))
    for s in range(0, len(points), 8192):
        out[s:s + 8192] = lj_pair_energy(((points[s:s + 8192, None, :] - images[None]) ** 2).sum(-1), pot).sum(1)
    return out


def density(fw: Atoms) -> float:
    return fw.get_masses().sum() * AMU_KG / (fw.get_volume() * 1e-30)


def draw(fw: Atoms, guest: Atoms, n: int, seed: int) -> np.ndarray:
    """The documented random stream, independently: (n, k, 3) guest atom positions."""
    rng = np.random.default_rng(seed)
    centres = rng.random((n, 3)) @ np.asarray(fw.cell)
    rot = Rotation.random(n, rng=rng)
    local = guest.positions - guest.get_center_of_mass()
    return np.stack([rot[i].apply(local) + centres[i] for i in range(n)])


def overlaps(fw: Atoms, positions: np.ndarray, distance: float) -> np.ndarray:
    """Minimum-image overlap of each insertion, with ASE's get_distances."""
    return np.array([get_distances(p, fw.positions, cell=fw.cell, pbc=True)[1].min() < distance for p in positions])


# ---------------------------------------------------------------------------------------------- Henry
def test_batch_lj_is_ases_lennard_jones():
    fw, pot = framework(), BatchLJ()
    rng = np.random.default_rng(3)
    cells = []
    for _ in range(4):
        a = fw + Atoms("Ar", positions=[rng.random(3) * 8.0], cell=fw.cell, pbc=True)
        cells.append(a)
    for a, ev in zip(cells, pot.evaluate(cells), strict=True):
        ref = a.copy()
        ref.calc = pot.calc()
        assert ev.energy_eV == pytest.approx(ref.get_potential_energy(), abs=1e-12)
        np.testing.assert_allclose(ev.forces_eV_per_A, ref.get_forces(), atol=1e-12)
    pts = np.array([c.positions[-1] for c in cells])
    e_fw = fw.copy()
    e_fw.calc = pot.calc()
    direct = np.array([ev.energy_eV for ev in pot.evaluate(cells)]) - e_fw.get_potential_energy()
    np.testing.assert_allclose(guest_field(fw, pts, pot), direct, atol=1e-12)


def test_henry_lj_argon_matches_grid_integration():
    """K_H = <exp(-E/kT)>_cell / (rho R T) with the cell average done on a dense grid (converged to 1e-5)."""
    fw, pot, t = framework(), BatchLJ(), 300.0
    r = mc.henry_coefficient(fw, "Ar", model=pot, temperature_K=t, n_insertions=8000, seed=11, cache=False)
    n = 32
    g = (np.arange(n) + 0.5) / n
    pts = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3) @ np.asarray(fw.cell)
    e = guest_field(fw, pts, pot)
    w = np.exp(-e / (units.kB * t))
    rho = density(fw)
    k_grid = w.mean() / (rho * R_J_PER_MOL_K * t)
    e_kj = e * units.mol / units.kJ
    q_grid = R_J_PER_MOL_K * t / 1000 - (np.where(w > 0, e_kj, 0) * w).sum() / w.sum()
    assert r.framework_density_kg_per_m3 == pytest.approx(rho, rel=1e-9)
    assert 0 < r.henry_error_mol_per_kg_Pa < 0.05 * r.henry_mol_per_kg_Pa
    assert abs(r.henry_mol_per_kg_Pa - k_grid) < 3 * r.henry_error_mol_per_kg_Pa, (r.henry_mol_per_kg_Pa, k_grid)
    assert abs(r.heat_of_adsorption_kJ_per_mol - q_grid) < 3 * r.heat_of_adsorption_error_kJ_per_mol + 0.02
    assert r.n_insertions == 8000 and r.n_blocks == 10 and not r.warnings
    assert r.henry_mol_per_kg_bar == pytest.approx(1e5 * r.henry_mol_per_kg_Pa)
    # the lowest insertions, as structures, carry their energies
    assert len(r.lowest_structures) == 5 and np.all(np.diff(r.lowest_energies_eV) >= 0)
    first = r.lowest_structures[0]
    assert first.get_tags().tolist() == [0, 0, 0, 0, 1]
    assert guest_field(fw, first.positions[-1:], pot)[0] == pytest.approx(r.lowest_energies_eV[0], abs=1e-12)
    assert r.lowest_energies_eV[0] == np.nanmin(r.insertion_energies_eV)
    # the running trace ends at the final estimate
    assert r.trace_n_insertions[-1] == 8000
    assert r.trace_henry_mol_per_kg_Pa[-1] == pytest.approx(r.henry_mol_per_kg_Pa)
    back = mc.Result.from_dict(r.to_dict())
    assert type(back) is type(r) and back.henry_mol_per_kg_Pa == r.henry_mol_per_kg_Pa
    np.testing.assert_array_equal(np.isnan(back.insertion_energies_eV), np.isnan(r.insertion_energies_eV))
    assert len(back.lowest_structures) == 5
    fig = r.plot()
    assert len(fig.axes) == 3 and fig.axes[0].get_ylabel() == "K_H (mol/(kg·Pa))"


def test_ideal_gas_limit_is_exact():
    """A guest that does not interact: K_H = (non-overlap fraction) / (rho R T) and Q_st = RT, exactly."""
    fw, t = framework(), 250.0
    co2 = molecule("CO2")
    r = mc.henry_coefficient(fw, "CO2", model=Additive("additive"), temperature_K=t, n_insertions=3000, seed=5,
                             overlap_distance_A=2.0, cache=False)
    blocked = overlaps(fw, draw(fw, co2, 3000, 5), 2.0)
    assert r.n_overlaps == int(blocked.sum()) and 0 < r.n_overlaps < 3000
    np.testing.assert_array_equal(np.isnan(r.insertion_energies_eV), blocked)
    assert np.all(r.insertion_energies_eV[~blocked] == 0.0)
    expected = (1 - blocked.mean()) / (density(fw) * R_J_PER_MOL_K * t)
    assert r.henry_mol_per_kg_Pa == pytest.approx(expected, rel=1e-12)
    assert r.heat_of_adsorption_kJ_per_mol == pytest.approx(R_J_PER_MOL_K * t / 1000, rel=1e-12)
    assert r.boltzmann_mean_interaction_kJ_per_mol == 0.0
    # the block error is the spread of the blocks' non-overlap fractions
    blocks = [1 - b.mean() for b in np.array_split(blocked, 10)]
    se = np.std(blocks, ddof=1) / np.sqrt(10) / (density(fw) * R_J_PER_MOL_K * t)
    assert r.henry_error_mol_per_kg_Pa == pytest.approx(se, rel=1e-9)


def test_same_seed_reproduces_every_insertion_with_plain_ase():
    """Every insertion energy equals a plain ASE loop (ASE's LennardJones) over the documented random stream."""
    fw, pot = framework(), BatchLJ()
    co2 = molecule("CO2")
    a = mc.henry_coefficient(fw, "CO2", model=pot, n_insertions=60, seed=7, insertions_per_request=16, cache=False)
    b = mc.henry_coefficient(fw, "co2", model=pot, n_insertions=60, seed=7, cache=False)
    c = mc.henry_coefficient(fw, "CO2", model=pot, n_insertions=60, seed=8, cache=False)
    np.testing.assert_array_equal(a.insertion_energies_eV, b.insertion_energies_eV)
    assert not np.allclose(np.nan_to_num(a.insertion_energies_eV), np.nan_to_num(c.insertion_energies_eV))
    assert any("periodic images" in w for w in a.warnings)  # 8 Å cell < CO2 extent + the 6 Å cutoff

    ref_fw = fw.copy()
    ref_fw.calc = pot.calc()
    e_fw = ref_fw.get_potential_energy()
    box = co2.copy()
    box.cell, box.pbc = np.eye(3) * a.guest_box_A, True
    box.calc = pot.calc()
    e_guest = box.get_potential_energy()
    positions = draw(fw, co2, 60, 7)
    blocked = overlaps(fw, positions, 1.5)
    expected = np.full(60, np.nan)
    for i in np.flatnonzero(~blocked):
        cpx = fw + Atoms("CO2", positions=positions[i], cell=fw.cell, pbc=True)
        cpx.calc = pot.calc()
        expected[i] = cpx.get_potential_energy() - e_fw - e_guest
    assert a.n_overlaps == blocked.sum() and 0 < a.n_overlaps < 60
    np.testing.assert_allclose(a.insertion_energies_eV, expected, rtol=1e-12, atol=1e-9)


def test_progress_reports_and_stop_request():
    fw, pot = framework(), BatchLJ()
    events = []

    def sink(ev):
        events.append(ev)
        if ev.extra.get("insertions", 0) >= 400:
            stop.set()

    with progress.reporting(sink) as stop:
        r = mc.henry_coefficient(fw, "Ar", model=pot, n_insertions=5000, insertions_per_request=200, cache=False)
    assert r.stopped_early and r.n_insertions == 400 and len(r.insertion_energies_eV) == 400
    assert any("stopped after 400 of 5000" in w for w in r.warnings)
    last = events[-1]
    assert last.stage == "widom" and last.step == 400 and last.total_steps == 5000
    assert last.extra["henry_mol_per_kg_Pa"] == pytest.approx(r.henry_mol_per_kg_Pa)
    assert last.extra["henry_error_mol_per_kg_Pa"] == pytest.approx(r.henry_error_mol_per_kg_Pa)
    assert last.extra["note"].startswith("400 insertions · K_H ") and "mol/(kg·Pa)" in last.extra["note"]
    # the widget state reads that note
    from matcalc.widgets.state import ProgressState

    class OneTask:
        id, status, progress = "t1", "RUNNING", last.to_dict()

        def add_progress_callback(self, fn): ...
        def add_done_callback(self, fn): ...
        def cancel(self): return False
        def result(self, timeout=None): ...
        def exception(self, timeout=None): ...

    assert ProgressState([OneTask()]).row("t1").note == last.extra["note"]


def test_engine_energy_only_requests_equal_evaluate():
    """Energy-only requests (Widom's path) and full requests from several threads: each gets its own kind."""
    pot = mc.get_model("emt")
    cells = []
    for i in range(6):
        a = bulk("Cu", "fcc", a=3.6, cubic=True)
        a.rattle(0.05, seed=i)
        cells.append(a)
    ref = []
    for a in cells:
        b = a.copy()
        b.calc = EMT()
        ref.append(b.get_potential_energy())
    engine = batching.engine_for(pot)
    out: dict = {}

    def one(i: int) -> None:
        out[i] = engine.energies(cells) if i % 2 else [e.energy_eV for e in engine.evaluate(cells)]
        if not i % 2:
            out[f"f{i}"] = engine.evaluate(cells)[0].forces_eV_per_A

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for i in range(4):
        np.testing.assert_allclose(out[i], ref, atol=1e-10)
    assert out["f0"].shape == (4, 3)
    np.testing.assert_allclose(pot.energies(cells), ref, atol=1e-10)


def test_chgnet_co2_in_calf20_matches_chgnet_calculator(chgnet):
    from chgnet.model.dynamics import CHGNetCalculator

    fw = mc.load_structure("CALF-20")
    r = mc.henry_coefficient(fw, "CO2", model=chgnet, n_insertions=6, seed=2, n_lowest=1, cache=False)
    calc = CHGNetCalculator(model=chgnet.model, use_device="cpu")

    def energy(atoms: Atoms) -> float:
        a = atoms.copy()
        a.calc = calc
        return float(a.get_potential_energy())

    co2 = molecule("CO2")
    box = co2.copy()
    box.cell, box.pbc = np.eye(3) * r.guest_box_A, True
    box.positions += box.cell.sum(0) / 2 - co2.get_center_of_mass()
    e_fw, e_guest = energy(fw), energy(box)
    assert r.framework_energy_eV == pytest.approx(e_fw, abs=2e-4)
    assert r.guest_energy_eV == pytest.approx(e_guest, abs=2e-4)
    positions = draw(fw, co2, 6, 2)
    blocked = overlaps(fw, positions, 1.5)
    assert r.n_overlaps == blocked.sum() < 6
    for i in np.flatnonzero(~blocked):
        cpx = fw + Atoms("CO2", positions=positions[i], cell=fw.cell, pbc=True)
        assert r.insertion_energies_eV[i] == pytest.approx(energy(cpx) - e_fw - e_guest, abs=5e-4)
    # the energy-only path is the same forward pass as energy + forces + stress
    cells = r.lowest_structures + [fw]
    np.testing.assert_allclose(chgnet.energies(cells), [e.energy_eV for e in chgnet.evaluate(cells)], atol=1e-5)


# ---------------------------------------------------------------------------------------------- binding sites
def brute_force_minima(fw: Atoms, pot: BatchLJ) -> list[tuple[float, np.ndarray]]:
    """Every local minimum of one LJ atom in the framework: the minima of a 32^3 grid, each refined by scipy's
    BFGS, merged within 0.05 Å, kept when the Hessian is positive definite; lowest first."""
    cell = np.asarray(fw.cell)
    n = 32
    g = np.arange(n) / n
    frac = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    e = guest_field(fw, frac @ cell, pot).reshape(n, n, n)
    is_min = np.ones_like(e, dtype=bool)
    for axis in range(3):
        for shift in (-1, 1):
            is_min &= e < np.roll(e, shift, axis=axis)

    def f(x: np.ndarray) -> float:
        return float(guest_field(fw, x[None], pot)[0])

    found: list[tuple[float, np.ndarray]] = []
    for ijk in np.argwhere(is_min):
        res = minimize(f, ijk / n @ cell, method="BFGS", options={"gtol": 1e-9})
        x = res.x
        if any(np.linalg.norm(find_mic(x - y, fw.cell, pbc=True)[0]) < 0.05 for _, y in found):
            continue
        h = 1e-3
        hess = np.array([[(f(x + h * (a + b)) - f(x + h * (a - b)) - f(x - h * (a - b)) + f(x - h * (a + b))) / (4 * h * h)
                          for b in np.eye(3)] for a in np.eye(3)])
        if np.linalg.eigvalsh(hess).min() > 0:
            found.append((res.fun, x))
    return sorted(found, key=lambda m: m[0])


def test_binding_sites_equal_a_brute_force_minimisation():
    fw, pot = framework(), BatchLJ()
    minima = brute_force_minima(fw, pot)
    assert len(minima) >= 6
    r = mc.binding_sites(fw, "Ar", model=pot, n_insertions=1000, n_candidates=24, n_sites=8, fmax=1e-5,
                         max_steps=1000, cache=False)
    assert r.n_candidates == 24 and r.candidates_converged == 24 and not r.warnings
    assert len(r.sites) >= 6
    for site, (e_ref, x_ref) in zip(r.sites, minima, strict=False):  # the lowest sites, in order
        assert site.converged and site.stable
        assert site.interaction_energy_eV == pytest.approx(e_ref, abs=2e-6)
        d = np.linalg.norm(find_mic(np.asarray(site.centre_A) - x_ref, fw.cell, pbc=True)[0])
        assert d < 0.02, (site.interaction_energy_eV, d)
        assert site.interaction_energy_kJ_per_mol == pytest.approx(site.interaction_energy_eV * 96.48533, rel=1e-5)
        nearest = get_distances(site.structure.positions[-1], fw.positions, cell=fw.cell, pbc=True)[1][0]
        assert site.nearest_distances_A[0] == pytest.approx(nearest.min())
        assert site.nearest_indices[0] == int(np.argmin(nearest)) and site.nearest_symbols[0] == "C"
    # the ASE calculator agrees at the brute-force minimum: energy, and zero force on the guest
    best = r.sites[0].structure.copy()
    best.calc = pot.calc()
    ref_fw = fw.copy()
    ref_fw.calc = pot.calc()
    assert best.get_potential_energy() - ref_fw.get_potential_energy() == pytest.approx(minima[0][0], abs=2e-6)
    assert np.abs(best.get_forces()[-1]).max() < 1e-5
    assert np.allclose(best.positions[:4], fw.positions)  # the framework stayed fixed
    assert sum(s.multiplicity for s in r.sites) == sum(1 for c in r.candidate_sites if c >= 0)
    # from given positions: 0.4 Å off the two best minima, each relaxes into its minimum
    given = [minima[0][1] + 0.4 / np.sqrt(3), minima[1][1] - 0.4 / np.sqrt(3)]
    p = mc.binding_sites(fw, "Ar", model=pot, positions=given, n_orientations=1, fmax=1e-5, cache=False)
    assert [s.interaction_energy_eV for s in p.sites] == pytest.approx([minima[0][0], minima[1][0]], abs=2e-6)
    assert p.n_insertions == 0 and p.n_candidates == 2
    back = mc.Result.from_dict(r.to_dict())
    assert back.sites[0].interaction_energy_eV == r.sites[0].interaction_energy_eV
    assert back.sites[0].structure is not None and back.sites[0].stable
    assert r.plot().axes[0].get_ylabel() == "E_int (kJ/mol)"


def test_binding_sites_co2_with_lj_model_relaxes_a_flexible_guest():
    fw = framework()
    r = mc.binding_sites(fw, "CO2", model="lj", n_insertions=40, n_candidates=2, n_sites=2, fmax=0.01,
                         max_steps=300, cache=False)
    assert r.sites and r.guest_formula == "CO2" and r.relaxed_guest is not None
    site = r.sites[0]
    # E_int against the relaxed isolated guest, from a plain ASE single point of the stored complex
    cpx = site.structure.copy()
    cpx.calc = LennardJones(sigma=ARGON_SIGMA_A, epsilon=ARGON_EPSILON_EV, rc=LJ_CUTOFF_A, smooth=True)
    assert cpx.get_potential_energy() - r.framework_energy_eV - r.guest_energy_eV == pytest.approx(
        site.interaction_energy_eV, abs=1e-9)
    assert len(site.centre_frac) == 3 and all(0 <= x < 1 for x in site.centre_frac)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("fn", "structure", "kw", "match"), [
    ("henry_coefficient", "tiny", {"guest": "CO2"}, "does not fit"),
    ("henry_coefficient", "fw", {"temperature_K": 0.0}, "temperature_K"),
    ("henry_coefficient", "fw", {"temperature_K": -10.0}, "temperature_K"),
    ("henry_coefficient", "fw", {"n_insertions": 0}, "n_insertions"),
    ("henry_coefficient", "fw", {"n_insertions": 200_001}, "n_insertions"),
    ("henry_coefficient", "fw", {"guest": "XeF6"}, "guest must be one of"),
    ("henry_coefficient", "molecule", {}, "cell"),
    ("binding_sites", "tiny", {"guest": "CO2"}, "does not fit"),
    ("binding_sites", "fw", {"n_candidates": 50, "n_insertions": 10}, "n_candidates"),
    ("binding_sites", "fw", {"positions": [[0.0, 0.0, 0.0]], "guest": "Ar"}, "overlaps the framework"),
    ("binding_sites", "fw", {"positions": [[0.0, 0.0]]}, "positions"),
])
def test_bad_input_raises_before_any_model_call(fn, structure, kw, match):
    atoms = {"fw": framework(), "tiny": Atoms("C", cell=[3.0, 3.0, 3.0], pbc=True),
             "molecule": molecule("CH4")}[structure]
    pot = BatchLJ()
    with pytest.raises(ValueError, match=match):
        getattr(mc, fn)(atoms, model=pot, cache=False, **kw)
    assert pot.stats.calls == 0


# ---------------------------------------------------------------------------------------------- REST
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    pytest.importorskip("fastapi")
    from live_server import LiveServer

    work = tmp_path_factory.mktemp("adsorption")
    srv = LiveServer(work, f"sqlite:///{work / 'api.db'}", "--workers", "1")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def cif(atoms: Atoms) -> str:
    buf = io.BytesIO()
    write(buf, atoms, format="cif")
    return buf.getvalue().decode()


HENRY = {"guest": "Ar", "n_insertions": 20, "seed": 3, "temperature_K": 200.0, "insertions_per_request": 5}
SITES = {"guest": "ar", "n_insertions": 12, "n_candidates": 2, "n_sites": 2, "fmax": 0.01, "seed": 3}


@pytest.mark.slow
def test_live_server_both_clients_and_widget_equal_local_runs(live):
    """Both properties through `matcalc serve` (model "lj") with the sync client, the widget following them
    (the Henry row shows the running K_H), Henry again with the async client; results equal local calls."""
    import asyncio

    import httpx
    from live_server import KEY

    from matcalc.client import AsyncClient, Client
    from matcalc.widgets import progress as progress_view

    text = cif(framework())
    with Client(live.url, api_key=KEY, poll_interval=0.2) as c:
        tasks = [c.henry_coefficient(text, "lj", **HENRY), c.binding_sites(text, "lj", **SITES)]
        w = progress_view(tasks, mode="widget", display=False, max_rate_hz=50)
        assert w.wait(300)
        assert w.counts() == {"COMPLETED": 2}
        rh, rb = (t.result(timeout=60) for t in tasks)
        note = w.state.row(tasks[0].id).note
        assert note and "insertions · K_H" in note and "mol/(kg·Pa)" in note, note
        w.close()

    async def henry_async():
        async with AsyncClient(live.url, api_key=KEY, poll_interval=0.2) as ac:
            task = await ac.henry_coefficient(text, "lj", **HENRY)
            return await task.result(timeout=180)

    ra = asyncio.run(henry_async())
    with httpx.Client(base_url=live.url + "/api/v1", headers={"X-API-Key": KEY}, timeout=30) as h:
        entries = h.get(f"/tasks/{tasks[0].id}/logs").json()["data"]
        assert any(e["event"] == "progress" for e in entries)

    fw = mc.load_structure(text)
    lh = mc.henry_coefficient(fw, model="lj", cache=False, **HENRY)
    lb = mc.binding_sites(fw, model="lj", cache=False, **SITES)
    for remote in (rh, ra):
        assert type(remote).__name__ == "HenryResult"
        np.testing.assert_allclose(remote.insertion_energies_eV, lh.insertion_energies_eV, atol=1e-10)
        assert remote.henry_mol_per_kg_Pa == pytest.approx(lh.henry_mol_per_kg_Pa, rel=1e-9)
    assert type(rb).__name__ == "BindingSitesResult" and rb.sites
    assert [s.interaction_energy_eV for s in rb.sites] == pytest.approx([s.interaction_energy_eV for s in lb.sites],
                                                                          abs=1e-9)


@pytest.fixture
def api(tmp_path):
    """In-process API with no workers: submissions are validated and stored, nothing runs."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from matcalc.server import Settings, create_app

    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'api.db'}", cluster="inprocess", workers=0))
    with TestClient(app) as c:
        yield c


def test_rest_bad_input_is_422_and_stores_nothing(api):
    from matcalc.store import Structure, Task

    store = api.app.state.store
    text = cif(framework())
    tiny = cif(Atoms("C", cell=[3.0, 3.0, 3.0], pbc=True))
    xyz = "5\nmethane\nC 0 0 0\nH 0.6 0.6 0.6\nH -0.6 -0.6 0.6\nH -0.6 0.6 -0.6\nH 0.6 -0.6 -0.6\n"
    cases = [
        ("henry-coefficient", {"structure": text, "temperature_K": 0}, "temperature_K"),
        ("henry-coefficient", {"structure": text, "temperature_K": -5}, "temperature_K"),
        ("henry-coefficient", {"structure": text, "n_insertions": 0}, "n_insertions"),
        ("henry-coefficient", {"structure": text, "n_insertions": 10**6}, "n_insertions"),
        ("henry-coefficient", {"structure": tiny, "guest": "CO2"}, "does not fit"),
        ("henry-coefficient", {"structure": xyz}, ""),
        ("binding-sites", {"structure": tiny, "guest": "CO2"}, "does not fit"),
        ("binding-sites", {"structure": text, "guest": "Ar", "positions": [[0, 0, 0]]}, "overlaps"),
        ("binding-sites", {"structure": text, "n_candidates": 50, "n_insertions": 10}, "n_candidates"),
        ("binding-sites", {"structure": text, "positions": [[0, 0]]}, "positions"),
    ]
    for route, body, word in cases:
        r = api.post(f"/api/v1/tasks/{route}", json={"model": "lj", **body})
        assert r.status_code == 422, (route, body, r.json())
        assert r.json()["code"] in (40001, 40002) and word in r.json()["message"], r.json()
    assert store.count(Task) == 0 and store.count(Structure) == 0
    ok = api.post("/api/v1/tasks/henry-coefficient", json={"model": "lj", "structure": text, "guest": "AR"})
    assert ok.status_code == 201, ok.json()
    assert store.count(Task) == 1


def test_openapi_has_both_routes_from_the_declarations(api):
    spec = api.get("/openapi.json").json()
    for route in ("henry-coefficient", "binding-sites"):
        assert f"/api/v1/tasks/{route}" in spec["paths"]
    schemas = spec["components"]["schemas"]
    henry = next(v for k, v in schemas.items() if k.startswith("HenryCoefficient") and "temperature_K" in
                 v.get("properties", {}))
    t = henry["properties"]["temperature_K"]["anyOf"][0]
    assert t["exclusiveMinimum"] == 0 and t["maximum"] == 10000
    n = henry["properties"]["n_insertions"]["anyOf"][0]
    assert n["minimum"] == 1 and n["maximum"] == 200_000
    sites = next(v for k, v in schemas.items() if k.startswith("BindingSites") and "positions" in
                 v.get("properties", {}))
    assert sites["properties"]["positions"]["anyOf"][0]["items"]["maxItems"] == 3
