"""Named protocol presets: ``"mofsimbench"`` (the default) and ``"fast"`` (screening).

A calculation's keyword left at ``None`` takes its value from the protocol; an explicit
keyword always wins. Values follow MOFSimBench (Kraß, Huang, Moosavi, npj Comput. Mater. 2025).
"""

from __future__ import annotations

import copy
from typing import Any

DEFAULT_PROTOCOL = "mofsimbench"

PROTOCOLS: dict[str, dict[str, dict[str, Any]]] = {
    "mofsimbench": {
        "single_point": {},
        "relax": {"fmax": 1e-3, "max_steps": 5000, "optimizer": "LBFGS", "relax_cell": True},
        "bulk_modulus": {
            "strain": 0.04, "n_points": 11, "eos": "birchmurnaghan", "relax_first": True,
            "fmax": 1e-3, "relax_max_steps": 1000, "relax_optimizer": "LBFGS",
            "fixed_cell_optimizer": "FIRE", "fixed_cell_max_steps": 1000,
        },
        "heat_capacity": {
            "supercell": (1, 1, 1), "displacement": 0.01, "mesh": 100, "t_min": 0.0, "t_max": 1000.0,
            "t_step": 10.0, "relax_first": True, "fmax": 1e-3, "relax_max_steps": 5000,
            "relax_optimizer": "BFGS",
        },
        "stability": {
            "temperature_K": 300.0, "timestep_fs": 1.0, "nvt_steps": 1000, "npt_steps": 50_000,
            "pressure_bar": 1.0, "friction_per_fs": 0.01, "tdamp_fs": 100.0, "pdamp_fs": 1000.0,
            "ensemble": "npt", "interval": 100, "seed": 0, "relax_first": True, "fmax": 1e-3,
            "relax_max_steps": 1000,
        },
        "interaction_energy": {},
    },
}
PROTOCOLS["fast"] = copy.deepcopy(PROTOCOLS["mofsimbench"])
PROTOCOLS["fast"]["relax"].update(fmax=0.05, max_steps=500)
PROTOCOLS["fast"]["bulk_modulus"].update(fmax=0.05, relax_max_steps=300, fixed_cell_max_steps=300, n_points=7)
PROTOCOLS["fast"]["heat_capacity"].update(fmax=0.05, relax_max_steps=500, mesh=30)
PROTOCOLS["fast"]["stability"].update(fmax=0.05, relax_max_steps=300, nvt_steps=200, npt_steps=2000,
                                      interval=20)


def protocol_names() -> list[str]:
    return sorted(PROTOCOLS)


def resolve(prop: str, protocol: str | None, **given: Any) -> tuple[str, dict[str, Any]]:
    """Merge explicit keywords (``None`` = unset) over the protocol's defaults for ``prop``.

    Returns:
        ``(protocol_name, parameters)``.
    """
    name = (protocol or DEFAULT_PROTOCOL).lower()
    if name not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(protocol_names())}, got {protocol!r}")
    params = dict(PROTOCOLS[name][prop])
    params.update({k: v for k, v in given.items() if v is not None})
    return name, params
