"""Which matcalc this is.

Two projects are imported as ``matcalc``: this one, distributed as **matcalc-mof** (``pip install matcalc-mof``),
and the Materials Virtual Lab's matcalc (``pip install matcalc``, 0.7 at the time of writing), which quacc's
MLIP recipes import (``matcalc.load_fp``). They cannot live in one environment: give each its own venv.
``matcalc.__version__`` together with ``matcalc.__distribution__`` (this module; MVL's matcalc has no such
attribute), or ``matcalc --version``, say which one is installed.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

DISTRIBUTION = "matcalc-mof"
"""The name of this project on PyPI (the import name stays ``matcalc``)."""
UNKNOWN_VERSION = "0+unknown"
"""The version when neither the installed metadata nor the source tree's ``pyproject.toml`` tells it."""


def distribution_version() -> str:
    """The installed version of `DISTRIBUTION` (``importlib.metadata``); from a source tree that is not
    installed, the ``version`` of its ``pyproject.toml``; else `UNKNOWN_VERSION`."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return UNKNOWN_VERSION
    name = re.search(r'^name\s*=\s*"([^"]+)"', text, re.MULTILINE)
    version = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if name and version and name.group(1) == DISTRIBUTION:
        return version.group(1)
    return UNKNOWN_VERSION


__version__ = distribution_version()


def version_text() -> str:
    """``matcalc 0.1.0 (distribution matcalc-mof, /path/to/matcalc)``: what ``matcalc --version`` prints."""
    return f"matcalc {__version__} (distribution {DISTRIBUTION}, {Path(__file__).resolve().parent})"


def install_hint(extra: str = "") -> str:
    """``pip install 'matcalc-mof[extra]'``: how to install this project (never MVL's ``matcalc``)."""
    return f"pip install '{DISTRIBUTION}[{extra}]'" if extra else f"pip install {DISTRIBUTION}"


__all__ = ["DISTRIBUTION", "UNKNOWN_VERSION", "__version__", "distribution_version", "install_hint",
           "version_text"]
