"""MOFSimBench's metrics, from per-structure results and the DFT reference tables shipped in the package.

Every function takes the finished rows of one task (``{"label", "status", "result": Result.to_dict()}``,
as `matcalc.runner` journals them) and returns ``(per-structure table, metrics)``. Reference
names follow MOFSimBench's analysis scripts: the file stem with ``"_primitive"`` removed.

Tables in ``matcalc/data/reference`` (MOFSimBench's own data, see its README there):

* ``dft_optimised_cells.csv``: atom count and volume of the DFT-optimised cells (optimisation).
* ``dft_bulk_modulus.csv``: DFT E(V) points and B₀ (bulk modulus); only MOFs whose DFT fit passed
  MOFSimBench's quality filter are in it.
* ``dft_cv_300k.csv``: DFT Cv at 300 K in J/(K·g) (heat capacity).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd

from matcalc.calculations.interaction import EV_TO_KJ_PER_MOL

STABLE_VOLUME_CHANGE_PERCENT = 10.0
"""|ΔV| at the end of the NPT run up to which a structure counts as stable (MOFSimBench)."""
OPTIMISATION_WITHIN_PERCENT = 10.0
"""Optimisation: the fraction of structures whose volume lies within this of the DFT cell (same window as
the MD criterion)."""


def reference_name(label: str) -> str:
    """The reference-table name of a structure file stem (MOFSimBench: ``"_primitive"`` removed)."""
    return label.replace("_primitive", "")


@cache
def reference_table(name: str) -> pd.DataFrame:
    """One of the shipped reference tables (``dft_optimised_cells``, ``dft_bulk_modulus``, ``dft_cv_300k``)."""
    path = resources.files("matcalc") / "data" / "reference" / f"{name}.csv"
    with resources.as_file(path) as p:
        return pd.read_csv(p)


def _completed(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "COMPLETED" and isinstance(r.get("result"), dict)]


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _mean(values: Sequence[float] | np.ndarray) -> float | None:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()) if arr.size else None


@dataclass
class TaskMetrics:
    """Per-structure table and the task's metrics (JSON-safe: ``None`` where undefined)."""

    table: pd.DataFrame
    metrics: dict[str, Any]


# ---------------------------------------------------------------------------- optimisation
def optimization(rows: Sequence[dict[str, Any]]) -> TaskMetrics:
    """Volume after the cell relaxation vs the DFT-optimised cell, per atom (so a conventional input cell
    compares with a primitive DFT cell): ΔV% = 100·(V/N − V_DFT/N_DFT)/(V_DFT/N_DFT)."""
    ref = reference_table("dft_optimised_cells").set_index("structure")
    out = []
    for r in _completed(rows):
        res = r["result"]
        name = reference_name(r["label"])
        v, n = _num(res.get("final_volume_A3")), int(res["n_atoms"])
        row = {"structure": r["label"], "reference": name, "n_atoms": n, "final_volume_A3": v,
               "converged": res.get("converged"), "steps": res.get("steps"),
               "volume_change_vs_input_percent": _num(res.get("volume_change_percent")),
               "dft_volume_A3": math.nan, "dft_n_atoms": None, "volume_change_vs_dft_percent": math.nan,
               "wall_time_s": _num(res.get("wall_time_s"))}
        if name in ref.index:
            vd, nd = float(ref.at[name, "volume_A3"]), int(ref.at[name, "n_atoms"])
            row.update(dft_volume_A3=vd, dft_n_atoms=nd,
                       volume_change_vs_dft_percent=100.0 * (v / n - vd / nd) / (vd / nd))
        out.append(row)
    table = pd.DataFrame(out, columns=_OPT_COLUMNS)
    dv = table["volume_change_vs_dft_percent"].dropna().to_numpy(dtype=float)
    metrics = {
        "n_compared": int(dv.size),
        "mean_abs_volume_change_vs_dft_percent": _mean(np.abs(dv)),
        "mean_volume_change_vs_dft_percent": _mean(dv),
        "fraction_within_10_percent_of_dft": _mean(np.abs(dv) <= OPTIMISATION_WITHIN_PERCENT),
        "n_converged": int(table["converged"].fillna(False).astype(bool).sum()),
    }
    return TaskMetrics(table, metrics)


_OPT_COLUMNS = ["structure", "reference", "n_atoms", "final_volume_A3", "converged", "steps",
                "volume_change_vs_input_percent", "dft_volume_A3", "dft_n_atoms", "volume_change_vs_dft_percent",
                "wall_time_s"]


# ---------------------------------------------------------------------------- MD stability
def stability(rows: Sequence[dict[str, Any]]) -> TaskMetrics:
    """Volume change of the last NPT frame vs the input cell; stable = no blow-up and |ΔV| <= 10 %.
    A structure whose run failed outright counts as unstable."""
    out = []
    for r in rows:
        res = r.get("result") if r.get("status") == "COMPLETED" else None
        if isinstance(res, dict):
            out.append({"structure": r["label"], "status": "COMPLETED", "n_atoms": int(res["n_atoms"]),
                        "volume_change_percent": _num(res.get("volume_change_percent")),
                        "stable": bool(res.get("stable")), "reason": res.get("reason") or "",
                        "steps_completed": res.get("steps_completed"), "wall_time_s": _num(res.get("wall_time_s"))})
        else:
            out.append({"structure": r["label"], "status": r.get("status"), "n_atoms": None,
                        "volume_change_percent": math.nan, "stable": False,
                        "reason": f"run failed: {r.get('error')}", "steps_completed": None, "wall_time_s": math.nan})
    table = pd.DataFrame(out, columns=["structure", "status", "n_atoms", "volume_change_percent", "stable", "reason",
                                       "steps_completed", "wall_time_s"])
    dv = table["volume_change_percent"].dropna().to_numpy(dtype=float)
    metrics = {
        "n_structures": len(table),
        "stable_fraction": _mean(table["stable"].to_numpy(dtype=bool)),
        "n_stable": int(table["stable"].sum()),
        "mean_abs_volume_change_percent": _mean(np.abs(dv)),
        "n_failed": int((table["status"] != "COMPLETED").sum()),
    }
    return TaskMetrics(table, metrics)


# ---------------------------------------------------------------------------- bulk modulus
def bulk_modulus_exclusion(res: dict[str, Any]) -> str:
    """Why a model's EOS fit is left out of the MAE ("" = kept): the fit failed (no B, as MOFSimBench's
    ``dropna``), B <= 0, or the fitted minimum V₀ lies outside the sampled volumes (the E(V) points have
    no minimum; ASE warns "the minimum volume of your fit is not in your volumes")."""
    b = _num(res.get("bulk_modulus_GPa"))
    if not math.isfinite(b):
        return "fit failed"
    if b <= 0:
        return "non-physical B <= 0"
    volumes = np.asarray(res.get("volumes_A3") or [], dtype=float)
    v0 = _num(res.get("equilibrium_volume_A3"))
    if volumes.size and not (volumes.min() <= v0 <= volumes.max()):
        return "fitted minimum outside the sampled volumes"
    return ""


def bulk_modulus(rows: Sequence[dict[str, Any]]) -> TaskMetrics:
    """B from the model's E(V) fit vs DFT B₀: MAE (GPa) and MAPE (%) over the structures with a DFT
    reference and a good model fit (`bulk_modulus_exclusion`); ``*_all`` keep every finite fit."""
    ref = reference_table("dft_bulk_modulus").set_index("structure")
    out = []
    for r in _completed(rows):
        res = r["result"]
        name = reference_name(r["label"])
        b = _num(res.get("bulk_modulus_GPa"))
        dft = float(ref.at[name, "B0_GPa"]) if name in ref.index else math.nan
        excluded = "no DFT reference" if name not in ref.index else bulk_modulus_exclusion(res)
        out.append({"structure": r["label"], "reference": name, "n_atoms": int(res["n_atoms"]),
                    "bulk_modulus_GPa": b, "dft_bulk_modulus_GPa": dft, "error_GPa": b - dft,
                    "equilibrium_volume_A3": _num(res.get("equilibrium_volume_A3")),
                    "relaxed_volume_A3": _num(res.get("relaxed_volume_A3")), "excluded": excluded,
                    "wall_time_s": _num(res.get("wall_time_s"))})
    table = pd.DataFrame(out, columns=["structure", "reference", "n_atoms", "bulk_modulus_GPa", "dft_bulk_modulus_GPa",
                                       "error_GPa", "equilibrium_volume_A3", "relaxed_volume_A3", "excluded",
                                       "wall_time_s"])
    kept = table[table["excluded"] == ""]
    finite = table[np.isfinite(table["error_GPa"].to_numpy(dtype=float))]
    metrics = {
        "n_compared": len(kept),
        "mae_GPa": _mean(np.abs(kept["error_GPa"])),
        "mape_percent": _mean(100.0 * np.abs(kept["error_GPa"]) / kept["dft_bulk_modulus_GPa"]),
        "n_excluded": int((table["excluded"] != "").sum()),
        "excluded": {s: e for s, e in zip(table["structure"], table["excluded"], strict=True) if e},
        "n_compared_all": len(finite),
        "mae_all_GPa": _mean(np.abs(finite["error_GPa"])),
        "mape_all_percent": _mean(100.0 * np.abs(finite["error_GPa"]) / finite["dft_bulk_modulus_GPa"]),
    }
    return TaskMetrics(table, metrics)


# ---------------------------------------------------------------------------- heat capacity
def heat_capacity(rows: Sequence[dict[str, Any]]) -> TaskMetrics:
    """Cv(300 K) per gram vs the DFT value: MAE in J/(K·g)."""
    ref = reference_table("dft_cv_300k").set_index("cif_name")
    out = []
    for r in _completed(rows):
        res = r["result"]
        name = reference_name(r["label"])
        cv = _num(res.get("cv_300K_J_per_K_g"))
        dft = float(ref.at[name, "cv_300K_JperKperg"]) if name in ref.index else math.nan
        out.append({"structure": r["label"], "reference": name, "n_atoms": int(res["n_atoms"]),
                    "cv_300K_J_per_K_g": cv, "dft_cv_300K_J_per_K_g": dft, "error_J_per_K_g": cv - dft,
                    "imaginary_modes": res.get("imaginary_modes"), "wall_time_s": _num(res.get("wall_time_s"))})
    table = pd.DataFrame(out, columns=["structure", "reference", "n_atoms", "cv_300K_J_per_K_g",
                                       "dft_cv_300K_J_per_K_g", "error_J_per_K_g", "imaginary_modes", "wall_time_s"])
    err = table["error_J_per_K_g"].dropna().to_numpy(dtype=float)
    metrics = {
        "n_compared": int(err.size),
        "mae_J_per_K_g": _mean(np.abs(err)),
        "mape_percent": _mean(100.0 * np.abs(err) / table.loc[table["error_J_per_K_g"].notna(),
                                                               "dft_cv_300K_J_per_K_g"].to_numpy(dtype=float)),
    }
    return TaskMetrics(table, metrics)


# ---------------------------------------------------------------------------- interaction energy
@dataclass(frozen=True)
class GoldDACReference:
    """DFT energies (eV) of one GoldDAC complex, and its DFT forces (eV/Å) when given."""

    total_eV: float
    mof_eV: float
    gas_eV: float
    forces_eV_per_A: np.ndarray | None = None

    @property
    def interaction_eV(self) -> float:
        return self.total_eV - self.mof_eV - self.gas_eV


def golddac_parts(name: str) -> tuple[str, str] | None:
    """``(framework file stem, gas)`` of a complex's name (``"Al-PMOF_CO2_E_N_0.0-3.3"`` ->
    ``("Al-PMOF_CO2", "CO2")``), ``None`` for a framework or a gas (MOFSimBench's naming)."""
    parts = name.split("_")
    if name in ("CO2", "H2O") or len(parts) <= 2:
        return None
    return "_".join(parts[:2]), parts[1]


def interaction_energy(rows: Sequence[dict[str, Any]],
                       references: dict[str, GoldDACReference] | None = None) -> TaskMetrics:
    """E_int = E(complex) − E(framework) − E(gas) from three single points, vs DFT (GoldDAC): MAE in eV and
    kJ/mol; force MAE (eV/Å, per component, on the complex) when the reference has forces."""
    refs = references or {}
    results = {r["label"]: r["result"] for r in _completed(rows)}
    out = []
    for r in rows:
        parts = golddac_parts(r["label"])
        if parts is None:
            continue
        framework, gas = parts
        res, host, guest = results.get(r["label"]), results.get(framework), results.get(gas)
        e_int = math.nan
        if res is not None and host is not None and guest is not None:
            e_int = _num(res["energy_eV"]) - _num(host["energy_eV"]) - _num(guest["energy_eV"])
        ref = refs.get(r["label"])
        force_mae = math.nan
        if ref is not None and ref.forces_eV_per_A is not None and res is not None:
            forces = np.asarray(res["forces_eV_per_A"], dtype=float)
            if forces.shape == ref.forces_eV_per_A.shape:
                force_mae = float(np.mean(np.abs(forces - ref.forces_eV_per_A)))
        dft = ref.interaction_eV if ref is not None else math.nan
        out.append({"structure": r["label"], "framework": framework, "gas": gas,
                    "configuration": r["label"].split("_")[2],
                    "interaction_energy_eV": e_int, "dft_interaction_energy_eV": dft, "error_eV": e_int - dft,
                    "force_mae_eV_per_A": force_mae,
                    "wall_time_s": _num(res.get("wall_time_s")) if res is not None else math.nan})
    table = pd.DataFrame(out, columns=["structure", "framework", "gas", "configuration", "interaction_energy_eV",
                                       "dft_interaction_energy_eV", "error_eV", "force_mae_eV_per_A", "wall_time_s"])
    err = table["error_eV"].dropna().to_numpy(dtype=float)
    fmae = table["force_mae_eV_per_A"].dropna().to_numpy(dtype=float)
    mae = _mean(np.abs(err))
    metrics = {
        "n_compared": int(err.size),
        "mae_eV": mae,
        "mae_kJ_per_mol": None if mae is None else mae * EV_TO_KJ_PER_MOL,
        "force_mae_eV_per_A": _mean(fmae),
        "n_complexes": len(table),
    }
    return TaskMetrics(table, metrics)


__all__ = ["GoldDACReference", "TaskMetrics", "bulk_modulus", "bulk_modulus_exclusion", "golddac_parts",
           "heat_capacity", "interaction_energy", "optimization", "reference_name", "reference_table", "stability"]
