"""Live progress of tasks: an ipywidgets view for notebooks, a tqdm bar elsewhere.

Both are driven by the tasks' callbacks (progress events, status changes, completion), never by
a loop in the cell: the cell returns at once and the view keeps updating. Callbacks arrive on
other threads; they only update `ProgressState` and request a
refresh, which a `Throttle` runs at most ``max_rate_hz`` times a
second.

Next to the live view, the cell's output carries a static snapshot (``text/html`` and ``text/plain``), replaced
by the final state once every task has finished: a notebook saved after the run shows the outcome, not the
"2 running" of the moment it was displayed, and an ``nbconvert`` HTML export or a viewer without the widget
manager shows that table instead of a blank widget.
"""

from __future__ import annotations

import html
import logging
import sys
import threading
import time
import uuid
from typing import Any, TextIO

from matcalc.tasks import ACTIVE, FAILURES, ON_WORKER
from matcalc.version import install_hint
from matcalc.widgets.kernel import execution_count, in_kernel
from matcalc.widgets.state import (
    ProgressState,
    Row,
    Throttle,
    Ticker,
    fmt_elapsed,
    fmt_float,
)

log = logging.getLogger(__name__)

STATUS_COLORS = {
    "PENDING": "#777777", "QUEUED": "#777777", "ASSIGNED": "#8a6d3b", "RUNNING": "#1f6fb2",
    "COMPLETED": "#2e7d32", "FAILED": "#c62828", "CANCELLED": "#6d4c41", "TIMEOUT": "#c62828",
}
COLUMNS = (("structure", "150px"), ("property", "110px"), ("model", "80px"), ("status", "95px"),
           ("step", "130px"), ("energy", "115px"), ("fmax", "105px"), ("elapsed", "75px"))


def _show_rank(status: str) -> int:
    """Rows shown first when not all fit: running, then failed, then waiting, then the rest."""
    if status in ON_WORKER:
        return 0
    if status in FAILURES:
        return 1
    return 2 if status in ACTIVE else 3


def widgets_available() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def progress(tasks: Any, *, mode: str = "auto", max_rate_hz: float = 5.0, display: bool = True,
             file: TextIO | None = None, max_rows: int = 50) -> ProgressWidget | TqdmProgress:
    """Show live progress of ``tasks`` and return the view at once (the cell does not block).

    Args:
        tasks: a `matcalc.cluster.Task`, any task-like object (see
            `matcalc.widgets.state`), a ``concurrent.futures``/dask future, or a list of them.
        mode: ``"auto"`` (the widget inside a Jupyter kernel with ipywidgets installed, tqdm
            otherwise), ``"widget"`` or ``"tqdm"``.
        max_rate_hz: most refreshes per second of the view (callbacks in between are merged).
        display: show the widget now (``False``: return it for placing in your own layout).
        file: stream of the tqdm bar (default stderr).
        max_rows: most task rows in the widget (beyond that, running and failed tasks are shown
            first; the counts cover all).

    Returns:
        A `ProgressWidget` (an ``ipywidgets.VBox``) or a `TqdmProgress`; both have
        ``state``, ``counts()``, ``wait(timeout)``, ``cancel_all()``.
    """
    if mode not in ("auto", "widget", "tqdm"):
        raise ValueError(f"mode must be 'auto', 'widget' or 'tqdm', got {mode!r}")
    if max_rate_hz <= 0:
        raise ValueError(f"max_rate_hz must be > 0, got {max_rate_hz!r}")
    use_widget = mode == "widget" or (mode == "auto" and widgets_available() and in_kernel())
    if not use_widget:
        return TqdmProgress(tasks, file=file, max_rate_hz=max_rate_hz)
    if not widgets_available():
        raise ImportError("matcalc.widgets.progress(mode='widget') needs ipywidgets: "
                          + install_hint("widgets"))
    view = ProgressWidget(tasks, max_rate_hz=max_rate_hz, max_rows=max_rows)
    if display:
        show_once(view)
    return view


class TqdmProgress:
    """A tqdm bar over finished tasks with counts by status (outside Jupyter)."""

    def __init__(self, tasks: Any, *, file: TextIO | None = None, max_rate_hz: float = 5.0) -> None:
        from tqdm.auto import tqdm

        self.state = ProgressState(tasks)
        n = len(self.state.tasks)
        self.bar = tqdm(total=n, desc="matcalc", unit="task", file=file if file is not None else sys.stderr,
                        dynamic_ncols=True, mininterval=1.0 / max_rate_hz)
        self._shown = 0
        self._closed = False
        self._throttle = Throttle(self._render, 1.0 / max_rate_hz)
        self.state.add_listener(lambda _ids: self._throttle.request())
        self._render()

    def _render(self) -> None:
        if self._closed:
            return
        done = self.state.n_done()
        if done > self._shown:
            self.bar.update(done - self._shown)
            self._shown = done
        text = counts_text(self.state.counts())
        rows = self.state.rows()
        if len(rows) == 1 and rows[0].note:  # one task: its own status line too (e.g. the running K_H)
            text += f" | {rows[0].note}"
        self.bar.set_postfix_str(text, refresh=True)
        if self.state.all_done():
            self.close()

    def counts(self) -> dict[str, int]:
        return self.state.counts()

    def wait(self, timeout: float | None = None) -> bool:
        ok = self.state.wait(timeout)
        if ok:
            self._throttle.flush()
        return ok

    def cancel_all(self) -> int:
        return self.state.cancel_all()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._throttle.cancel()
            self.bar.close()


def _execution_count() -> int | None:
    return execution_count()


class ShowOnce:
    """Mixin for the widgets that `progress`/`results` display themselves
    and also return: the returned object, being the cell's last expression, would be displayed a
    second time. ``_ipython_display_`` skips that second display within the same cell execution.

    The displayed output holds the live widget view and a static snapshot of the view (``text/html``,
    ``text/plain``: `snapshot_html`, `snapshot_text`); `publish_snapshot` replaces that output
    (every place the view was shown) with the current state, which the views do once their work is finished."""

    _shown_in: int | None = None
    _display_id: str | None = None

    def snapshot_html(self) -> str:
        """The view as static HTML (no widgets)."""
        raise NotImplementedError

    def snapshot_text(self) -> str:
        """The view as one line of text."""
        raise NotImplementedError

    def _repr_html_(self) -> str:
        return self.snapshot_html()

    def display_bundle(self) -> dict[str, Any]:
        """What the cell's output holds: the widget view (while the widget lives) and the static snapshot."""
        widget_bundle = getattr(self, "_repr_mimebundle_", None)  # ipywidgets sets it to None once closed
        data = dict(widget_bundle() or {}) if callable(widget_bundle) else {}
        data["text/html"] = self.snapshot_html()
        data["text/plain"] = self.snapshot_text()
        return data

    def _ipython_display_(self, **kwargs: Any) -> None:
        now = _execution_count()
        if self._shown_in is not None and self._shown_in == now:
            return
        self._shown_in = now
        from IPython.display import display

        if self._display_id is None:
            self._display_id = uuid.uuid4().hex
        display(self.display_bundle(), raw=True, display_id=self._display_id)

    def publish_snapshot(self) -> bool:
        """Replace the displayed output (live view and snapshot) by the current state; False when the view was
        never displayed."""
        if self._display_id is None:
            return False
        from IPython.display import update_display

        try:
            update_display(self.display_bundle(), raw=True, display_id=self._display_id)
        except Exception:  # noqa: BLE001 - the kernel or front end is gone: nothing to update
            log.debug("could not update the displayed snapshot", exc_info=True)
            return False
        return True


def show_once(view: Any) -> None:
    """Display ``view`` now (a `ShowOnce` widget is then not shown again by this cell)."""
    from IPython.display import display

    view._shown_in = None
    display(view)


def counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {s.lower()}" for s, n in counts.items())


def rows_html(rows: list[Row], now: float) -> str:
    """The task rows as a static HTML table (the columns of the live view; errors and notes below a row)."""
    head = "".join(f"<th style='text-align:left;padding:1px 8px'>{name}</th>" for name, _ in COLUMNS)
    body = []
    for row in rows:
        color = STATUS_COLORS.get(row.status, "#000000")
        cells = [html.escape(row.label or row.id[:12]), html.escape(row.property), html.escape(row.model),
                 f"<b style='color:{color}'>{row.status}</b>", html.escape(row.step_text()),
                 fmt_float(row.energy_eV, ".4f", "eV"), fmt_float(row.fmax_eV_per_A, ".3g", "eV/Å"),
                 fmt_elapsed(row.elapsed_s(now))]
        body.append("<tr>" + "".join(f"<td style='padding:1px 8px'>{c}</td>" for c in cells) + "</tr>")
        notes = [html.escape(row.note)] if row.note else []
        if row.error and row.status != "CANCELLED":
            notes.append(f"<span style='color:#c62828'>{html.escape(row.error)}</span>")
        if notes:
            body.append(f"<tr><td colspan='{len(COLUMNS)}' style='padding:0 8px 3px 20px;font-size:90%'>"
                        + "<br>".join(notes) + "</td></tr>")
    return (f"<table style='border-collapse:collapse;font-size:12px'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def ipywidgets_module() -> Any:
    """The ``ipywidgets`` module, imported on first use (the [widgets] extra)."""
    import ipywidgets

    return ipywidgets


try:  # the widget class derives from VBox; without ipywidgets only the tqdm view exists
    import ipywidgets as _w

    _Base: Any = _w.VBox
except ImportError:  # pragma: no cover - exercised only without the [widgets] extra
    _w = None
    _Base = object


class _RowView:
    """The widgets of one row slot; ``task_id`` is the task it shows now."""

    def __init__(self, w: Any, task_id: str, on_cancel: Any) -> None:
        self.task_id = task_id
        self.cells = {name: w.HTML(layout=w.Layout(width=width, overflow="hidden")) for name, width in COLUMNS}
        self.bar = w.FloatProgress(min=0.0, max=1.0, value=0.0, layout=w.Layout(width="90px"))
        self.cancel = w.Button(description="", icon="times", tooltip="cancel this task",
                               layout=w.Layout(width="34px"))
        self.cancel.on_click(lambda _b: on_cancel(self.task_id))
        self.error = w.HTML(layout=w.Layout(display="none", margin="0 0 4px 12px"))
        self.note = w.HTML(layout=w.Layout(display="none", margin="0 0 2px 12px"))
        self.line = w.HBox([*self.cells.values(), self.bar, self.cancel], layout=w.Layout(align_items="center"))
        self.box = w.VBox([self.line, self.note, self.error])

    def show(self, row: Row, now: float) -> None:
        self.task_id = row.id
        c = self.cells
        c["structure"].value = f"<span title='{html.escape(row.id)}'>{html.escape(row.label or row.id[:12])}</span>"
        c["property"].value = html.escape(row.property)
        c["model"].value = html.escape(row.model)
        color = STATUS_COLORS.get(row.status, "#000000")
        c["status"].value = f"<b style='color:{color}'>{row.status}</b>"
        c["step"].value = html.escape(row.step_text())
        c["energy"].value = fmt_float(row.energy_eV, ".4f", "eV")
        c["fmax"].value = fmt_float(row.fmax_eV_per_A, ".3g", "eV/Å")
        c["elapsed"].value = fmt_elapsed(row.elapsed_s(now))
        self.bar.value = float(row.fraction) if row.fraction is not None else 0.0
        self.bar.bar_style = {"COMPLETED": "success", "FAILED": "danger", "TIMEOUT": "danger",
                              "CANCELLED": "warning"}.get(row.status, "info")
        self.cancel.disabled = row.done
        if row.note:
            self.note.value = f"<span style='color:#555;font-size:90%'>{html.escape(row.note)}</span>"
            self.note.layout.display = "block"
        else:
            self.note.layout.display = "none"
        if row.error and row.status != "CANCELLED":
            self.error.value = f"<pre style='color:#c62828;margin:0;white-space:pre-wrap'>{html.escape(row.error)}</pre>"
            self.error.layout.display = "block"
        else:
            self.error.layout.display = "none"


class ProgressWidget(ShowOnce, _Base):  # type: ignore[misc,valid-type]
    """Notebook view of many tasks: an overall bar with counts by status and a cancel-all button,
    then one row per task (structure, property, model, status, step, energy, fmax, elapsed time,
    a bar, a cancel button; the error below failed rows).

    Attributes:
        state: the `ProgressState` (rows, counts, cancel).
        overall: ``IntProgress`` of finished tasks. summary: ``HTML`` with the counts.
        cancel_all_button: cancels every unfinished task. rows: task id -> the widgets of its row
        (the tasks shown now). more: ``HTML`` note when not every task has a row.

    With more than ``max_rows`` tasks, ``max_rows`` row slots show the most relevant tasks:
    running first, then failed, then waiting, then finished (each group in submission order);
    the overall bar and counts always cover every task.
    """

    def __init__(self, tasks: Any, *, max_rate_hz: float = 5.0, tick_s: float = 1.0, max_rows: int = 50) -> None:
        w = ipywidgets_module()
        self.state = ProgressState(tasks)
        n = len(self.state.tasks)
        self.overall = w.IntProgress(min=0, max=max(n, 1), value=0, description="tasks",
                                     layout=w.Layout(width="320px"))
        self.summary = w.HTML()
        self.cancel_all_button = w.Button(description="Cancel all", icon="stop", button_style="danger",
                                          layout=w.Layout(width="110px"))
        self.cancel_all_button.on_click(lambda _b: self.cancel_all())
        header = w.HBox([w.HTML(f"<b>{name}</b>", layout=w.Layout(width=width)) for name, width in COLUMNS],
                        layout=w.Layout(border_bottom="1px solid #ccc"))
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows!r}")
        self.max_rows = int(max_rows)
        self._slots = [_RowView(w, r.id, self._cancel_one) for r in self.state.rows()[: self.max_rows]]
        self.more = w.HTML()
        super().__init__([w.HBox([self.overall, self.summary, self.cancel_all_button],
                                 layout=w.Layout(align_items="center")),
                          header, *(v.box for v in self._slots), self.more])
        self._final_published = False
        self._throttle = Throttle(self._render, 1.0 / max_rate_hz)
        self._dirty: set[str] = {t.id for t in self.state.tasks}
        self._dirty_lock = threading.Lock()
        self.state.add_listener(self._mark)
        self._render()
        self._ticker = None if self.state.all_done() else Ticker(self._tick, tick_s, self.state.all_done)

    # ------------------------------------------------------------------ refresh
    def _mark(self, ids: set[str]) -> None:
        with self._dirty_lock:
            self._dirty |= ids
        self._throttle.request()

    def _tick(self) -> None:
        self._mark({r.id for r in self.state.rows() if r.status == "RUNNING"})

    @property
    def rows(self) -> dict[str, _RowView]:
        """Task id -> the widgets of its row, for the tasks shown now."""
        return {v.task_id: v for v in self._slots}

    def _render(self) -> None:
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        now = time.time()
        rows = self.state.rows()
        if len(rows) <= self.max_rows:  # one fixed slot per task: redraw the changed ones
            for slot in self._slots:
                if slot.task_id in dirty:
                    slot.show(self.state.row(slot.task_id), now)
        else:
            order = sorted(range(len(rows)), key=lambda i: (_show_rank(rows[i].status), i))
            for slot, i in zip(self._slots, order, strict=False):
                if slot.task_id != rows[i].id or rows[i].id in dirty:
                    slot.show(rows[i], now)
            self.more.value = (f"<i>showing {len(self._slots)} of {len(rows)} tasks: running, then failed, "
                               f"then waiting, then finished</i>")
        counts = self.state.counts()
        done = self.state.n_done()
        self.overall.value = done
        self.overall.description = f"{done}/{len(rows)}"
        failed = sum(counts.get(s, 0) for s in FAILURES)
        self.overall.bar_style = "danger" if failed else ("success" if self.state.all_done() else "info")
        self.summary.value = " · ".join(
            f"<span style='color:{STATUS_COLORS.get(s, '#000')}'>{n} {s.lower()}</span>" for s, n in counts.items())
        self.cancel_all_button.disabled = self.state.all_done()
        if self.state.all_done() and not self._final_published:
            self._final_published = self.publish_snapshot()  # the saved notebook shows the outcome

    def snapshot_html(self) -> str:
        """The progress as static HTML: finished/total, counts by status, and the rows (at most ``max_rows``:
        running, then failed, then waiting, then finished first when not all fit)."""
        rows = self.state.rows()
        shown = rows
        if len(rows) > self.max_rows:
            order = sorted(range(len(rows)), key=lambda i: (_show_rank(rows[i].status), i))[: self.max_rows]
            shown = [rows[i] for i in sorted(order)]
        counts = " · ".join(f"<span style='color:{STATUS_COLORS.get(s, '#000')}'>{n} {s.lower()}</span>"
                            for s, n in self.state.counts().items())
        more = (f"<br><i>showing {len(shown)} of {len(rows)} tasks</i>" if len(shown) < len(rows) else "")
        return (f"<div class='matcalc-progress'><b>{self.state.n_done()}/{len(rows)}</b> tasks finished · {counts}"
                f"{rows_html(shown, time.time())}{more}</div>")

    def snapshot_text(self) -> str:
        """``matcalc: 7/7 tasks finished (6 completed, 1 failed)``."""
        return (f"matcalc: {self.state.n_done()}/{len(self.state.tasks)} tasks finished "
                f"({counts_text(self.state.counts())})")

    def refresh(self) -> None:
        """Re-read every task and redraw now (normally not needed: callbacks drive the view)."""
        self.state.refresh()
        with self._dirty_lock:
            self._dirty |= {t.id for t in self.state.tasks}
        self._throttle.flush()

    # ------------------------------------------------------------------ actions
    def _cancel_one(self, task_id: str) -> None:
        self.state.cancel(task_id)
        self._mark({task_id})

    def cancel_all(self) -> int:
        """Cancel every unfinished task; returns how many accepted the cancel."""
        n = self.state.cancel_all()
        self._mark({t.id for t in self.state.tasks})
        return n

    def counts(self) -> dict[str, int]:
        return self.state.counts()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until all tasks finished (True) or ``timeout`` s passed; then redraw at once."""
        ok = self.state.wait(timeout)
        self._throttle.flush()
        return ok

    def close(self) -> None:
        self._throttle.cancel()
        if self._ticker is not None:
            self._ticker.stop()
        super().close()
