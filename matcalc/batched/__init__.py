"""Batched, vectorised versions of the ASE algorithms matcalc uses, stepping every structure of a batch at once.

One module per algorithm, each reproducing ASE's own (same parameters, defaults and trajectories to float
round-off; tested side by side against ASE in ``tests/test_batched.py``):

==================  ===========================================  ==========================================
module              class                                        ASE reference
==================  ===========================================  ==========================================
``fire``            `BatchedFIRE`    ``ase.optimize.FIRE``
``lbfgs``           `BatchedLBFGS`  ``ase.optimize.LBFGS``
``bfgs``            `BatchedBFGS`    ``ase.optimize.BFGS``
``targets``         `FrechetCellTarget`  ``ase.filters.FrechetCellFilter``
``langevin``        `BatchedLangevin`  ``ase.md.langevin.Langevin``
``mtk``             `BatchedIsotropicMTKNPT`  ``ase.md.nose_hoover_chain.IsotropicMTKNPT``
==================  ===========================================  ==========================================

`matcalc.batched.runner` (optimisers) and `matcalc.batched.md` (integrators) own the loop: one
evaluator call per step for every running structure, per-structure convergence and step limits, jobs from
any number of threads joining one batch. ASE's classes stay the reference and the fallback: set
``MATCALC_BATCHED=0`` (or `set_enabled`/`disabled`) and calculations run ASE's own loops.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

ENV_ENABLED = "MATCALC_BATCHED"
_ENABLED: bool | None = None


def enabled() -> bool:
    """Whether optimisations and MD use the batched algorithms: `set_enabled`, else ``MATCALC_BATCHED``
    (default on)."""
    if _ENABLED is not None:
        return _ENABLED
    return os.environ.get(ENV_ENABLED, "1").strip().lower() not in {"0", "false", "no", "off"}


def set_enabled(flag: bool | None) -> None:
    """Use the batched algorithms (True), ASE's own loops (False), or the environment again (None)."""
    global _ENABLED
    _ENABLED = flag


@contextmanager
def disabled() -> Iterator[None]:
    """``with batched.disabled(): ...`` runs ASE's own optimizers and integrators (process-wide)."""
    global _ENABLED
    before = _ENABLED
    _ENABLED = False
    try:
        yield
    finally:
        _ENABLED = before


__all__ = ["ENV_ENABLED", "disabled", "enabled", "set_enabled"]
