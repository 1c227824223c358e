"""Benchmark runners over the same calculations and execution as everything else (the layer above them).

`mofsimbench` runs MOFSimBench (Kraß, Huang, Moosavi, npj Comput. Mater. 2025) with any model:
``mc.bench.mofsimbench("chgnet", "structures/", "out/")`` or ``matcalc bench mofsimbench --model chgnet
--structures structures/ --out out/``.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"mofsimbench": "matcalc.bench.benchmark", "BenchSummary": "matcalc.bench.benchmark",
         "TaskSummary": "matcalc.bench.benchmark", "TASKS": "matcalc.bench.tasks"}


def __getattr__(name: str) -> Any:  # the runner imports pandas and the calculations: only on first use
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'matcalc.bench' has no attribute {name!r}")


__all__ = ["TASKS", "BenchSummary", "TaskSummary", "mofsimbench"]
