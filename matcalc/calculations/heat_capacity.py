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
import warnings as pywarnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from ase import Atoms

from matcalc import progress
from matcalc.calculations.contract import Either, ModelInfo, Number, Param, PreRelax, Property, Run, Vector
from matcalc.calculations.results import PreRelaxedResult
from matcalc.structures import bare_copy, mass_g_per_mol

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from phonopy import Phonopy

IMAGINARY_TOLERANCE_THZ = 0.1
"""A mesh mode counts as imaginary below −this frequency (THz). Float32 models with 0.01 Å
displacements break the acoustic sum rule by up to a few 0.1 THz at Γ (those three modes are
excluded); a genuinely unstable branch sits far lower (CHGNet on RSM0010 relaxed to fmax 0.05:
down to −4.4 THz, and the count barely changes between 0.01 and 0.1 THz: 6844 vs 6826 modes)."""
GAMMA_ACOUSTIC_WARN_THZ = 1.0
"""The three acoustic modes at Γ farther than this from zero (THz) get a result warning: the force constants
then break translational invariance by more than the float32 noise above (phonopy warns from 0.1 THz, which
CHGNet's float32 forces reach on well-relaxed MOFs; the modes are left out of the thermal sums either way)."""
REFERENCE_TEMPERATURE_K = 300.0
GAS_CONSTANT_J_PER_K_MOL = 8.314462618

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class HeatCapacityResult(PreRelaxedResult):
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


MAX_SUPERCELL_ATOMS = 3000
"""Largest phonon supercell (atoms): phonopy's full force constants take 72 bytes per atom pair."""
MAX_MESH_MODES = 50_000_000
"""Largest q-point mesh, counted as q-points × bands (3 per atom of the cell): ~400 MB of frequencies."""
MAX_TEMPERATURES = 100_001
"""Largest number of temperatures ((t_max − t_min) / t_step + 1)."""


def check_temperatures(params: dict[str, Any]) -> None:
    """``t_max >= t_min`` and at most `MAX_TEMPERATURES` temperatures."""
    if params["t_max"] < params["t_min"]:
        raise ValueError(f"t_max must be >= t_min ({params['t_min']} K), got {params['t_max']!r}")
    n = (params["t_max"] - params["t_min"]) / params["t_step"] + 1
    if n > MAX_TEMPERATURES:
        raise ValueError(f"t_step: {n:.0f} temperatures from t_min to t_max exceed the limit {MAX_TEMPERATURES}; "
                         "use a larger t_step")


def mesh_numbers(atoms: Atoms, mesh: float | Sequence[int]) -> list[int]:
    """The q-point mesh phonopy uses for ``atoms`` (length-based: phonopy's own ``length2mesh``)."""
    if isinstance(mesh, (int, float)):
        from phonopy.phonon.grid import length2mesh

        return [int(n) for n in length2mesh(float(mesh), np.asarray(atoms.cell))]
    return [int(n) for n in mesh]


def check_phonon_size(params: dict[str, Any], atoms: Atoms, model: ModelInfo | None = None) -> None:
    """Refuse a supercell or q-point mesh too large to compute, before any model call."""
    n_super = len(atoms) * int(np.prod(params["supercell"]))
    if n_super > MAX_SUPERCELL_ATOMS:
        raise ValueError(f"supercell {tuple(params['supercell'])} of {len(atoms)} atoms has {n_super} atoms "
                         f"(limit {MAX_SUPERCELL_ATOMS})")
    numbers = mesh_numbers(atoms, params["mesh"])
    modes = int(np.prod(numbers)) * 3 * len(atoms)
    if modes > MAX_MESH_MODES:
        raise ValueError(f"mesh {params['mesh']!r} gives a {numbers[0]}x{numbers[1]}x{numbers[2]} q-point mesh with "
                         f"{modes:.3g} modes (q-points × {3 * len(atoms)} bands; limit {MAX_MESH_MODES:.3g})")


def phonon_params(*, mesh_default: float = 100.0, mesh_fast: float = 30.0) -> tuple[Param, ...]:
    """The finite-displacement phonon parameters (supercell, displacement, q-point mesh, temperatures)."""
    return (
        Param("supercell", Vector(Number(1, 20, integer=True)), "diagonal supercell multiples of the displacements",
              default=(1, 1, 1)),
        Param("displacement", Number(0.0, 0.5, lo_open=True), "finite displacement", default=0.01, unit="Å"),
        Param("mesh", Either(Number(1.0, 1000.0), Vector(Number(1, 1000, integer=True)),
                             "a length (Å, 1–1000: phonopy's length-based mesh) or 3 integers 1–1000"),
              "q-point mesh: phonopy's mesh density (a length) or an explicit mesh", default=mesh_default,
              presets={"fast": mesh_fast}),
        Param("t_min", Number(0.0, 10_000.0), "lowest temperature", default=0.0, unit="K"),
        Param("t_max", Number(0.0, 10_000.0), "highest temperature (>= t_min)", default=1000.0, unit="K"),
        Param("t_step", Number(0.0, 10_000.0, lo_open=True), "temperature step", default=10.0, unit="K"),
    )


def _compute(run: Run) -> dict[str, Any]:
    p = run.params
    relaxed = bare_copy(run.atoms)

    phonon = make_phonopy(relaxed, p["supercell"])
    supercells = displaced_supercells(phonon, p["displacement"])
    progress.report("phonons", 0, len(supercells))
    evaluations = run.prep.evaluator.evaluate(supercells)
    progress.report("phonons", len(supercells), len(supercells))
    max_drift = set_forces(phonon, [e.forces_eV_per_A for e in evaluations])
    return {**thermal_fields(phonon, relaxed, p, run.warnings), "n_displacements": len(supercells),
            "max_drift_eV_per_A": max_drift}


def displaced_supercells(phonon: Phonopy, distance_A: float) -> list[Atoms]:
    """phonopy's displaced supercells of ``phonon`` (displacement ``distance_A`` Å), as ASE Atoms."""
    phonon.generate_displacements(distance=distance_A)
    return [to_ase(s) for s in phonon.supercells_with_displacements or []]


def set_forces(phonon: Phonopy, forces: Sequence[np.ndarray], *, symmetrize: bool = False) -> float:
    """Give ``phonon`` the forces (eV/Å) of its displaced supercells and produce its force constants.

    The mean force of each supercell (drift) is subtracted first; ``symmetrize`` applies phonopy's
    ``symmetrize_force_constants`` (translational and permutation symmetry). Returns the largest
    |drift| (eV/Å).
    """
    f = np.array(forces, dtype=float)
    drift = f.mean(axis=1, keepdims=True)
    f -= drift
    max_drift = float(np.linalg.norm(drift, axis=2).max()) if len(f) else 0.0
    phonon.forces = f
    phonon.produce_force_constants()
    if symmetrize:
        phonon.symmetrize_force_constants(show_drift=False)
    return max_drift


def thermal_fields(phonon: Phonopy, atoms: Atoms, params: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """The harmonic thermal fields of `HeatCapacityResult` from ``phonon`` with force constants:
    q-point mesh ``params["mesh"]``, temperatures ``t_min``..``t_max`` step ``t_step`` (K), the imaginary-mode
    count (a warning appended to ``warnings``), Cv per mole of ``atoms`` and per gram. Leaves the mesh on
    ``phonon`` (``phonon.mesh``) for further use (DOS)."""
    from phonopy.phonon.thermal_properties import GammaAcousticWarning

    p = params
    qmesh = phonon.run_mesh(p["mesh"])
    with pywarnings.catch_warnings():  # Γ's acoustic modes: reported below when they tell something
        pywarnings.filterwarnings("ignore", category=GammaAcousticWarning)
        phonon.run_thermal_properties(t_min=p["t_min"], t_max=p["t_max"], t_step=p["t_step"],
                                      exclude_gamma_acoustic=True)
    thermal = phonon.thermal_properties

    frequencies = np.asarray(qmesh.frequencies)
    acoustic = gamma_acoustic_THz(np.asarray(qmesh.qpoints), frequencies)
    if acoustic.size:
        log.debug("acoustic modes at Γ: %s THz", ", ".join(f"{f:.3g}" for f in acoustic))
    if acoustic.size and np.abs(acoustic).max() > GAMMA_ACOUSTIC_WARN_THZ:
        warnings.append("the three acoustic modes at Γ are at " + ", ".join(f"{f:.2f}" for f in acoustic)
                        + f" THz instead of 0 (more than {GAMMA_ACOUSTIC_WARN_THZ:g} THz off): the force constants "
                        "break translational invariance (residual forces of a structure not at a minimum, or a "
                        "noisy model); those modes are left out of the thermal properties, but the low-frequency "
                        "branches near Γ are suspect")
    n_imag, lowest = count_imaginary(np.asarray(qmesh.qpoints), frequencies, IMAGINARY_TOLERANCE_THZ)
    if n_imag:
        warnings.append(f"{n_imag} imaginary mode(s) of {frequencies.size} on the q-point mesh (lowest "
                        f"{lowest:.3f} THz, tolerance −{IMAGINARY_TOLERANCE_THZ} THz, Γ acoustic modes "
                        "excluded): the structure is not at a minimum of the model; imaginary modes are left "
                        "out of the thermal properties")

    temperatures = np.asarray(thermal.temperatures, dtype=float)
    cv_mol = np.asarray(thermal.heat_capacity, dtype=float)
    molar_mass = mass_g_per_mol(atoms)
    if temperatures[0] <= REFERENCE_TEMPERATURE_K <= temperatures[-1]:
        cv300_mol = float(np.interp(REFERENCE_TEMPERATURE_K, temperatures, cv_mol))
    else:
        cv300_mol = float("nan")
        warnings.append(f"300 K lies outside the temperature range {temperatures[0]:g}–{temperatures[-1]:g} K: "
                        "cv_300K_J_per_K_g is NaN")
    return {
        "cv_300K_J_per_K_g": cv300_mol / molar_mass,
        "cv_300K_J_per_K_mol": cv300_mol,
        "molar_mass_g_per_mol": molar_mass,
        "imaginary_modes": n_imag,
        "mesh_modes": int(frequencies.size),
        "lowest_frequency_THz": lowest,
        "imaginary_tolerance_THz": IMAGINARY_TOLERANCE_THZ,
        "mesh_numbers": [int(n) for n in qmesh.mesh_numbers],
        "temperatures_K": temperatures,
        "cv_J_per_K_mol": cv_mol,
        "cv_J_per_K_g": cv_mol / molar_mass,
        "entropy_J_per_K_mol": np.asarray(thermal.entropy, dtype=float),
        "free_energy_kJ_per_mol": np.asarray(thermal.free_energy, dtype=float),
    }


PROPERTY = Property(
    name="heat_capacity",
    task_type="heat-capacity",
    summary="Harmonic heat capacity, entropy and free energy of `structure` with `model` (phonopy).",
    details="""Pre-relax (BFGS + `FrechetCellFilter`), then phonopy's finite displacements of the input cell
    (`primitive_matrix="P"`), every displaced supercell evaluated in one batched request, force constants,
    a q-point mesh and the harmonic thermal properties (per mole of the input cell and per gram).""",
    result=HeatCapacityResult,
    params=phonon_params(),
    prerelax=PreRelax(max_steps=1000, fast_max_steps=300, optimizer="BFGS"),  # MOFSimBench: at most 1000 steps
    compute=_compute,
    check=check_temperatures,
    check_structure=check_phonon_size,
)
heat_capacity = PROPERTY.function


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


def gamma_acoustic_THz(qpoints: np.ndarray, frequencies: np.ndarray) -> np.ndarray:
    """The three acoustic frequencies at Γ (THz; the three of smallest magnitude, as phonopy picks them), empty
    when the mesh has no Γ point."""
    gamma = np.flatnonzero(np.all(np.abs(qpoints - np.round(qpoints)) < 1e-8, axis=1))
    if not gamma.size:
        return np.zeros(0)
    at_gamma = np.asarray(frequencies, dtype=float)[gamma[0]]
    return np.sort(at_gamma[np.argsort(np.abs(at_gamma))[:3]])


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


__all__ = ["GAMMA_ACOUSTIC_WARN_THZ", "IMAGINARY_TOLERANCE_THZ", "PROPERTY", "HeatCapacityResult", "check_phonon_size",
           "check_temperatures", "count_imaginary", "displaced_supercells", "gamma_acoustic_THz", "heat_capacity",
           "make_phonopy", "mesh_numbers", "phonon_params", "set_forces", "thermal_fields", "to_ase"]
