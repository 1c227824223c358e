"""One module per property; each exposes one function returning a typed result dataclass."""

from __future__ import annotations

import importlib
from typing import Any

from matcalc.calculations.protocols import PROTOCOLS, protocol_names
from matcalc.calculations.relax import RelaxResult, relax
from matcalc.calculations.results import Result, result_types, results_frame
from matcalc.calculations.single_point import SinglePointResult, single_point

# property name -> (module, function, result class); modules import lazily
PROPERTIES: dict[str, tuple[str, str, str]] = {
    "single_point": ("matcalc.calculations.single_point", "single_point", "SinglePointResult"),
    "relax": ("matcalc.calculations.relax", "relax", "RelaxResult"),
    "bulk_modulus": ("matcalc.calculations.bulk_modulus", "bulk_modulus", "BulkModulusResult"),
    "heat_capacity": ("matcalc.calculations.heat_capacity", "heat_capacity", "HeatCapacityResult"),
    "stability": ("matcalc.calculations.stability", "stability", "StabilityResult"),
    "interaction_energy": ("matcalc.calculations.interaction", "interaction_energy", "InteractionEnergyResult"),
}

TASK_TYPES: dict[str, str] = {
    "optimization": "relax",
    "single-point": "single_point",
    "bulk-modulus": "bulk_modulus",
    "heat-capacity": "heat_capacity",
    "stability": "stability",
    "interaction-energy": "interaction_energy",
}
"""Task type of the REST API and the client (``POST /tasks/{type}``) -> property name in :data:`PROPERTIES`."""


def property_function(name: str) -> Any:
    """The calculation function of property ``name`` (e.g. ``"bulk_modulus"``)."""
    key = name.replace("-", "_").lower()
    if key == "optimization":
        key = "relax"
    if key not in PROPERTIES:
        raise ValueError(f"unknown property {name!r}; one of {', '.join(PROPERTIES)}")
    module, func, _ = PROPERTIES[key]
    return getattr(importlib.import_module(module), func)


def load_all() -> None:
    """Import every property module (registers all result kinds for ``Result.from_dict``)."""
    for module, _, _ in PROPERTIES.values():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


__all__ = [
    "PROPERTIES",
    "PROTOCOLS",
    "RelaxResult",
    "Result",
    "SinglePointResult",
    "load_all",
    "property_function",
    "protocol_names",
    "relax",
    "result_types",
    "results_frame",
    "single_point",
]
