"""Results view: the table of finished results, growing as tasks finish, with a plot per row."""

from __future__ import annotations

import base64
import html
import io
import logging
import threading
from typing import TYPE_CHECKING, Any

from matcalc.calculations.results import Result
from matcalc.tasks import TERMINAL
from matcalc.widgets.progress import ShowOnce, in_kernel, ipywidgets_module, show_once
from matcalc.widgets.state import DONE_TIMEOUT_S, Throttle, as_task, status_name

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

try:
    import ipywidgets as _w

    _Base: Any = _w.VBox
except ImportError:  # pragma: no cover - exercised only without the [widgets] extra
    _w = None
    _Base = object


class _Entry:
    """One row source: a task-like object, a Result, or an exception."""

    def __init__(self, index: int, item: Any) -> None:
        self.index = index
        self.task: Any = None
        self.result: Result | None = None
        self.error: str | None = None
        if isinstance(item, Result):
            self.result = item
            self.key = f"{index}"
        elif isinstance(item, BaseException):
            self.error = f"{type(item).__name__}: {item}"
            self.key = f"{index}"
        elif item is None:
            self.error = "not computed"
            self.key = f"{index}"
        else:
            self.task = as_task(item)
            self.key = str(self.task.id)

    def status(self) -> str:
        if self.task is None:
            return "COMPLETED" if self.result is not None else "FAILED"
        return status_name(self.task.status)

    def label(self) -> str:
        if self.result is not None and self.result.label:
            return self.result.label
        if self.task is not None:
            return str(getattr(self.task, "label", "") or self.task.id)
        return f"#{self.index}"

    def collect(self) -> None:
        """Fetch the result/error of a finished task (once)."""
        if self.task is None or self.result is not None or self.error is not None:
            return
        if self.status() == "COMPLETED":
            try:
                value = self.task.result(DONE_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001
                self.error = f"{type(exc).__name__}: {exc}"
                return
            if isinstance(value, Result):
                self.result = value
            else:
                self.error = f"not a matcalc result: {type(value).__name__}"
        elif self.status() in TERMINAL:
            err = getattr(self.task, "error", None)
            if err is None:
                failure = self.task.exception(DONE_TIMEOUT_S)
                err = None if failure is None else f"{type(failure).__name__}: {failure}"
            self.error = err or self.status()

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.task is not None:
            out.update(task_id=self.task.id, label=getattr(self.task, "label", ""),
                       property=getattr(self.task, "property", ""), model=getattr(self.task, "model", ""))
        if self.result is not None:
            out.update(self.result.row())
        if self.task is not None:
            out["status"] = self.status()
        out["error"] = self.error
        return out


def results_table(items: Any) -> pd.DataFrame:
    """The pandas table of ``items`` (tasks, results or exceptions) as it stands now: one row per
    finished item (task_id, label, property, model, the result's scalar fields, status, error)."""
    import pandas as pd

    entries = [_Entry(i, it) for i, it in enumerate(_as_list(items))]
    rows = []
    for e in entries:
        e.collect()
        if e.result is not None or e.error is not None:
            rows.append(e.row())
    return pd.DataFrame(rows)


def _as_list(items: Any) -> list[Any]:
    if isinstance(items, (Result, BaseException)) or hasattr(items, "add_done_callback"):
        return [items]
    return list(items)


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a matplotlib Figure (no pyplot, no backend state)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def results(items: Any, *, display: bool = True, max_rate_hz: float = 2.0) -> ResultsWidget:
    """Show the table of finished results of ``items`` and a plot of the selected row.

    Args:
        items: tasks (local `Task`, task-like, futures), results, or a
            list mixing them. Rows of tasks appear as they finish.
        display: show the widget now (inside Jupyter).
        max_rate_hz: most table refreshes per second.

    Returns:
        The `ResultsWidget`; ``.frame()`` is the current pandas table.
    """
    view = ResultsWidget(items, max_rate_hz=max_rate_hz)
    if display and in_kernel():
        show_once(view)
    return view


class ResultsWidget(ShowOnce, _Base):  # type: ignore[misc,valid-type]
    """A table (HTML of the pandas frame) of finished results, a dropdown to pick one and its
    ``plot()`` below (EOS curve, Cv(T), MD traces, relaxation energy per step...).

    Attributes:
        table: ``HTML`` with the frame. selector: ``Dropdown`` of finished rows with a result.
        plot_output: ``Output`` holding the selected result's figure (as PNG).
        figure: the matplotlib Figure of the selected row (None before a selection).
    """

    def __init__(self, items: Any, *, max_rate_hz: float = 2.0) -> None:
        w = ipywidgets_module()
        self._entries = [_Entry(i, it) for i, it in enumerate(_as_list(items))]
        self._lock = threading.RLock()
        self.figure: Figure | None = None
        self.table = w.HTML()
        self.summary = w.HTML()
        self.selector = w.Dropdown(options=[("—", None)], value=None, description="plot",
                                   layout=w.Layout(width="420px"))
        self.plot_output = w.Output()
        self.selector.observe(self._on_select, names="value")
        super().__init__([self.summary, self.table, self.selector, self.plot_output])
        self._final_published = False
        self._throttle = Throttle(self._render, 1.0 / max_rate_hz)
        self._render()
        for e in self._entries:
            if e.task is not None:
                e.task.add_done_callback(lambda _t: self._throttle.request())

    # ------------------------------------------------------------------ data
    def frame(self) -> pd.DataFrame:
        """The table as it stands: one row per finished entry, in input order."""
        import pandas as pd

        with self._lock:
            for e in self._entries:
                e.collect()
            return pd.DataFrame([e.row() for e in self._entries if e.result is not None or e.error is not None])

    def result(self, key: str) -> Result:
        """The result of row ``key`` (a task id, or the index for plain results)."""
        for e in self._entries:
            if e.key == key and e.result is not None:
                return e.result
        raise KeyError(f"no finished result {key!r}")

    # ------------------------------------------------------------------ view
    def _summary_parts(self) -> tuple[str, str]:
        """``("7/7", "finished (6 completed, 1 failed)")``: every finished row is in the table."""
        finished = [e for e in self._entries if e.result is not None or e.error is not None]
        failed = sum(1 for e in finished if e.result is None)
        parts = [f"{len(finished) - failed} completed"] + ([f"{failed} failed"] if failed else [])
        return f"{len(finished)}/{len(self._entries)}", f"finished ({', '.join(parts)})"

    def _summary_text(self) -> str:
        return " ".join(self._summary_parts())

    def snapshot_html(self) -> str:
        """The table as static HTML, with the selected row's plot (PNG) below it."""
        figure = ""
        if self.figure is not None:
            png = base64.b64encode(figure_png(self.figure)).decode()
            figure = f"<br><img src='data:image/png;base64,{png}' alt='plot of the selected result'>"
        return (f"<div class='matcalc-results'><b>{html.escape(self._summary_text())}</b>"
                f"{_frame_html(self.frame())}{figure}</div>")

    def snapshot_text(self) -> str:
        return f"matcalc results: {self._summary_text()}"

    def _render(self) -> None:
        df = self.frame()
        count, rest = self._summary_parts()
        self.summary.value = f"<b>{count}</b> {html.escape(rest)}"
        self.table.value = _frame_html(df)
        options = [("—", None)] + [(f"{e.label()} · {e.result.kind}", e.key)
                                   for e in self._entries if e.result is not None]
        if list(self.selector.options) != options:
            current = self.selector.value
            self.selector.unobserve(self._on_select, names="value")
            self.selector.options = options
            self.selector.value = current if current in [k for _, k in options] else None
            self.selector.observe(self._on_select, names="value")
        if all(e.result is not None or e.error is not None for e in self._entries) and not self._final_published:
            self._final_published = self.publish_snapshot()  # the saved notebook shows the whole table

    def _on_select(self, change: dict[str, Any]) -> None:
        self.show(change["new"])

    def show(self, key: str | None) -> Figure | None:
        """Plot row ``key`` into the output area (None clears it); returns the figure."""
        from IPython.display import Image

        self.plot_output.outputs = ()
        if key is None:
            self.figure = None
            return None
        try:
            fig = self.result(key).plot()
        except Exception as exc:  # noqa: BLE001 - show the problem where the plot would be
            log.exception("plot of %s failed", key)
            self.plot_output.append_stdout(f"plot failed: {type(exc).__name__}: {exc}\n")
            self.figure = None
            return None
        self.figure = fig
        self.plot_output.append_display_data(Image(figure_png(fig)))
        self.publish_snapshot()  # the static copy shows the plot too
        return fig

    def refresh(self) -> None:
        """Redraw now (normally not needed: finished tasks trigger it)."""
        self._throttle.flush()

    def close(self) -> None:
        self._throttle.cancel()
        super().close()


SCROLL_ROWS = 15
"""Tables with more rows than this scroll (at most ~480 px high); smaller ones show every row at once."""


def _frame_html(df: pd.DataFrame, max_rows: int = 200) -> str:
    """The table as HTML: label, status, model, property and error first; ids and duplicates left out
    (``frame()`` keeps every column). Every row shows without scrolling up to `SCROLL_ROWS` rows."""
    if df.empty:
        return "<i>no finished results yet</i>"
    drop = [c for c in ("structure_hash", "task_id") if c in df.columns]
    if "property" in df.columns and "kind" in df.columns:
        drop.append("kind")
    view = df.drop(columns=drop)
    if "error" in view.columns and view["error"].isna().all():
        view = view.drop(columns=["error"])
    first = [c for c in ("label", "status", "model", "property", "kind", "error") if c in view.columns]
    view = view[first + [c for c in view.columns if c not in first]]
    text = view.head(max_rows).to_html(index=False, float_format=lambda v: f"{v:.5g}", na_rep="",
                                       escape=True, border=0)
    more = f"<br><i>… {len(view) - max_rows} more rows</i>" if len(view) > max_rows else ""
    height = "max-height:480px;" if len(view) > SCROLL_ROWS else ""
    return f"<div style='{height}overflow-x:auto;font-size:12px'>{text}{more}</div>"


__all__ = ["ResultsWidget", "figure_png", "results", "results_table"]
