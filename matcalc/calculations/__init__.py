"""One module per property; each declares its parameters once (`matcalc.calculations.contract`) and
exposes one function returning a typed result dataclass.

Adding a property is one module (a `Property` named ``PROPERTY``
and the function it makes) plus one line in `PROPERTIES`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from matcalc.calculations.protocols import protocol_names
from matcalc.calculations.relax import RelaxResult, relax
from matcalc.calculations.results import Result, result_types, results_frame
from matcalc.calculations.single_point import SinglePointResult, single_point

if TYPE_CHECKING:
    from matcalc.calculations.contract import Property

PROPERTIES: dict[str, tuple[str, str, str]] = {
    "single_point": ("matcalc.calculations.single_point", "single_point", "SinglePointResult"),
    "relax": ("matcalc.calculations.relax", "relax", "RelaxResult"),
    "bulk_modulus": ("matcalc.calculations.bulk_modulus", "bulk_modulus", "BulkModulusResult"),
    "heat_capacity": ("matcalc.calculations.heat_capacity", "heat_capacity", "HeatCapacityResult"),
    "stability": ("matcalc.calculations.stability", "stability", "StabilityResult"),
    "interaction_energy": ("matcalc.calculations.interaction", "interaction_energy", "InteractionEnergyResult"),
    "henry_coefficient": ("matcalc.calculations.henry", "henry_coefficient", "HenryResult"),
    "binding_sites": ("matcalc.calculations.binding_sites", "binding_sites", "BindingSitesResult"),
    "elastic_tensor": ("matcalc.calculations.elastic", "elastic_tensor", "ElasticTensorResult"),
    "phonons": ("matcalc.calculations.phonons", "phonons", "PhononResult"),
    "thermal_expansion": ("matcalc.calculations.thermal_expansion", "thermal_expansion", "ThermalExpansionResult"),
}
"""The registry: property name -> (module, function, result class). Modules import lazily."""


def properties() -> dict[str, Property[Any]]:
    """Every property's declaration, by property name (imports the property modules)."""
    return {name: importlib.import_module(module).PROPERTY for name, (module, _, _) in PROPERTIES.items()}


def task_types() -> dict[str, str]:
    """REST task type (``POST /tasks/{type}``, e.g. ``bulk-modulus``) -> property name."""
    return {spec.task_type: name for name, spec in properties().items()}


def get_property(name: str) -> Property[Any]:
    """The declaration of a property by name (``bulk_modulus``) or task type (``bulk-modulus``, ``optimization``)."""
    key = str(name).strip().lower()
    specs = properties()
    types = {spec.task_type: spec for spec in specs.values()}
    found = specs.get(key.replace("-", "_")) or types.get(key) or types.get(key.replace("_", "-"))
    if found is None:
        raise ValueError(f"unknown property {name!r}; one of {', '.join(specs)}")
    return found


def property_function(name: str) -> Any:
    """The calculation function of property ``name`` (e.g. ``"bulk_modulus"`` or ``"bulk-modulus"``)."""
    return get_property(name).function


def load_all() -> None:
    """Import every property module (registers all result kinds for ``Result.from_dict``)."""
    properties()


def __getattr__(name: str) -> Any:
    if name == "TASK_TYPES":
        return task_types()
    if name == "PROTOCOLS":
        from matcalc.calculations.protocols import presets

        return presets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PROPERTIES",
    "RelaxResult",
    "Result",
    "SinglePointResult",
    "get_property",
    "load_all",
    "properties",
    "property_function",
    "protocol_names",
    "relax",
    "result_types",
    "results_frame",
    "single_point",
    "task_types",
]
