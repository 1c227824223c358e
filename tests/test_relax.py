"""relax() and single_point() against plain ASE runs of the same model, optimizer, filter and fmax."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.emt import EMT
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, FIRE, LBFGS, MDMin

import matcalc as mc
from matcalc import progress
from matcalc.calculations.relax import RelaxResult
from matcalc.calculations.single_point import SinglePointResult
from matcalc.models import EV_PER_A3_TO_GPA
from matcalc.structures import load_structure

ASE_OPT = {"LBFGS": LBFGS, "BFGS": BFGS, "FIRE": FIRE, "MDMin": MDMin}


def plain_ase_relax(atoms: Atoms, calc, *, fmax: float, optimizer: str = "LBFGS", steps: int = 5000) -> Atoms:
    """What a peer writes by hand: optimizer + FrechetCellFilter, nothing else."""
    atoms = atoms.copy()
    atoms.calc = calc
    ASE_OPT[optimizer](FrechetCellFilter(atoms), logfile=None).run(fmax=fmax, steps=steps)
    return atoms


@pytest.mark.parametrize("optimizer", ["LBFGS", "BFGS", "FIRE"])
def test_emt_relax_matches_plain_ase(cu_rattled: Atoms, optimizer: str) -> None:
    r = mc.relax(cu_rattled, "emt", optimizer=optimizer, fmax=1e-3)
    ref = plain_ase_relax(cu_rattled, EMT(), fmax=1e-3, optimizer=optimizer)
    n = len(ref)
    assert r.converged
    assert abs(r.final_energy_eV - ref.get_potential_energy()) / n < 1e-3
    assert abs(r.final_volume_A3 / ref.get_volume() - 1) < 1e-3
    # physics: EMT Cu relaxes to its fcc lattice constant (~3.59 Å), zero stress
    assert r.final_volume_A3 / n == pytest.approx(3.59**3 / 4, rel=0.01)
    assert r.final_fmax_eV_per_A <= 1e-3
    assert r.energies_eV[-1] == pytest.approx(r.final_energy_eV)
    assert r.final_energy_eV < r.initial_energy_eV


def test_mdmin_optimizer_runs(cu_rattled: Atoms) -> None:
    r = mc.relax(cu_rattled, "emt", optimizer="MDMin", fmax=0.01, max_steps=2000)
    ref = plain_ase_relax(cu_rattled, EMT(), fmax=0.01, optimizer="MDMin", steps=2000)
    assert abs(r.final_energy_eV - ref.get_potential_energy()) / len(ref) < 1e-3


def test_chgnet_relax_matches_plain_ase(chgnet) -> None:
    from chgnet.model.dynamics import CHGNetCalculator

    atoms = load_structure("RSM0009")
    atoms.rattle(0.02, seed=7)
    fmax = 0.05
    r = mc.relax(atoms, chgnet, fmax=fmax, max_steps=300)
    ref = plain_ase_relax(atoms, CHGNetCalculator(model=chgnet.model, use_device="cpu"), fmax=fmax, steps=300)
    assert r.converged
    assert abs(r.final_energy_eV - ref.get_potential_energy()) / len(ref) < 1e-3  # eV/atom
    assert abs(r.final_volume_A3 / ref.get_volume() - 1) < 1e-3


def test_relax_positions_only_keeps_cell(cu_rattled: Atoms) -> None:
    r = mc.relax(cu_rattled, "emt", relax_cell=False, fmax=1e-3)
    np.testing.assert_allclose(np.asarray(r.final_structure.cell), np.asarray(cu_rattled.cell))
    assert r.volume_change_percent == pytest.approx(0.0, abs=1e-12)


def test_fixed_atoms_do_not_move(cu_rattled: Atoms) -> None:
    r = mc.relax(cu_rattled, "emt", relax_cell=False, fixed_atoms=[0, 3], fmax=1e-3)
    np.testing.assert_allclose(r.final_structure.positions[[0, 3]], cu_rattled.positions[[0, 3]], atol=1e-12)
    assert not np.allclose(r.final_structure.positions[1], cu_rattled.positions[1])
    assert r.parameters["fixed_atoms"] == [0, 3]


def test_fast_protocol_is_looser(cu_rattled: Atoms) -> None:
    r = mc.relax(cu_rattled, "emt", protocol="fast")
    assert r.protocol == "fast" and r.parameters["fmax"] == 0.05
    assert r.final_fmax_eV_per_A <= 0.05
    explicit = mc.relax(cu_rattled, "emt", protocol="fast", fmax=0.01)
    assert explicit.parameters["fmax"] == 0.01


def test_not_converged_is_reported(cu_rattled: Atoms) -> None:
    r = mc.relax(cu_rattled, "emt", max_steps=2)
    assert not r.converged and r.steps == 2
    assert any("not converged" in w for w in r.warnings)


def test_progress_events_and_stop(cu_rattled: Atoms) -> None:
    events: list[progress.ProgressEvent] = []
    with progress.reporting(events.append):
        r = mc.relax(cu_rattled, "emt", fmax=1e-3)
    assert len(events) == r.steps + 1
    assert [e.step for e in events] == list(range(r.steps + 1))
    assert events[-1].energy_eV == pytest.approx(r.final_energy_eV)

    def stop_after_three(event: progress.ProgressEvent) -> None:
        if event.step >= 3:
            stop.set()

    with progress.reporting(stop_after_three) as stop:
        r = mc.relax(cu_rattled, "emt", fmax=1e-6)
    assert not r.converged and r.steps == 3
    assert "stopped early" in r.warnings[0]


def test_result_serialisation_and_frame(cu_rattled: Atoms) -> None:
    r = mc.relax(cu_rattled, "emt")
    d = r.to_dict()
    text = json.dumps(d)  # JSON-safe
    back = mc.Result.from_dict(json.loads(text))
    assert isinstance(back, RelaxResult)
    assert back.final_energy_eV == r.final_energy_eV and back.converged == r.converged
    np.testing.assert_allclose(back.energies_eV, r.energies_eV)
    np.testing.assert_allclose(back.final_structure.positions, r.final_structure.positions)
    row = r.to_frame().iloc[0]
    assert row["final_volume_A3"] == pytest.approx(r.final_volume_A3) and row["model"] == "emt"
    assert "energies_eV" not in row.index
    fig = r.plot()
    ax = fig.axes[0]
    assert "(eV)" in ax.get_ylabel() and ax.get_xlabel() == "optimizer step"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fmax": -0.1}, r"fmax must be in \(0"),
        ({"fmax": float("nan")}, "fmax must be finite"),
        ({"max_steps": 0}, "max_steps must be an integer >= 1"),
        ({"optimizer": "SGD"}, "optimizer must be one of FIRE, BFGS, LBFGS, MDMin"),
        ({"protocol": "slow"}, "protocol must be one of"),
        ({"fixed_atoms": [0, 99]}, "fixed_atoms indices must be in"),
    ],
)
def test_bad_parameters(cu_rattled: Atoms, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mc.relax(cu_rattled, "emt", **kwargs)


def test_single_point_matches_ase(cu_rattled: Atoms) -> None:
    sp = mc.single_point(cu_rattled, "emt")
    ref = cu_rattled.copy()
    ref.calc = EMT()
    assert isinstance(sp, SinglePointResult)
    assert sp.energy_eV == pytest.approx(ref.get_potential_energy())
    assert sp.energy_per_atom_eV == pytest.approx(ref.get_potential_energy() / len(ref))
    np.testing.assert_allclose(sp.forces_eV_per_A, ref.get_forces())
    np.testing.assert_allclose(sp.stress_GPa, ref.get_stress() * EV_PER_A3_TO_GPA)
    assert sp.max_force_eV_per_A == pytest.approx(np.linalg.norm(ref.get_forces(), axis=1).max())
    back = mc.Result.from_dict(json.loads(json.dumps(sp.to_dict())))
    np.testing.assert_allclose(back.forces_eV_per_A, sp.forces_eV_per_A)


def test_single_point_chgnet_on_shipped_mof(chgnet) -> None:
    from chgnet.model.dynamics import CHGNetCalculator

    sp = mc.single_point("CALF-20", chgnet)
    ref = load_structure("CALF-20")
    ref.calc = CHGNetCalculator(model=chgnet.model, use_device="cpu")
    assert abs(sp.energy_eV - ref.get_potential_energy()) / sp.n_atoms < 1e-5
    np.testing.assert_allclose(sp.forces_eV_per_A, ref.get_forces(), atol=1e-4)
    assert sp.label == "CALF-20" and sp.formula == "C12H8N12O8Zn4"


@pytest.mark.parametrize("suffix", [".traj", ".xyz"])
def test_trajectory_is_every_step_of_the_relaxation(cu_rattled: Atoms, tmp_path, suffix: str) -> None:
    """``trajectory=`` writes the start and every optimizer step (energy, forces, cell), as ASE's own optimizer
    writes its trajectory for the same run; the last frame is the result's final structure."""
    from ase.io import Trajectory, read

    path = tmp_path / f"relax{suffix}"
    r = mc.relax(cu_rattled, "emt", fmax=1e-3, optimizer="FIRE", trajectory=str(path))
    frames = read(path, ":")
    assert len(frames) == r.steps + 1 == len(r.energies_eV)
    np.testing.assert_allclose([f.get_potential_energy() for f in frames], r.energies_eV, rtol=0, atol=1e-8)
    np.testing.assert_allclose(frames[0].positions, cu_rattled.positions, atol=1e-7)
    np.testing.assert_allclose(frames[-1].positions, r.final_structure.positions, atol=1e-7)
    np.testing.assert_allclose(frames[-1].cell[:], r.final_structure.cell[:], atol=1e-7)
    assert np.abs(frames[-1].get_forces()).max() < 1e-2
    # the same run by hand: ASE's FIRE on FrechetCellFilter with its own Trajectory
    atoms = cu_rattled.copy()
    atoms.calc = EMT()
    with Trajectory(str(tmp_path / "ase.traj"), "w", atoms) as traj:
        opt = FIRE(FrechetCellFilter(atoms), logfile=None)
        opt.attach(traj)
        opt.run(fmax=1e-3, steps=5000)
    ref = read(tmp_path / "ase.traj", ":")
    assert len(ref) == len(frames)
    np.testing.assert_allclose([f.get_potential_energy() for f in ref], r.energies_eV, atol=1e-8)
    assert r.parameters["trajectory"] == str(path)


def test_trajectory_suffix_is_checked_before_the_run(cu_rattled: Atoms, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"trajectory must end in .traj, .xyz, .extxyz"):
        mc.relax(cu_rattled, "emt", trajectory=str(tmp_path / "relax.cif"))
    with pytest.raises(ValueError, match="does not exist"):
        mc.relax(cu_rattled, "emt", trajectory=str(tmp_path / "no" / "relax.traj"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["final.cif", "final.vasp", "POSCAR", "final.xyz", "final.extxyz", "final.traj"])
def test_write_structure_by_suffix(cu_rattled: Atoms, tmp_path, name: str) -> None:
    from ase.io import read

    r = mc.relax(cu_rattled, "emt", fmax=1e-3)
    assert r.structure_fields() == ("final_structure",) and r.default_structure_field() == "final_structure"
    path = r.write_structure(tmp_path / name)
    back = read(path)
    assert back.get_chemical_symbols() == r.final_structure.get_chemical_symbols()
    np.testing.assert_allclose(back.cell[:], r.final_structure.cell[:], atol=1e-5)
    np.testing.assert_allclose(back.get_scaled_positions(wrap=True), r.final_structure.get_scaled_positions(wrap=True),
                               atol=1e-5)
    # the same file through mc.load_structure, as a next calculation would read it (not for .traj)
    if not name.endswith(".traj"):
        again = mc.load_structure(path)
        np.testing.assert_allclose(again.get_scaled_positions(wrap=True),
                                   r.final_structure.get_scaled_positions(wrap=True), atol=1e-5)


def test_write_structure_refuses_what_it_cannot_write(cu_rattled: Atoms, tmp_path) -> None:
    from dataclasses import dataclass

    from ase.build import molecule

    r = mc.relax(cu_rattled, "emt", fmax=0.05)
    with pytest.raises(ValueError, match="cannot tell a structure format from the file name 'final.pdf'"):
        r.write_structure(tmp_path / "final.pdf")
    with pytest.raises(ValueError, match="which must be one of final_structure"):
        r.write_structure(tmp_path / "x.cif", which="relaxed_structure")

    @dataclass(kw_only=True)
    class TwoStructures(mc.Result):  # no `kind`: not registered as a result type
        guest: Atoms | None = None
        frames: list[Atoms] | None = None

    two = TwoStructures(model="emt", formula="H2O", n_atoms=3, structure_hash="x", guest=molecule("H2O"),
                        frames=[cu_rattled, r.final_structure])
    assert two.structure_fields() == ("guest", "frames") and two.default_structure_field() is None
    with pytest.raises(ValueError, match="several structures: guest, frames; say which one with which="):
        two.write_structure(tmp_path / "x.xyz")
    with pytest.raises(ValueError, match="cif needs a periodic cell; a molecule goes to .xyz"):
        two.write_structure(tmp_path / "w.cif", which="guest")
    with pytest.raises(ValueError, match="vasp holds one structure, got 2"):
        two.write_structure(tmp_path / "POSCAR", which="frames")
    from ase.io import read

    assert len(read(two.write_structure(tmp_path / "f.extxyz", which="frames"), ":")) == 2
    assert len(read(two.write_structure(tmp_path / "f1.cif", which="frames", index=-1), ":")) == 1
    assert read(two.write_structure(tmp_path / "w.xyz", which="guest")).get_chemical_formula() == "H2O"


def test_large_volume_change_warns(cu_rattled: Atoms) -> None:
    """EMT Cu compressed to a = 3.3 Å (its minimum: 3.59 Å) grows by ~29 % when relaxed: a warning says so; a
    cell near its minimum relaxes without one."""
    from ase.build import bulk

    from matcalc.calculations.relax import VOLUME_WARNING_PERCENT

    squeezed = mc.relax(bulk("Cu", "fcc", a=3.3, cubic=True), "emt", fmax=1e-3)
    assert squeezed.volume_change_percent > VOLUME_WARNING_PERCENT
    grew = [w for w in squeezed.warnings if "volume grew by" in w]
    assert len(grew) == 1 and f"{squeezed.volume_change_percent:.1f} %" in grew[0], squeezed.warnings
    near = mc.relax(cu_rattled, "emt", fmax=1e-3)
    assert abs(near.volume_change_percent) < VOLUME_WARNING_PERCENT and not near.warnings
    fixed = mc.relax(bulk("Cu", "fcc", a=3.3, cubic=True), "emt", relax_cell=False, fmax=1e-3)
    assert not fixed.warnings  # the cell cannot change: nothing to warn about


@pytest.mark.slow
def test_fast_chgnet_relaxation_of_rsm0010_warns_about_its_volume(chgnet) -> None:
    """The issue's example: CHGNet's "fast" relaxation of the shipped RSM0010 grows its cell by ~29 % (a plain ASE
    LBFGS + FrechetCellFilter run on the same model says the same), and the result says so."""
    atoms = load_structure("RSM0010")
    r = mc.relax(atoms, chgnet, protocol="fast", cache=False)
    from chgnet.model.dynamics import CHGNetCalculator

    ref = plain_ase_relax(atoms, CHGNetCalculator(model=chgnet.model, use_device="cpu"), fmax=0.05, steps=500)
    assert 100 * (ref.get_volume() / atoms.get_volume() - 1) == pytest.approx(r.volume_change_percent, abs=1.0)
    assert r.volume_change_percent > 20
    assert [w for w in r.warnings if w.startswith(f"volume grew by {r.volume_change_percent:.1f} %")], r.warnings
