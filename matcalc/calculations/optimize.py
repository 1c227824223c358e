"""Geometry optimisation (ASE's FIRE/BFGS/LBFGS/MDMin, ``FrechetCellFilter`` for the cell), shared by
``relax`` and the pre-relaxation step of every other property, and MD stepping (Langevin NVT, isotropic MTK
NPT) for the MD properties.

`optimize` (one structure) and `optimize_many` (a list) run the batched versions of ASE's
algorithms (`matcalc.batched`: same trajectories to float round-off) when they can: every structure
being optimised in the process with the same model and algorithm, from any thread, steps in one batch with
one model request per step. ASE's own loop is the fallback (``MATCALC_BATCHED=0``, MDMin, an arbitrary ASE
calculator, constraints other than ``FixAtoms``) and the reference.

`run_md` / `run_md_many` do the same for MD (`matcalc.batched.md`: ``ase.md.langevin.Langevin``
and ``ase.md.nose_hoover_chain.IsotropicMTKNPT``, same trajectories and, for Langevin, the same random stream).
"""

from __future__ import annotations

import contextvars
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.constraints import FixAtoms
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, FIRE, LBFGS, MDMin
from ase.optimize.optimize import Optimizer

from matcalc import batched, progress
from matcalc.batched.base import BatchedOptimizer
from matcalc.batched.bfgs import BatchedBFGS
from matcalc.batched.fire import BatchedFIRE
from matcalc.batched.integrator import BatchedIntegrator, supported_constraints
from matcalc.batched.langevin import BatchedLangevin, LangevinParams
from matcalc.batched.lbfgs import BatchedLBFGS
from matcalc.batched.md import MDFrame, MDJob, cache_results
from matcalc.batched.md import run_md as run_md_jobs
from matcalc.batched.mtk import BatchedIsotropicMTKNPT, MTKParams
from matcalc.batched.runner import OptimizationJob, run_optimizations
from matcalc.calculations import checks
from matcalc.calculations.contract import STEPS, Choice, Param
from matcalc.models.base import Evaluator, PotentialCalculator

log = logging.getLogger(__name__)

# FrechetCellFilter takes a matrix log of the 3x3 deformation gradient every step; scipy warns about
# estimated errors of ~1e-13, which is harmless and floods notebooks and logs.
warnings.filterwarnings("ignore", message="logm result may be inaccurate", category=RuntimeWarning)

OPTIMIZERS: dict[str, type[Optimizer]] = {"FIRE": FIRE, "BFGS": BFGS, "LBFGS": LBFGS, "MDMin": MDMin}
BATCHED_OPTIMIZERS: dict[str, Callable[[], BatchedOptimizer]] = {
    "FIRE": BatchedFIRE, "BFGS": BatchedBFGS, "LBFGS": BatchedLBFGS}
"""Optimizers with a batched version (ASE defaults); the others always run ASE's loop."""


def fixed_cell_params(what: str) -> tuple[Param, Param]:
    """``fixed_cell_max_steps`` (1000, ``"fast"``: 300) and ``fixed_cell_optimizer`` (FIRE): the relaxations
    at fixed cell that bulk modulus, elastic tensor and thermal expansion run (``what``: e.g. "fixed-cell")."""
    return (Param("fixed_cell_max_steps", STEPS, f"step limit of each {what} relaxation", default=1000,
                  presets={"fast": 300}),
            Param("fixed_cell_optimizer", Choice(tuple(OPTIMIZERS)), f"optimizer of the {what} relaxations",
                  default="FIRE"))


@dataclass
class OptimizationTrace:
    """What happened during one optimisation."""

    converged: bool
    steps: int
    final_fmax_eV_per_A: float
    energies_eV: list[float] = field(default_factory=list)
    fmax_eV_per_A: list[float] = field(default_factory=list)
    stopped_early: bool = False

    def warning(self, what: str, fmax: float) -> str | None:
        """The warning a result carries when ``what`` did not converge (``None`` when it did)."""
        if self.converged:
            return None
        return (f"{what} not converged: fmax {self.final_fmax_eV_per_A:.3g} eV/Å > {fmax} after {self.steps} steps"
                + (" (stopped early)" if self.stopped_early else ""))


def check_optimizer_params(fmax: float, max_steps: int, optimizer: str) -> str:
    checks.positive("fmax", fmax)
    checks.integer("max_steps", max_steps, minimum=1)
    return checks.choice("optimizer", optimizer, OPTIMIZERS)


def fixed_mask(atoms: Atoms, fixed_atoms: Sequence[int] | Sequence[bool] | np.ndarray | None) -> np.ndarray | None:
    """Boolean mask of fixed atoms from indices or a mask; ``ValueError`` when out of range."""
    if fixed_atoms is None:
        return None
    arr = np.asarray(fixed_atoms)
    n = len(atoms)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"fixed_atoms mask must have length {n} (number of atoms), got {arr.shape}")
        return arr
    if arr.size == 0:
        return np.zeros(n, dtype=bool)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError("fixed_atoms must be atom indices (integers) or a boolean mask")
    if arr.min() < -n or arr.max() >= n:
        raise ValueError(f"fixed_atoms indices must be in [0, {n - 1}], got {arr.min()}..{arr.max()}")
    mask = np.zeros(n, dtype=bool)
    mask[arr] = True
    return mask


def optimize(
    atoms: Atoms,
    calculator: Calculator,
    *,
    fmax: float,
    max_steps: int,
    optimizer: str = "LBFGS",
    relax_cell: bool = True,
    fixed: np.ndarray | None = None,
    stage: str = "relax",
    trajectory: str | None = None,
) -> OptimizationTrace:
    """Optimise ``atoms`` in place (positions, and the cell when ``relax_cell``).

    Converged means max |F| < ``fmax`` (eV/Å) on every degree of freedom the optimizer sees
    (for the cell, ``FrechetCellFilter``'s virial-derived forces). Each step is reported to
    `matcalc.progress.report` and a stop request ends the run after the current step.
    Afterwards ``atoms.calc`` is ``calculator`` holding the final energy, forces and stress.
    A model error is raised. ``trajectory``: a file (``.traj``, ``.xyz``/``.extxyz``) receiving the structure
    with its energy, forces and stress after every step (step 0 = the start); ASE's own loop then runs (the
    batched stepping holds the structures in its own arrays between steps).
    """
    opt_name = check_optimizer_params(fmax, max_steps, optimizer)
    evaluator = None if trajectory is not None else _batched_evaluator(atoms, calculator, opt_name, relax_cell)
    if evaluator is None:
        return _optimize_ase(atoms, calculator, fmax=fmax, max_steps=max_steps, optimizer=opt_name,
                             relax_cell=relax_cell, fixed=fixed, stage=stage, trajectory=trajectory)
    out = _optimize_batched([atoms], [calculator], evaluator, fmax=[fmax], max_steps=[max_steps],
                            optimizer=opt_name, relax_cell=relax_cell, fixed=[fixed], stages=[stage])[0]
    if isinstance(out, BaseException):
        raise out
    return out


def optimize_many(
    atoms_list: Sequence[Atoms],
    calculator: Calculator | Evaluator,
    *,
    fmax: float | Sequence[float],
    max_steps: int | Sequence[int],
    optimizer: str = "LBFGS",
    relax_cell: bool = True,
    fixed: Sequence[np.ndarray | None] | None = None,
    stage: str | Sequence[str] = "relax",
    contexts: Sequence[contextvars.Context] | None = None,
    return_exceptions: bool = False,
) -> list[Any]:
    """`optimize` on every structure of ``atoms_list`` (each in place), stepped together as one batch.

    Same outcome per structure as calling `optimize` on it alone (same trace, progress reports and
    stop requests), with one model request per step for all structures still running.

    Args:
        atoms_list: the structures.
        calculator: a matcalc calculator (``Potential.calculator(...)``) or an evaluator (a ``Potential`` or
            the batching engine); each structure gets its own calculator over the same evaluator.
        fmax, max_steps, stage: one value for all, or one per structure.
        fixed: one boolean mask (or ``None``) per structure.
        contexts: one ``contextvars`` context per structure for its progress reports, stop requests and logs
            (default: the caller's).
        return_exceptions: put a structure's exception in its slot instead of raising the first one.

    Returns:
        One `OptimizationTrace` per structure (or exception, with ``return_exceptions``).
    """
    n = len(atoms_list)
    fmaxes = _per_structure(fmax, n, "fmax")
    steps = _per_structure(max_steps, n, "max_steps")
    stages = _per_structure(stage, n, "stage")
    masks = list(fixed) if fixed is not None else [None] * n
    if len(masks) != n or (contexts is not None and len(contexts) != n):
        raise ValueError(f"fixed and contexts need one entry per structure ({n})")
    opt_name = optimizer
    for f_, s_ in zip(fmaxes, steps, strict=True):
        opt_name = check_optimizer_params(f_, s_, optimizer)
    evaluator = calculator.evaluator if isinstance(calculator, PotentialCalculator) else calculator
    name = getattr(calculator, "model_name", getattr(evaluator, "name", "matcalc"))
    calcs: list[Calculator] = [PotentialCalculator(evaluator, name=name) for _ in range(n)]  # type: ignore[arg-type]
    ok = all(_batched_evaluator(a, c, opt_name, relax_cell) is not None for a, c in zip(atoms_list, calcs,
                                                                                         strict=True))
    if ok:
        out = _optimize_batched(list(atoms_list), calcs, evaluator, fmax=fmaxes, max_steps=steps,  # type: ignore[arg-type]
                                optimizer=opt_name, relax_cell=relax_cell, fixed=masks, stages=stages,
                                contexts=contexts)
    else:
        out = []
        for i, atoms in enumerate(atoms_list):
            def one(i: int = i, atoms: Atoms = atoms) -> OptimizationTrace:
                return _optimize_ase(atoms, calcs[i], fmax=fmaxes[i], max_steps=steps[i], optimizer=opt_name,
                                     relax_cell=relax_cell, fixed=masks[i], stage=stages[i])
            try:
                out.append(contexts[i].run(one) if contexts is not None else one())
            except Exception as exc:  # noqa: BLE001 - per structure, like the batched path
                out.append(exc)
    if not return_exceptions:
        for r in out:
            if isinstance(r, BaseException):
                raise r
    return out


def _per_structure(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, (str, int, float)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name} needs one value per structure ({n}), got {len(values)}")
    return values


def _batched_evaluator(atoms: Atoms, calculator: Any, optimizer: str, relax_cell: bool) -> Evaluator | None:
    """The evaluator the batched path calls, or ``None`` when ASE's own loop must run (module doc)."""
    if not batched.enabled() or optimizer not in BATCHED_OPTIMIZERS:
        return None
    if not isinstance(calculator, PotentialCalculator):
        return None
    if any(not isinstance(c, FixAtoms) for c in atoms.constraints):
        return None
    if relax_cell and not atoms.pbc.all():
        return None  # FrechetCellFilter needs a stress: ASE's loop raises the error it always did
    return calculator.evaluator


def _optimize_batched(atoms_list: list[Atoms], calculators: list[Calculator], evaluator: Evaluator, *,
                      fmax: list[float], max_steps: list[int], optimizer: str, relax_cell: bool,
                      fixed: list[np.ndarray | None], stages: list[str],
                      contexts: Sequence[contextvars.Context] | None = None) -> list[Any]:
    traces = [OptimizationTrace(converged=False, steps=0, final_fmax_eV_per_A=float("nan")) for _ in atoms_list]
    jobs = []
    for i, atoms in enumerate(atoms_list):
        mask = _fixed_with_constraints(atoms, fixed[i])
        if mask is not None and mask.any():
            atoms.set_constraint(FixAtoms(mask=mask))
        jobs.append(OptimizationJob(atoms, fmax=fmax[i], max_steps=max_steps[i], fixed=mask,
                                    observer=_observer(traces[i], stages[i], max_steps[i]),
                                    context=contexts[i].copy() if contexts is not None else None))
    run_optimizations(jobs, evaluator, key=optimizer, make_optimizer=BATCHED_OPTIMIZERS[optimizer],
                      relax_cell=relax_cell)
    out: list[Any] = []
    for atoms, calc, job, trace, stage in zip(atoms_list, calculators, jobs, traces, stages, strict=True):
        atoms.calc = calc
        if job.final is not None:
            cache_results(atoms, job.final)  # as ASE leaves it: no new model call for get_potential_energy
        if job.error is not None:
            out.append(job.error)
            continue
        trace.stopped_early = job.stopped
        trace.converged = job.converged and not job.stopped
        trace.steps = job.steps
        trace.final_fmax_eV_per_A = trace.fmax_eV_per_A[-1] if trace.fmax_eV_per_A else float("nan")
        _log_done(stage, trace)
        out.append(trace)
    return out


def _fixed_with_constraints(atoms: Atoms, fixed: np.ndarray | None) -> np.ndarray | None:
    """``fixed`` joined with the atoms' own ``FixAtoms`` constraints (``None`` when nothing is fixed)."""
    mask = None if fixed is None else np.asarray(fixed, dtype=bool).copy()
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            if mask is None:
                mask = np.zeros(len(atoms), dtype=bool)
            mask[c.index] = True
    return mask


def _observer(trace: OptimizationTrace, stage: str, max_steps: int) -> Callable[[int, float, float], bool]:
    """Record a step in ``trace``, report it, and return True when a stop was requested."""

    def observe(step: int, energy: float, fm: float) -> bool:
        trace.energies_eV.append(energy)
        trace.fmax_eV_per_A.append(fm)
        log.debug("%s step %d E=%.6f eV fmax=%.4g eV/A", stage, step, energy, fm,
                  extra={"stage": stage, "step": step, "energy_eV": energy, "fmax_eV_per_A": fm})
        progress.report(stage, step, max_steps, energy_eV=energy, fmax_eV_per_A=fm)
        return progress.should_stop()

    return observe


def _log_done(stage: str, trace: OptimizationTrace) -> None:
    log.info("%s: %s after %d steps, fmax %.3g eV/A", stage, "converged" if trace.converged else "NOT converged",
             trace.steps, trace.final_fmax_eV_per_A,
             extra={"stage": stage, "steps": trace.steps, "converged": trace.converged})


def _optimize_ase(atoms: Atoms, calculator: Calculator, *, fmax: float, max_steps: int, optimizer: str,
                  relax_cell: bool, fixed: np.ndarray | None, stage: str,
                  trajectory: str | None = None) -> OptimizationTrace:
    """ASE's own loop: the reference and the fallback."""
    opt_cls = OPTIMIZERS[optimizer]
    atoms.calc = calculator
    if fixed is not None and fixed.any():
        atoms.set_constraint(FixAtoms(mask=fixed))
    target = FrechetCellFilter(atoms) if relax_cell else atoms
    opt = opt_cls(target, logfile=None)
    trace = OptimizationTrace(converged=False, steps=0, final_fmax_eV_per_A=float("nan"))
    record = _observer(trace, stage, max_steps)

    def observe() -> None:
        energy = float(atoms.get_potential_energy())
        f = target.get_forces()
        fm = float(np.sqrt((f**2).sum(axis=1).max())) if len(f) else 0.0
        if record(len(trace.energies_eV), energy, fm):
            trace.stopped_early = True

    opt.attach(observe, interval=1)
    writer = None
    if trajectory is not None:
        from matcalc.structures import TrajectoryWriter

        writer = frames = TrajectoryWriter(trajectory)
        opt.attach(lambda: frames.write(atoms), interval=1)
    converged = False
    try:
        for converged in opt.irun(fmax=fmax, steps=max_steps):
            if trace.stopped_early:
                break
    finally:
        if writer is not None:
            writer.close()
    trace.converged = bool(converged) and not trace.stopped_early
    trace.steps = int(opt.nsteps)
    trace.final_fmax_eV_per_A = trace.fmax_eV_per_A[-1] if trace.fmax_eV_per_A else float("nan")
    _log_done(stage, trace)
    return trace


# ---------------------------------------------------------------------- molecular dynamics
MDParams = LangevinParams | MTKParams
"""One structure's integrator and its parameters in ASE units: `LangevinParams`
(``ase.md.langevin.Langevin(atoms, timestep, temperature_K=, friction=, fixcm=False, rng=)``) or
`MTKParams` (``IsotropicMTKNPT(atoms, timestep, temperature_K, pressure_au, tdamp,
pdamp)``, chains of 3)."""

MDObserver = Callable[[MDFrame], bool]
"""Called after every MD step with the structure's `MDFrame`; return True to stop."""


@dataclass
class MDOutcome:
    """What happened during one MD run."""

    steps: int
    """Steps completed."""
    stopped_early: bool = False
    """The observer asked to stop before all steps ran."""


def run_md(atoms: Atoms, calculator: Calculator, params: MDParams, steps: int, *,
           observer: MDObserver | None = None) -> MDOutcome:
    """Run ``steps`` MD steps of ``params``' integrator on ``atoms`` (in place: positions, momenta, cell).

    ``observer(frame)`` sees the state after every step (energy, forces, temperature, volume...;
    ``frame.atoms()`` for the ``Atoms`` itself) and returns True to stop. Concurrent runs with the same model
    and integrator in other threads step together in one batch (`matcalc.batched.md`); ASE's own
    integrator is the fallback (module doc). A model error is raised, with ``atoms`` at the failing step.
    Afterwards ``atoms.calc`` is ``calculator`` holding the final results.
    """
    out = run_md_many([atoms], calculator, [params], steps, observers=[observer])[0]
    if isinstance(out, BaseException):
        raise out
    return out


def run_md_many(atoms_list: Sequence[Atoms], calculator: Calculator | Evaluator, params: Sequence[MDParams],
                steps: int | Sequence[int], *, observers: Sequence[MDObserver | None] | None = None,
                contexts: Sequence[contextvars.Context] | None = None,
                return_exceptions: bool = False) -> list[Any]:
    """`run_md` on every structure (one set of parameters and one observer each), stepped as one batch.

    All structures must use the same integrator kind. Returns one `MDOutcome` per structure (or its
    exception, with ``return_exceptions``; otherwise the first exception is raised once all ended).
    """
    n = len(atoms_list)
    steps_each = _per_structure(steps, n, "steps")
    obs = list(observers) if observers is not None else [None] * n
    if len(params) != n or len(obs) != n or (contexts is not None and len(contexts) != n):
        raise ValueError(f"params, observers and contexts need one entry per structure ({n})")
    kinds = {type(p) for p in params}
    if len(kinds) > 1 or not kinds <= {LangevinParams, MTKParams}:
        raise ValueError("params must all be LangevinParams or all MTKParams")
    for s_ in steps_each:
        checks.integer("steps", s_, minimum=0)
    if isinstance(calculator, PotentialCalculator):
        calcs: list[Calculator] = [calculator] * n if n == 1 else [
            PotentialCalculator(calculator.evaluator, name=calculator.model_name) for _ in range(n)]
        evaluator: Evaluator | None = calculator.evaluator
    elif isinstance(calculator, Calculator):
        calcs, evaluator = [calculator] * n, None
    else:
        name = getattr(calculator, "name", "matcalc")
        calcs, evaluator = [PotentialCalculator(calculator, name=name) for _ in range(n)], calculator
    mtk = kinds == {MTKParams}
    usable = evaluator is not None and batched.enabled() and all(
        (not a.constraints) if mtk else supported_constraints(a) for a in atoms_list)
    for a, c in zip(atoms_list, calcs, strict=True):
        a.calc = c
    if not usable:
        out: list[Any] = []
        for i, a in enumerate(atoms_list):
            def one(i: int = i, a: Atoms = a) -> MDOutcome:
                return _md_ase(a, params[i], steps_each[i], obs[i])
            try:
                out.append(contexts[i].run(one) if contexts is not None else one())
            except Exception as exc:  # noqa: BLE001 - per structure, like the batched path
                out.append(exc)
    else:
        jobs = [MDJob(a, steps_each[i], params[i], observer=obs[i],
                      context=contexts[i].copy() if contexts is not None else None)
                for i, a in enumerate(atoms_list)]
        make: Callable[[], BatchedIntegrator] = BatchedIsotropicMTKNPT if mtk else BatchedLangevin
        assert evaluator is not None
        run_md_jobs(jobs, evaluator, key="mtk" if mtk else "langevin", make_integrator=make)
        out = []
        for a, job in zip(atoms_list, jobs, strict=True):
            if job.final is not None:
                cache_results(a, job.final)
            out.append(job.error if job.error is not None else MDOutcome(job.steps_done, job.stopped))
    if not return_exceptions:
        for r in out:
            if isinstance(r, BaseException):
                raise r
    return out


def _md_ase(atoms: Atoms, params: MDParams, steps: int, observer: MDObserver | None) -> MDOutcome:
    """ASE's own integrator: the reference and the fallback."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.nose_hoover_chain import IsotropicMTKNPT

    if isinstance(params, LangevinParams):
        dyn: Any = Langevin(atoms, timestep=params.timestep, temperature_K=params.temperature_K,
                            friction=params.friction, fixcm=False, rng=params.rng)
    else:
        dyn = IsotropicMTKNPT(atoms, timestep=params.timestep, temperature_K=params.temperature_K,
                              pressure_au=params.pressure_au, tdamp=params.tdamp, pdamp=params.pdamp)
    done = 0
    it = dyn.irun(steps)
    next(it)  # the state before the first step
    for _ in it:
        done += 1
        if observer is None:
            continue
        ekin = float(atoms.get_kinetic_energy())
        results = atoms.calc.results if atoms.calc is not None else {}
        frame = MDFrame(atoms, done, float(atoms.get_potential_energy()), atoms.get_forces(md=True),
                        results.get("stress"), atoms.get_positions(), atoms.get_momenta(), np.array(atoms.cell),
                        float(atoms.get_volume()), ekin,
                        2 * ekin / (atoms.get_number_of_degrees_of_freedom() * units.kB), synced=True)
        if observer(frame):
            return MDOutcome(done, stopped_early=True)
    return MDOutcome(done)
