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

from matcalc.switches import Switch

ENV_ENABLED = "MATCALC_BATCHED"
_SWITCH = Switch(ENV_ENABLED)
enabled = _SWITCH.enabled
"""Whether optimisations and MD use the batched algorithms: `set_enabled`, else ``MATCALC_BATCHED``
(default on)."""
set_enabled = _SWITCH.set_enabled
"""Use the batched algorithms (True), ASE's own loops (False), or the environment again (None)."""
disabled = _SWITCH.disabled
"""``with batched.disabled(): ...`` runs ASE's own optimizers and integrators (process-wide)."""


__all__ = ["ENV_ENABLED", "disabled", "enabled", "set_enabled"]
