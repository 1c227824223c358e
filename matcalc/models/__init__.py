"""Interatomic potentials ("models"): the registry and one adapter per family."""

from matcalc.models.base import (
    EV_PER_A3_TO_GPA,
    ASECalculatorPotential,
    Evaluation,
    Evaluator,
    ModelStats,
    Potential,
    PotentialCalculator,
    SumPotential,
)
from matcalc.models.registry import (
    ModelCard,
    ModelUnavailableError,
    UnknownModelError,
    default_device,
    get_model,
    list_models,
    loaded_models,
    model_card,
    model_names,
    register_model,
    unload_model,
)

__all__ = [
    "EV_PER_A3_TO_GPA",
    "ASECalculatorPotential",
    "Evaluation",
    "Evaluator",
    "ModelCard",
    "ModelStats",
    "ModelUnavailableError",
    "Potential",
    "PotentialCalculator",
    "SumPotential",
    "UnknownModelError",
    "default_device",
    "get_model",
    "list_models",
    "loaded_models",
    "model_card",
    "model_names",
    "register_model",
    "unload_model",
]
