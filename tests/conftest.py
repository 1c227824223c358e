"""Shared fixtures. Everything runs on the CPU; CHGNet loads once per test session."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from ase import Atoms
from ase.build import bulk

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # for subprocesses (servers, kernels); see scripts/test

# The result cache (matcalc.cache) is off for the whole session, subprocesses (servers, workers, kernels)
# included: a test computing what another test computed would be served from the cache, and model-call
# counts or "batched equals unbatched" comparisons would test nothing. tests/test_cache.py turns it on per
# test with a fresh database. Nothing may write to ~/.matcalc either: the location is a session temp dir.
_CACHE_DIR = tempfile.mkdtemp(prefix="matcalc-test-cache-")
os.environ["MATCALC_CACHE"] = "0"
os.environ["MATCALC_CACHE_URL"] = "sqlite:///" + os.path.join(_CACHE_DIR, "cache.db")

# tests/families/test_<family>.py run in the family's own environment (.venvs/<family>, built by
# scripts/setup-family), each started by scripts/test with MATCALC_REQUIRE_FAMILY=<family>.
collect_ignore = [] if os.environ.get("MATCALC_REQUIRE_FAMILY") else ["families"]


@pytest.fixture(autouse=True, scope="session")
def _one_blas_thread():
    """One BLAS thread in this process too (numpy may load before the variable above is read).

    OpenBLAS threads thrash on a shared 2-core machine (ASE's 3x3 linear algebra ran 20x slower);
    one BLAS thread changes no result, only the speed.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(autouse=True, scope="session")
def _session_cache_dir():
    """Remove the session's cache directory at the end."""
    yield
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


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
