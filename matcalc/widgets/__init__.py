"""Jupyter front door: live progress of tasks and a results table with plots.

>>> import matcalc as mc
>>> with mc.cluster.start(n_gpus=0, n_workers=1) as cl:        # doctest: +SKIP
...     tasks = cl.map("relax", ["CALF-20", "RSM0009"], model="chgnet", protocol="fast")
...     mc.widgets.progress(tasks)      # returns at once, updates live from the tasks' callbacks
...     mc.widgets.results(tasks)       # table of finished results, click a row to plot it

Needs the ``[widgets]`` extra (ipywidgets) for the notebook views; outside a Jupyter kernel
:func:`progress` falls back to a tqdm bar.
"""

from __future__ import annotations

from matcalc.widgets.progress import ProgressWidget, TqdmProgress, in_kernel, progress
from matcalc.widgets.results import ResultsWidget, figure_png, results, results_table
from matcalc.widgets.state import FutureTask, ProgressState, Row, TaskLike, as_task, as_tasks

__all__ = [
    "FutureTask",
    "ProgressState",
    "ProgressWidget",
    "ResultsWidget",
    "Row",
    "TaskLike",
    "TqdmProgress",
    "as_task",
    "as_tasks",
    "figure_png",
    "in_kernel",
    "progress",
    "results",
    "results_table",
]
