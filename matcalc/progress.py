"""Progress reporting and cooperative stopping for long calculations.

Calculations call `report` at each step; whoever runs them (a notebook widget, a
dask worker, the server) installs a sink with `reporting`. The sink lives in a
``contextvars.ContextVar``, so concurrent calculations in threads each report to their own.
`should_stop` lets a caller end a long run early (e.g. a cancelled task).

A call made with no `reporting` block around it, from the main thread, goes to the *fallback sink*
(`set_fallback_sink`), if one is set: in a Jupyter kernel, ``import matcalc`` sets one that shows a
light progress line under the cell (`matcalc.widgets.call`), so a single ``mc.relax(...)`` in a notebook
shows its progress; plain scripts set none and print nothing.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class ProgressEvent:
    """One step of a calculation; ``fraction`` in [0, 1] when the total is known."""

    stage: str
    step: int
    total_steps: int | None = None
    energy_eV: float | None = None
    fmax_eV_per_A: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        if not self.total_steps:
            return None
        return min(1.0, self.step / self.total_steps)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fraction"] = self.fraction
        return d


Sink = Callable[[ProgressEvent], None]


@dataclass
class _Context:
    sink: Sink | None
    stop: threading.Event
    every: int


_current: contextvars.ContextVar[_Context | None] = contextvars.ContextVar("matcalc_progress", default=None)
_fallback: Sink | None = None


def set_fallback_sink(sink: Sink | None) -> Sink | None:
    """Send the events of calls made outside any `reporting` block, from the main thread, to ``sink``
    (``None``: drop them, the default outside notebooks); returns the sink it replaces. Threads of
    ``relax_many``, cluster workers and the server always report to their own sinks, never to this one."""
    global _fallback
    previous, _fallback = _fallback, sink
    return previous


def fallback_sink() -> Sink | None:
    """The sink `set_fallback_sink` set (``None`` when none is)."""
    return _fallback


@contextmanager
def reporting(sink: Sink | None = None, *, stop: threading.Event | None = None,
              every: int = 1) -> Iterator[threading.Event]:
    """Send progress events of calculations run inside the block to ``sink``.

    Args:
        sink: called with each `ProgressEvent` (exceptions in it are logged, not raised).
        stop: set this event to ask running calculations to stop early.
        every: forward only every n-th step of a stage (first and last always pass).

    Yields:
        The stop event.
    """
    ctx = _Context(sink, stop or threading.Event(), max(1, int(every)))
    token = _current.set(ctx)
    try:
        yield ctx.stop
    finally:
        _current.reset(token)


def report(stage: str, step: int, total_steps: int | None = None, *, energy_eV: float | None = None,
           fmax_eV_per_A: float | None = None, **extra: Any) -> None:
    """Report one step to the current sink (no-op when nobody listens)."""
    ctx = _current.get()
    if ctx is None:  # nobody asked: a single call in a notebook still shows its progress (module doc)
        sink = _fallback
        if sink is not None and threading.current_thread() is threading.main_thread():
            try:
                sink(ProgressEvent(stage, step, total_steps, energy_eV, fmax_eV_per_A, extra))
            except Exception:  # noqa: BLE001 - a broken listener must never break a calculation
                log.exception("fallback progress sink failed")
        return
    if ctx.sink is None:
        return
    last = total_steps is not None and step >= total_steps
    if step % ctx.every and step != 0 and not last:
        return
    event = ProgressEvent(stage, step, total_steps, energy_eV, fmax_eV_per_A, extra)
    try:
        ctx.sink(event)
    except Exception:  # noqa: BLE001 - a broken listener must never break a calculation
        log.exception("progress sink failed")


def should_stop() -> bool:
    """True when the caller asked the running calculation to stop early."""
    ctx = _current.get()
    return bool(ctx is not None and ctx.stop.is_set())


class StopRequested(RuntimeError):
    """Raised by calculations that cannot return a partial result when asked to stop."""
