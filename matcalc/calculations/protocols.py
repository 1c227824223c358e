"""Named protocol presets: ``"mofsimbench"`` (the default) and ``"fast"`` (screening).

A calculation's keyword left at ``None`` takes its value from the protocol; an explicit keyword always
wins. The values are declared once, in each property's parameter table (`matcalc.calculations.contract`);
`presets` (and ``PROTOCOLS``) is derived from those tables. ``"mofsimbench"`` follows MOFSimBench
(Kraß, Huang, Moosavi, npj Comput. Mater. 2025).
"""

from __future__ import annotations

from typing import Any

from matcalc.calculations.contract import DEFAULT_PROTOCOL, PROTOCOL_NAMES, check_protocol


def presets() -> dict[str, dict[str, dict[str, Any]]]:
    """``{protocol: {property: {parameter: value}}}``, derived from every property's declaration."""
    from matcalc.calculations import properties

    specs = properties()
    return {proto: {name: spec.defaults(proto) for name, spec in specs.items()} for proto in PROTOCOL_NAMES}


def protocol_names() -> list[str]:
    """The protocol names, sorted."""
    return sorted(PROTOCOL_NAMES)


def __getattr__(name: str) -> Any:
    if name == "PROTOCOLS":  # read-only view, derived on access
        return presets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_PROTOCOL", "PROTOCOL_NAMES", "check_protocol", "presets", "protocol_names"]
