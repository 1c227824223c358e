"""GET /metrics: Prometheus text that prometheus_client's parser reads, whose counters move when tasks
run (checked against the tasks' own records), with GPU gauges from injected NVML readings, queue depth
by priority, model load times, the batching engine's counters and API latency."""

from __future__ import annotations

from datetime import datetime

import pytest
from ase.build import bulk

pytest.importorskip("prometheus_client")

from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from test_observability_alerts import GIB, FakeNVML, nvml  # noqa: E402, F401
from test_observability_logs import cif_of, wait_for  # noqa: E402

from matcalc import batching  # noqa: E402
from matcalc.models.registry import model_load_times  # noqa: E402
from matcalc.server import Settings, create_app  # noqa: E402

API = "/api/v1"
KEY = "metrics-key-123456"


def scrape(c: TestClient, path: str = "/metrics") -> dict[tuple[str, tuple], float]:
    r = c.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text[:300]
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(m: dict, metric: str, **labels) -> float:
    return m.get((metric, tuple(sorted(labels.items()))), 0.0)


def rattled() -> str:
    atoms = bulk("Cu", "fcc", a=3.66, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=3)
    return cif_of(atoms)


def emt_calls() -> float:
    return float(sum(e.stats_snapshot().calls for e in batching.engines() if e.potential.name == "emt"))


def test_metrics_move_when_tasks_run(tmp_path, nvml):  # noqa: F811
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'm.db'}", workers=1, cluster="inprocess",
                              api_keys=[KEY], rate_limit_per_s=0))
    with TestClient(app, headers={"X-API-Key": KEY}) as c:
        before = scrape(c)
        calls_before = emt_calls()
        relax = c.post(f"{API}/tasks/optimization", json={"structure": rattled(), "model": "emt", "fmax": 0.01,
                                                          "optimizer": "BFGS"}).json()["data"]["id"]
        sp = c.post(f"{API}/tasks/single-point", json={"structure": rattled(), "model": "emt"}).json()["data"]["id"]
        for tid in (relax, sp):
            wait_for(lambda tid=tid: c.get(f"{API}/tasks/{tid}").json()["data"]["status"] == "COMPLETED", 120, tid)
        task = c.get(f"{API}/tasks/{relax}").json()["data"]
        steps = c.get(f"{API}/tasks/{relax}/result").json()["data"]["result"]["steps"]
        after = scrape(c)
        also = scrape(c, f"{API}/metrics")
        c.headers.pop("X-API-Key")
        denied = c.get("/metrics")
    assert denied.status_code == 401 and denied.json()["code"] == 20001
    assert val(also, "matcalc_tasks_finished_total", type="optimization", status="COMPLETED") == 1

    def delta(metric: str, **labels) -> float:
        return val(after, metric, **labels) - val(before, metric, **labels)

    assert delta("matcalc_tasks_submitted_total", type="optimization") == 1
    assert delta("matcalc_tasks_started_total", type="single-point") == 1
    assert delta("matcalc_tasks_finished_total", type="optimization", status="COMPLETED") == 1
    assert delta("matcalc_tasks_finished_total", type="single-point", status="COMPLETED") == 1
    assert val(after, "matcalc_tasks", type="optimization", status="COMPLETED") == 1
    run_s = (datetime.fromisoformat(task["finished_at"].replace("Z", "+00:00"))
             - datetime.fromisoformat(task["started_at"].replace("Z", "+00:00"))).total_seconds()
    assert val(after, "matcalc_task_duration_seconds_count", type="optimization", status="COMPLETED") == 1
    total = val(after, "matcalc_task_duration_seconds_sum", type="optimization", status="COMPLETED")
    assert total == pytest.approx(run_s)
    assert val(after, "matcalc_task_duration_seconds_bucket", type="optimization", status="COMPLETED", le="+Inf") == 1
    # batching engine: one fused call per force request here (one calculation at a time)
    calls = delta("matcalc_batching_calls_total", model="emt", device="cpu")
    assert calls == emt_calls() - calls_before and calls >= steps + 1
    n_calls = val(after, "matcalc_batching_batch_size_count", model="emt", device="cpu")
    assert n_calls == val(after, "matcalc_batching_calls_total", model="emt", device="cpu")
    assert val(after, "matcalc_batching_batch_size_sum", model="emt", device="cpu") == val(
        after, "matcalc_batching_structures_total", model="emt", device="cpu")
    assert val(after, "matcalc_batching_fill_ratio_count", model="emt", device="cpu") == n_calls
    assert 0 < val(after, "matcalc_batching_fill_ratio_sum", model="emt", device="cpu") <= n_calls
    assert val(after, "matcalc_model_load_seconds", model="emt", device="cpu") == pytest.approx(
        model_load_times()[("emt", "cpu")])
    # GPU gauges are the injected NVML readings
    assert val(after, "matcalc_gpus") == 2
    assert val(after, "matcalc_gpu_memory_free_bytes", gpu="0", name="NVIDIA H200") == 100 * GIB
    assert val(after, "matcalc_gpu_memory_used_bytes", gpu="1", name="NVIDIA H200") == 41 * GIB
    assert val(after, "matcalc_gpu_utilization_ratio", gpu="0", name="NVIDIA H200") == pytest.approx(0.35)
    assert val(after, "matcalc_gpu_temperature_celsius", gpu="1", name="NVIDIA H200") == 60
    # API latency by route template
    polled = delta("matcalc_http_request_duration_seconds_count", method="GET", route="/api/v1/tasks/{task_id}",
                   status="200")
    assert polled >= 2
    assert delta("matcalc_http_request_duration_seconds_count", method="POST", route="/api/v1/tasks/optimization",
                 status="201") == 1
    assert val(after, "matcalc_log_stream_clients", stream="task") == 0


def test_queue_depth_by_priority_and_public_metrics(tmp_path):
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'q.db'}", workers=0, api_keys=[KEY], metrics_public=True,
                              rate_limit_per_s=0))
    with TestClient(app) as c:
        h = {"X-API-Key": KEY}
        for prio in ("HIGH", "HIGH", "LOW"):
            r = c.post(f"{API}/tasks/single-point", headers=h, json={"structure": rattled(), "model": "emt",
                                                                     "priority": prio})
            assert r.status_code == 201
        m = scrape(c)  # no key needed with metrics_public
    assert val(m, "matcalc_queue_depth", priority="HIGH") == 2 and val(m, "matcalc_queue_depth", priority="LOW") == 1
    assert val(m, "matcalc_queue_depth", priority="NORMAL") == 0
    assert val(m, "matcalc_tasks", type="single-point", status="QUEUED") == 3
    assert val(m, "matcalc_tasks_submitted_total", type="single-point") == 3
