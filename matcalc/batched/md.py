"""The loop around the batched MD integrators, shared by every thread of the process.

Like `matcalc.batched.runner` for optimisers: `run_md` runs `MDJob` s in the process-wide
group of their evaluator and integrator kind; each tick makes ONE evaluator call for every running structure,
finishes their step (`post_step`), shows each job its
`MDFrame` (in the job's own context: progress, stop requests, logs), drops finished jobs and starts the
next step of the others (`pre_step`). Jobs that join start
with the evaluation of their initial state in the same request.

Per job, the semantics of ASE's ``MolecularDynamics.irun(steps)``: ``steps`` steps of the integrator, the
observer after each (``frame.step`` = 1..steps); a job ends early when its observer returns True (stop) or
when its structure's model call raised (`MDJob.error`).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms, units

from matcalc.batched.integrator import BatchedIntegrator
from matcalc.batched.runner import Group, evaluate_each, no_stress_error, run_in_group, stack_results
from matcalc.models.base import Evaluation, Evaluator


@dataclass(eq=False)
class MDJob:
    """One structure's MD run. ``atoms`` (positions, momenta, cell) is updated in place when it ends."""

    atoms: Atoms
    steps: int
    params: Any
    """The integrator's per-structure parameters (``LangevinParams``, ``MTKParams``)."""
    observer: Callable[[MDFrame], bool] | None = None
    context: contextvars.Context | None = None
    # outcome
    steps_done: int = 0
    stopped: bool = False
    error: BaseException | None = None
    final: Evaluation | None = None
    """Model result at the final positions."""
    done: bool = field(default=False, repr=False)


@dataclass
class MDFrame:
    """A structure's state after one MD step (ASE units: Å, eV, amu·Å/ASE time; temperature K)."""

    structure: Atoms
    """The run's ``Atoms`` (brought up to date by `atoms`)."""
    step: int
    energy_eV: float
    forces_eV_per_A: np.ndarray
    stress_eV_per_A3: np.ndarray | None
    positions: np.ndarray
    momenta: np.ndarray
    cell: np.ndarray
    volume_A3: float
    kinetic_energy_eV: float
    temperature_K: float
    synced: bool = False
    """The structure already holds this frame (ASE's own loop)."""

    def atoms(self) -> Atoms:
        """The run's ``Atoms`` set to this frame (positions, momenta, cell), its calculator holding this frame's
        results, so ``get_potential_energy`` and friends need no model call."""
        a = self.structure
        if self.synced:
            return a
        self.synced = True
        a.set_cell(self.cell, scale_atoms=False)
        a.arrays["positions"][:] = self.positions
        a.set_momenta(self.momenta, apply_constraint=False)
        cache_results(a, Evaluation(self.energy_eV, self.forces_eV_per_A, self.stress_eV_per_A3))
        return a


def cache_results(atoms: Atoms, ev: Evaluation) -> None:
    """Store ``ev`` as the results of ``atoms.calc`` for ``atoms``' current state (no new model call)."""
    calc = atoms.calc
    if calc is None or not hasattr(calc, "results"):
        return
    snapshot = atoms.copy()
    snapshot.calc = None
    calc.atoms = snapshot
    calc.results = {"energy": float(ev.energy_eV), "free_energy": float(ev.energy_eV),
                    "forces": np.array(ev.forces_eV_per_A, dtype=float)}
    if ev.stress_eV_per_A3 is not None:
        calc.results["stress"] = np.array(ev.stress_eV_per_A3, dtype=float)


class MDGroup(Group):
    """MD jobs with one evaluator and one integrator kind."""

    def __init__(self, evaluator: Evaluator, make_integrator: Callable[[], BatchedIntegrator]) -> None:
        super().__init__(evaluator)
        self._make = make_integrator
        self.integrator = make_integrator()
        self.started = np.zeros(0, dtype=bool)

    def reset(self) -> None:
        self.integrator = self._make()
        self.started = np.zeros(0, dtype=bool)

    def tick(self) -> None:
        new = self._take_incoming()
        integ = self.integrator
        if new:
            integ.add([j.atoms for j in new], [j.params for j in new])
            self.jobs.extend(new)
            self.started = np.concatenate([self.started, np.zeros(len(new), dtype=bool)])
        if not self.jobs:
            return
        self.ticks += 1
        lay = integ.layout
        results = evaluate_each(self.evaluator, integ.sync())
        if integ.needs_stress:
            results = [no_stress_error(r) for r in results]
        ok, energies, forces, stresses = stack_results(results, lay.sizes)
        running = self.started & ok
        integ.post_step(forces, stresses, running)
        ekin = integ.kinetic_energy()
        volumes = integ.volumes()
        temps = 2 * ekin / (integ.dof * units.kB)
        finished = np.zeros(len(self.jobs), dtype=bool)
        for i, job in enumerate(self.jobs):
            if not ok[i]:
                job.error = results[i]
                finished[i] = True
                self._write_back(i, job)
                continue
            if running[i]:
                job.steps_done += 1
                if job.observer is not None:
                    sl = lay.slice(i)
                    ev = results[i]
                    frame = MDFrame(job.atoms, job.steps_done, float(energies[i]), forces[sl], ev.stress_eV_per_A3,
                                    integ.positions[sl], integ.momenta[sl], integ.cells[i], float(volumes[i]),
                                    float(ekin[i]), float(temps[i]))
                    try:
                        assert job.context is not None
                        job.stopped = bool(job.context.run(job.observer, frame))
                    except Exception as exc:  # noqa: BLE001 - a failing observer ends its own job only
                        job.error = exc
            if job.error is not None or job.stopped or job.steps_done >= job.steps:
                finished[i] = True
                job.final = results[i]
                self._write_back(i, job)
        keep = ~finished
        done = [j for j, f in zip(self.jobs, finished, strict=True) if f]
        if finished.any():
            rows = lay.row_mask(keep)
            forces, stresses = forces[rows], stresses[keep]
            integ.keep(keep)
            self.started = self.started[keep]
            self.jobs = [j for j, k in zip(self.jobs, keep, strict=True) if k]
        if self.jobs:
            integ.pre_step(forces, stresses)
            self.started[:] = True
        self._finish(done)

    def _write_back(self, i: int, job: MDJob) -> None:
        integ = self.integrator
        sl = integ.layout.slice(i)
        a = job.atoms
        a.set_cell(integ.cells[i], scale_atoms=False)
        a.arrays["positions"][:] = integ.positions[sl]
        a.set_momenta(integ.momenta[sl], apply_constraint=False)


def run_md(jobs: Sequence[MDJob], evaluator: Evaluator, *, key: Hashable,
           make_integrator: Callable[[], BatchedIntegrator]) -> None:
    """Run ``jobs`` to completion in the process-wide MD group of (``evaluator``, ``key``) (module doc)."""
    run_in_group(jobs, evaluator, ("md", key), lambda: MDGroup(evaluator, make_integrator))


__all__ = ["MDFrame", "MDGroup", "MDJob", "cache_results", "run_md"]
