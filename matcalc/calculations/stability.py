"""MD stability (MOFSimBench): positions-only pre-relaxation, Langevin NVT, then isotropic
MTK NPT; a structure is *stable* when its volume changes by at most 10 % and it does not blow up.

Stages and units: ``timestep_fs`` (fs), ``friction_per_fs`` (1/fs), ``tdamp_fs`` / ``pdamp_fs``
(fs), ``pressure_bar`` (bar), ``temperature_K`` (K); all converted to ASE units here.
A frame (time, volume, temperature, energies, RMSD) is recorded every ``interval`` MD steps,
at the last step, and at the step where a run blew up or was stopped.
"""

from __future__ import annotations

import logging
import math
import warnings as pywarnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from ase import Atoms, units
from ase.constraints import FixCom
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta

from matcalc import progress
from matcalc.calculations.contract import Choice, FilePath, Number, Param, PreRelax, Property, Run
from matcalc.calculations.optimize import LangevinParams, MDFrame, MDParams, MTKParams, run_md
from matcalc.calculations.relax import displacements, volume_warning
from matcalc.calculations.results import PreRelaxedResult
from matcalc.structures import TrajectoryWriter, bare_copy, smallest_distance, trajectory_format

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

ENSEMBLES = ("npt", "nvt")
MAX_VOLUME_CHANGE_PERCENT = 10.0
"""|ΔV| above this (last frame vs input) marks a structure as unstable (MOFSimBench)."""
BLOWUP_VOLUME_CHANGE_PERCENT = 50.0
"""|ΔV| above this at any step ends the run as a blow-up."""
BLOWUP_MIN_DISTANCE_A = 0.5
"""Two atoms closer than this (Å) end the run as a blow-up."""
DISTANCE_CHECK_EVERY = 10
"""Interatomic distances are checked every this many steps (and at every recorded frame)."""
MD_STEPS = Number(0, 10_000_000, integer=True)
"""MD step counts (10⁷ steps = 10 ns at 1 fs)."""
MAX_COORDINATION_SITES = 64
"""CrystalNN runs on at most this many metal sites (the first ones), to keep it cheap."""


def blowup_temperature_K(target_K: float) -> float:
    """Temperature (K) above which a run counts as exploded: 3 × target + 1000 K."""
    return 3.0 * target_K + 1000.0


@dataclass(kw_only=True)
class StabilityResult(PreRelaxedResult):
    """Outcome of an MD stability run. Time ps, volumes Å³, temperatures K, energies eV, lengths Å.

    Traces hold one entry per recorded frame; frame 0 is the (relaxed) start at t = 0.
    """

    kind: ClassVar[str] = "stability"

    stable: bool
    """No blow-up and |volume_change_percent| <= 10 %."""
    reason: str = ""
    """Why the structure is unstable (empty when stable)."""
    stopped_early: bool = False
    """The caller asked the run to stop (``progress.should_stop()``) before all steps ran."""
    steps_completed: int
    """MD steps run (NVT + NPT)."""
    total_steps: int
    """MD steps requested (NVT + NPT, NPT counted only for ``ensemble="npt"``)."""
    initial_volume_A3: float
    """Volume of the input structure."""
    final_volume_A3: float
    volume_change_percent: float
    """100 (V_last − V_input) / V_input."""
    mean_temperature_K: float
    """Mean temperature over the tail (second half of the frames of the last stage run)."""
    final_rmsd_A: float
    """RMSD of the last frame from the relaxed start (minimum image, drift removed)."""
    max_displacement_A: float
    """Largest displacement of any atom from the relaxed start over all frames."""
    energy_drift_eV_per_atom_per_ps: float
    """Slope of a linear fit of the total energy (potential + kinetic) per atom against time over
    the tail (second half of the frames of the last stage run, >= 3 frames; NaN otherwise).
    With a thermostat the mean total energy is stationary once equilibrated, so a clear slope
    means the structure is still changing (relaxing, heating, decomposing)."""
    coordination_before: dict[int, int] = field(default_factory=dict)
    """CrystalNN coordination number of each metal site (index -> CN) of the relaxed start."""
    coordination_after: dict[int, int] = field(default_factory=dict)
    """The same for the last frame (empty when it could not be computed)."""
    coordination_changed: list[int] = field(default_factory=list)
    """Metal sites whose coordination number changed."""
    time_ps: np.ndarray = field(repr=False)
    volume_A3: np.ndarray = field(repr=False)
    temperature_K: np.ndarray = field(repr=False)
    potential_energy_eV: np.ndarray = field(repr=False)
    total_energy_eV: np.ndarray = field(repr=False)
    rmsd_A: np.ndarray = field(repr=False)
    stages: list[str] = field(default_factory=list, repr=False)
    """Stage of each frame: ``"start"``, ``"nvt"`` or ``"npt"``."""
    trajectory: str | None = None
    """Path of the trajectory (one frame per recorded frame: ASE ``.traj`` or extended XYZ), when one was written."""
    final_structure: Atoms | None = field(default=None, repr=False)
    """The last MD frame."""

    def __post_init__(self) -> None:  # JSON turns int keys into strings
        self.coordination_before = {int(k): int(v) for k, v in self.coordination_before.items()}
        self.coordination_after = {int(k): int(v) for k, v in self.coordination_after.items()}

    def plot(self, ax: Axes | None = None) -> Figure:
        """Volume, temperature and potential energy vs time: three stacked panels on a new figure,
        or volume and temperature on twin axes when ``ax`` is given."""
        if ax is not None:
            return super().plot(ax)
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.0, 7.0), layout="constrained")
        axes = fig.subplots(3, 1, sharex=True)
        self._series(axes[0], self.volume_A3, "volume (Å³)", "C0")
        self._series(axes[1], self.temperature_K, "temperature (K)", "C3")
        self._series(axes[2], self.potential_energy_eV, "potential energy (eV)", "C2")
        axes[1].axhline(float(self.parameters.get("temperature_K", np.nan)), color="0.5", ls="--", lw=0.8)
        axes[2].set_xlabel("time (ps)")
        axes[0].set_title(self._title())
        return fig

    def _series(self, ax: Axes, y: np.ndarray, label: str, color: str) -> None:
        ax.plot(self.time_ps, y, color=color, marker=".", ms=3)
        ax.set_ylabel(label, color=color)

    def _title(self) -> str:
        state = "stable" if self.stable else f"unstable: {self.reason}"
        return f"{self.formula} ({self.model}): ΔV {self.volume_change_percent:+.2f} %, {state}"

    def _plot(self, ax: Axes) -> None:
        self._series(ax, self.volume_A3, "volume (Å³)", "C0")
        ax.set_xlabel("time (ps)")
        twin = ax.twinx()
        self._series(twin, self.temperature_K, "temperature (K)", "C3")
        ax.set_title(self._title(), fontsize="small")


@dataclass
class _Trace:
    steps: list[int] = field(default_factory=list)
    time_ps: list[float] = field(default_factory=list)
    volume_A3: list[float] = field(default_factory=list)
    temperature_K: list[float] = field(default_factory=list)
    potential_energy_eV: list[float] = field(default_factory=list)
    total_energy_eV: list[float] = field(default_factory=list)
    rmsd_A: list[float] = field(default_factory=list)
    max_disp_A: list[float] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)


class _Run:
    """The MD loop: records frames, checks for blow-ups, reports progress, honours stop requests."""

    def __init__(self, atoms: Atoms, reference: Atoms, v_input: float, params: dict[str, Any],
                 writer: Any | None) -> None:
        self.atoms = atoms
        self.reference = reference
        self.v_input = v_input
        self.p = params
        self.writer = writer
        self.trace = _Trace()
        self.step = 0
        self.reason = ""
        self.stopped = False
        self.t_limit = blowup_temperature_K(params["temperature_K"])

    # ------------------------------------------------------------------ frames
    def record(self, stage: str) -> None:
        a = self.atoms
        epot = _safe(a.get_potential_energy)
        ekin = float(a.get_kinetic_energy())
        temp = temperature_K(a)
        vol = float(a.get_volume())
        with np.errstate(invalid="ignore"):
            norms = np.linalg.norm(displacements(self.reference, a), axis=1)
        t = self.trace
        t.steps.append(self.step)
        t.time_ps.append(self.step * self.p["timestep_fs"] / 1000.0)
        t.volume_A3.append(vol)
        t.temperature_K.append(temp)
        t.potential_energy_eV.append(epot)
        t.total_energy_eV.append(epot + ekin)
        t.rmsd_A.append(float(np.sqrt(np.mean(norms**2))))
        t.max_disp_A.append(float(norms.max()))
        t.stages.append(stage)
        if self.writer is not None:
            self.writer.write(a)

    # ------------------------------------------------------------------ checks
    def blowup(self) -> str:
        a = self.atoms
        energy = _safe(a.get_potential_energy)
        if not math.isfinite(energy):
            return f"non-finite potential energy at step {self.step}"
        forces = a.get_forces()
        if not np.all(np.isfinite(forces)) or not np.all(np.isfinite(a.positions)):
            return f"non-finite forces or positions at step {self.step}"
        temp = temperature_K(a)
        if not temp <= self.t_limit:
            return f"temperature {temp:.0f} K above {self.t_limit:.0f} K at step {self.step}"
        dv = 100.0 * (a.get_volume() - self.v_input) / self.v_input
        if abs(dv) > BLOWUP_VOLUME_CHANGE_PERCENT:
            return f"volume changed by {dv:+.1f} % (> {BLOWUP_VOLUME_CHANGE_PERCENT:.0f} %) at step {self.step}"
        if self.step % DISTANCE_CHECK_EVERY == 0 or self.step % self.p["interval"] == 0:
            dmin = smallest_distance(a, BLOWUP_MIN_DISTANCE_A)
            if dmin is not None:
                return f"atoms {dmin:.2f} Å apart (< {BLOWUP_MIN_DISTANCE_A} Å) at step {self.step}"
        return ""

    # ------------------------------------------------------------------ stages
    def run_stage(self, params: MDParams, stage: str, n_steps: int, last_step: int) -> bool:
        """Run ``n_steps`` of the integrator ``params``; False when the run must end (blow-up or stop request).

        Runs through `matcalc.calculations.optimize.run_md`: concurrent stability runs with the same
        model step together in one batch (ASE's integrators are the fallback, same trajectories)."""
        interval = self.p["interval"]
        first = self.step

        def observe(frame: MDFrame) -> bool:
            self.atoms = frame.atoms()  # the same Atoms, brought to this step (results cached)
            self.step += 1
            self.reason = self.blowup()
            if self.reason or self.step % interval == 0 or self.step == last_step:
                self.record(stage)
                t = self.trace
                progress.report(stage, self.step - first, n_steps, energy_eV=t.potential_energy_eV[-1],
                                temperature_K=t.temperature_K[-1], volume_A3=t.volume_A3[-1],
                                time_ps=t.time_ps[-1])
            if self.reason:
                log.warning("stability: %s", self.reason)
                return True
            if progress.should_stop() and self.step < last_step:
                if self.trace.steps[-1] != self.step:
                    self.record(stage)
                self.stopped = True
                log.info("stability: stop requested at step %d", self.step)
                return True
            return False

        try:
            run_md(self.atoms, self.atoms.calc, params, n_steps, observer=observe)
        except Exception as exc:  # noqa: BLE001 - a model failing on an exploded structure ends the run, keeps the trace
            log.exception("stability: %s stage failed at step %d", stage, self.step + 1)
            self.reason = f"{stage} failed at step {self.step + 1}: {type(exc).__name__}: {exc}"
            return False
        return not (self.reason or self.stopped)


def temperature_K(atoms: Atoms) -> float:
    """Kinetic temperature (K) over the degrees of freedom the constraints leave; 0 K when none is left
    (one atom with its centre of mass fixed), where ASE's ``get_temperature`` divides by zero."""
    if atoms.get_number_of_degrees_of_freedom() <= 0:
        return 0.0
    return float(atoms.get_temperature())


def _safe(getter: Any) -> float:
    try:
        return float(getter())
    except (ValueError, FloatingPointError, OverflowError):
        return float("nan")


def metal_sites(atoms: Atoms) -> list[int]:
    """Indices of the metal atoms (pymatgen ``Element.is_metal``)."""
    from pymatgen.core import Element

    metals = {s for s in set(atoms.get_chemical_symbols()) if Element(s).is_metal}
    return [i for i, s in enumerate(atoms.get_chemical_symbols()) if s in metals]


def metal_coordination(atoms: Atoms, sites: list[int] | None = None) -> dict[int, int]:
    """CrystalNN coordination number of the metal sites (site index -> CN); ``sites``: which ones
    (default: every metal site)."""
    from pymatgen.analysis.local_env import CrystalNN
    from pymatgen.io.ase import AseAtomsAdaptor

    clean = bare_copy(atoms)
    structure = AseAtomsAdaptor.get_structure(clean)
    cnn = CrystalNN()
    with pywarnings.catch_warnings():
        pywarnings.simplefilter("ignore")  # "no oxidation states" etc.
        return {i: int(cnn.get_cn(structure, i)) for i in (metal_sites(atoms) if sites is None else sites)}


def _coordination(atoms: Atoms, what: str, warnings: list[str]) -> dict[int, int]:
    sites = metal_sites(atoms)
    if len(sites) > MAX_COORDINATION_SITES:
        if what == "relaxed start":
            warnings.append(f"coordination computed for the first {MAX_COORDINATION_SITES} of {len(sites)} "
                            "metal sites only")
        sites = sites[:MAX_COORDINATION_SITES]
    try:
        return metal_coordination(atoms, sites)
    except Exception as exc:  # noqa: BLE001 - CrystalNN is an analysis extra; never fail the run for it
        log.warning("CrystalNN failed on the %s structure: %s", what, exc)
        warnings.append(f"coordination ({what}) not computed: CrystalNN failed: {type(exc).__name__}: {exc}")
        return {}


def _tail(stages: list[str], last_stage: str) -> np.ndarray:
    """Indices of the second half of the frames of ``last_stage`` (the equilibrated tail)."""
    idx = np.array([i for i, s in enumerate(stages) if s == last_stage], dtype=int)
    return idx[len(idx) // 2:]


def _drift(time_ps: np.ndarray, energy_per_atom: np.ndarray) -> float:
    ok = np.isfinite(energy_per_atom)
    if ok.sum() < 3 or np.ptp(time_ps[ok]) <= 0:
        return float("nan")
    return float(np.polyfit(time_ps[ok], energy_per_atom[ok], 1)[0])


def _check(params: dict[str, Any]) -> None:
    if params["ensemble"] == "nvt":
        params["npt_steps"] = 0
    if params.get("trajectory") is not None:
        trajectory_format(params["trajectory"])  # ValueError naming the suffixes, before anything runs


def _setup(run: Run) -> None:
    if run.atoms.constraints:
        run.warnings.append("constraints of the input structure were removed (MTK NPT does not support them)")
        run.atoms.set_constraint()


def _remove_rotation(atoms: Atoms) -> None:
    """ASE's ``ZeroRotation`` on a non-periodic copy (ASE warns that the inertia tensor ignores PBC), skipped
    when the inertia tensor is singular (one atom, or all atoms on a line): there is no rotation to remove
    and inverting it would turn every velocity into NaN."""
    spin = atoms.copy()
    spin.pbc = False
    inertia = np.linalg.eigvalsh(np.asarray(spin.get_moments_of_inertia(vectors=True)[0]) * np.eye(3))
    if len(atoms) < 3 or not np.all(inertia > 1e-8 * max(1.0, float(inertia.max()))):
        return
    ZeroRotation(spin)
    atoms.set_momenta(spin.get_momenta())


def _compute(run: Run) -> dict[str, Any]:
    p = run.params
    atoms = run.atoms
    warnings = run.warnings
    v_input = float(atoms.get_volume())  # the pre-relaxation keeps the cell
    atoms.calc = run.calculator()
    stopped = run.relaxation is not None and run.relaxation.stopped_early
    reference = atoms.copy()
    reference.calc = None
    coord_before = _coordination(reference, "relaxed start", warnings)

    t_target = p["temperature_K"]
    rng = np.random.default_rng(p["seed"])
    if len(atoms) > 1:
        thermalize_momenta(atoms, temperature_K=t_target, rng=rng)
        Stationary(atoms)
        _remove_rotation(atoms)
    else:  # ASE's Stationary rescales a zero kinetic energy to the old temperature: NaN velocities
        warnings.append("one atom: no internal degrees of freedom, so it stays at rest (0 K) and only the cell "
                        "responds to the pressure (NPT)")

    nvt, npt = p["nvt_steps"], p["npt_steps"]
    total = nvt + npt
    writer = None
    if p.get("trajectory") is not None:
        writer = TrajectoryWriter(p["trajectory"])
    md = _Run(atoms, reference, v_input, p, writer)
    try:
        md.record("start")
        stopped = stopped or (total > 0 and progress.should_stop())
        md.stopped = stopped
        ok = not stopped
        if ok and nvt:
            atoms.set_constraint(FixCom())
            nvt_params = LangevinParams(timestep=p["timestep_fs"] * units.fs, temperature_K=t_target,
                                        friction=p["friction_per_fs"] / units.fs, rng=rng)
            ok = md.run_stage(nvt_params, "nvt", nvt, total)
            atoms.set_constraint()
        if ok and npt:
            npt_params = MTKParams(timestep=p["timestep_fs"] * units.fs, temperature_K=t_target,
                                   pressure_au=p["pressure_bar"] * units.bar, tdamp=p["tdamp_fs"] * units.fs,
                                   pdamp=p["pdamp_fs"] * units.fs)
            ok = md.run_stage(npt_params, "npt", npt, total)
    finally:
        atoms.set_constraint()
        if writer is not None:
            writer.close()

    t = md.trace
    time_ps = np.asarray(t.time_ps)
    volumes = np.asarray(t.volume_A3)
    temps = np.asarray(t.temperature_K)
    etot = np.asarray(t.total_energy_eV)
    last_stage = t.stages[-1]
    tail = _tail(t.stages, last_stage)
    if last_stage == "start":
        tail = np.array([0])
    dv = float(100.0 * (volumes[-1] - v_input) / v_input)
    reason = md.reason
    if not reason and not abs(dv) <= MAX_VOLUME_CHANGE_PERCENT:
        reason = f"volume changed by {dv:+.2f} % (> {MAX_VOLUME_CHANGE_PERCENT:.0f} %)"
    blown_up = bool(md.reason)
    if md.stopped:
        warnings.append(f"stopped early after {md.step} of {total} MD steps")
    if blown_up:
        warnings.append(f"run ended: {md.reason}")
    elif (w := volume_warning("MD run", v_input, float(volumes[-1]))) is not None:
        warnings.append(w)

    final = atoms.copy()
    final.calc = None
    if blown_up:
        coord_after: dict[int, int] = {}
        if coord_before:
            warnings.append("coordination (last frame) not computed: the run blew up")
    else:
        coord_after = _coordination(final, "last frame", warnings)
    changed = sorted(i for i in coord_before if i in coord_after and coord_before[i] != coord_after[i])
    return {
        "stable": not reason,
        "reason": reason,
        "stopped_early": md.stopped,
        "steps_completed": md.step,
        "total_steps": total,
        "initial_volume_A3": v_input,
        "final_volume_A3": float(volumes[-1]),
        "volume_change_percent": dv,
        "mean_temperature_K": float(np.mean(temps[tail])),
        "final_rmsd_A": float(t.rmsd_A[-1]),
        "max_displacement_A": float(np.max(t.max_disp_A)),
        "energy_drift_eV_per_atom_per_ps": _drift(time_ps[tail], etot[tail] / len(atoms)),
        "coordination_before": coord_before,
        "coordination_after": coord_after,
        "coordination_changed": changed,
        "time_ps": time_ps,
        "volume_A3": volumes,
        "temperature_K": temps,
        "potential_energy_eV": np.asarray(t.potential_energy_eV),
        "total_energy_eV": etot,
        "rmsd_A": np.asarray(t.rmsd_A),
        "stages": list(t.stages),
        "trajectory": p.get("trajectory"),
        "final_structure": final,
    }


PROPERTY = Property(
    name="stability",
    task_type="stability",
    summary="Run the MOFSimBench MD stability protocol on `structure` with `model`.",
    details="""Positions-only LBFGS pre-relaxation (cell fixed) -> velocities from Maxwell–Boltzmann
    (seeded numpy Generator; centre-of-mass momentum and rotation removed) -> Langevin NVT
    (centre of mass fixed) -> isotropic MTK NPT (`ase.md.nose_hoover_chain.IsotropicMTKNPT`).
    A blow-up (non-finite energy/forces, atoms < 0.5 Å apart, |ΔV| > 50 %, temperature above
    3·T + 1000 K, or the model failing) ends the run with `stable=False` and a `reason`;
    the trace up to that point is kept. A stop request (`progress.reporting(stop=...)`) ends
    the run early with `stopped_early=True` (`stable` then judges the partial run).""",
    result=StabilityResult,
    params=(
        Param("temperature_K", Number(0.0, 10_000.0, lo_open=True), "target temperature", default=300.0, unit="K"),
        Param("timestep_fs", Number(0.0, 20.0, lo_open=True), "MD time step", default=1.0, unit="fs"),
        Param("nvt_steps", MD_STEPS, "Langevin NVT steps", default=1000, presets={"fast": 200}),
        Param("npt_steps", MD_STEPS, "MTK NPT steps (0 with `ensemble=\"nvt\"`)", default=50_000,
              presets={"fast": 2000}),
        Param("pressure_bar", Number(-1e5, 1e6), "external pressure", default=1.0, unit="bar"),
        Param("friction_per_fs", Number(0.0, 10.0, lo_open=True), "Langevin friction", default=0.01, unit="1/fs"),
        Param("tdamp_fs", Number(0.0, 1e6, lo_open=True), "NPT thermostat time constant", default=100.0, unit="fs"),
        Param("pdamp_fs", Number(0.0, 1e7, lo_open=True), "NPT barostat time constant", default=1000.0, unit="fs"),
        Param("ensemble", Choice(ENSEMBLES), "`npt` (NVT then NPT) or `nvt` (stop after NVT)", default="npt"),
        Param("interval", Number(1, 10_000_000, integer=True), "record a frame (and report progress) every this "
              "many steps", default=100, presets={"fast": 20}),
        Param("seed", Number(0, 2**32 - 1, integer=True), "seed of the velocities and the Langevin noise",
              default=0),
        Param("trajectory", FilePath(), "write the recorded frames here (`.traj`: ASE trajectory; `.xyz`/`.extxyz`: "
              "extended XYZ)", remote=False),
    ),
    prerelax=PreRelax(max_steps=1000, fast_max_steps=300, relax_cell=False, choose_optimizer=False),
    compute=_compute,
    check=_check,
    setup=_setup,
)
stability = PROPERTY.function


__all__ = ["ENSEMBLES", "MAX_VOLUME_CHANGE_PERCENT", "PROPERTY", "StabilityResult", "metal_coordination", "stability"]
