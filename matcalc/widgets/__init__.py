"""Jupyter front door: live progress of tasks and a results table with plots.

>>> import matcalc as mc
>>> with mc.cluster.start(n_gpus=0, n_workers=1) as cl:        # doctest: +SKIP
...     tasks = cl.map("relax", ["CALF-20", "RSM0009"], model="chgnet", protocol="fast")
...     mc.widgets.progress(tasks)      # returns at once, updates live from the tasks' callbacks
...     mc.widgets.results(tasks)       # table of finished results, click a row to plot it

Needs the ``[widgets]`` extra (ipywidgets) for the notebook views; outside a Jupyter kernel
`progress` falls back to a tqdm bar. A single call in a notebook (``mc.relax(...)``) shows a light progress
line by itself (`matcalc.widgets.call`; `notebook_progress` turns it off).
"""

from __future__ import annotations

from matcalc.widgets.call import CallProgress, notebook_progress
from matcalc.widgets.kernel import in_kernel
from matcalc.widgets.progress import ProgressWidget, TqdmProgress, progress
from matcalc.widgets.results import ResultsWidget, figure_png, results, results_table
from matcalc.widgets.state import FutureTask, ProgressState, Row, TaskLike, as_task, as_tasks

__all__ = [
    "CallProgress",
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
    "notebook_progress",
    "progress",
    "results",
    "results_table",
]
