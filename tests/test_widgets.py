"""matcalc.widgets: the progress view driven by task callbacks (real Tasks, futures, a real dask
cluster), the tqdm fallback, the results view with its plots, and plot() of all six result types."""

from __future__ import annotations

import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT

import matcalc as mc
from matcalc import progress as reports
from matcalc.cluster import Task, TaskStatus
from matcalc.widgets import FutureTask, ProgressWidget, ResultsWidget, TqdmProgress, progress, results
from matcalc.widgets.state import ProgressState, Throttle, as_task

pytest.importorskip("ipywidgets")


def make_task(i: int, label: str | None = None) -> Task:
    """A real Task with no cluster: the test drives its lifecycle; cancel() cancels it for real."""
    return Task(task_id=f"t{i}", prop="relax", model="emt", priority="NORMAL", params={},
                label=label or f"Cu-{i}")


def cu(n: int = 1, rattle: float = 0.05, seed: int = 0):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(n)
    atoms.rattle(rattle, seed=seed)
    return atoms


def emt_energy(atoms) -> float:
    a = atoms.copy()
    a.calc = EMT()
    return float(a.get_potential_energy())


def text(html_value: str) -> str:
    return re.sub(r"<[^>]+>", "", html_value)


@pytest.fixture
def widget_and_tasks():
    tasks = [make_task(i) for i in range(3)]
    w = ProgressWidget(tasks, max_rate_hz=1000)
    yield w, tasks
    w.close()


def test_rows_and_counts_follow_callbacks(widget_and_tasks):
    w, (a, b, c) = widget_and_tasks
    w.refresh()
    assert w.counts() == {"PENDING": 3}
    assert w.overall.value == 0 and w.overall.description == "0/3"
    assert text(w.rows["t0"].cells["structure"].value) == "Cu-0"
    assert w.rows["t0"].cells["property"].value == "relax" and w.rows["t0"].cells["model"].value == "emt"

    a.state.advance(TaskStatus.QUEUED)
    b.state.advance(TaskStatus.RUNNING, worker="tcp://w")
    b.state.record_progress({"stage": "relax", "step": 7, "total_steps": 500, "fraction": 7 / 500,
                    "energy_eV": -1.234567, "fmax_eV_per_A": 0.0421})
    w._throttle.flush()
    assert w.counts() == {"PENDING": 1, "QUEUED": 1, "RUNNING": 1}
    row = w.rows["t1"]
    assert text(row.cells["status"].value) == "RUNNING"
    assert row.cells["step"].value == "relax 7/500"
    assert row.cells["energy"].value == "-1.2346 eV"
    assert row.cells["fmax"].value == "0.0421 eV/Å"
    assert row.bar.value == pytest.approx(7 / 500)
    assert row.cells["elapsed"].value.endswith(" s")  # running: elapsed shown
    assert w.rows["t0"].cells["elapsed"].value == ""  # queued: none yet
    assert "1 running" in text(w.summary.value) and "1 queued" in text(w.summary.value)

    result = mc.relax(cu(), "emt", protocol="fast")
    b.state.finish(TaskStatus.COMPLETED, result=result)
    c.state.advance(TaskStatus.RUNNING)
    c.state.finish(TaskStatus.FAILED, error=ValueError("fmax must be > 0, got -1"))
    w._throttle.flush()
    assert w.counts() == {"QUEUED": 1, "COMPLETED": 1, "FAILED": 1}
    assert w.overall.value == 2 and w.overall.description == "2/3"
    assert w.overall.bar_style == "danger"
    assert w.rows["t1"].bar.value == 1.0 and w.rows["t1"].cancel.disabled
    assert w.rows["t1"].cells["step"].value == "relax 7/500"  # last progress kept after completion
    failed = w.rows["t2"]
    assert failed.error.layout.display == "block"
    assert "ValueError: fmax must be &gt; 0, got -1" in failed.error.value
    assert w.rows["t1"].error.layout.display == "none"
    # elapsed of a finished task is frozen at its end
    frozen = w.rows["t1"].cells["elapsed"].value
    time.sleep(0.15)
    w.refresh()
    assert w.rows["t1"].cells["elapsed"].value == frozen


def test_cancel_buttons_call_cancel(widget_and_tasks):
    w, (a, b, c) = widget_and_tasks
    b.state.advance(TaskStatus.RUNNING)
    w.rows["t1"].cancel.click()
    assert b.status == TaskStatus.CANCELLED
    assert a.status == TaskStatus.PENDING and c.status == TaskStatus.PENDING
    w._throttle.flush()
    assert w.rows["t1"].cancel.disabled and text(w.rows["t1"].cells["status"].value) == "CANCELLED"
    assert w.rows["t1"].error.layout.display == "none"  # a cancel is not an error
    a.state.finish(TaskStatus.COMPLETED, result=mc.single_point(cu(), "emt"))
    w.cancel_all_button.click()
    assert c.status == TaskStatus.CANCELLED and a.status == TaskStatus.COMPLETED  # finished ones stay
    assert w.wait(5)
    assert w.cancel_all_button.disabled
    assert w.counts() == {"COMPLETED": 1, "CANCELLED": 2}


def test_cancel_calls_the_task_like_objects_cancel():
    class Fake:
        """A minimal task-like object (what the client's RemoteTask will provide)."""

        def __init__(self, i):
            self.id, self.status, self.progress, self.cancelled = f"f{i}", "RUNNING", None, 0
            self._done = []

        def add_done_callback(self, fn):
            self._done.append(fn)

        def add_progress_callback(self, fn):
            pass

        def cancel(self):
            self.cancelled += 1
            self.status = "CANCELLED"
            for fn in self._done:
                fn(self)
            return True

        def result(self, timeout=None):
            raise RuntimeError("no result")

        def exception(self, timeout=None):
            return None

    fakes = [Fake(i) for i in range(2)]
    w = ProgressWidget(fakes, max_rate_hz=1000)
    w.rows["f0"].cancel.click()
    assert [f.cancelled for f in fakes] == [1, 0]
    w.cancel_all_button.click()
    assert [f.cancelled for f in fakes] == [1, 1]
    assert w.wait(2) and w.counts() == {"CANCELLED": 2}
    w.close()


def test_updates_are_throttled_and_merged():
    task = make_task(0)
    task.state.advance(TaskStatus.RUNNING)
    w = ProgressWidget([task], max_rate_hz=20)  # at most one refresh per 50 ms
    calls0 = w._throttle.calls
    t0 = time.monotonic()
    for step in range(2000):
        task.state.record_progress({"stage": "md", "step": step, "total_steps": 2000, "energy_eV": -float(step)})
    elapsed = time.monotonic() - t0
    w._throttle.flush()
    assert w._throttle.calls - calls0 <= elapsed / 0.05 + 2  # 2000 events, a handful of refreshes
    assert w.rows["t0"].cells["step"].value == "md 1999/2000"  # the latest event wins
    w.close()


def test_throttle_runs_once_for_a_burst():
    seen = []
    done = threading.Event()
    th = Throttle(lambda: (seen.append(1), done.set()), min_interval_s=0.5)
    for _ in range(100):
        th.request()
    assert done.wait(5)
    time.sleep(0.8)
    assert 1 <= len(seen) <= 2  # the first request may run at once; the other 99 merge into one call
    th.flush()
    assert len(seen) <= 3


def test_futures_are_accepted():
    gate = threading.Event()

    def ok():
        gate.wait(10)
        return 42

    def bad():
        gate.wait(10)
        raise RuntimeError("boom in a thread")

    with ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(ok), pool.submit(bad)]
        w = ProgressWidget(futs, max_rate_hz=1000)
        assert all(isinstance(t, FutureTask) for t in w.state.tasks)
        w.refresh()
        assert set(w.counts()) <= {"QUEUED", "RUNNING"}
        gate.set()
        assert w.wait(10)
    ids = [t.id for t in w.state.tasks]
    assert w.counts() == {"COMPLETED": 1, "FAILED": 1}
    assert "RuntimeError: boom in a thread" in w.rows[ids[1]].error.value
    assert w.rows[ids[1]].error.layout.display == "block"
    w.close()


def test_bad_inputs():
    with pytest.raises(TypeError, match="task-like"):
        as_task(3)
    with pytest.raises(ValueError, match="mode"):
        progress([], mode="html")
    with pytest.raises(ValueError, match="max_rate_hz"):
        progress([], max_rate_hz=0)
    with pytest.raises(ValueError, match="distinct ids"):
        ProgressState([make_task(1), make_task(1)])


def test_tqdm_fallback_without_a_kernel():
    tasks = [make_task(i) for i in range(3)]
    out = io.StringIO()
    view = progress(tasks, file=out, max_rate_hz=1000)  # pytest has no Jupyter kernel
    assert isinstance(view, TqdmProgress)
    tasks[0].state.advance(TaskStatus.RUNNING)
    tasks[0].state.finish(TaskStatus.COMPLETED, result=mc.single_point(cu(), "emt"))
    tasks[1].state.finish(TaskStatus.FAILED, error=RuntimeError("x"))
    view._throttle.flush()
    assert view.bar.n == 2
    assert "1 pending, 1 completed, 1 failed" in out.getvalue()
    assert view.cancel_all() == 1 and tasks[2].status == TaskStatus.CANCELLED
    assert view.wait(5)
    assert view.bar.n == 3 and "3/3" in out.getvalue()


def test_widget_mode_is_a_widget():
    task = make_task(0)
    view = progress([task], mode="widget", display=False)
    assert isinstance(view, ProgressWidget)
    import ipywidgets

    assert isinstance(view, ipywidgets.VBox)
    view.close()


def test_results_view_grows_and_plots():
    atoms = [cu(1, 0.05, seed=s) for s in range(3)]
    tasks = [make_task(i, label=f"Cu-{i}") for i in range(3)]
    view = ResultsWidget(tasks, max_rate_hz=1000)
    assert view.frame().empty and "no finished results" in view.table.value
    sp = mc.single_point(atoms[0], "emt")
    tasks[0].state.finish(TaskStatus.COMPLETED, result=sp)
    tasks[1].state.finish(TaskStatus.FAILED, error=ValueError("bad structure"))
    view.refresh()
    df = view.frame()
    assert list(df["task_id"]) == ["t0", "t1"]
    assert df.loc[0, "energy_eV"] == pytest.approx(emt_energy(atoms[0]), abs=1e-10)
    assert df.loc[1, "status"] == "FAILED" and df.loc[1, "error"] == "ValueError: bad structure"
    assert "1/3" not in view.summary.value and "2/3" in text(view.summary.value)
    assert [k for _, k in view.selector.options] == [None, "t0"]  # only rows with a result
    r = mc.relax(atoms[2], "emt", protocol="fast")
    tasks[2].state.finish(TaskStatus.COMPLETED, result=r)
    view.refresh()
    assert [k for _, k in view.selector.options] == [None, "t0", "t2"]
    view.selector.value = "t2"  # what a click does
    assert view.figure is not None
    assert view.figure.axes[0].get_ylabel() == "E − E_final (eV)"
    (out,) = view.plot_output.outputs
    assert out["data"]["image/png"]  # the PNG of result.plot()
    view.selector.value = None
    assert view.figure is None and view.plot_output.outputs == ()
    view.close()


def test_results_of_plain_results():
    a, b = cu(1, 0.02, seed=1), cu(1, 0.02, seed=2)
    rs = [mc.single_point(a, "emt"), mc.single_point(b, "emt"), RuntimeError("failed")]
    view = results(rs, display=False)
    df = view.frame()
    np.testing.assert_allclose(df["energy_eV"][:2], [emt_energy(a), emt_energy(b)], atol=1e-10)
    assert df.loc[2, "error"] == "RuntimeError: failed"
    view.show("1")
    assert view.figure.axes[0].get_ylabel() == "|F| (eV/Å)"
    view.close()


UNIT = re.compile(r"\((?:[^()]|\([^()]*\))+\)\s*$")  # "(eV)", "(J/(K·g))" at the end of a label


def test_every_result_plot_is_a_figure_with_units():
    """plot() of every result kind returns a Figure whose value axes carry units."""
    from ase import Atoms
    from matplotlib.figure import Figure

    atoms = cu(1, 0.05, seed=1)
    lj_pores = Atoms("C4", scaled_positions=[[0, 0, 0], [0.5, 0.1, 0], [0.1, 0.5, 0.3], [0.3, 0.2, 0.6]],
                     cell=[8.0, 8.0, 8.0], pbc=True)  # a small LJ framework with room for an argon atom
    made = {
        "single_point": mc.single_point(atoms, "emt"),
        "relax": mc.relax(atoms, "emt", protocol="fast"),
        "bulk_modulus": mc.bulk_modulus(atoms, "emt", protocol="fast"),
        "heat_capacity": mc.heat_capacity(bulk("Cu", "fcc", a=3.6), "emt", supercell=(2, 2, 2), mesh=8,
                                          fmax=0.01, t_max=500.0, t_step=50.0),
        "stability": mc.stability(atoms.repeat((2, 1, 1)), "emt", nvt_steps=20, npt_steps=20, interval=5,
                                  fmax=0.05),
        "interaction_energy": mc.interaction_energy(fcc111("Cu", (2, 2, 3), vacuum=6.0, periodic=True), "CO2",
                                                    "emt"),
        "elastic_tensor": mc.elastic_tensor(bulk("Cu", "fcc", a=3.6), "emt", n_strains=2, fmax=0.01),
        "phonons": mc.phonons(bulk("Cu", "fcc", a=3.6), "emt", supercell=(2, 2, 2), mesh=8, band_points=5,
                              fmax=0.01, t_max=500.0, t_step=50.0),
        "thermal_expansion": mc.thermal_expansion(bulk("Cu", "fcc", a=3.6), "emt", supercell=(2, 2, 2), mesh=8,
                                                  n_volumes=5, volume_range=(0.97, 1.05), fmax=0.01, t_max=300.0,
                                                  t_step=50.0),
        "henry_coefficient": mc.henry_coefficient(lj_pores, "Ar", model="lj", n_insertions=200, seed=1),
        "binding_sites": mc.binding_sites(lj_pores, "Ar", model="lj", n_insertions=100, n_candidates=4, n_sites=2,
                                          fmax=0.01, max_steps=200),
    }
    assert set(made) == set(mc.calculations.PROPERTIES)
    dimensionless_x = {"optimizer step", "atom index"}
    for kind, result in made.items():
        assert result.kind == kind
        fig = result.plot()
        assert isinstance(fig, Figure), kind
        for ax in fig.axes:
            assert UNIT.search(ax.get_ylabel()), (kind, ax.get_ylabel())
            assert ax.has_data(), kind
        xlabels = [ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()]  # a twin y axis carries none
        categorical = kind in ("interaction_energy", "binding_sites")  # bars: complex / host / guest / sites
        assert categorical or xlabels, kind
        for xlabel in xlabels:
            assert categorical or xlabel in dimensionless_x or UNIT.search(xlabel), (kind, xlabel)
        # plotting onto given axes returns that axes' figure
        other = Figure()
        ax = other.add_subplot()
        assert result.plot(ax=ax) is other


@pytest.fixture(scope="module")
def cl():
    with mc.cluster.start(n_gpus=0, n_workers=1, threads_per_worker=2, preload=("emt",), dashboard=False,
                          torch_threads=1) as c:
        yield c


@pytest.mark.slow
def test_live_widget_on_a_real_cluster(cl):
    """EMT relaxations on a CPU LocalCluster: the widget follows them through the dask event stream."""
    structures = [cu(3, 0.2, seed=s) for s in range(3)]
    tasks = cl.map("relax", structures, model="emt", fmax=1e-4, optimizer="FIRE", relax_cell=False,
                   max_steps=3000)
    fe = bulk("Fe", "bcc", a=2.87, cubic=True)  # EMT has no Fe: fails on the worker
    tasks.append(cl.submit("single_point", fe, model="emt"))
    tasks.append(cl.submit("relax", "no-such-file.cif", model="emt"))  # fails on the client at once
    w = progress(tasks, mode="widget", display=False, max_rate_hz=10)
    assert w.wait(180)
    assert w.counts() == {"COMPLETED": 3, "FAILED": 2}
    assert w.overall.value == 5
    stepped = 0
    for t in tasks[:3]:
        row = w.state.row(t.id)
        r = t.result()
        assert row.status == "COMPLETED" and row.elapsed_s() > 0
        if row.step is not None:  # progress events arrived over dask's event stream
            stepped += 1
            assert row.energy_eV == pytest.approx(r.energies_eV[row.step], abs=1e-9)
    assert stepped >= 1
    assert "Fe" in w.rows[tasks[3].id].error.value
    assert "no-such-file.cif" in w.rows[tasks[4].id].error.value
    df = results(tasks, display=False).frame()
    assert list(df["status"]) == ["COMPLETED"] * 3 + ["FAILED"] * 2
    np.testing.assert_allclose(df["final_energy_eV"][:3], [t.result().final_energy_eV for t in tasks[:3]])
    w.close()


def test_shown_once_per_cell(monkeypatch):
    """progress() displays the widget and returns it; as the cell's last expression it must not
    appear a second time (the same cell), but it may be shown again from a later cell."""
    import IPython.display

    import importlib

    progress_module = importlib.import_module("matcalc.widgets.progress")  # the module, not the function

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *a, **k: shown.append(a))
    count = [5]
    monkeypatch.setattr(progress_module, "_execution_count", lambda: count[0])
    view = ProgressWidget([make_task(0)])
    view._ipython_display_()          # progress(display=True) in cell 5
    view._ipython_display_()          # the returned value, displayed by cell 5's displayhook
    assert len(shown) == 1 and "application/vnd.jupyter.widget-view+json" in shown[0][0]
    count[0] = 6
    view._ipython_display_()          # `view` evaluated again in cell 6
    assert len(shown) == 2
    view.close()


@pytest.mark.slow
def test_dask_futures_on_a_real_cluster(cl):
    """Plain dask futures (no matcalc Task): status, result and error in the widget and the table."""
    import operator

    futs = [cl.client.submit(operator.add, 1, 2, pure=False), cl.client.submit(operator.truediv, 1, 0, pure=False)]
    w = ProgressWidget(futs, max_rate_hz=1000)
    assert w.wait(60)
    w.refresh()
    assert w.counts() == {"COMPLETED": 1, "FAILED": 1}
    assert "ZeroDivisionError" in w.rows[futs[1].key].error.value
    view = ResultsWidget(futs)
    df = view.frame()  # 3 is not a matcalc result: the row says so instead of failing
    assert list(df["error"]) == ["not a matcalc result: int", "ZeroDivisionError: division by zero"]
    view.close()
    w.close()


def test_many_tasks_show_running_and_failed_first():
    tasks = [make_task(i) for i in range(5)]
    w = ProgressWidget(tasks, max_rate_hz=1000, max_rows=2)
    w.refresh()
    assert list(w.rows) == ["t0", "t1"] and len(w.children) == 2 + 2 + 1  # header rows, 2 slots, note
    assert "showing 2 of 5 tasks" in w.more.value
    tasks[3].state.advance(TaskStatus.RUNNING)
    tasks[3].state.record_progress({"stage": "relax", "step": 3, "total_steps": 10, "energy_eV": -2.0})
    tasks[4].state.finish(TaskStatus.FAILED, error=RuntimeError("worker died"))
    w._throttle.flush()
    assert list(w.rows) == ["t3", "t4"]
    assert w.rows["t3"].cells["step"].value == "relax 3/10"
    assert "RuntimeError: worker died" in w.rows["t4"].error.value
    assert w.counts() == {"PENDING": 3, "RUNNING": 1, "FAILED": 1} and w.overall.description == "1/5"
    w.rows["t3"].cancel.click()  # the slot's button cancels the task it shows now
    assert tasks[3].status == TaskStatus.CANCELLED
    w._throttle.flush()
    assert list(w.rows) == ["t4", "t0"]  # failed first, then waiting in order
    assert w.rows["t0"].bar.value == 0.0 and w.rows["t0"].cells["step"].value == ""  # slot fully redrawn
    with pytest.raises(ValueError, match="max_rows"):
        ProgressWidget(tasks, max_rows=0)
    w.close()


def test_results_table_shows_every_finished_row_including_failures():
    """'7/7 finished' means seven rows in the table, the failed one included, all visible without scrolling."""
    tasks = [make_task(i, label=f"Cu-{i}") for i in range(6)] + [make_task(6, label="Fe (not in EMT)")]
    view = ResultsWidget(tasks, max_rate_hz=1000)
    sp = mc.single_point(cu(1, 0.05, seed=0), "emt")
    for t in tasks[:6]:
        t.state.finish(TaskStatus.COMPLETED, result=sp)
    tasks[6].state.finish(TaskStatus.FAILED, error=mc.StructureError("elements not supported by the model: Fe"))
    view.refresh()
    assert text(view.summary.value) == "7/7 finished (6 completed, 1 failed)"
    body = view.table.value.split("<tbody>")[1]
    assert body.count("<tr") == 7 and "Fe (not in EMT)" in body and "elements not supported" in body
    assert "max-height" not in view.table.value  # a small table is shown whole
    view.close()


def test_saved_output_holds_the_final_state_and_a_static_copy(monkeypatch):
    """The displayed output carries a static snapshot (text/html, text/plain) beside the widget view; once every
    task has finished it is replaced, under the same display id, by the final state: a notebook saved then, or
    exported with nbconvert, shows the outcome and not '2 running'."""
    import IPython.display

    shown, updated = [], []
    monkeypatch.setattr(IPython.display, "display", lambda data, **kw: shown.append((data, kw)))
    monkeypatch.setattr(IPython.display, "update_display", lambda data, **kw: updated.append((data, kw)))
    tasks = [make_task(0), make_task(1)]
    tasks[0].state.advance(TaskStatus.RUNNING, worker="tcp://w")
    tasks[1].state.advance(TaskStatus.RUNNING, worker="tcp://w")
    w = ProgressWidget(tasks, max_rate_hz=1000)
    w._ipython_display_()
    ((data, kw),) = shown
    assert "application/vnd.jupyter.widget-view+json" in data and kw["display_id"]
    assert "2 running" in text(data["text/html"]) and data["text/plain"].startswith("matcalc: 0/2 tasks finished")
    assert updated == []
    tasks[0].state.finish(TaskStatus.COMPLETED, result=mc.single_point(cu(), "emt"))
    tasks[1].state.finish(TaskStatus.FAILED, error=ValueError("bad structure"))
    w.refresh()
    (final, fkw), = updated
    assert fkw["display_id"] == kw["display_id"]
    assert "application/vnd.jupyter.widget-view+json" in final
    page = text(final["text/html"])
    assert "2/2 tasks finished" in page and "1 completed" in page and "1 failed" in page
    assert "running" not in page and "ValueError: bad structure" in page and "Cu-0" in page
    assert final["text/plain"] == "matcalc: 2/2 tasks finished (1 completed, 1 failed)"
    w.refresh()
    assert len(updated) == 1  # published once
    assert w._repr_html_() == final["text/html"]

    view = ResultsWidget(tasks, max_rate_hz=1000)
    view._ipython_display_()
    view.refresh()
    assert "1 failed" in text(shown[-1][0]["text/html"]) and "bad structure" in shown[-1][0]["text/html"]
    view.show("t0")  # a plot selected afterwards is in the static copy too
    assert "data:image/png;base64," in updated[-1][0]["text/html"]
    view.close()
    w.close()


def test_single_calls_report_to_the_notebook_fallback_only_when_nobody_listens():
    """In a notebook, a single call with no sink of its own reports to the fallback sink (the progress line); in
    a reporting block, in another thread, or with no fallback (scripts, tests) nothing reaches it."""
    from matcalc.widgets.call import CallProgress

    assert reports.fallback_sink() is None  # not a kernel: `import matcalc` installed nothing
    seen = []
    previous = reports.set_fallback_sink(seen.append)
    try:
        r = mc.relax(cu(1, 0.05), "emt", fmax=0.01, cache=False)
        steps = [e.step for e in seen if e.stage == "relax"]
        assert steps == list(range(r.steps + 1)) and seen[-1].energy_eV == pytest.approx(r.final_energy_eV)
        n = len(seen)
        with reports.reporting(None):
            mc.relax(cu(1, 0.05), "emt", fmax=0.01, cache=False)
        thread = threading.Thread(target=lambda: mc.relax(cu(1, 0.05), "emt", fmax=0.01, cache=False))
        thread.start()
        thread.join()
        assert len(seen) == n
    finally:
        reports.set_fallback_sink(previous)
    # the line itself: one HTML display per cell, updated in place, the last event shown
    import IPython.display

    line = CallProgress(max_rate_hz=1e9)
    handles = []

    class Handle:
        def __init__(self, data):
            self.data = [data]

        def update(self, data, **kw):
            self.data.append(data)

    def fake_display(data, **kw):
        handles.append(Handle(data))
        return handles[-1]

    old = IPython.display.display
    IPython.display.display = fake_display
    try:
        for step in range(3):
            line(reports.ProgressEvent("relax", step, 500, energy_eV=-1.5 - step, fmax_eV_per_A=0.1))
        line(reports.ProgressEvent("eos", 2, 7))
    finally:
        IPython.display.display = old
    (h,) = handles
    last = h.data[-1]
    assert "relax 2/500 · E -3.50000 eV · fmax 0.1 eV/Å" in last["text/plain"] and "eos 2/7" in last["text/plain"]
    assert "<progress value='2' max='500'" in last["text/html"]
