"""MD stability: EMT Cu physics (volume, temperature, barostat pressure), blow-ups, seeding,
stop requests, trajectory files, validation, and one short CHGNet run on a builtin MOF."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import read

from matcalc import progress
from matcalc.calculations.results import Result
from matcalc.calculations.stability import StabilityResult, stability
from matcalc.models.base import EV_PER_A3_TO_GPA, Evaluation, Potential

A_CU = 3.61  # Å; EMT Cu at 300 K sits within ~1 % of this volume


def cu(n: int) -> Atoms:
    return bulk("Cu", "fcc", a=A_CU, cubic=True).repeat((n, n, n))


def tail(r: StabilityResult, stage: str) -> np.ndarray:
    idx = np.array([i for i, s in enumerate(r.stages) if s == stage])
    return idx[len(idx) // 2:]


def mic_rmsd(a: Atoms, b: Atoms) -> float:
    d = b.get_scaled_positions(wrap=False) - a.get_scaled_positions(wrap=False)
    d -= np.round(d)
    d = d @ np.asarray(b.cell)
    d -= d.mean(axis=0)
    return float(np.sqrt(np.mean(np.sum(d**2, axis=1))))


@pytest.mark.slow
def test_emt_cu_nvt_then_npt_keeps_volume_and_temperature():
    atoms = cu(3)  # 108 atoms
    r = stability(atoms, "emt", nvt_steps=200, npt_steps=300, interval=10, pdamp_fs=200, seed=1)
    assert r.stable and r.reason == "" and not r.stopped_early
    assert r.steps_completed == r.total_steps == 500
    assert len(r.time_ps) == 51 and r.stages.count("nvt") == 20 and r.stages.count("npt") == 30
    np.testing.assert_allclose(np.diff(r.time_ps), 0.010)
    # perfect fcc: nothing to pre-relax, so frame 0 is the input; its energy is plain EMT's
    ref = atoms.copy()
    ref.calc = EMT()
    assert r.potential_energy_eV[0] == pytest.approx(ref.get_potential_energy(), abs=1e-9)
    assert r.initial_volume_A3 == pytest.approx(atoms.get_volume())
    assert abs(r.volume_change_percent) < 3.0
    assert r.volume_change_percent == pytest.approx(100 * (r.volume_A3[-1] / atoms.get_volume() - 1))
    t_tail = r.temperature_K[tail(r, "npt")]
    assert r.mean_temperature_K == pytest.approx(t_tail.mean())
    assert abs(t_tail.mean() - 300.0) < 40.0, t_tail
    # RMSD of the last frame, recomputed here against the input (= the relaxed start)
    assert r.rmsd_A[-1] == pytest.approx(mic_rmsd(atoms, r.final_structure), abs=1e-9)
    assert 0.03 < r.rmsd_A[-1] < 0.3  # thermal vibrations of Cu at 300 K, no diffusion
    assert r.max_displacement_A < 0.8
    assert np.isfinite(r.energy_drift_eV_per_atom_per_ps)
    assert abs(r.energy_drift_eV_per_atom_per_ps) < 0.2
    assert r.coordination_before and set(r.coordination_before.values()) == {12}
    assert len(r.coordination_before) == 64  # capped at MAX_COORDINATION_SITES, with a warning
    assert any("first 64" in w for w in r.warnings)


def test_npt_reaches_the_applied_pressure_and_flags_a_large_volume_change():
    """40 GPa compresses Cu by ~18 %: unstable by the 10 % rule (not a blow-up). The static
    EMT pressure of the perfect lattice at the mean NPT volume must match the applied pressure
    minus a small thermal pressure (checks the bar -> eV/Å³ conversion and the barostat)."""
    atoms = cu(2)
    r = stability(atoms, "emt", nvt_steps=50, npt_steps=300, interval=10, pdamp_fs=100, pressure_bar=4e5)
    assert not r.stable and "volume changed" in r.reason
    assert r.steps_completed == 350  # not ended as a blow-up
    shrank = [w for w in r.warnings if "volume shrank by" in w and "during the MD run" in w]
    assert len(shrank) == 1 and f"{abs(r.volume_change_percent):.1f} %" in shrank[0], r.warnings
    v_mean = r.volume_A3[tail(r, "npt")].mean()
    assert 0.75 < v_mean / atoms.get_volume() < 0.9
    probe = atoms.copy()
    probe.set_cell(probe.cell * (v_mean / atoms.get_volume()) ** (1 / 3), scale_atoms=True)
    probe.calc = EMT()
    p_static_GPa = -probe.get_stress()[:3].mean() * EV_PER_A3_TO_GPA
    assert 35.0 < p_static_GPa < 42.0, p_static_GPa  # 40 GPa applied, thermal pressure ~1-3 GPa


def test_nvt_only_keeps_the_cell_and_npt_relaxes_an_expanded_one():
    expanded = bulk("Cu", "fcc", a=3.72, cubic=True).repeat((2, 2, 2))  # +9 % volume vs EMT equilibrium
    nvt = stability(expanded, "emt", nvt_steps=100, npt_steps=300, ensemble="nvt", interval=10)
    assert nvt.steps_completed == nvt.total_steps == 100
    assert set(nvt.stages) == {"start", "nvt"} and nvt.parameters["npt_steps"] == 0
    np.testing.assert_allclose(nvt.volume_A3, expanded.get_volume(), rtol=1e-12)
    assert nvt.volume_change_percent == pytest.approx(0.0, abs=1e-9)
    npt = stability(expanded, "emt", nvt_steps=50, npt_steps=300, interval=10, pdamp_fs=100)
    v_tail = npt.volume_A3[tail(npt, "npt")].mean()
    assert v_tail < 0.95 * expanded.get_volume()  # the barostat pulls the cell in
    assert npt.stable  # final |dV| < 10 %


def test_seeded_runs_are_reproducible():
    atoms = cu(2)
    kw = dict(nvt_steps=40, npt_steps=40, interval=10, pdamp_fs=100)
    a = stability(atoms, "emt", seed=7, **kw)
    b = stability(atoms, "emt", seed=7, **kw)
    c = stability(atoms, "emt", seed=8, **kw)
    for name in ("temperature_K", "volume_A3", "potential_energy_eV", "rmsd_A"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.temperature_K, c.temperature_K)


def squeezed() -> Atoms:
    atoms = cu(2)
    d = atoms.positions[1] - atoms.positions[0]
    atoms.positions[1] = atoms.positions[0] + 0.7 * d / np.linalg.norm(d)  # 0.7 Å apart
    return atoms


@pytest.mark.parametrize(("structure", "kw", "expect"), [
    (squeezed, {"relax_first": False}, "temperature"),
    (lambda: cu(2), {"timestep_fs": 20.0, "temperature_K": 2000.0}, "at step"),  # 20 fs: the largest allowed
])
def test_blowup_gives_unstable_with_reason_and_keeps_the_trace(structure, kw, expect):
    r = stability(structure(), "emt", nvt_steps=100, npt_steps=100, interval=10, **kw)
    assert not r.stable and expect in r.reason
    assert r.steps_completed < r.total_steps
    assert len(r.time_ps) >= 2 and r.stages[0] == "start"  # the trace up to the blow-up survives
    assert r.coordination_after == {}
    assert any("run ended" in w for w in r.warnings)


class FailingEMT(Potential):
    """EMT that goes wrong after ``ok_calls`` evaluations: NaN energy or an exception."""

    def __init__(self, ok_calls: int, mode: str) -> None:
        super().__init__(f"failing-emt-{mode}", elements=frozenset({"Cu"}))
        self.ok_calls, self.mode, self.n = ok_calls, mode, 0

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        out = []
        for atoms in atoms_list:
            self.n += 1
            if self.n > self.ok_calls and self.mode == "raise":
                raise RuntimeError("model crashed")
            a = atoms.copy()
            a.calc = EMT()
            e = a.get_potential_energy() if self.n <= self.ok_calls else float("nan")
            out.append(Evaluation(e, a.get_forces(), a.get_stress()))
        return out


@pytest.mark.parametrize(("mode", "expect"), [("nan", "non-finite potential energy"),
                                              ("raise", "RuntimeError: model crashed")])
def test_model_failure_ends_the_run_without_losing_the_trace(mode, expect):
    r = stability(cu(1), FailingEMT(25, mode), nvt_steps=50, npt_steps=50, interval=5, relax_first=False)
    assert not r.stable and expect in r.reason
    assert r.steps_completed <= 25 and len(r.time_ps) >= 4
    assert np.all(np.isfinite(r.temperature_K[:4]))


def test_stop_request_ends_early_with_the_partial_trace():
    events = []
    stop = threading.Event()

    def sink(ev: progress.ProgressEvent) -> None:
        events.append(ev)
        if ev.stage == "nvt" and ev.step >= 30:
            stop.set()

    with progress.reporting(sink, stop=stop):
        r = stability(cu(2), "emt", nvt_steps=100, npt_steps=100, interval=10)
    assert r.stopped_early and r.steps_completed == 30
    assert r.stages == ["start", "nvt", "nvt", "nvt"] and r.time_ps[-1] == pytest.approx(0.030)
    assert r.stable  # nothing went wrong in the 30 steps that ran
    assert any("stopped early" in w for w in r.warnings)
    nvt_events = [e for e in events if e.stage == "nvt"]
    assert [e.step for e in nvt_events] == [10, 20, 30] and nvt_events[0].total_steps == 100
    assert all(np.isfinite(e.energy_eV) and "temperature_K" in e.extra for e in nvt_events)


@pytest.mark.parametrize("suffix", [".traj", ".extxyz"])
def test_trajectory_holds_every_recorded_frame(tmp_path, suffix):
    path = tmp_path / f"md{suffix}"
    r = stability(cu(2), "emt", nvt_steps=30, npt_steps=25, interval=10, trajectory=path)
    frames = read(path, ":")
    assert r.trajectory == str(path)
    assert len(frames) == len(r.time_ps) == 7  # 0 10 20 30 40 50 55
    np.testing.assert_allclose([f.get_volume() for f in frames], r.volume_A3)
    np.testing.assert_allclose([f.get_potential_energy() for f in frames], r.potential_energy_eV)
    np.testing.assert_allclose(frames[-1].positions, r.final_structure.positions, atol=1e-6)


def test_result_round_trip_row_and_plot():
    r = stability(cu(1), "emt", nvt_steps=20, npt_steps=20, interval=10)
    back = Result.from_dict(r.to_dict())
    assert isinstance(back, StabilityResult)
    np.testing.assert_allclose(back.volume_A3, r.volume_A3)
    assert back.coordination_before == r.coordination_before == {0: 12, 1: 12, 2: 12, 3: 12}
    assert back.stages == r.stages
    row = r.to_frame().iloc[0]
    assert row["stable"] and row["volume_change_percent"] == r.volume_change_percent
    fig = r.plot()
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert "volume (Å³)" in labels and "temperature (K)" in labels
    assert fig.axes[-1].get_xlabel() == "time (ps)"
    fig2 = r.plot(ax=fig.axes[0].figure.add_subplot(4, 1, 4))
    assert fig2 is fig


@pytest.mark.parametrize(("kw", "name"), [
    ({"temperature_K": -10}, "temperature_K"),
    ({"temperature_K": 0}, "temperature_K"),
    ({"timestep_fs": 0}, "timestep_fs"),
    ({"nvt_steps": -1}, "nvt_steps"),
    ({"npt_steps": 2.5}, "npt_steps"),
    ({"interval": 0}, "interval"),
    ({"friction_per_fs": 0}, "friction_per_fs"),
    ({"tdamp_fs": -1}, "tdamp_fs"),
    ({"pdamp_fs": 0}, "pdamp_fs"),
    ({"ensemble": "nve"}, "ensemble"),
    ({"seed": -3}, "seed"),
    ({"protocol": "slow"}, "protocol"),
])
def test_bad_parameters_raise_value_error_naming_them(kw, name):
    with pytest.raises(ValueError, match=name):
        stability(cu(1), "emt", **kw)


@pytest.mark.slow
def test_chgnet_on_a_builtin_mof(chgnet):
    from chgnet.model.dynamics import CHGNetCalculator

    from matcalc import load_structure

    atoms = load_structure("RSM0010")  # C10H2O8Zn2, 22 atoms
    r = stability(atoms, chgnet, protocol="fast", nvt_steps=10, npt_steps=10, interval=5, relax_first=False)
    assert r.stable and r.steps_completed == 20 and len(r.time_ps) == 5
    assert r.stages == ["start", "nvt", "nvt", "npt", "npt"]
    ref = atoms.copy()
    ref.calc = CHGNetCalculator(model=chgnet.model, use_device="cpu")
    assert r.potential_energy_eV[0] == pytest.approx(ref.get_potential_energy(), abs=2e-3)
    assert np.all(np.isfinite(r.temperature_K)) and abs(r.volume_change_percent) < 2.0
    assert r.coordination_before == {0: 4, 1: 4}  # tetrahedral Zn
    assert r.rmsd_A[-1] < 0.3
