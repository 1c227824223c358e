"""Provenance of a result: everything needed to reproduce it months later (filled once, by the property
skeleton `matcalc.calculations.contract.Property.run`, into ``Result.provenance``)."""

from __future__ import annotations

import platform
import socket
from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from matcalc.models.identity import package_version

if TYPE_CHECKING:
    from matcalc.models import Potential

LIBRARIES = ("numpy", "torch", "ase", "phonopy", "pymatgen")
"""Packages whose versions every provenance records (plus the model's own package)."""


def utc_now() -> str:
    """The current time, UTC, ISO 8601 with microseconds (``2025-01-31T12:00:00.123456+00:00``)."""
    return datetime.now(UTC).isoformat()


@lru_cache(maxsize=1)
def host() -> str:
    """This machine's host name."""
    return socket.gethostname()


def versions(model_package: str = "") -> dict[str, str | None]:
    """Versions of python, matcalc's numerical libraries and ``model_package`` (``None``: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in (*LIBRARIES, *([model_package] if model_package and model_package not in LIBRARIES else [])):
        out[name] = package_version(name)
    return out


def matcalc_version() -> str:
    from matcalc import __version__

    return __version__


def record(*, prop: str, potential: Potential, protocol: str, parameters: dict[str, Any], structure_hash: str,
           started_at: str, finished_at: str, cache_key: str | None = None) -> dict[str, Any]:
    """The provenance of one computed result (JSON-safe: ``parameters`` must be JSON-safe already)."""
    model = potential.identity()
    packages = [c.package for c in model.components] or [model.package]
    libs = versions(packages[0])
    for extra in packages[1:]:
        if extra:
            libs.setdefault(extra, package_version(extra))
    return {
        "matcalc_version": matcalc_version(),
        "model": model.to_dict(),
        "dtype": model.dtype,
        "device": str(potential.device),
        "versions": libs,
        "property": prop,
        "protocol": protocol,
        "parameters": parameters,
        "structure_hash": structure_hash,
        "started_at": started_at,
        "finished_at": finished_at,
        "host": host(),
        "cached": False,
        "cache_key": cache_key,
    }


__all__ = ["LIBRARIES", "host", "matcalc_version", "record", "utc_now", "versions"]
