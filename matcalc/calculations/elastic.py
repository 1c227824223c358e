"""Elastic tensor from stress–strain fits of strained cells with relaxed atomic positions.

Pre-relax (LBFGS + ``FrechetCellFilter``: positions and cell, so the reference carries ~no stress), then
for each of the six Voigt strain components ``n_strains`` cells strained from −``strain_max`` to
+``strain_max`` (half compressive, half tensile, evenly spaced; the unstrained cell is the extra point of
every fit). Each strained cell is the reference deformed by the symmetric deformation gradient
F = I + ε (fractional positions kept), its atomic positions relaxed at fixed cell (``relax_strained``:
the relaxed-ion tensor MOFs need), all cells of the structure stepped together through the batching
engine (`matcalc.calculations.optimize.optimize_many`), then one batched request for their stresses.

Conventions (documented choices):

* Voigt order xx, yy, zz, yz, xz, xy (ASE's and pymatgen's); shear strains are engineering strains
  (ε₄ = 2ε_yz), so C is the usual Voigt stiffness matrix and σ = C·ε.
* Stress is ASE's sign (positive = tensile), in GPa; C_ij = ∂σ_i/∂ε_j is the slope of a straight-line
  fit (with intercept: a residual stress of the reference only shifts the line).
* The fitted matrix is symmetrised, C = (C_fit + C_fitᵀ)/2; ``asymmetry_GPa`` = max |C_fit − C_fitᵀ|/2
  tells how far the fit was from symmetric (noise, non-linearity, an unrelaxed reference).
* Voigt–Reuss–Hill averages (Hill 1952; the tests check them against pymatgen's ``ElasticTensor``);
  Young's modulus E = 9KG/(3K + G) and Poisson's ratio ν = (3K − 2G)/(6K + 2G) from the VRH K and G.
* Born stability: every eigenvalue of the (symmetrised) 6×6 Voigt matrix > 0, i.e. C positive definite
  (the sign pattern is the same as that of the tensor's Mandel form, so the criterion is exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from ase import Atoms

from matcalc import progress
from matcalc.calculations.contract import Flag, Number, Param, PreRelax, Property, Run
from matcalc.calculations.optimize import fixed_cell_params, optimize_many
from matcalc.calculations.results import PreRelaxedResult
from matcalc.models.base import EV_PER_A3_TO_GPA
from matcalc.structures import bare_copy

if TYPE_CHECKING:
    from matplotlib.axes import Axes

VOIGT_LABELS = ("xx", "yy", "zz", "yz", "xz", "xy")
"""Voigt order of strains and stresses."""
MIN_R2 = 0.99
"""Warn when a significant component's straight-line fit has R² below this (non-linear response)."""
SIGNIFICANT = 0.01
"""A component counts for the fit-quality check when |C_ij| >= this fraction of max |C|."""


@dataclass(kw_only=True)
class ElasticTensorResult(PreRelaxedResult):
    """Elastic stiffness from stress–strain fits. Moduli GPa, compliance 1/GPa, strains dimensionless
    (Voigt order xx yy zz yz xz xy, engineering shear strains), stresses GPa (positive = tensile)."""

    kind: ClassVar[str] = "elastic_tensor"

    C_GPa: np.ndarray = field(repr=False)
    """6×6 Voigt stiffness matrix (symmetrised fit), GPa."""
    compliance_per_GPa: np.ndarray = field(repr=False)
    """S = C⁻¹ (1/GPa); NaN when C is singular."""
    bulk_modulus_vrh_GPa: float
    shear_modulus_vrh_GPa: float
    youngs_modulus_GPa: float
    """E = 9KG/(3K + G) from the VRH K and G."""
    poisson_ratio: float
    """ν = (3K − 2G)/(6K + 2G) from the VRH K and G (dimensionless)."""
    bulk_modulus_voigt_GPa: float
    bulk_modulus_reuss_GPa: float
    shear_modulus_voigt_GPa: float
    shear_modulus_reuss_GPa: float
    eigenvalues_GPa: np.ndarray = field(repr=False)
    """Eigenvalues of the 6×6 Voigt matrix C, ascending (GPa)."""
    mechanically_stable: bool
    """Born criterion: every eigenvalue of C > 0."""
    fit_r2: np.ndarray = field(repr=False)
    """R² of each straight-line fit σ_i(ε_j), laid out like C ([i, j]); NaN where σ_i does not vary."""
    fit_rms_GPa: np.ndarray = field(repr=False)
    """Root-mean-square deviation of each fit from its points (GPa), laid out like C."""
    min_fit_r2: float
    """Lowest R² over the significant components (|C_ij| ≥ 1 % of max |C|)."""
    asymmetry_GPa: float
    """max |C_fit − C_fitᵀ| / 2 of the unsymmetrised fit (GPa)."""
    residual_stress_GPa: np.ndarray = field(repr=False)
    """Stress of the unstrained reference (Voigt, GPa)."""
    strain_values: np.ndarray = field(repr=False)
    """The strains applied to each Voigt component, 0 (the reference) included, ascending."""
    stresses_GPa: np.ndarray = field(repr=False)
    """Stress (Voigt, GPa) for strain component j at each strain value: shape (6, len(strain_values), 6)."""
    n_strained_cells: int = 0
    """Strained cells computed (6 × n_strains, plus the reference)."""
    cells_converged: int = 0
    """Fixed-cell relaxations that reached ``fmax`` (all cells when ``relax_strained=False``)."""

    def fitted_stress_GPa(self, component: int, strains: np.ndarray) -> np.ndarray:
        """Stresses (n, 6; GPa) of the fitted lines for strain ``component`` (0–5) at ``strains``."""
        e = np.asarray(strains, dtype=float)
        sigma = self.stresses_GPa[component]
        fit = np.polyfit(self.strain_values, sigma, 1)
        return np.outer(e, fit[0]) + fit[1]

    def _plot(self, ax: Axes) -> None:
        e = np.linspace(self.strain_values.min(), self.strain_values.max(), 50)
        for j in range(6):
            color = f"C{j}"
            ax.plot(self.strain_values * 100, self.stresses_GPa[j][:, j], "o", color=color, ms=4)
            ax.plot(e * 100, self.fitted_stress_GPa(j, e)[:, j], "-", color=color, lw=1,
                    label=f"σ{VOIGT_LABELS[j]}(ε{VOIGT_LABELS[j]}): C{j + 1}{j + 1} = {self.C_GPa[j, j]:.3g} GPa")
        ax.axhline(0.0, color="0.7", lw=0.8)
        ax.set_xlabel("strain ε_j (%; shear: engineering strain)")
        ax.set_ylabel("stress σ_j (GPa, positive = tensile)")
        ax.set_title(f"{self.formula} ({self.model}): K = {self.bulk_modulus_vrh_GPa:.3g} GPa, "
                     f"G = {self.shear_modulus_vrh_GPa:.3g} GPa (VRH)")
        ax.legend(fontsize="x-small")


def voigt_strain_matrix(voigt: np.ndarray) -> np.ndarray:
    """The symmetric 3×3 strain tensor of a Voigt strain (xx yy zz yz xz xy, engineering shear)."""
    e = np.asarray(voigt, dtype=float)
    return np.array([[e[0], e[5] / 2, e[4] / 2],
                     [e[5] / 2, e[1], e[3] / 2],
                     [e[4] / 2, e[3] / 2, e[2]]])


def strained(reference: Atoms, voigt: np.ndarray) -> Atoms:
    """``reference`` deformed by F = I + ε (ε from the Voigt strain ``voigt``), fractional positions kept."""
    atoms = reference.copy()
    deformation = np.eye(3) + voigt_strain_matrix(voigt)
    atoms.set_cell(np.asarray(reference.cell) @ deformation.T, scale_atoms=True)
    return atoms


def strain_values(strain_max: float, n_strains: int) -> np.ndarray:
    """``n_strains`` strains evenly spaced from −``strain_max`` to +``strain_max`` without 0, and 0: sorted."""
    half = n_strains // 2
    steps = strain_max * np.arange(1, half + 1) / half
    return np.concatenate([-steps[::-1], [0.0], steps])


@dataclass
class ElasticFit:
    """The straight-line fits of one stress–strain data set (see `fit_elastic`)."""

    C_fit_GPa: np.ndarray
    r2: np.ndarray
    rms_GPa: np.ndarray


def fit_elastic(strains: np.ndarray, stresses_GPa: np.ndarray) -> ElasticFit:
    """Slopes C[i, j] = ∂σ_i/∂ε_j of straight lines (with intercept) through ``stresses_GPa[j]`` (n, 6)
    against ``strains`` (n), with R² and RMS residual of each line."""
    x = np.asarray(strains, dtype=float)
    c = np.zeros((6, 6))
    r2 = np.full((6, 6), np.nan)
    rms = np.zeros((6, 6))
    for j in range(6):
        y = np.asarray(stresses_GPa[j], dtype=float)
        slope, intercept = np.polyfit(x, y, 1)
        c[:, j] = slope
        residual = y - (np.outer(x, slope) + intercept)
        ss_res = (residual**2).sum(axis=0)
        ss_tot = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
        rms[:, j] = np.sqrt(ss_res / len(x))
        ok = ss_tot > 0
        r2[ok, j] = 1.0 - ss_res[ok] / ss_tot[ok]
    return ElasticFit(c, r2, rms)


def moduli(C_GPa: np.ndarray, S_per_GPa: np.ndarray) -> dict[str, float]:
    """Voigt, Reuss and Hill bulk and shear moduli (GPa) of the Voigt stiffness ``C_GPa`` and its compliance
    ``S_per_GPa``, Young's modulus and Poisson's ratio from the Hill K and G; NaN where undefined.

    Voigt: K = [ΣC_ii + 2ΣC_ij]/9, G = [ΣC_ii − ΣC_ij + 3ΣC_kk]/15; Reuss: K = 1/[ΣS_ii + 2ΣS_ij],
    G = 15/[4ΣS_ii − 4ΣS_ij + 3ΣS_kk] (i, j = 1–3, i < j; k = 4–6): Hill (1952).
    """
    c, s = np.asarray(C_GPa, dtype=float), np.asarray(S_per_GPa, dtype=float)
    d = [(0, 0), (1, 1), (2, 2)]
    o = [(0, 1), (1, 2), (0, 2)]
    sh = [(3, 3), (4, 4), (5, 5)]

    def total(m: np.ndarray, idx: list[tuple[int, int]]) -> float:
        return float(sum(m[i, j] for i, j in idx))

    with np.errstate(all="ignore"):
        kv = (total(c, d) + 2 * total(c, o)) / 9
        gv = (total(c, d) - total(c, o) + 3 * total(c, sh)) / 15
        kr = float(np.float64(1.0) / (total(s, d) + 2 * total(s, o)))
        gr = float(np.float64(15.0) / (4 * total(s, d) - 4 * total(s, o) + 3 * total(s, sh)))
        k, g = (kv + kr) / 2, (gv + gr) / 2
        e = float(np.float64(9 * k * g) / (3 * k + g))
        nu = float(np.float64(3 * k - 2 * g) / (6 * k + 2 * g))
    return {"bulk_modulus_voigt_GPa": kv, "shear_modulus_voigt_GPa": gv, "bulk_modulus_reuss_GPa": kr,
            "shear_modulus_reuss_GPa": gr, "bulk_modulus_vrh_GPa": k, "shear_modulus_vrh_GPa": g,
            "youngs_modulus_GPa": e, "poisson_ratio": nu}


def _compute(run: Run) -> dict[str, Any]:
    p = run.params
    reference = bare_copy(run.atoms)

    values = strain_values(p["strain_max"], p["n_strains"])
    nonzero = [k for k, e in enumerate(values) if e != 0.0]
    cells = [reference.copy()]  # index 0: the unstrained reference (relaxed with the others)
    where: list[tuple[int, int]] = []
    for j in range(6):
        for k in nonzero:
            voigt = np.zeros(6)
            voigt[j] = values[k]
            cells.append(strained(reference, voigt))
            where.append((j, k))

    converged = len(cells)
    if p["relax_strained"]:
        traces = optimize_many(cells, run.prep.evaluator, fmax=p["fmax"], max_steps=p["fixed_cell_max_steps"],
                               optimizer=p["fixed_cell_optimizer"], relax_cell=False,
                               stage=[f"strained cell {i + 1}/{len(cells)}" for i in range(len(cells))])
        unconverged = [i for i, t in enumerate(traces) if not t.converged]
        converged -= len(unconverged)
        if unconverged:
            run.warnings.append(f"{len(unconverged)} of {len(cells)} fixed-cell relaxations did not reach fmax "
                                f"{p['fmax']} eV/Å (cells {unconverged}; 0 = the unstrained reference)")
    for atoms in cells:
        atoms.calc = None
    progress.report("stresses", 0, len(cells))
    evaluations = run.prep.evaluator.evaluate(cells)
    progress.report("stresses", len(cells), len(cells))
    if any(e.stress_eV_per_A3 is None for e in evaluations):
        raise ValueError(f"model {run.prep.potential.name!r} gives no stress: the elastic tensor needs one")
    stress = np.array([e.stress_eV_per_A3 for e in evaluations], dtype=float) * EV_PER_A3_TO_GPA

    i0 = int(np.flatnonzero(values == 0.0)[0])
    stresses = np.zeros((6, len(values), 6))
    stresses[:, i0, :] = stress[0]
    for n, (j, k) in enumerate(where, start=1):
        stresses[j, k, :] = stress[n]

    fit = fit_elastic(values, stresses)
    c_sym = (fit.C_fit_GPa + fit.C_fit_GPa.T) / 2
    asymmetry = float(np.abs(fit.C_fit_GPa - fit.C_fit_GPa.T).max() / 2)
    eigenvalues = np.linalg.eigvalsh(c_sym)
    try:
        compliance = np.linalg.inv(c_sym)
    except np.linalg.LinAlgError:
        compliance = np.full((6, 6), np.nan)
        run.warnings.append("the elastic tensor is singular: no compliance, Reuss and Hill averages")
    significant = np.abs(c_sym) >= SIGNIFICANT * np.abs(c_sym).max() if np.abs(c_sym).max() > 0 else np.zeros((6, 6), bool)
    r2_sig = fit.r2[significant & np.isfinite(fit.r2)]
    min_r2 = float(r2_sig.min()) if r2_sig.size else float("nan")
    if np.isfinite(min_r2) and min_r2 < MIN_R2:
        worst = np.unravel_index(np.nanargmin(np.where(significant, fit.r2, np.nan)), (6, 6))
        run.warnings.append(f"stress–strain fit of C{worst[0] + 1}{worst[1] + 1} has R² = {min_r2:.4f} < {MIN_R2}: "
                            "the response is not linear over ±strain_max (use a smaller strain_max, or tighter fmax)")
    stable = bool(np.all(eigenvalues > 0))
    if not stable:
        run.warnings.append(f"mechanically unstable (Born): lowest eigenvalue of C is {eigenvalues[0]:.4g} GPa")
    residual = float(np.abs(stress[0]).max())
    tolerance = 0.05 * max(float(np.abs(c_sym).max()), 1e-12) * p["strain_max"]
    if residual > tolerance:
        run.warnings.append(f"the unstrained reference carries a stress of up to {residual:.3g} GPa (> 5 % of the "
                            "largest stress change the strains make): is the cell relaxed?")
    return {
        "C_GPa": c_sym,
        "compliance_per_GPa": compliance,
        **moduli(c_sym, compliance),
        "eigenvalues_GPa": eigenvalues,
        "mechanically_stable": stable,
        "fit_r2": fit.r2,
        "fit_rms_GPa": fit.rms_GPa,
        "min_fit_r2": min_r2,
        "asymmetry_GPa": asymmetry,
        "residual_stress_GPa": stress[0],
        "strain_values": values,
        "stresses_GPa": stresses,
        "n_strained_cells": len(cells),
        "cells_converged": converged,
    }


def _check(params: dict[str, Any]) -> None:
    if params["n_strains"] % 2:
        raise ValueError(f"n_strains must be even (half compressive, half tensile), got {params['n_strains']}")


PROPERTY = Property(
    name="elastic_tensor",
    task_type="elastic-tensor",
    summary="Elastic tensor (6×6 Voigt, GPa), VRH moduli and Born stability of `structure` with `model`.",
    details="""Pre-relax (LBFGS + `FrechetCellFilter`), then for each of the six Voigt strain components
    `n_strains` cells strained evenly from −strain_max to +strain_max (F = I + ε, engineering shear strains),
    atomic positions relaxed at each fixed cell (`relax_strained`, FIRE; all cells stepped together), and
    straight-line fits of the stresses (positive = tensile): C_ij = ∂σ_i/∂ε_j, symmetrised. VRH averages
    (Hill); Born stability: every eigenvalue of C > 0.""",
    result=ElasticTensorResult,
    params=(
        Param("strain_max", Number(0.0, 0.1, lo_open=True, hi_open=True),
              "largest strain magnitude of each Voigt component (engineering strain for shear)", default=0.01),
        Param("n_strains", Number(2, 20, integer=True),
              "strained cells per component (even: half compressive, half tensile)", default=4,
              presets={"fast": 2}),
        Param("relax_strained", Flag(), "relax atomic positions in every strained cell (relaxed-ion tensor)",
              default=True),
        *fixed_cell_params("strained-cell"),
    ),
    prerelax=PreRelax(max_steps=1000, fast_max_steps=300,
                      fmax_doc="force threshold of the pre-relaxation and of every strained-cell relaxation"),
    compute=_compute,
    check=_check,
)
elastic_tensor = PROPERTY.function


__all__ = ["PROPERTY", "VOIGT_LABELS", "ElasticTensorResult", "elastic_tensor", "fit_elastic", "moduli", "strain_values",
           "strained", "voigt_strain_matrix"]
