"""relax_many / map_property: concurrent, batched, input order, per-structure errors."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.filters import FrechetCellFilter
from ase.optimize import LBFGS

import matcalc
from matcalc import batched, batching
from matcalc.calculations.many import (
    BATCHED_MIN_WORKERS,
    default_workers,
    many_frame,
    map_property,
    relax_many,
)
from matcalc.models import Evaluation, Potential, get_model
from matcalc.structures import StructureError


class BatchEMT(Potential):
    """EMT per structure, but declared batching: the engine fuses concurrent requests into one call."""

    supports_batching = True

    def __init__(self) -> None:
        super().__init__("batch-emt-many", device="cpu", elements=frozenset({"Cu", "Ni", "Al"}))
        self._lock = threading.Lock()

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        out = []
        for atoms in atoms_list:
            a = atoms.copy()
            a.calc = EMT()
            out.append(Evaluation(a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=True)))
        return out


@pytest.fixture
def pot():
    p = BatchEMT()
    yield p
    batching.shutdown(p)


def cells(n: int) -> list[Atoms]:
    reps = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1)]
    out = []
    for i in range(n):
        a = bulk("Cu", "fcc", a=3.55 + 0.02 * (i % 3), cubic=True) * reps[i % len(reps)]
        a.rattle(0.05, seed=i)
        a.info["label"] = f"cu{i}"
        out.append(a)
    return out


def ase_relax(atoms: Atoms, fmax: float, steps: int) -> float:
    """The plain ASE loop peers use: same optimizer, filter and settings as matcalc.relax."""
    a = atoms.copy()
    a.calc = EMT()
    LBFGS(FrechetCellFilter(a), logfile=None).run(fmax=fmax, steps=steps)
    return a.get_potential_energy()


def test_relax_many_matches_serial_ase_and_fuses(pot):
    structs = cells(8)
    results = relax_many(structs, model=pot, progress=False, fmax=0.01, max_steps=200)
    assert [r.label for r in results] == [f"cu{i}" for i in range(8)]  # input order
    expected = [ase_relax(a, 0.01, 200) for a in structs]
    np.testing.assert_allclose([r.final_energy_eV for r in results], expected, atol=1e-6)
    assert all(r.converged for r in results)
    s = batching.engine_for(pot).stats
    assert s.mean_batch_size > 1.0, s.summary()
    assert s.calls < s.structures, s.summary()  # structures fused into model calls
    # batched stepping: the 8 relaxations share one request per step (not one request per structure-step)
    steps = sum(r.steps + 1 for r in results)
    assert s.requests < steps / 4, (s.requests, steps)


def test_one_bad_structure_does_not_sink_the_rest(pot, tmp_path):
    structs: list = cells(3)
    fe = bulk("Fe", "bcc", a=2.87, cubic=True)  # element the model does not support
    structs.insert(1, fe)
    structs.append(str(tmp_path / "missing.cif"))
    results = relax_many(structs, model=pot, progress=False, fmax=0.05, max_steps=100)
    assert isinstance(results[1], StructureError) and "Fe" in str(results[1])
    assert isinstance(results[4], Exception)
    for i, a in zip((0, 2, 3), cells(3), strict=True):
        assert abs(results[i].final_energy_eV - ase_relax(a, 0.05, 100)) < 1e-6
    frame = many_frame(results, structs)
    assert list(frame["index"]) == [0, 1, 2, 3, 4]
    assert list(frame["ok"]) == [True, False, True, True, False]
    assert frame["error"].notna().tolist() == [False, True, False, False, True]
    assert frame.loc[0, "input"] == "cu0" and frame.loc[4, "input"] == "missing"
    assert "final_energy_eV" in frame.columns


def test_map_property_by_name_and_callable(pot):
    structs = cells(5)
    sp = map_property("single_point", structs, model=pot, progress=False)
    for r, a in zip(sp, structs, strict=True):
        ref = a.copy()
        ref.calc = EMT()
        assert abs(r.energy_eV - ref.get_potential_energy()) < 1e-10
        np.testing.assert_allclose(r.forces_eV_per_A, ref.get_forces(), atol=1e-10)

    def volume_per_atom(structure, model, scale=1.0):
        assert model is pot  # the loaded model is shared by every thread
        return scale * structure.get_volume() / len(structure)

    got = map_property(volume_per_atom, structs, model=pot, progress=False, scale=2.0)
    assert got == pytest.approx([2.0 * a.get_volume() / len(a) for a in structs])


def test_one_output_file_for_many_structures_is_refused(pot, tmp_path):
    """trajectory= names one file: many structures would write over each other, so it is refused up front."""
    for call in (lambda: matcalc.relax_many(cells(2), model=pot, trajectory=str(tmp_path / "r.traj")),
                 lambda: map_property("stability", cells(2), model=pot, trajectory=str(tmp_path / "md.traj"))):
        with pytest.raises(ValueError, match="trajectory is one file per structure"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_relax_many_builtin_model_name_and_progress_bar(capsys):
    structs = cells(3)
    results = relax_many(structs, model="emt", device="cpu", progress=True, protocol="fast")
    err = capsys.readouterr().err
    assert "relax (emt)" in err and "3/3" in err
    for r, a in zip(results, structs, strict=True):
        assert abs(r.final_energy_eV - ase_relax(a, 0.05, 500)) < 1e-6
        assert r.parameters["fmax"] == 0.05


def test_batching_disabled_gives_same_results(pot):
    structs = cells(4)
    fused = relax_many(structs, model=pot, progress=False, fmax=0.02)
    calls = batching.engine_for(pot).stats.calls
    with batching.disabled(), batched.disabled():
        assert default_workers(pot, structs) == 1
        plain = relax_many(structs, model=pot, progress=False, fmax=0.02)
    assert batching.engine_for(pot).stats.calls == calls  # the engine was bypassed
    np.testing.assert_allclose([r.final_energy_eV for r in plain], [r.final_energy_eV for r in fused],
                               atol=1e-8)
    assert [r.steps for r in plain] == [r.steps for r in fused]  # ASE's own loop: same trajectories


def test_default_workers(pot):
    batching.engine_for(pot).budget_atoms = 256
    with batched.disabled():  # threads only overlap model calls: sized by the engine budget
        assert default_workers(pot, cells(40)) == 32  # 256 // median 8 atoms, capped at MAX_WORKERS
        assert default_workers(pot, cells(3)) == 3  # never more threads than structures
        big = [bulk("Cu", cubic=True) * (4, 4, 4)] * 10  # 256 atoms: one fills the budget -> floor of 2
        assert default_workers(pot, big) == 2
        assert default_workers(get_model("emt", "cpu"), cells(10)) == 1  # non-batching model
    # batched stepping: the waiting threads' structures form one vectorised step
    batching.engine_for(pot).budget_atoms = 2048
    assert default_workers(pot, cells(300)) == 128  # 2048 // 8 atoms = 256, capped at BATCHED_MAX_WORKERS
    assert default_workers(pot, cells(40)) == 40
    assert default_workers(pot, [bulk("Cu", cubic=True) * (4, 4, 4)] * 40) == BATCHED_MIN_WORKERS
    assert default_workers(get_model("emt", "cpu"), cells(40)) == BATCHED_MIN_WORKERS


def test_bad_arguments(pot):
    with pytest.raises(ValueError, match="structures"):
        relax_many("CALF-20", model=pot)
    with pytest.raises(ValueError, match="structures"):
        relax_many(cells(1)[0], model=pot)
    with pytest.raises(ValueError, match="structures"):
        relax_many(42, model=pot)
    with pytest.raises(ValueError, match="max_workers"):
        relax_many(cells(2), model=pot, max_workers=0)
    with pytest.raises(ValueError, match="progress"):
        relax_many(cells(2), model=pot, progress="yes")
    with pytest.raises(ValueError, match="unknown property"):
        map_property("melting_point", cells(2), model=pot)
    with pytest.raises(ValueError, match="prop"):
        map_property(3, cells(2), model=pot)
    with pytest.raises(TypeError, match="fmaxx"):
        relax_many(cells(2), model=pot, fmaxx=0.1)
    with pytest.raises(matcalc.UnknownModelError):
        relax_many(cells(2), model="no-such-model")
    assert relax_many([], model=pot) == []
    # a bad *value* fails per structure with the calculation's own ValueError
    res = relax_many(cells(2), model=pot, progress=False, fmax=-1.0)
    assert all(isinstance(r, ValueError) and "fmax" in str(r) for r in res)
