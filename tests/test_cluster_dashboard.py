"""The dask dashboard on a default install: ``start()`` serves it (bokeh is a core dependency) and prints its
link; the notebook repr links it; task keys carry property and structure label, as the dashboard's progress
bars and task stream show them; the workers' batching counters are visible from the scheduler (its
Prometheus ``/metrics``, the ``/matcalc/batching`` page, ``Cluster.batching()``)."""

from __future__ import annotations

import contextlib
import io
import json
import time
import urllib.request

import numpy as np
import pytest
from ase.build import bulk
from dask.utils import key_split
from prometheus_client.parser import text_string_to_metric_families

import matcalc as mc
from matcalc import cluster
from matcalc.cluster.worker import batching_counters


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read().decode()


@pytest.fixture(scope="module")
def started():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        c = cluster.start(n_gpus=0, n_workers=1, threads_per_worker=1, preload=("emt",), torch_threads=1)
    with c:
        yield c, out.getvalue()


def test_dashboard_link_answers_and_is_printed_and_shown(started):
    cl, printed = started
    link = cl.dashboard_link
    assert link and link.startswith("http://") and link.endswith("/status")
    status, body = get(link)
    assert status == 200 and "bokeh" in body.lower()  # the real dashboard page, not dask's "install bokeh" note
    assert link in printed and "dashboard" in printed  # start() printed it (a notebook shows stdout)
    html = cl._repr_html_()
    assert f"href='{link}'" in html and cl.address in html and "local, CPU workers" in html
    assert cl.batching_link and cl.batching_link in html


def test_task_keys_carry_property_and_label(started):
    """The dashboard's task stream shows each task's key: property and structure; its progress bars group by
    the key's prefix, which is the property alone (``key_split``, as dask computes it)."""
    cl, _ = started
    atoms = []
    for i, name in enumerate(["CALF-20", "MOF-5 (prim)"]):
        a = bulk("Cu", "fcc", a=3.62, cubic=True)
        a.rattle(0.05, seed=i)
        a.info["label"] = name
        atoms.append(a)
    cl.client.get_task_stream()  # the scheduler records the task stream from here on (as the dashboard does)
    t0 = time.time()
    tasks = cl.map("relax", atoms, model="emt", fmax=1e-3, relax_cell=False)
    frame = cl.gather_frame(tasks, timeout=180)
    assert frame["status"].tolist() == ["COMPLETED"] * 2 and frame["label"].tolist() == ["CALF-20", "MOF-5 (prim)"]
    for t, a in zip(tasks, atoms, strict=True):  # the same results as in-process
        np.testing.assert_allclose(t.result().energies_eV, mc.relax(a, "emt", fmax=1e-3, relax_cell=False).energies_eV,
                                   rtol=0, atol=1e-10)
    stream = cl.client.get_task_stream(start=t0)
    keys = sorted(str(r["key"]) for r in stream if str(r["key"]).startswith("relax-"))
    assert len(keys) == 2, [r["key"] for r in stream]
    assert keys[0].startswith("relax-[CALF-20]-") and keys[1].startswith("relax-[MOF-5_prim]-")
    assert {key_split(k) for k in keys} == {"relax"}
    prefixes = cl.client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert "relax" in prefixes and not any("CALF" in p for p in prefixes)


def test_batching_counters_reach_the_scheduler(started):
    """What each worker's batching engine counted (read on the worker itself) is what the scheduler serves on
    /metrics, on the batching page and to Cluster.batching()."""
    cl, _ = started
    a = bulk("Cu", "fcc", a=3.62, cubic=True)
    a.rattle(0.05, seed=9)
    a.info["label"] = "counted"
    cl.submit("relax", a, model="emt", fmax=1e-3, relax_cell=False).result(120)
    ((addr, on_worker),) = cl.client.run(batching_counters).items()
    (emt,) = [r for r in on_worker if r["model"] == "emt"]
    assert emt["calls"] > 0 and emt["atoms"] >= 4 * emt["calls"] and emt["model_time_s"] > 0

    def scheduler_rows():
        frame = cl.batching()
        return frame[(frame["worker"] == addr) & (frame["model"] == "emt")] if len(frame) else frame

    # the heartbeat brings them (about every second): wait until the scheduler has the worker's latest numbers
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (len(scheduler_rows()) == 0 or
                                           int(scheduler_rows()["calls"].iloc[0]) < emt["calls"]):
        time.sleep(0.2)
    row = scheduler_rows().iloc[0]
    assert int(row["calls"]) == emt["calls"] and int(row["atoms"]) == emt["atoms"]
    assert row["atoms_per_s"] == pytest.approx(row["atoms"] / row["model_time_s"])
    assert 0 < row["mean_fill"] <= 1

    base = cl.dashboard_link.rsplit("/status", 1)[0]
    status, text = get(base + "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    calls = families["matcalc_worker_batching_calls"]
    (sample,) = [s for s in calls.samples if s.labels.get("worker") == addr and s.labels.get("model") == "emt"]
    assert sample.value == int(row["calls"])
    fill = families["matcalc_worker_batching_mean_fill_ratio"]
    assert any(s.labels.get("worker") == addr and s.value == pytest.approx(row["mean_fill"]) for s in fill.samples)
    status, page = get(cl.batching_link)
    assert status == 200 and addr in page and "emt" in page
    status, raw = get(cl.batching_link + ".json")
    assert any(r["worker"] == addr and r["model"] == "emt" and r["calls"] == int(row["calls"])
               for r in json.loads(raw))
