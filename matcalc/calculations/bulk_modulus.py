"""Bulk modulus from an energy–volume curve (MOFSimBench protocol).

Pre-relax (LBFGS + ``FrechetCellFilter``), then ``n_points`` volumes evenly spaced from
(1 − strain)·V₀ to (1 + strain)·V₀ (cell scaled by s^(1/3), fractional positions kept), atomic
positions relaxed at fixed cell (FIRE), and an ``ase.eos.EquationOfState`` fit.
"""

from __future__ import annotations

import logging
import warnings as pywarnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from ase import Atoms
from ase.eos import EquationOfState
from ase.units import GPa

from matcalc.calculations import checks, protocols
from matcalc.calculations.common import Prepared, map_threads, prepare
from matcalc.calculations.optimize import check_optimizer_params, optimize
from matcalc.calculations.results import Result
from matcalc.models import Potential

if TYPE_CHECKING:
    from matplotlib.axes import Axes

log = logging.getLogger(__name__)

EOS_TYPES = ("birchmurnaghan", "murnaghan", "vinet", "sj")
"""Equations of state accepted by :func:`bulk_modulus` (names as in ``ase.eos``)."""
MAX_MINIMUM_OFFSET = 0.01
"""Warn when the fitted minimum volume lies further than this fraction from the relaxed volume."""


@dataclass(kw_only=True)
class BulkModulusResult(Result):
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
    relax_converged: bool | None = None
    """Pre-relaxation converged (``None`` when it was skipped)."""
    relax_steps: int = 0
    points_converged: int = 0
    """Number of fixed-cell relaxations that reached ``fmax``."""
    volumes_A3: np.ndarray = field(repr=False)
    energies_eV: np.ndarray = field(repr=False)
    eos_parameters: list[float] = field(default_factory=list, repr=False)
    """Raw ``ase.eos`` parameters (ASE units: eV, Å³, eV/Å³), for redrawing the fitted curve."""

    @property
    def fit_residual(self) -> float:
        """Alias of :attr:`fit_residual_eV` (the issue's name)."""
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


def check_eos_params(strain: Any, n_points: Any, eos: Any, fmax: Any) -> tuple[float, int, str]:
    strain = checks.in_range("strain", strain, 0.0, 0.5, lo_open=True, hi_open=True)
    n_points = checks.integer("n_points", n_points, minimum=5)
    eos = checks.choice("eos", eos, EOS_TYPES)
    checks.positive("fmax", fmax)
    return strain, n_points, eos


def bulk_modulus(
    structure: Any,
    model: str | Potential = "chgnet",
    *,
    strain: float | None = None,
    n_points: int | None = None,
    eos: str | None = None,
    relax_first: bool | None = None,
    fmax: float | None = None,
    relax_max_steps: int | None = None,
    relax_optimizer: str | None = None,
    fixed_cell_max_steps: int | None = None,
    fixed_cell_optimizer: str | None = None,
    protocol: str | None = None,
    device: str | None = None,
) -> BulkModulusResult:
    """Bulk modulus of ``structure`` with ``model`` from an E(V) fit.

    Args:
        structure: anything :func:`matcalc.load_structure` reads.
        model: model name (``"chgnet"``, ``"emt"``, ``"chgnet+d3"``...) or a loaded Potential.
        strain: volume strain range: volumes from (1 − strain)·V₀ to (1 + strain)·V₀; in (0, 0.5);
            default 0.04.
        n_points: number of volumes (>= 5); default 11 (``"fast"``: 7).
        eos: ``birchmurnaghan`` (default), ``murnaghan``, ``vinet`` or ``sj``.
        relax_first: relax positions and cell before straining (default True); V₀ is then the
            relaxed volume, otherwise the input volume.
        fmax: force threshold (eV/Å) of the pre-relaxation and of every fixed-cell relaxation;
            default 1e-3 (``"fast"``: 0.05).
        relax_max_steps: step limit of the pre-relaxation; default 1000.
        relax_optimizer: optimizer of the pre-relaxation; default ``LBFGS``.
        fixed_cell_max_steps: step limit of each fixed-cell relaxation; default 1000.
        fixed_cell_optimizer: optimizer of the fixed-cell relaxations; default ``FIRE``.
        protocol: ``"mofsimbench"`` (default) or ``"fast"``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default: a GPU if torch sees one.
    """
    name, params = protocols.resolve(
        "bulk_modulus", protocol, strain=strain, n_points=n_points, eos=eos, relax_first=relax_first, fmax=fmax,
        relax_max_steps=relax_max_steps, relax_optimizer=relax_optimizer,
        fixed_cell_max_steps=fixed_cell_max_steps, fixed_cell_optimizer=fixed_cell_optimizer)
    params["strain"], params["n_points"], params["eos"] = check_eos_params(
        params["strain"], params["n_points"], params["eos"], params["fmax"])
    params["relax_optimizer"] = check_optimizer_params(params["fmax"], params["relax_max_steps"],
                                                       params["relax_optimizer"])
    params["fixed_cell_optimizer"] = check_optimizer_params(params["fmax"], params["fixed_cell_max_steps"],
                                                            params["fixed_cell_optimizer"])
    params["relax_first"] = bool(params["relax_first"])
    prep = prepare(structure, model, device)
    warnings: list[str] = []

    relax_converged: bool | None = None
    relax_steps = 0
    atoms = prep.atoms
    if params["relax_first"]:
        trace = optimize(atoms, prep.calculator(), fmax=params["fmax"], max_steps=params["relax_max_steps"],
                         optimizer=params["relax_optimizer"], relax_cell=True, stage="relax")
        relax_converged, relax_steps = trace.converged, trace.steps
        if (w := trace.warning("pre-relaxation", params["fmax"])) is not None:
            warnings.append(w)
    reference = atoms.copy()
    reference.calc = None
    reference.set_constraint()
    v_ref = float(reference.get_volume())

    factors = np.linspace(1.0 - params["strain"], 1.0 + params["strain"], params["n_points"])
    points = map_threads(lambda item: _relax_strained(prep, reference, item[0], item[1], params),
                         list(enumerate(factors)))
    volumes = np.array([p[0] for p in points])
    energies = np.array([p[1] for p in points])
    unconverged = [i for i, p in enumerate(points) if not p[2]]
    if unconverged:
        warnings.append(f"{len(unconverged)} of {len(points)} fixed-cell relaxations did not reach fmax "
                        f"{params['fmax']} eV/Å (points {unconverged})")

    fit = fit_eos(volumes, energies, params["eos"])
    warnings += fit.messages
    offset = 100.0 * (fit.v0 - v_ref) / v_ref
    if np.isfinite(offset) and abs(offset) > 100.0 * MAX_MINIMUM_OFFSET:
        warnings.append(f"fitted minimum V0 = {fit.v0:.4g} Å³ lies {offset:+.2f}% from the "
                        f"{'relaxed' if params['relax_first'] else 'input'} volume {v_ref:.4g} Å³ "
                        f"(> {100 * MAX_MINIMUM_OFFSET:.0f}%): the E(V) curve is not centred on its minimum")
    for w in warnings:
        log.warning("bulk_modulus %s: %s", prep.label or prep.structure_hash[:8], w)

    return BulkModulusResult(
        **prep.common(name, params, warnings),
        bulk_modulus_GPa=fit.b_GPa,
        pressure_derivative=fit.b_prime,
        equilibrium_volume_A3=fit.v0,
        equilibrium_energy_eV=fit.e0,
        fit_residual_eV=fit.residual_eV,
        eos=params["eos"],
        relaxed_volume_A3=v_ref,
        minimum_offset_percent=float(offset),
        relax_converged=relax_converged,
        relax_steps=relax_steps,
        points_converged=len(points) - len(unconverged),
        volumes_A3=volumes,
        energies_eV=energies,
        eos_parameters=fit.parameters,
    )


def _relax_strained(prep: Prepared, reference: Atoms, index: int, factor: float,
                    params: dict[str, Any]) -> tuple[float, float, bool]:
    """Scale ``reference``'s volume by ``factor``, relax positions at fixed cell: (V Å³, E eV, converged)."""
    atoms = reference.copy()
    atoms.set_cell(reference.cell * factor ** (1.0 / 3.0), scale_atoms=True)
    trace = optimize(atoms, prep.calculator(), fmax=params["fmax"], max_steps=params["fixed_cell_max_steps"],
                     optimizer=params["fixed_cell_optimizer"], relax_cell=False,
                     stage=f"eos {index + 1}/{params['n_points']}")
    return float(atoms.get_volume()), float(atoms.get_potential_energy()), trace.converged


__all__ = ["EOS_TYPES", "BulkModulusResult", "bulk_modulus", "eos_energy", "fit_eos"]
