"""Shared fixtures. Everything runs on the CPU; CHGNet loads once per test session."""

from __future__ import annotations

import os

import pytest
from ase import Atoms
from ase.build import bulk

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see scripts/test


@pytest.fixture(scope="session")
def chgnet():
    """The CHGNet potential on the CPU (weights from the chgnet wheel)."""
    from matcalc.models import get_model

    return get_model("chgnet", device="cpu")


@pytest.fixture
def cu_rattled() -> Atoms:
    """Conventional fcc Cu (4 atoms), 2x1x1, rattled 0.05 Å: something to relax with EMT."""
    atoms = bulk("Cu", "fcc", a=3.66, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=3)
    return atoms
