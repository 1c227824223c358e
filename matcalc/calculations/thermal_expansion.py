"""Thermal expansion in the quasi-harmonic approximation (phonopy's QHA).

Pre-relax (BFGS + ``FrechetCellFilter``), then ``n_volumes`` cells evenly spaced in volume between
``volume_range`` × V₀ (cell scaled by s^(1/3), fractional positions kept), atomic positions relaxed at each
fixed cell (all volumes stepped together: `matcalc.calculations.optimize.optimize_many`), phonopy's
finite displacements at every volume, and **all displaced supercells of all volumes (and the relaxed cells
themselves, for E(V)) in one batched request**. ``phonopy.run_qha`` then fits F(V; T) = E(V) + F_ph(V; T)
(+ pV) to an equation of state at each temperature.

Conventions (documented choices):

* Per input cell (phonopy's unit and primitive cell, ``primitive_matrix="P"``, as ``heat_capacity``):
  volumes Å³ of the input cell, energies eV per input cell, Cp per mole of the input cell and per gram.
* Phonon thermal properties as ``heat_capacity`` computes them: the three Γ acoustic modes are left out
  (``exclude_gamma_acoustic``), imaginary modes are left out of the sums and warned about per volume.
* ``volumetric_expansion_per_K`` is phonopy's β = (1/V) dV/dT by central differences (0 at the first
  temperature); ``cp`` is phonopy's polynomial-fit C_P; the thermal properties are computed at one extra
  temperature (t_max + t_step) that the finite differences consume, so the result spans t_min..t_max.
* V(T) outside the sampled volumes is an extrapolation of the EOS: warned about, and
  ``max_temperature_in_range_K`` says up to where the result is an interpolation.
"""

from __future__ import annotations

import warnings as pywarnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from ase import Atoms

from matcalc import progress
from matcalc.calculations.contract import Choice, Number, Param, PreRelax, Property, Run, Vector
from matcalc.calculations.heat_capacity import (
    IMAGINARY_TOLERANCE_THZ,
    REFERENCE_TEMPERATURE_K,
    check_phonon_size,
    check_temperatures,
    count_imaginary,
    displaced_supercells,
    make_phonopy,
    phonon_params,
    set_forces,
)
from matcalc.calculations.optimize import fixed_cell_params, optimize_many
from matcalc.calculations.results import PreRelaxedResult
from matcalc.structures import bare_copy, mass_g_per_mol

if TYPE_CHECKING:
    from matplotlib.axes import Axes

QHA_EOS = ("vinet", "birch_murnaghan", "murnaghan")
"""Equations of state of phonopy's QHA."""


@dataclass(kw_only=True)
class ThermalExpansionResult(PreRelaxedResult):
    """Quasi-harmonic thermodynamics at constant pressure. Temperatures K, volumes Å³ (input cell), energies
    eV per input cell, bulk modulus GPa, expansion 1/K, Cp J/(K·mol) per mole of the input cell and J/(K·g)."""

    kind: ClassVar[str] = "thermal_expansion"

    temperatures_K: np.ndarray = field(repr=False)
    volume_A3: np.ndarray = field(repr=False)
    """Equilibrium volume V(T) (Å³, input cell)."""
    volumetric_expansion_per_K: np.ndarray = field(repr=False)
    """β(T) = (1/V) dV/dT (1/K; 0 at the first temperature)."""
    bulk_modulus_GPa: np.ndarray = field(repr=False)
    """Isothermal bulk modulus B(T) of the EOS fitted at each temperature (GPa)."""
    cp_J_per_K_mol: np.ndarray = field(repr=False)
    """C_P(T) per mole of the input cell (phonopy's polynomial fit; 0 at the first temperature)."""
    cp_J_per_K_g: np.ndarray = field(repr=False)
    gibbs_free_energy_eV: np.ndarray = field(repr=False)
    """G(T) at the pressure (eV per input cell)."""
    gruneisen_parameter: np.ndarray = field(repr=False)
    """Thermodynamic Grüneisen parameter γ(T) = β B V / C_V (dimensionless)."""
    volume_300K_A3: float
    """V at 300 K (linear interpolation); NaN when 300 K is outside the temperatures."""
    volumetric_expansion_300K_per_K: float
    bulk_modulus_300K_GPa: float
    max_temperature_in_range_K: float
    """Highest temperature up to which V(T) stays inside the sampled volumes (beyond: EOS extrapolation)."""
    pressure_GPa: float
    eos: str
    relaxed_volume_A3: float
    """Volume after the pre-relaxation (V₀; the input volume when ``relax_first=False``)."""
    molar_mass_g_per_mol: float
    n_displacements: int
    """Displaced supercells over all volumes (all evaluated in one batched request)."""
    volumes_A3: np.ndarray = field(repr=False)
    """The sampled volumes (Å³)."""
    electronic_energies_eV: np.ndarray = field(repr=False)
    """Static energy E(V) of each relaxed volume (eV per input cell)."""
    helmholtz_free_energy_eV: np.ndarray = field(repr=False)
    """F(V; T) = E(V) + F_ph(V; T) (+ pV), shape (temperatures, volumes), eV per input cell."""
    imaginary_modes: list[int] = field(default_factory=list)
    """Imaginary modes on each volume's q-point mesh (Γ acoustic modes excluded)."""
    lowest_frequency_THz: list[float] = field(default_factory=list)
    """Lowest mesh frequency at each volume (THz, negative = imaginary)."""
    volumes_converged: int = 0
    """Fixed-cell relaxations that reached ``fmax``."""

    @property
    def linear_expansion_per_K(self) -> np.ndarray:
        """β/3 (1/K): the linear expansion coefficient of an isotropic (cubic) crystal."""
        return self.volumetric_expansion_per_K / 3.0

    def _plot(self, ax: Axes) -> None:
        ax.plot(self.temperatures_K, self.volume_A3, "-", color="C0", label="V(T)")
        for v in (self.volumes_A3.min(), self.volumes_A3.max()):
            ax.axhline(v, color="0.7", ls=":", lw=0.8)
        ax.set_xlabel("temperature (K)")
        ax.set_ylabel("volume (Å³)", color="C0")
        twin = ax.twinx()
        twin.plot(self.temperatures_K, self.volumetric_expansion_per_K * 1e6, "-", color="C3", label="β(T)")
        twin.set_ylabel("volumetric expansion β (10⁻⁶/K)", color="C3")
        twin.set_xlabel(ax.get_xlabel())  # the twin shares the temperature axis
        ax.set_title(f"{self.formula} ({self.model}), QHA at {self.pressure_GPa:g} GPa")


def volume_factors(volume_range: tuple[float, float], n_volumes: int) -> np.ndarray:
    """The volume scale factors: ``n_volumes`` evenly spaced from ``volume_range[0]`` to ``volume_range[1]``."""
    return np.linspace(volume_range[0], volume_range[1], n_volumes)


def qha_temperatures(t_min: float, t_max: float, t_step: float) -> np.ndarray:
    """t_min..t_max step t_step (K), plus the one extra point the QHA's finite differences consume."""
    n = round((t_max - t_min) / t_step)
    return t_min + t_step * np.arange(n + 2)


def _check(params: dict[str, Any]) -> None:
    check_temperatures(params)
    if params["t_max"] < params["t_min"] + params["t_step"]:
        raise ValueError(f"t_max must be at least t_min + t_step ({params['t_min'] + params['t_step']:g} K) for "
                         f"thermal expansion, got {params['t_max']!r}")
    lo, hi = params["volume_range"]
    if not lo < 1.0 < hi:
        raise ValueError(f"volume_range must bracket the relaxed volume: smallest < 1 < largest, got {(lo, hi)!r}")


def _scaled(reference: Atoms, factor: float) -> Atoms:
    atoms = reference.copy()
    atoms.set_cell(reference.cell * factor ** (1.0 / 3.0), scale_atoms=True)
    return atoms


def _compute(run: Run) -> dict[str, Any]:
    from phonopy import run_qha
    from phonopy.physical_units import get_physical_units

    p = run.params
    reference = bare_copy(run.atoms)
    v_ref = float(reference.get_volume())
    factors = volume_factors(p["volume_range"], p["n_volumes"])
    cells = [_scaled(reference, f) for f in factors]

    traces = optimize_many(cells, run.prep.evaluator, fmax=p["fmax"], max_steps=p["fixed_cell_max_steps"],
                           optimizer=p["fixed_cell_optimizer"], relax_cell=False,
                           stage=[f"volume {i + 1}/{len(cells)}" for i in range(len(cells))])
    unconverged = [i for i, t in enumerate(traces) if not t.converged]
    if unconverged:
        run.warnings.append(f"{len(unconverged)} of {len(cells)} fixed-cell relaxations did not reach fmax "
                            f"{p['fmax']} eV/Å (volumes {unconverged})")
    for atoms in cells:
        atoms.calc = None

    phonons = [make_phonopy(atoms, p["supercell"]) for atoms in cells]
    supercells = [displaced_supercells(ph, p["displacement"]) for ph in phonons]
    request = list(cells) + [s for group in supercells for s in group]
    progress.report("phonons", 0, len(request))
    evaluations = run.prep.evaluator.evaluate(request)  # every volume's displacements in one batched request
    progress.report("phonons", len(request), len(request))
    energies = np.array([e.energy_eV for e in evaluations[: len(cells)]], dtype=float)
    start = len(cells)
    for ph, group in zip(phonons, supercells, strict=True):
        set_forces(ph, [e.forces_eV_per_A for e in evaluations[start:start + len(group)]])
        start += len(group)

    temperatures = qha_temperatures(p["t_min"], p["t_max"], p["t_step"])
    with pywarnings.catch_warnings(record=True) as caught:
        pywarnings.simplefilter("always")
        qha = run_qha(phonons, temperatures, internal_energies=energies, mesh=p["mesh"],
                      pressure=p["pressure_GPa"], eos=p["eos"], exclude_gamma_acoustic=True)
    for w in caught:
        text = str(w.message)
        if "EOS fitting failed" in text:
            run.warnings.append(f"phonopy QHA: {text}")
    progress.report("qha", 1, 1)

    imaginary, lowest = [], []
    for i, (ph, atoms) in enumerate(zip(phonons, cells, strict=True)):
        n, lo = count_imaginary(np.asarray(ph.mesh.qpoints), np.asarray(ph.mesh.frequencies), IMAGINARY_TOLERANCE_THZ)
        imaginary.append(n)
        lowest.append(lo)
        if n:
            run.warnings.append(f"volume {i + 1} of {len(cells)} ({atoms.get_volume():.4g} Å³, {factors[i]:.4g} V₀): "
                                f"{n} imaginary mode(s) on the q-point mesh (lowest {lo:.3f} THz), left out of its "
                                "free energy")

    units = get_physical_units()
    t = np.asarray(qha.temperatures, dtype=float)
    volume = np.asarray(qha.equilibrium_volumes, dtype=float)
    beta = np.asarray(qha.thermal_expansion, dtype=float)
    bulk = np.asarray(qha.bulk_moduli, dtype=float) * units.EVAngstromToGPa
    cp_mol = np.asarray(qha.heat_capacity_P.heat_capacities, dtype=float) * units.EvTokJmol * 1000.0
    molar_mass = mass_g_per_mol(reference)
    expected = qha_temperatures(p["t_min"], p["t_max"], p["t_step"])[:-1]
    if len(t) != len(expected):
        run.warnings.append(f"phonopy QHA kept {len(t)} of {len(expected)} temperatures (EOS fits failed at the "
                            "others): derivatives there are over uneven steps")

    v_min, v_max = float(np.min(qha.volumes)), float(np.max(qha.volumes))
    outside = np.flatnonzero((volume < v_min) | (volume > v_max))
    t_in = float(t[-1]) if outside.size == 0 else (float(t[outside[0] - 1]) if outside[0] > 0 else float("nan"))
    if outside.size:
        run.warnings.append(f"the free-energy minimum leaves the sampled volumes {v_min:.4g}–{v_max:.4g} Å³ at "
                            f"{t[outside[0]]:g} K (V = {volume[outside[0]]:.4g} Å³): beyond {t_in:g} K V(T) is an "
                            "extrapolation of the EOS; widen volume_range")

    def at_300(values: np.ndarray) -> float:
        if len(t) and t[0] <= REFERENCE_TEMPERATURE_K <= t[-1]:
            return float(np.interp(REFERENCE_TEMPERATURE_K, t, values))
        return float("nan")

    return {
        "temperatures_K": t,
        "volume_A3": volume,
        "volumetric_expansion_per_K": beta,
        "bulk_modulus_GPa": bulk,
        "cp_J_per_K_mol": cp_mol,
        "cp_J_per_K_g": cp_mol / molar_mass,
        "gibbs_free_energy_eV": np.asarray(qha.gibbs_free_energies, dtype=float),
        "gruneisen_parameter": np.asarray(qha.gruneisen_parameters, dtype=float),
        "volume_300K_A3": at_300(volume),
        "volumetric_expansion_300K_per_K": at_300(beta),
        "bulk_modulus_300K_GPa": at_300(bulk),
        "max_temperature_in_range_K": t_in,
        "pressure_GPa": float(p["pressure_GPa"]),
        "eos": p["eos"],
        "relaxed_volume_A3": v_ref,
        "molar_mass_g_per_mol": molar_mass,
        "n_displacements": len(request) - len(cells),
        "volumes_A3": np.asarray(qha.volumes, dtype=float),
        "electronic_energies_eV": energies,
        "helmholtz_free_energy_eV": np.asarray(qha.helmholtz_volume, dtype=float),
        "imaginary_modes": imaginary,
        "lowest_frequency_THz": lowest,
        "volumes_converged": len(cells) - len(unconverged),
    }


PROPERTY = Property(
    name="thermal_expansion",
    task_type="thermal-expansion",
    summary="Thermal expansion, V(T), B(T), Cp(T) and G(T) of `structure` with `model` in the quasi-harmonic "
            "approximation (phonopy QHA).",
    details="""Pre-relax (BFGS + `FrechetCellFilter`), then `n_volumes` volumes evenly spaced over
    `volume_range` × V₀ (cell scaled by s^(1/3)), atomic positions relaxed at each fixed cell (FIRE, all volumes
    stepped together), phonopy's finite displacements at every volume, all displaced supercells of all volumes
    evaluated in one batched request, and `phonopy.run_qha` (F(V; T) fitted to an EOS at each temperature).
    Per input cell (`primitive_matrix="P"`), Γ acoustic modes excluded, as `heat_capacity`.""",
    result=ThermalExpansionResult,
    params=phonon_params(mesh_default=100.0, mesh_fast=30.0) + (
        Param("n_volumes", Number(5, 51, integer=True), "number of volumes (phonon calculations)", default=11,
              presets={"fast": 7}),
        Param("volume_range", Vector(Number(0.5, 2.0), length=2),
              "(smallest, largest) volume as fractions of the relaxed volume V₀", default=(0.95, 1.05)),
        Param("eos", Choice(QHA_EOS), "equation of state fitted to F(V) at each temperature", default="vinet"),
        Param("pressure_GPa", Number(-50.0, 500.0), "pressure (adds pV to the free energy)", default=0.0,
              unit="GPa"),
        *fixed_cell_params("fixed-volume"),
    ),
    prerelax=PreRelax(max_steps=1000, fast_max_steps=300, optimizer="BFGS",  # as heat_capacity (MOFSimBench)
                      fmax_doc="force threshold of the pre-relaxation and of every fixed-volume relaxation"),
    compute=_compute,
    check=_check,
    check_structure=check_phonon_size,
)
thermal_expansion = PROPERTY.function


__all__ = ["PROPERTY", "QHA_EOS", "ThermalExpansionResult", "qha_temperatures", "thermal_expansion",
           "volume_factors"]
