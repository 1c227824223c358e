"""Bulk modulus from an energy–volume curve (MOFSimBench protocol).

Pre-relax (LBFGS + ``FrechetCellFilter``), then ``n_points`` volumes evenly spaced from
(1 − strain)·V₀ to (1 + strain)·V₀ (cell scaled by s^(1/3), fractional positions kept), atomic
positions relaxed at fixed cell (FIRE), and an ``ase.eos.EquationOfState`` fit.
"""

from __future__ import annotations

import warnings as pywarnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from ase.eos import EquationOfState
from ase.units import GPa

from matcalc.calculations.contract import Choice, Number, Param, PreRelax, Property, Run
from matcalc.calculations.optimize import fixed_cell_params, optimize_many
from matcalc.calculations.results import PreRelaxedResult
from matcalc.structures import bare_copy

if TYPE_CHECKING:
    from matplotlib.axes import Axes

EOS_TYPES = ("birchmurnaghan", "murnaghan", "vinet", "sj")
"""Equations of state accepted by `bulk_modulus` (names as in ``ase.eos``)."""
MAX_MINIMUM_OFFSET = 0.01
"""Warn when the fitted minimum volume lies further than this fraction from the relaxed volume."""


@dataclass(kw_only=True)
class BulkModulusResult(PreRelaxedResult):
    """Equation-of-state fit. Energies eV, volumes Å³, bulk modulus GPa.

    Fit quantities are NaN only when the fit failed, and then ``warnings`` says why.
    """

    kind: ClassVar[str] = "bulk_modulus"

    bulk_modulus_GPa: float
    pressure_derivative: float
    """B′ = dB/dP at V₀ (dimensionless)."""
    equilibrium_volume_A3: float
    """V₀ of the fitted EOS."""
    equilibrium_energy_eV: float
    fit_residual_eV: float
    """Root-mean-square deviation of the fitted E(V) from the computed energies."""
    eos: str
    relaxed_volume_A3: float
    """Volume after the pre-relaxation (the input volume when ``relax_first=False``): the strain centre."""
    minimum_offset_percent: float
    """100·(V₀(fit) − relaxed volume) / relaxed volume."""
    points_converged: int = 0
    """Number of fixed-cell relaxations that reached ``fmax``."""
    volumes_A3: np.ndarray = field(repr=False)
    energies_eV: np.ndarray = field(repr=False)
    eos_parameters: list[float] = field(default_factory=list, repr=False)
    """Raw ``ase.eos`` parameters (ASE units: eV, Å³, eV/Å³), for redrawing the fitted curve."""

    @property
    def fit_residual(self) -> float:
        """Alias of `fit_residual_eV` (the issue's name)."""
        return self.fit_residual_eV

    @property
    def fit_ok(self) -> bool:
        return bool(np.isfinite(self.bulk_modulus_GPa))

    def fitted_energies(self, volumes: np.ndarray) -> np.ndarray:
        """Energy (eV) of the fitted EOS at ``volumes`` (Å³); NaN when the fit failed."""
        v = np.asarray(volumes, dtype=float)
        if not self.eos_parameters:
            return np.full_like(v, np.nan)
        return eos_energy(self.eos, self.eos_parameters, v)

    def _plot(self, ax: Axes) -> None:
        ax.plot(self.volumes_A3, self.energies_eV, "o", label="computed")
        if self.eos_parameters:
            v = np.linspace(self.volumes_A3.min(), self.volumes_A3.max(), 200)
            ax.plot(v, self.fitted_energies(v), "-", label=f"{self.eos} fit")
        ax.axvline(self.relaxed_volume_A3, color="0.6", ls=":", lw=1, label="relaxed volume")
        ax.set_xlabel("volume (Å³)")
        ax.set_ylabel("energy (eV)")
        ax.set_title(f"{self.formula} ({self.model}): B = {self.bulk_modulus_GPa:.2f} GPa, B′ = "
                     f"{self.pressure_derivative:.2f}")
        ax.legend(fontsize="small")


def eos_energy(eos: str, parameters: list[float] | np.ndarray, volumes: np.ndarray) -> np.ndarray:
    """E(V) (eV) of the ``ase.eos`` form ``eos`` with its fitted ``parameters``.

    For ``sj`` the parameters are the cubic's coefficients in t = V^(-1/3) (highest power first);
    for the others (E₀, B₀, B′, V₀) in eV, eV/Å³, 1, Å³.
    """
    v = np.asarray(volumes, dtype=float)
    if eos == "sj":
        return np.poly1d(parameters)(v ** (-1.0 / 3.0))
    import ase.eos

    return getattr(ase.eos, eos)(v, *parameters)


def _sj_pressure_derivative(poly: np.poly1d, v0: float) -> float:
    """B′ = dB/dP at V₀ for the SJEOS cubic E(t), t = V^(-1/3).

    With d/dV = −(t⁴/3)·d/dt: P(t) = (t⁴/3)·E′(t) and B(t) = V·E″(V) = (4t⁴E′(t) + t⁵E″(t))/9,
    both polynomials in t, so B′ = (dB/dt)/(dP/dt) exactly.
    """
    t = np.poly1d([1.0, 0.0])
    e1, e2 = poly.deriv(1), poly.deriv(2)
    pressure = (t**4) * e1 / 3.0
    bulk = (4.0 * t**4 * e1 + t**5 * e2) / 9.0
    t0 = v0 ** (-1.0 / 3.0)
    return float(bulk.deriv()(t0) / pressure.deriv()(t0))


@dataclass
class EOSFit:
    """Outcome of one ``ase.eos`` fit (NaN fields and a message when it failed)."""

    v0: float = float("nan")
    e0: float = float("nan")
    b_GPa: float = float("nan")
    b_prime: float = float("nan")
    residual_eV: float = float("nan")
    parameters: list[float] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def fit_eos(volumes: np.ndarray, energies: np.ndarray, eos: str) -> EOSFit:
    """Fit ``eos`` to E(V); never raises: failures come back as NaN and a message."""
    out = EOSFit()
    fitter = EquationOfState(volumes, energies, eos=eos)
    try:
        with pywarnings.catch_warnings(record=True) as caught:
            pywarnings.simplefilter("always")
            v0, e0, b = fitter.fit(warn=True)
        out.messages += [f"EOS fit ({eos}): {w.message}" for w in caught]
        if eos == "sj":
            out.parameters = [float(c) for c in fitter.fit0.coeffs]
            out.b_prime = _sj_pressure_derivative(fitter.fit0, float(v0))
        else:
            out.parameters = [float(p) for p in fitter.eos_parameters]
            out.b_prime = float(fitter.eos_parameters[2])
        out.v0, out.e0, out.b_GPa = float(v0), float(e0), float(b) / GPa
        fitted = eos_energy(eos, out.parameters, volumes)
        out.residual_eV = float(np.sqrt(np.mean((fitted - energies) ** 2)))
    except Exception as exc:  # noqa: BLE001 - scipy/ase raise RuntimeError, ValueError, LinAlgError...
        out.messages.append(f"EOS fit ({eos}) failed: {type(exc).__name__}: {exc}")
        out.v0 = out.e0 = out.b_GPa = out.b_prime = out.residual_eV = float("nan")
        out.parameters = []
        return out
    if not (np.isfinite(out.b_GPa) and out.b_GPa > 0):
        out.messages.append(f"EOS fit ({eos}) gave a non-physical bulk modulus {out.b_GPa:.4g} GPa "
                            "(no energy minimum in the sampled volumes?)")
    return out


def _compute(run: Run) -> dict[str, Any]:
    p = run.params
    reference = bare_copy(run.atoms)
    v_ref = float(reference.get_volume())

    factors = np.linspace(1.0 - p["strain"], 1.0 + p["strain"], p["n_points"])
    strained = []
    for factor in factors:  # scale the volume by factor, then relax positions at fixed cell
        atoms = reference.copy()
        atoms.set_cell(reference.cell * factor ** (1.0 / 3.0), scale_atoms=True)
        strained.append(atoms)
    traces = optimize_many(strained, run.prep.calculator(), fmax=p["fmax"], max_steps=p["fixed_cell_max_steps"],
                           optimizer=p["fixed_cell_optimizer"], relax_cell=False,
                           stage=[f"eos {i + 1}/{p['n_points']}" for i in range(len(factors))])
    points = [(float(a.get_volume()), float(a.get_potential_energy()), t.converged)
              for a, t in zip(strained, traces, strict=True)]
    volumes = np.array([pt[0] for pt in points])
    energies = np.array([pt[1] for pt in points])
    unconverged = [i for i, pt in enumerate(points) if not pt[2]]
    if unconverged:
        run.warnings.append(f"{len(unconverged)} of {len(points)} fixed-cell relaxations did not reach fmax "
                            f"{p['fmax']} eV/Å (points {unconverged})")

    fit = fit_eos(volumes, energies, p["eos"])
    run.warnings.extend(fit.messages)
    offset = 100.0 * (fit.v0 - v_ref) / v_ref
    if np.isfinite(offset) and abs(offset) > 100.0 * MAX_MINIMUM_OFFSET:
        run.warnings.append(f"fitted minimum V0 = {fit.v0:.4g} Å³ lies {offset:+.2f}% from the "
                            f"{'relaxed' if p['relax_first'] else 'input'} volume {v_ref:.4g} Å³ "
                            f"(> {100 * MAX_MINIMUM_OFFSET:.0f}%): the E(V) curve is not centred on its minimum")
    return {
        "bulk_modulus_GPa": fit.b_GPa,
        "pressure_derivative": fit.b_prime,
        "equilibrium_volume_A3": fit.v0,
        "equilibrium_energy_eV": fit.e0,
        "fit_residual_eV": fit.residual_eV,
        "eos": p["eos"],
        "relaxed_volume_A3": v_ref,
        "minimum_offset_percent": float(offset),
        "points_converged": len(points) - len(unconverged),
        "volumes_A3": volumes,
        "energies_eV": energies,
        "eos_parameters": fit.parameters,
    }


PROPERTY = Property(
    name="bulk_modulus",
    task_type="bulk-modulus",
    summary="Bulk modulus of `structure` with `model` from an energy–volume fit (MOFSimBench protocol).",
    details="""Pre-relax (LBFGS + `FrechetCellFilter`), then `n_points` volumes evenly spaced from
    (1 − strain)·V₀ to (1 + strain)·V₀ (the cell scaled by s^(1/3) keeping its shape, fractional positions
    kept), atomic positions relaxed at fixed cell (FIRE), and an `ase.eos.EquationOfState` fit.
    V₀ is the relaxed volume (the input volume when `relax_first=False`).

    The cell *shape* stays fixed at every volume (MOFSimBench's protocol, and the way its DFT E(V) references
    were computed); only the atoms relax. MVL's matcalc `EOSCalc` (0.7) instead also relaxes the cell shape at
    each constant volume (`allow_shape_change=True`), over ±10 % linear strain (0.73–1.33 V₀) at fmax 0.1 eV/Å.
    Letting the shape relax lowers the energy of every strained cell, so on anisotropic frameworks its B is
    lower: 30.6 GPa from `EOSCalc` against 40.6 GPa here was reported for the same MOF cell and model. Compare
    bulk moduli only between runs of the same protocol.""",
    result=BulkModulusResult,
    params=(
        Param("strain", Number(0.0, 0.5, lo_open=True, hi_open=True),
              "volume strain: volumes from (1 − strain)·V₀ to (1 + strain)·V₀", default=0.04),
        Param("n_points", Number(5, 101, integer=True), "number of volumes", default=11, presets={"fast": 7}),
        Param("eos", Choice(EOS_TYPES), "equation of state (`ase.eos` name)", default="birchmurnaghan"),
        *fixed_cell_params("fixed-cell"),
    ),
    prerelax=PreRelax(max_steps=1000, fast_max_steps=300,
                      fmax_doc="force threshold of the pre-relaxation and of every fixed-cell relaxation"),
    compute=_compute,
)
bulk_modulus = PROPERTY.function


__all__ = ["EOS_TYPES", "PROPERTY", "BulkModulusResult", "bulk_modulus", "eos_energy", "fit_eos"]
