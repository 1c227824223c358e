"""Tests of the optional model families; each file runs in its family's environment (scripts/test)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require(module: str) -> ModuleType:
    """Import ``module``; skip when absent, except in the family run of scripts/test, where it must exist."""
    if os.environ.get("MATCALC_REQUIRE_FAMILY"):
        return importlib.import_module(module)
    return pytest.importorskip(module)
