"""matcalc: materials properties with universal machine-learning interatomic potentials.

>>> import matcalc as mc
>>> r = mc.relax("CALF-20", model="chgnet")      # doctest: +SKIP
>>> r.final_volume_A3, r.converged                # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from matcalc.calculations import PROPERTIES, Result, results_frame
from matcalc.calculations.relax import RelaxResult, relax
from matcalc.calculations.single_point import SinglePointResult, single_point
from matcalc.models import (
    ModelUnavailableError,
    Potential,
    UnknownModelError,
    get_model,
    list_models,
    register_model,
)
from matcalc.structures import StructureError, list_builtins, load_structure, structure_hash
from matcalc.version import DISTRIBUTION as __distribution__
from matcalc.version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

# Everything else is imported on first use (keeps `import matcalc` light).
_LAZY: dict[str, tuple[str, str | None]] = {
    name: (module, attr) for name, (module, attr, _) in PROPERTIES.items()
}
_LAZY.update({cls: (module, cls) for module, _, cls in PROPERTIES.values()})
_LAZY.update({
    "bench": ("matcalc.bench", None),
    "cluster": ("matcalc.cluster", None),
    "widgets": ("matcalc.widgets", None),
    "client": ("matcalc.client", None),
    "batching": ("matcalc.batching", None),
    "progress": ("matcalc.progress", None),
    "relax_many": ("matcalc.calculations.many", "relax_many"),
    "map_property": ("matcalc.calculations.many", "map_property"),
    "many_frame": ("matcalc.calculations.many", "many_frame"),
    "register_model_file": ("matcalc.models.custom", "register_model_file"),
    "validate_potential": ("matcalc.models.validation", "validate_potential"),
})


def _notebook_progress() -> None:
    """In a Jupyter kernel, single calls show a progress line under the cell (matcalc.widgets.call)."""
    import sys

    if "ipykernel" in sys.modules:  # cheap test first: nothing is imported in scripts, workers or servers
        from matcalc.widgets.call import install

        install()


_notebook_progress()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        value = mod if attr is None else getattr(mod, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'matcalc' has no attribute {name!r}")


__all__ = [
    "ModelUnavailableError",
    "Potential",
    "RelaxResult",
    "Result",
    "SinglePointResult",
    "StructureError",
    "UnknownModelError",
    "__distribution__",
    "__version__",
    "get_model",
    "list_builtins",
    "list_models",
    "load_structure",
    "register_model",
    "relax",
    "results_frame",
    "single_point",
    "structure_hash",
    *sorted(_LAZY),
]
