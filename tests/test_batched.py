"""Batched optimizers, cell filter and MD integrators (matcalc.batched) side by side with ASE's own classes.

Every comparison runs the same structures through ASE's loop (``batched.disabled()``: ASE's optimizer,
``FrechetCellFilter`` and integrators) and through the batched path on the same model, and requires the same
trajectories: energies of every step, step counts, convergence, final positions and cells, to float round-off.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence

import numpy as np
import pytest
import scipy.linalg
from ase import Atoms, units
from ase.build import bulk
from ase.constraints import FixCom
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from matcalc import batched, progress
from matcalc.batched import linalg
from matcalc.batched.runner import groups
from matcalc.calculations.optimize import (
    LangevinParams,
    MTKParams,
    optimize,
    optimize_many,
    run_md,
    run_md_many,
)
from matcalc.models import Evaluation, Potential, get_model


def structures() -> list[Atoms]:
    """Three small cells of different sizes (4, 8, 2 atoms), rattled and strained (one sheared)."""
    out = []
    for i, (el, rep) in enumerate([("Cu", (1, 1, 1)), ("Al", (2, 1, 1)), ("Ni", (1, 1, 2))]):
        a = (bulk(el, cubic=True) if rep != (1, 1, 2) else bulk(el)) * rep
        a.rattle(0.1, seed=i)
        shear = np.array([[0, 0.05, 0], [0, 0, 0], [0.03, 0, 0]]) * (i % 2)
        a.set_cell(np.array(a.cell) * (1.02 + 0.01 * i) + shear, scale_atoms=True)
        out.append(a)
    return out


def ase_reference(atoms_list, pot, **kw):
    """ASE's own loop, one structure after the other (the reference)."""
    with batched.disabled():
        return [optimize(a, pot.calculator(), **{k: (v[i] if isinstance(v, list) else v) for k, v in kw.items()})
                for i, a in enumerate(atoms_list)]


@pytest.mark.parametrize("optimizer", ["FIRE", "LBFGS", "BFGS"])
@pytest.mark.parametrize("relax_cell", [False, True])
def test_optimizers_equal_ase(optimizer: str, relax_cell: bool) -> None:
    pot = get_model("emt", "cpu")
    fixed = [None, np.array([True] + [False] * 7), None]  # FixAtoms on one structure
    steps = [40, 25, 60]  # per-structure step limits
    ref_atoms, got_atoms = structures(), structures()
    ref = ase_reference(ref_atoms, pot, fmax=0.01, max_steps=steps, optimizer=optimizer, relax_cell=relax_cell,
                        fixed=fixed)
    got = optimize_many(got_atoms, pot.calculator(), fmax=0.01, max_steps=steps, optimizer=optimizer,
                        relax_cell=relax_cell, fixed=fixed)
    assert any(r.converged for r in ref) and not all(r.converged for r in ref)  # both outcomes covered
    for r, g, ra, ga in zip(ref, got, ref_atoms, got_atoms, strict=True):
        assert (g.steps, g.converged) == (r.steps, r.converged)
        np.testing.assert_allclose(g.energies_eV, r.energies_eV, rtol=0, atol=1e-9)
        np.testing.assert_allclose(g.fmax_eV_per_A, r.fmax_eV_per_A, rtol=0, atol=1e-8)
        np.testing.assert_allclose(ga.positions, ra.positions, rtol=0, atol=1e-9)
        np.testing.assert_allclose(np.array(ga.cell), np.array(ra.cell), rtol=0, atol=1e-9)
        assert ga.get_potential_energy() == pytest.approx(g.energies_eV[-1], abs=1e-12)  # cached: no new call
    start = structures()[1]
    if relax_cell:  # the fixed atom moves with the cell only: same fractional coordinates
        np.testing.assert_allclose(got_atoms[1].get_scaled_positions()[0], start.get_scaled_positions()[0],
                                   atol=1e-12)
    else:
        np.testing.assert_array_equal(got_atoms[1].positions[0], start.positions[0])


def test_fixed_atoms_stay_and_stop_requests_are_per_structure() -> None:
    pot = get_model("emt", "cpu")
    atoms_list = structures()
    start = atoms_list[1].positions[[0, 2]].copy()
    stop = threading.Event()
    seen: list[int] = []

    def sink(event: progress.ProgressEvent) -> None:
        seen.append(event.step)
        if event.step == 3:
            stop.set()

    import contextvars

    with progress.reporting(sink, stop=stop):
        stopping = contextvars.copy_context()
    plain = contextvars.copy_context()
    fixed = [None, np.isin(np.arange(8), [0, 2]), None]
    out = optimize_many(atoms_list, pot.calculator(), fmax=1e-4, max_steps=100, optimizer="FIRE",
                        relax_cell=False, fixed=fixed, contexts=[plain, stopping, plain])
    assert out[1].stopped_early and out[1].steps == 3 and not out[1].converged and seen == [0, 1, 2, 3]
    assert out[0].steps > 3 and out[2].steps > 3  # the others go on
    np.testing.assert_array_equal(atoms_list[1].positions[[0, 2]], start)


class Flaky(Potential):
    """EMT that raises for structures with more than ``limit`` atoms."""

    supports_batching = True

    def __init__(self, limit: int) -> None:
        super().__init__("flaky-emt", device="cpu")
        self.limit = limit
        self.requests: list[int] = []

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        from ase.calculators.emt import EMT

        self.requests.append(len(atoms_list))
        out = []
        for atoms in atoms_list:
            if len(atoms) > self.limit:
                raise RuntimeError(f"too many atoms: {len(atoms)}")
            a = atoms.copy()
            a.calc = EMT()
            out.append(Evaluation(a.get_potential_energy(), a.get_forces(), a.get_stress()))
        return out


def test_model_error_reaches_only_its_structure() -> None:
    pot = Flaky(limit=4)
    atoms_list = structures()
    out = optimize_many(atoms_list, pot, fmax=0.01, max_steps=50, optimizer="LBFGS", relax_cell=True,
                        return_exceptions=True)
    assert isinstance(out[1], RuntimeError) and "8" in str(out[1])
    ref = ase_reference(structures()[::2], get_model("emt", "cpu"), fmax=0.01, max_steps=50, optimizer="LBFGS",
                        relax_cell=True)
    for g, r in zip(out[::2], ref, strict=True):
        assert g.steps == r.steps and g.energies_eV[-1] == pytest.approx(r.energies_eV[-1], abs=1e-9)
    with pytest.raises(RuntimeError, match="too many atoms"):
        optimize(structures()[1], pot.calculator(), fmax=0.01, max_steps=5)


def test_threads_share_one_batched_step() -> None:
    """optimize() from several threads at once: one group, one model request per tick for all of them."""
    pot = Flaky(limit=100)
    atoms_list = [s.copy() for s in structures() for _ in range(2)]
    barrier = threading.Barrier(len(atoms_list))
    traces: list = [None] * len(atoms_list)

    def one(i: int) -> None:
        barrier.wait()
        traces[i] = optimize(atoms_list[i], pot.calculator(), fmax=0.01, max_steps=60, optimizer="FIRE",
                             relax_cell=False)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(atoms_list))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ref = ase_reference([s.copy() for s in structures() for _ in range(2)], get_model("emt", "cpu"), fmax=0.01,
                        max_steps=60, optimizer="FIRE", relax_cell=False)
    for g, r in zip(traces, ref, strict=True):
        assert g.steps == r.steps
        np.testing.assert_allclose(g.energies_eV, r.energies_eV, atol=1e-9)
    evaluations = sum(t.steps + 1 for t in traces)
    assert max(pot.requests) > 1 and len(pot.requests) < evaluations / 2  # structures shared requests
    assert not groups()  # nothing left behind


def md_structures(constraint: bool) -> list[Atoms]:
    out = []
    for i, a in enumerate(structures()):
        MaxwellBoltzmannDistribution(a, temperature_K=300, rng=np.random.default_rng(10 + i))
        if constraint:
            a.set_constraint(FixCom())
        out.append(a)
    return out


@pytest.mark.parametrize("kind", ["langevin", "mtk"])
def test_md_equals_ase(kind: str) -> None:
    pot = get_model("emt", "cpu")
    steps = [12, 8, 10]

    def params(i: int):
        if kind == "langevin":
            return LangevinParams(2 * units.fs, 500.0, 0.02 / units.fs, rng=np.random.default_rng(i))
        return MTKParams(2 * units.fs, 500.0, 1e4 * units.bar, 50 * units.fs, 200 * units.fs)

    def record(into: list):
        def observe(frame) -> bool:
            into.append((frame.energy_eV, frame.temperature_K, frame.volume_A3, frame.atoms().get_temperature()))
            return False
        return observe

    ref_atoms, got_atoms = md_structures(kind == "langevin"), md_structures(kind == "langevin")
    ref_frames: list[list] = [[] for _ in ref_atoms]
    with batched.disabled():
        for i, a in enumerate(ref_atoms):
            assert run_md(a, pot.calculator(), params(i), steps[i], observer=record(ref_frames[i])).steps == steps[i]
    got_frames: list[list] = [[] for _ in got_atoms]
    out = run_md_many(got_atoms, pot.calculator(), [params(i) for i in range(3)], steps,
                      observers=[record(f) for f in got_frames])
    assert [o.steps for o in out] == steps
    for ra, ga, rf, gf in zip(ref_atoms, got_atoms, ref_frames, got_frames, strict=True):
        np.testing.assert_allclose(np.array(gf), np.array(rf), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(ga.positions, ra.positions, atol=1e-10)
        np.testing.assert_allclose(ga.get_momenta(), ra.get_momenta(), atol=1e-10)
        np.testing.assert_allclose(np.array(ga.cell), np.array(ra.cell), atol=1e-10)


def test_md_stop_from_observer() -> None:
    pot = get_model("emt", "cpu")
    atoms_list = md_structures(True)
    stops = [lambda f: f.step >= 4, None, None]
    out = run_md_many(atoms_list, pot.calculator(),
                      [LangevinParams(units.fs, 300.0, 0.01 / units.fs, np.random.default_rng(i)) for i in range(3)],
                      10, observers=stops)
    assert (out[0].steps, out[0].stopped_early) == (4, True) and [o.steps for o in out[1:]] == [10, 10]


def test_chgnet_mof_relaxation_equals_ase(chgnet) -> None:
    """One small MOF (RSM0009, 22 atoms) with CHGNet: LBFGS + FrechetCellFilter, a few steps."""
    from matcalc.structures import load_structure

    base = load_structure("RSM0009")
    base.rattle(0.03, seed=1)
    ref_atoms, got_atoms = base.copy(), base.copy()
    with batched.disabled():
        ref = optimize(ref_atoms, chgnet.calculator(), fmax=0.05, max_steps=4)
    got = optimize(got_atoms, chgnet.calculator(), fmax=0.05, max_steps=4)
    assert got.steps == ref.steps == 4
    np.testing.assert_allclose(np.array(got.energies_eV) / len(base), np.array(ref.energies_eV) / len(base),
                               atol=1e-5)
    np.testing.assert_allclose(got_atoms.positions, ref_atoms.positions, atol=1e-4)
    np.testing.assert_allclose(np.array(got_atoms.cell), np.array(ref_atoms.cell), atol=1e-4)


def test_batched_matrix_functions_equal_scipy() -> None:
    rng = np.random.default_rng(0)
    for scale in (0.0, 1e-3, 0.1, 1.5):
        x = rng.normal(size=(5, 3, 3)) * scale
        g = rng.normal(size=(5, 3, 3)) * 10
        np.testing.assert_allclose(linalg.expm(x), [scipy.linalg.expm(m) for m in x], rtol=1e-12, atol=1e-13)
        adj = linalg.expm_frechet_adjoint(x, g)
        for b in range(5):
            ref = np.array([[np.sum(scipy.linalg.expm_frechet(x[b], np.eye(3)[[m]].T @ np.eye(3)[[n]],
                                                              compute_expm=False) * g[b])
                             for n in range(3)] for m in range(3)])
            np.testing.assert_allclose(adj[b], ref, rtol=1e-12, atol=1e-12)
    f = np.eye(3) + rng.normal(size=(2, 3, 3)) * np.array([1e-6, 0.05])[:, None, None]
    np.testing.assert_allclose(linalg.logm_near_identity(f), [scipy.linalg.logm(m) for m in f], atol=1e-14)


class NoStress(Flaky):
    """EMT without stresses: a cell filter or barostat cannot run on it."""

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        return [Evaluation(e.energy_eV, e.forces_eV_per_A, None) for e in super()._evaluate_batch(atoms_list)]


def test_missing_stress_is_an_error_as_in_ase() -> None:
    from ase.calculators.calculator import PropertyNotImplementedError

    pot = NoStress(limit=100)
    for ase_loops in (True, False):
        with batched.disabled() if ase_loops else contextlib.nullcontext():
            with pytest.raises(PropertyNotImplementedError):
                optimize(structures()[0], pot.calculator(), fmax=0.01, max_steps=5, relax_cell=True)
            with pytest.raises(PropertyNotImplementedError):
                run_md(md_structures(False)[0], pot.calculator(),
                       MTKParams(units.fs, 300.0, 0.0, 50 * units.fs, 500 * units.fs), 3)
    assert optimize(structures()[0], pot.calculator(), fmax=0.01, max_steps=5, relax_cell=False).steps > 0
