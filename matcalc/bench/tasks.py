"""MOFSimBench's tasks, declared once (no heavy imports: the command line reads them for its help)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """One MOFSimBench task: the property it runs, the structure set it reads, how it is scored."""

    name: str
    prop: str
    """matcalc property function (``relax``, ``stability``...)."""
    structure_set: str
    """Set name in ``structures.yaml`` and folder under ``structures``."""
    headline: str
    """Metric key of the leaderboard line."""
    headline_text: str
    unit: str


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("optimization", "relax", "main_set", "mean_abs_volume_change_vs_dft_percent",
         "mean |ΔV| vs DFT cell", "%"),
    Task("stability", "stability", "main_set", "stable_fraction", "stable fraction (|ΔV| <= 10 %)", ""),
    Task("bulk_modulus", "bulk_modulus", "main_set", "mae_GPa", "B MAE", "GPa"),
    Task("heat_capacity", "heat_capacity", "hcmof", "mae_J_per_K_g", "Cv(300 K) MAE", "J/(K·g)"),
    Task("interaction_energy", "single_point", "golddac", "mae_eV", "E_int MAE", "eV"),
)}
"""The tasks in MOFSimBench's order."""


__all__ = ["TASKS", "Task"]
