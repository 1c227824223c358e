"""Harmonic heat capacity with phonopy (MOFSimBench protocol).

Pre-relax (BFGS + ``FrechetCellFilter``), then phonopy's finite displacements; every displaced
supercell is evaluated in one batched model call; force constants, a q-point mesh and the
harmonic thermal properties come from phonopy.

Conventions (documented choices):

* phonopy's *unit cell* is the input cell and ``primitive_matrix="P"`` (identity; phonopy 4
  defaults to "auto", which would silently switch to a reduced cell): thermal properties are
  per mole of the input cell (``n_atoms`` atoms), so ``cv_J_per_K_mol`` tends to 3·n_atoms·R and
  ``cv_J_per_K_g`` = ``cv_J_per_K_mol`` / molar mass of the cell.
* The mean force of each displaced supercell (drift) is subtracted before building force constants,
  as phonopy's own calculator interfaces do when they read forces (the ``phonopy.forces`` API
  does not). For conservative models (forces = −∇E) the drift is float noise; it is reported as
  ``max_drift_eV_per_A``.
* The three acoustic modes at Γ are left out of the thermal sums (phonopy's
  ``exclude_gamma_acoustic=True``, as phonopy itself recommends): their exact frequency is zero, and
  letting noise-level frequencies in adds a spurious ≈3·k_B per mesh point to Cv at every
  temperature (visible below ~30 K; < 0.01 % at 300 K with the default mesh).
* Force constants are not symmetrized (as in MOFSimBench and plain phonopy).
* Imaginary modes: modes of the irreducible q-point mesh below −``IMAGINARY_TOLERANCE_THZ``
  (0.1 THz; phonopy reports imaginary frequencies as negative numbers), excluding the three
  acoustic modes at Γ. They are left out of the thermal sums (phonopy's behaviour) and warned about.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from ase import Atoms

from matcalc import progress
from matcalc.calculations import checks, protocols
from matcalc.calculations.common import prepare
from matcalc.calculations.optimize import check_optimizer_params, optimize
from matcalc.calculations.results import Result
from matcalc.models import Potential
from matcalc.structures import mass_g_per_mol

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from phonopy import Phonopy

log = logging.getLogger(__name__)

IMAGINARY_TOLERANCE_THZ = 0.1
"""A mesh mode counts as imaginary below −this frequency (THz). Float32 models with 0.01 Å
displacements break the acoustic sum rule by up to a few 0.1 THz at Γ (those three modes are
excluded); a genuinely unstable branch sits far lower (CHGNet on RSM0010 relaxed to fmax 0.05:
down to −4.4 THz, and the count barely changes between 0.01 and 0.1 THz: 6844 vs 6826 modes)."""
REFERENCE_TEMPERATURE_K = 300.0
GAS_CONSTANT_J_PER_K_MOL = 8.314462618


@dataclass(kw_only=True)
class HeatCapacityResult(Result):
    """Harmonic thermal properties. Temperatures K; per mole of the input cell; per gram of it."""

    kind: ClassVar[str] = "heat_capacity"

    cv_300K_J_per_K_g: float
    """Cv at 300 K (linear interpolation); NaN, with a warning, when 300 K is outside the range."""
    cv_300K_J_per_K_mol: float
    molar_mass_g_per_mol: float
    """Molar mass of the cell the properties refer to."""
    n_displacements: int
    imaginary_modes: int
    """Modes on phonopy's irreducible q-point mesh with frequency < −``imaginary_tolerance_THz``
    (three Γ acoustic modes excluded)."""
    mesh_modes: int = 0
    """Number of modes on the irreducible q-point mesh (q-points × bands), for scale."""
    lowest_frequency_THz: float
    """Lowest mesh frequency, Γ acoustic modes excluded (negative = imaginary)."""
    imaginary_tolerance_THz: float = IMAGINARY_TOLERANCE_THZ
    max_drift_eV_per_A: float = 0.0
    """Largest |mean force| over the displaced supercells (subtracted before the force constants)."""
    mesh_numbers: list[int] = field(default_factory=list)
    relax_converged: bool | None = None
    relax_steps: int = 0
    relaxed_structure: Atoms | None = field(default=None, repr=False)
    """The structure the phonons were computed on (after the pre-relaxation)."""
    temperatures_K: np.ndarray = field(repr=False)
    cv_J_per_K_mol: np.ndarray = field(repr=False)
    cv_J_per_K_g: np.ndarray = field(repr=False)
    entropy_J_per_K_mol: np.ndarray = field(repr=False)
    free_energy_kJ_per_mol: np.ndarray = field(repr=False)

    @property
    def dulong_petit_J_per_K_mol(self) -> float:
        """Classical high-temperature limit 3·n_atoms·R (J/(K·mol))."""
        return 3.0 * self.n_atoms * GAS_CONSTANT_J_PER_K_MOL

    def _plot(self, ax: Axes) -> None:
        ax.plot(self.temperatures_K, self.cv_J_per_K_g, "-")
        ax.axhline(self.dulong_petit_J_per_K_mol / self.molar_mass_g_per_mol, color="0.6", ls=":", lw=1,
                   label="Dulong–Petit 3nR")
        if np.isfinite(self.cv_300K_J_per_K_g):
            ax.plot([REFERENCE_TEMPERATURE_K], [self.cv_300K_J_per_K_g], "o",
                    label=f"300 K: {self.cv_300K_J_per_K_g:.4f} J/(K·g)")
        ax.set_xlabel("temperature (K)")
        ax.set_ylabel("Cv (J/(K·g))")
        ax.set_title(f"{self.formula} ({self.model})")
        ax.legend(fontsize="small")


def check_phonon_params(supercell: Any, displacement: Any, mesh: Any, t_min: Any, t_max: Any, t_step: Any,
                        fmax: Any) -> tuple[tuple[int, int, int], float, float | list[int], float, float, float]:
    """Validate the phonon parameters; ``ValueError`` naming the first bad one."""
    if isinstance(supercell, (str, bytes)) or not isinstance(supercell, Sequence | np.ndarray):
        raise ValueError(f"supercell must be 3 positive integers, got {supercell!r}")
    if len(supercell) != 3:
        raise ValueError(f"supercell must be 3 positive integers, got {supercell!r}")
    try:
        sc = tuple(checks.integer("supercell", n, minimum=1) for n in supercell)
    except ValueError:
        raise ValueError(f"supercell must be 3 positive integers, got {supercell!r}") from None
    displacement = checks.positive("displacement", displacement)
    if isinstance(mesh, (str, bytes)):
        raise ValueError(f"mesh must be a number >= 1 (length, Å) or 3 positive integers, got {mesh!r}")
    if isinstance(mesh, Sequence | np.ndarray):
        if len(mesh) != 3:
            raise ValueError(f"mesh must be a number >= 1 (length, Å) or 3 positive integers, got {mesh!r}")
        try:
            mesh_value: float | list[int] = [checks.integer("mesh", m, minimum=1) for m in mesh]
        except ValueError:
            raise ValueError(f"mesh must be a number >= 1 (length, Å) or 3 positive integers, got {mesh!r}") \
                from None
    else:
        mesh_value = checks.in_range("mesh", mesh, 1.0, float("inf"))
    t_min = checks.non_negative("t_min", t_min)
    t_max = checks.non_negative("t_max", t_max)
    if t_max < t_min:
        raise ValueError(f"t_max must be >= t_min ({t_min} K), got {t_max!r}")
    t_step = checks.positive("t_step", t_step)
    checks.positive("fmax", fmax)
    return sc, displacement, mesh_value, t_min, t_max, t_step  # type: ignore[return-value]


def heat_capacity(
    structure: Any,
    model: str | Potential = "chgnet",
    *,
    supercell: Sequence[int] | None = None,
    displacement: float | None = None,
    mesh: float | Sequence[int] | None = None,
    t_min: float | None = None,
    t_max: float | None = None,
    t_step: float | None = None,
    relax_first: bool | None = None,
    fmax: float | None = None,
    relax_max_steps: int | None = None,
    relax_optimizer: str | None = None,
    protocol: str | None = None,
    device: str | None = None,
) -> HeatCapacityResult:
    """Harmonic heat capacity, entropy and free energy of ``structure`` with ``model`` (phonopy).

    Args:
        structure: anything :func:`matcalc.load_structure` reads.
        model: model name (``"chgnet"``, ``"emt"``, ``"chgnet+d3"``...) or a loaded Potential.
        supercell: diagonal supercell multiples for the displacements; default (1, 1, 1).
        displacement: finite displacement (Å); default 0.01.
        mesh: q-point mesh: a number is phonopy's length-based mesh density (Å, >= 1), three
            integers an explicit mesh; default 100 (``"fast"``: 30).
        t_min: lowest temperature (K); default 0.
        t_max: highest temperature (K), >= t_min; default 1000.
        t_step: temperature step (K), > 0; default 10.
        relax_first: relax positions and cell first (default True).
        fmax: force threshold of the pre-relaxation (eV/Å); default 1e-3 (``"fast"``: 0.05).
        relax_max_steps: step limit of the pre-relaxation; default 5000 (``"fast"``: 500).
        relax_optimizer: optimizer of the pre-relaxation; default ``BFGS``.
        protocol: ``"mofsimbench"`` (default) or ``"fast"``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default: a GPU if torch sees one.
    """
    name, params = protocols.resolve(
        "heat_capacity", protocol, supercell=supercell, displacement=displacement, mesh=mesh, t_min=t_min,
        t_max=t_max, t_step=t_step, relax_first=relax_first, fmax=fmax, relax_max_steps=relax_max_steps,
        relax_optimizer=relax_optimizer)
    (params["supercell"], params["displacement"], params["mesh"], params["t_min"], params["t_max"],
     params["t_step"]) = check_phonon_params(params["supercell"], params["displacement"], params["mesh"],
                                             params["t_min"], params["t_max"], params["t_step"], params["fmax"])
    params["relax_optimizer"] = check_optimizer_params(params["fmax"], params["relax_max_steps"],
                                                       params["relax_optimizer"])
    params["relax_first"] = bool(params["relax_first"])
    prep = prepare(structure, model, device)
    warnings: list[str] = []

    atoms = prep.atoms
    relax_converged: bool | None = None
    relax_steps = 0
    if params["relax_first"]:
        trace = optimize(atoms, prep.calculator(), fmax=params["fmax"], max_steps=params["relax_max_steps"],
                         optimizer=params["relax_optimizer"], relax_cell=True, stage="relax")
        relax_converged, relax_steps = trace.converged, trace.steps
        if (w := trace.warning("pre-relaxation", params["fmax"])) is not None:
            warnings.append(w)
    relaxed = atoms.copy()
    relaxed.calc = None
    relaxed.set_constraint()

    phonon = make_phonopy(relaxed, params["supercell"])
    phonon.generate_displacements(distance=params["displacement"])
    supercells = [to_ase(s) for s in phonon.supercells_with_displacements or []]
    progress.report("phonons", 0, len(supercells))
    evaluations = prep.evaluator.evaluate(supercells)
    progress.report("phonons", len(supercells), len(supercells))
    forces = np.array([e.forces_eV_per_A for e in evaluations], dtype=float)
    drift = forces.mean(axis=1, keepdims=True)
    forces -= drift
    max_drift = float(np.linalg.norm(drift, axis=2).max()) if len(forces) else 0.0
    phonon.forces = forces
    phonon.produce_force_constants()
    qmesh = phonon.run_mesh(params["mesh"])
    phonon.run_thermal_properties(t_min=params["t_min"], t_max=params["t_max"], t_step=params["t_step"],
                                  exclude_gamma_acoustic=True)
    tp = phonon.get_thermal_properties_dict()

    frequencies = np.asarray(qmesh.frequencies)
    n_imag, lowest = count_imaginary(np.asarray(qmesh.qpoints), frequencies, IMAGINARY_TOLERANCE_THZ)
    if n_imag:
        warnings.append(f"{n_imag} imaginary mode(s) of {frequencies.size} on the q-point mesh (lowest {lowest:.3f} "
                        f"THz, tolerance −{IMAGINARY_TOLERANCE_THZ} THz, Γ acoustic modes excluded): the structure "
                        "is not at a minimum of the model; imaginary modes are left out of the thermal properties")

    temperatures = np.asarray(tp["temperatures"], dtype=float)
    cv_mol = np.asarray(tp["heat_capacity"], dtype=float)
    molar_mass = mass_g_per_mol(relaxed)
    cv_g = cv_mol / molar_mass
    if temperatures[0] <= REFERENCE_TEMPERATURE_K <= temperatures[-1]:
        cv300_mol = float(np.interp(REFERENCE_TEMPERATURE_K, temperatures, cv_mol))
    else:
        cv300_mol = float("nan")
        warnings.append(f"300 K lies outside the temperature range {temperatures[0]:g}–{temperatures[-1]:g} K: "
                        "cv_300K_J_per_K_g is NaN")
    for w in warnings:
        log.warning("heat_capacity %s: %s", prep.label or prep.structure_hash[:8], w)

    return HeatCapacityResult(
        **prep.common(name, params, warnings),
        cv_300K_J_per_K_g=cv300_mol / molar_mass,
        cv_300K_J_per_K_mol=cv300_mol,
        molar_mass_g_per_mol=molar_mass,
        n_displacements=len(supercells),
        imaginary_modes=n_imag,
        mesh_modes=int(frequencies.size),
        lowest_frequency_THz=lowest,
        imaginary_tolerance_THz=IMAGINARY_TOLERANCE_THZ,
        max_drift_eV_per_A=max_drift,
        mesh_numbers=[int(n) for n in qmesh.mesh_numbers],
        relax_converged=relax_converged,
        relax_steps=relax_steps,
        relaxed_structure=relaxed,
        temperatures_K=temperatures,
        cv_J_per_K_mol=cv_mol,
        cv_J_per_K_g=cv_g,
        entropy_J_per_K_mol=np.asarray(tp["entropy"], dtype=float),
        free_energy_kJ_per_mol=np.asarray(tp["free_energy"], dtype=float),
    )


def make_phonopy(atoms: Atoms, supercell: Sequence[int]) -> Phonopy:
    """A ``Phonopy`` object whose unit cell (and primitive cell) is ``atoms``, with ASE's masses."""
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    unitcell = PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=np.asarray(atoms.cell),
                            scaled_positions=atoms.get_scaled_positions(), masses=atoms.get_masses())
    return Phonopy(unitcell, supercell_matrix=np.diag(supercell), primitive_matrix="P")


def to_ase(cell: Any) -> Atoms:
    """ASE Atoms of a ``PhonopyAtoms`` supercell (periodic)."""
    return Atoms(symbols=list(cell.symbols), cell=np.asarray(cell.cell), positions=np.asarray(cell.positions),
                 pbc=True)


def count_imaginary(qpoints: np.ndarray, frequencies: np.ndarray, tolerance_THz: float) -> tuple[int, float]:
    """(number of modes below −tolerance, lowest frequency) over a mesh, Γ's three acoustic modes excluded."""
    freqs = np.array(frequencies, dtype=float)
    gamma = np.flatnonzero(np.all(np.abs(qpoints - np.round(qpoints)) < 1e-8, axis=1))
    keep = np.ones_like(freqs, dtype=bool)
    for iq in gamma:
        keep[iq, np.argsort(freqs[iq])[:3]] = False
    rest = freqs[keep]
    if rest.size == 0:
        return 0, float("nan")
    return int(np.sum(rest < -tolerance_THz)), float(rest.min())


__all__ = ["IMAGINARY_TOLERANCE_THZ", "HeatCapacityResult", "count_imaginary", "heat_capacity", "make_phonopy"]
