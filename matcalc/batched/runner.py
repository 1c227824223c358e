"""The loop around the batched optimizers, shared by every thread of the process.

`run_optimizations` steps a list of `OptimizationJob` together: each *tick* makes ONE evaluator
call for every structure still running, turns the results into optimizer forces (the target), lets every
job observe its step (energy, fmax; in the job's own ``contextvars`` context, so progress reports, stop
requests and log capture reach whoever started that job), drops the jobs that finished (converged, step
limit, stop request, model error) and advances the others with one batched optimizer step.

Cooperative batching: jobs are grouped by evaluator, algorithm (with its parameters) and target kind. Any
number of threads may submit jobs to the same group at any time; new jobs join at the next tick. One of the
waiting threads *drives* the group (runs the ticks) while the others sleep; when the driver's own jobs are
done it hands the group over to another waiting thread. So concurrent calculations in threads (``relax_many``,
the EOS points of a bulk modulus, tasks of the server) share one batched step and one model request per step
instead of serialising their per-structure Python work on the GIL.

Semantics per job are those of ASE's ``Optimizer.irun``: the step-0 evaluation is observed, then
``converged = fmax < job.fmax`` (fmax: the largest row norm of the optimizer forces, cell rows included), and
a job stops when converged, when ``steps == max_steps``, when its observer asks it to stop, or when its
structure's model call raised (then `OptimizationJob.error` holds the exception).
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms

from matcalc.batched.base import BatchedOptimizer
from matcalc.batched.targets import FrechetCellTarget, PositionsTarget, Target
from matcalc.models.base import Evaluation, Evaluator

log = logging.getLogger(__name__)

Observer = Callable[[int, float, float], bool]
"""``observer(step, energy_eV, fmax_eV_per_A) -> stop``: called after every evaluation (step 0 first)."""


@dataclass(eq=False)
class OptimizationJob:
    """One structure to optimise. ``atoms`` is updated in place when the job finishes."""

    atoms: Atoms
    fmax: float
    max_steps: int
    fixed: np.ndarray | None = None
    """Boolean mask of fixed atoms (``None``: none)."""
    observer: Observer | None = None
    context: contextvars.Context | None = None
    """Context the observer runs in (default: a copy of the submitting thread's context)."""
    # outcome
    steps: int = 0
    converged: bool = False
    stopped: bool = False
    error: BaseException | None = None
    final: Evaluation | None = None
    """Model result at the final structure (raw forces)."""
    done: bool = field(default=False, repr=False)


def evaluate_each(evaluator: Evaluator, atoms_list: Sequence[Atoms]) -> list[Evaluation | BaseException]:
    """One evaluator call for all of ``atoms_list``; a structure whose evaluation raised gets its exception.

    Uses the evaluator's ``evaluate_partial`` when it has one (the batching engine); otherwise, when the
    whole call fails, the structures are retried one at a time to find the guilty ones.
    """
    partial = getattr(evaluator, "evaluate_partial", None)
    if partial is not None:
        return list(partial(atoms_list))
    try:
        return list(evaluator.evaluate(atoms_list))
    except Exception as exc:  # noqa: BLE001 - sorted out per structure below
        if len(atoms_list) == 1:
            return [exc]
    out: list[Evaluation | BaseException] = []
    for atoms in atoms_list:
        try:
            out.append(evaluator.evaluate([atoms])[0])
        except Exception as exc:  # noqa: BLE001 - the exception goes to that structure's job
            out.append(exc)
    return out


def no_stress_error(result: Evaluation | BaseException) -> Evaluation | BaseException:
    """``result``, or the error ASE raises when a cell filter or barostat needs a stress the model did not give."""
    if isinstance(result, Evaluation) and result.stress_eV_per_A3 is None:
        from ase.calculators.calculator import PropertyNotImplementedError

        return PropertyNotImplementedError("stress property not implemented: the cell cannot move")
    return result


def stack_results(results: Sequence[Evaluation | BaseException], sizes: Sequence[int]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(ok, energies (B,), forces (atoms, 3), stresses (B, 6))``; failed structures get zeros."""
    ok = np.array([isinstance(r, Evaluation) for r in results], dtype=bool)
    energies = np.zeros(len(results))
    stresses = np.zeros((len(results), 6))
    forces = []
    for i, (r, n) in enumerate(zip(results, sizes, strict=True)):
        if isinstance(r, Evaluation):
            energies[i] = r.energy_eV
            forces.append(np.asarray(r.forces_eV_per_A, dtype=float).reshape(n, 3))
            if r.stress_eV_per_A3 is not None:
                stresses[i] = r.stress_eV_per_A3
        else:
            forces.append(np.zeros((n, 3)))
    return ok, energies, np.concatenate(forces) if forces else np.zeros((0, 3)), stresses


class Group(ABC):
    """Jobs of many threads stepping together (module doc): submission, driving, hand-over, failure."""

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator
        self.jobs: list[Any] = []
        self._incoming: list[Any] = []
        self._cond = threading.Condition()
        self._driving = False
        self.ticks = 0

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self.jobs and not self._incoming and not self._driving

    def submit(self, jobs: Sequence[Any]) -> None:
        for job in jobs:
            if job.context is None:
                job.context = contextvars.copy_context()
        with self._cond:
            self._incoming.extend(jobs)

    def _take_incoming(self) -> list[Any]:
        with self._cond:
            new, self._incoming = self._incoming, []
        return new

    def wait(self, jobs: Sequence[Any]) -> None:
        """Block until every job of ``jobs`` is done, driving the group whenever nobody else does."""
        while True:
            with self._cond:
                while not all(j.done for j in jobs) and self._driving:
                    self._cond.wait(1.0)
                if all(j.done for j in jobs):
                    return
                self._driving = True
            try:
                while not all(j.done for j in jobs):
                    self.tick()
            except Exception as exc:  # a bug, not a model error: every job of the group gets it
                log.exception("batched stepping failed")
                self._fail_all(exc)
            except BaseException as exc:  # KeyboardInterrupt and friends: fail the group, then propagate
                self._fail_all(RuntimeError(f"batched stepping interrupted ({type(exc).__name__}) in the thread "
                                            "that was stepping this structure's batch"))
                raise
            finally:
                with self._cond:
                    self._driving = False
                    self._cond.notify_all()

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            for job in [*self.jobs, *self._incoming]:
                if not job.done:
                    job.error = exc
                    job.done = True
            self.jobs, self._incoming = [], []
            self.reset()
            self._cond.notify_all()

    def _finish(self, done: Sequence[Any]) -> None:
        if done:
            with self._cond:
                for job in done:
                    job.done = True
                self._cond.notify_all()

    @abstractmethod
    def reset(self) -> None:
        """Forget all batch state (after a failure)."""

    @abstractmethod
    def tick(self) -> None:
        """Admit new jobs, evaluate every running structure once, observe, drop the finished, step the rest."""


class OptimizationGroup(Group):
    """Optimisation jobs with one evaluator, one algorithm and one target kind."""

    def __init__(self, evaluator: Evaluator, make_optimizer: Callable[[], BatchedOptimizer],
                 relax_cell: bool) -> None:
        super().__init__(evaluator)
        self.relax_cell = relax_cell
        self._make_optimizer = make_optimizer
        self.optimizer = make_optimizer()
        self.target: Target = FrechetCellTarget() if relax_cell else PositionsTarget()

    def reset(self) -> None:
        self.target = type(self.target)()
        self.optimizer = self._make_optimizer()

    def tick(self) -> None:
        """One evaluation of every running job, their observations, and one batched step."""
        new = self._take_incoming()
        if new:
            self.target.add([j.atoms for j in new], [j.fixed for j in new])
            self.optimizer.add(self.target.rows.sizes[len(self.jobs):].tolist())
            self.jobs.extend(new)
        if not self.jobs:
            return
        self.ticks += 1
        target = self.target
        results = evaluate_each(self.evaluator, target.sync())
        if self.relax_cell:
            results = [no_stress_error(r) for r in results]
        ok, energies, forces, stresses = stack_results(results, target.atoms_layout.sizes)
        opt_forces = target.forces(forces, stresses)
        fmax = target.rows.row_norm_max(opt_forces) if len(target) else np.zeros(0)
        finished = np.zeros(len(self.jobs), dtype=bool)
        for i, job in enumerate(self.jobs):
            if not ok[i]:
                job.error = results[i]  # type: ignore[assignment]
                finished[i] = True
                self._write_back(i, job)
                continue
            stop = False
            if job.observer is not None:
                try:
                    assert job.context is not None
                    stop = bool(job.context.run(job.observer, job.steps, float(energies[i]), float(fmax[i])))
                except Exception as exc:  # noqa: BLE001 - a failing observer ends its own job only
                    job.error = exc
                    finished[i] = True
                    self._write_back(i, job)
                    continue
            job.converged = bool(fmax[i] < job.fmax)
            job.stopped = stop
            if job.converged or stop or job.steps >= job.max_steps:
                finished[i] = True
                job.final = results[i]  # type: ignore[assignment]
                self._write_back(i, job)
        keep = ~finished
        done = [j for j, f in zip(self.jobs, finished, strict=True) if f]
        if finished.any():
            opt_forces = opt_forces[target.rows.row_mask(keep)]
            target.keep(keep)
            self.optimizer.keep(keep)
            self.jobs = [j for j, k in zip(self.jobs, keep, strict=True) if k]
        if self.jobs:
            target.set_x(self.optimizer.step(target.get_x(), opt_forces))
            for job in self.jobs:
                job.steps += 1
        self._finish(done)

    def _write_back(self, i: int, job: OptimizationJob) -> None:
        target = self.target
        atoms = job.atoms
        if self.relax_cell:
            atoms.set_cell(target.cells[i], scale_atoms=False)
        atoms.arrays["positions"][:] = target.positions[target.atoms_layout.slice(i)]


# ---------------------------------------------------------------------- process-wide groups
_GROUPS: dict[Hashable, Group] = {}
_LOCK = threading.Lock()


def run_in_group(jobs: Sequence[Any], evaluator: Evaluator, key: Hashable, factory: Callable[[], Group]) -> None:
    """Run ``jobs`` in the process-wide group of (``evaluator``, ``key``), made by ``factory`` when there is
    none, together with whatever other threads run there; returns when all of ``jobs`` are done."""
    if not jobs:
        return
    gkey = (id(evaluator), key)
    with _LOCK:
        group = _GROUPS.get(gkey)
        if group is None or group.evaluator is not evaluator:
            group = factory()
            _GROUPS[gkey] = group
        group.submit(jobs)
    try:
        group.wait(jobs)
    finally:
        with _LOCK:
            if _GROUPS.get(gkey) is group and group.idle:
                del _GROUPS[gkey]


def run_optimizations(jobs: Sequence[OptimizationJob], evaluator: Evaluator, *, key: Hashable,
                      make_optimizer: Callable[[], BatchedOptimizer], relax_cell: bool) -> None:
    """Run ``jobs`` to completion in the process-wide group for (``evaluator``, ``key``, ``relax_cell``),
    together with whatever other threads run there (module doc). Outcomes are stored on the jobs."""
    run_in_group(jobs, evaluator, ("optimize", key, bool(relax_cell)),
                 lambda: OptimizationGroup(evaluator, make_optimizer, relax_cell))


def groups() -> list[Group]:
    """The groups alive now (for tests and diagnostics)."""
    with _LOCK:
        return list(_GROUPS.values())


def _after_fork() -> None:
    global _LOCK
    _LOCK = threading.Lock()
    _GROUPS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)

__all__ = ["Group", "OptimizationGroup", "OptimizationJob", "evaluate_each", "groups", "no_stress_error",
           "run_in_group", "run_optimizations", "stack_results"]
