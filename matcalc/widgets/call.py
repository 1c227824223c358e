"""A light progress line for single calls in a notebook (``mc.relax(...)`` in a cell, no task, no widget).

``import matcalc`` inside a Jupyter kernel installs `CallProgress` as the fallback sink of
`matcalc.progress`: events of a call made from the notebook's main thread with no sink of its own land here,
and the cell shows one line per stage (a bar, the step, energy and fmax), updated in place at most
``max_rate_hz`` times a second. It is plain HTML (no ipywidgets), so the saved notebook and an ``nbconvert``
export keep the last state. Outside a kernel nothing is installed: plain scripts print nothing unless they ask
(``progress.reporting(sink)``, ``matcalc demo``). ``notebook_progress(False)`` turns it off, as does
``MATCALC_NOTEBOOK_PROGRESS=0`` before ``import matcalc``.
"""

from __future__ import annotations

import html
import os
import threading
import time
from typing import Any

from matcalc import progress
from matcalc.widgets.kernel import execution_count, in_kernel
from matcalc.widgets.state import fmt_float

ENV = "MATCALC_NOTEBOOK_PROGRESS"
"""``0`` turns the notebook progress line of single calls off (read by ``import matcalc``)."""


class CallProgress:
    """The fallback progress sink of a notebook: one display per cell execution, one line per stage."""

    def __init__(self, max_rate_hz: float = 4.0) -> None:
        self.interval_s = 1.0 / max_rate_hz
        self._lock = threading.Lock()
        self._cell: int | None = None
        self._handle: Any = None
        self._stages: dict[str, progress.ProgressEvent] = {}
        self._last = 0.0
        self._timer: threading.Timer | None = None
        self.updates = 0

    def __call__(self, event: progress.ProgressEvent) -> None:
        from IPython.display import display

        with self._lock:
            cell = execution_count()
            if cell != self._cell:  # a new cell: a new line under it
                self._cell, self._handle, self._stages = cell, None, {}
            self._stages[event.stage] = event
            if self._handle is None:
                self._handle = display(self.bundle(), raw=True, display_id=True)
                self._last = time.monotonic()
            elif time.monotonic() - self._last >= self.interval_s:
                self._update()
            elif self._timer is None:  # the last event of a burst is shown too, a moment later
                self._timer = threading.Timer(self.interval_s, self._flush)
                self._timer.daemon = True
                self._timer.start()

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
            self._update()

    def _update(self) -> None:
        if self._handle is not None:
            self._handle.update(self.bundle(), raw=True)
            self.updates += 1
        self._last = time.monotonic()

    def bundle(self) -> dict[str, str]:
        """The display data: an HTML line per stage, and the same as text."""
        lines = [(_bar(e), _text(e)) for e in self._stages.values()]
        body = "".join(f"<div>{bar} {html.escape(text)}</div>" for bar, text in lines)
        return {"text/html": f"<div class='matcalc-call-progress' style='font-size:12px'>{body}</div>",
                "text/plain": "\n".join(text for _, text in lines)}


def _bar(event: progress.ProgressEvent) -> str:
    if not event.total_steps:
        return ""
    return (f"<progress value='{min(event.step, event.total_steps)}' max='{event.total_steps}' "
            "style='width:140px;height:10px;vertical-align:middle'></progress>")


def _text(event: progress.ProgressEvent) -> str:
    parts = [f"{event.stage} {event.step}" + (f"/{event.total_steps}" if event.total_steps else "")]
    if event.energy_eV is not None:
        parts.append(f"E {fmt_float(event.energy_eV, '.5f', 'eV')}")
    if event.fmax_eV_per_A is not None:
        parts.append(f"fmax {fmt_float(event.fmax_eV_per_A, '.3g', 'eV/Å')}")
    note = event.extra.get("note") if isinstance(event.extra, dict) else None
    if note:
        parts.append(str(note))
    return " · ".join(parts)


def notebook_progress(enabled: bool = True) -> bool:
    """Show (or stop showing) the progress line of single calls in this notebook; returns whether it is on.
    Outside a Jupyter kernel it stays off."""
    current = progress.fallback_sink()
    if not enabled:
        if isinstance(current, CallProgress):
            progress.set_fallback_sink(None)
        return False
    if not in_kernel():
        return False
    if not isinstance(current, CallProgress):
        progress.set_fallback_sink(CallProgress())
    return True


def install() -> bool:
    """What ``import matcalc`` does: `notebook_progress` unless ``MATCALC_NOTEBOOK_PROGRESS=0``."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return notebook_progress(True)


__all__ = ["ENV", "CallProgress", "install", "notebook_progress"]
