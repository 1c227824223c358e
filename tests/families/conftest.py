"""Tests of the optional model families; each file runs in its family's environment (scripts/test)."""

from __future__ import annotations

import importlib
import os
import socket
from types import ModuleType
from typing import Any

import pytest


def require(module: str) -> ModuleType:
    """Import ``module``; skip when absent, except in the family run of scripts/test, where it must exist."""
    if os.environ.get("MATCALC_REQUIRE_FAMILY"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading and evaluating must never open a connection (matcalc never downloads weights)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
