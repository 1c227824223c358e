"""Alerts: every built-in rule fires and resolves from a driven condition.

GPU readings are injected through the NVML layer (a fake ``pynvml`` module behind
``matcalc.cluster.gpus``), queue backlog and model failures come from real tasks, disk free from the
real file system with the threshold moved, API p99 from recorded request latencies, workers from the
executor's provider. Alerts are read back over HTTP; the file and webhook notifiers are checked.
"""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import pytest
from ase.build import bulk

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from test_observability_logs import cif_of, wait_for  # noqa: E402
from test_observability_webhooks import Receiver, hmac_ok  # noqa: E402

from matcalc.server import Settings, create_app  # noqa: E402
from matcalc.server.alerts import builtin_rules  # noqa: E402

API = "/api/v1"
GIB = 1024**3
CU = cif_of(bulk("Cu", "fcc", a=3.6, cubic=True))
ZN = cif_of(bulk("Zn", "hcp", a=2.66, c=4.95))  # EMT has no Zn parameters: such tasks fail


class FakeNVML:
    """The subset of ``pynvml`` that :func:`matcalc.cluster.gpus` calls, with settable readings."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, n: int = 2) -> None:
        self.devices = [{"name": "NVIDIA H200", "total": 141 * GIB, "free": 100 * GIB, "util": 35, "temp": 60,
                         "lost": False} for _ in range(n)]

    def nvmlDeviceGetCount(self):  # noqa: N802
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i):  # noqa: N802
        if self.devices[i]["lost"]:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        return self.devices[i]

    def nvmlDeviceGetName(self, h):  # noqa: N802
        return h["name"].encode()

    def nvmlDeviceGetUUID(self, h):  # noqa: N802
        return f"GPU-{self.devices.index(h)}"

    def nvmlDeviceGetMemoryInfo(self, h):  # noqa: N802
        return SimpleNamespace(total=h["total"], free=h["free"], used=h["total"] - h["free"])

    def nvmlDeviceGetUtilizationRates(self, h):  # noqa: N802
        return SimpleNamespace(gpu=h["util"], memory=10)

    def nvmlDeviceGetTemperature(self, h, sensor):  # noqa: N802
        return h["temp"]

    def nvmlDeviceGetPowerUsage(self, h):  # noqa: N802
        return 300_000


@pytest.fixture
def nvml(monkeypatch):
    fake = FakeNVML()
    monkeypatch.setattr(importlib.import_module("matcalc.cluster.gpus"), "_pynvml", lambda: fake)
    return fake


def make_client(tmp_path, **settings) -> TestClient:
    settings.setdefault("db_url", f"sqlite:///{tmp_path / 'alerts.db'}")
    settings.setdefault("workers", 0)
    settings.setdefault("cluster", "inprocess")
    settings.setdefault("alert_interval_s", 3600)  # evaluated by hand unless a test wants the timer
    settings.setdefault("rate_limit_per_s", 0)
    settings.setdefault("alert_disk_free_gb", 0)  # the machine's real free space must not interfere
    return TestClient(create_app(Settings(**settings)))


def active(c: TestClient) -> dict[tuple[str, str], dict]:
    return {(a["rule"], a["key"]): a for a in c.get(f"{API}/system/alerts/active").json()["data"]}


def test_gpu_rules_from_nvml_readings_and_notifiers(tmp_path, nvml):
    key = "alert-signing-key"
    with Receiver() as rx, make_client(tmp_path, alert_file=str(tmp_path / "alerts.jsonl"),
                                       alert_webhook_urls=[rx.url], alert_webhook_signing_key=key) as c:
        engine = c.app.state.observability.alerts
        assert engine.evaluate() == ([], []) and active(c) == {}
        nvml.devices[0]["free"] = 1.5 * GIB  # < 2 GB
        nvml.devices[1]["temp"] = 91  # > 85 °C
        opened, _ = engine.evaluate()
        assert {(a["rule"], a["key"]) for a in opened} == {("gpu_memory_low", "0"), ("gpu_temperature_high", "1")}
        a = active(c)
        assert a[("gpu_memory_low", "0")]["data"]["value"] == pytest.approx(1.5)
        hot = a[("gpu_temperature_high", "1")]
        assert hot["data"]["value"] == 91 and "91" in hot["message"]
        assert engine.evaluate() == ([], [])  # still true: nothing new, nothing duplicated
        nvml.devices[0]["free"] = 50 * GIB
        nvml.devices[1]["lost"] = True  # NVML error on GPU 1
        opened, resolved = engine.evaluate()
        assert [(x["rule"], x["key"]) for x in opened] == [("gpu_unavailable", "1")]
        assert {(x["rule"], x["key"]) for x in resolved} == {("gpu_memory_low", "0"), ("gpu_temperature_high", "1")}
        assert "NVML_ERROR_GPU_IS_LOST" in opened[0]["message"]
        nvml.devices.pop()  # GPU 1 no longer listed at all: the same alert stays open
        assert engine.evaluate() == ([], [])
        assert set(active(c)) == {("gpu_unavailable", "1")}
        nvml.devices.append(dict(nvml.devices[0]))  # back
        _, resolved = engine.evaluate()
        assert [(x["rule"], x["key"]) for x in resolved] == [("gpu_unavailable", "1")] and active(c) == {}
        hist = c.get(f"{API}/system/alerts/history").json()["data"]
        assert hist["total"] == 3 and all(x["status"] == "resolved" and x["resolved_at"] for x in hist["items"])
        only = c.get(f"{API}/system/alerts/history", params={"rule": "gpu_unavailable"}).json()["data"]
        assert only["total"] == 1
        wait_for(lambda: len(rx.of("alert.resolved")) == 3, 20, "alert webhooks")
    events = [json.loads(x) for x in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert [(e["event"], e["rule"]) for e in events].count(("alert.opened", "gpu_unavailable")) == 1
    assert sum(e["event"] == "alert.opened" for e in events) == 3
    assert sum(e["event"] == "alert.resolved" for e in events) == 3
    hooks = rx.of("alert.opened")
    assert len(hooks) == 3 and all(hmac_ok(key, h) for h in hooks)
    assert {json.loads(h["body"])["alert"]["rule"] for h in hooks} == {"gpu_memory_low", "gpu_temperature_high",
                                                                      "gpu_unavailable"}


def test_queue_backlog_evaluated_periodically(tmp_path):
    with make_client(tmp_path, alert_queue_backlog=3, alert_interval_s=0.2) as c:
        tasks = [{"type": "single-point", "structure": CU, "model": "emt"} for _ in range(4)]
        ids = [t["id"] for t in c.post(f"{API}/tasks/batch", json={"tasks": tasks}).json()["data"]["tasks"]]
        a = wait_for(lambda: active(c).get(("queue_backlog", "queue")), 20, "backlog alert")
        assert a["data"]["value"] == 4 and a["data"]["threshold"] == 3 and a["message"] == "4 tasks waiting (> 3)"
        # the queue grows: the open alert carries the current value (same alert, the first value kept)
        more = c.post(f"{API}/tasks/batch", json={"tasks": tasks + tasks[:2]}).json()["data"]["tasks"]
        ids += [t["id"] for t in more]
        grown = wait_for(lambda: (x := active(c).get(("queue_backlog", "queue"))) and x["data"]["value"] == 10 and x,
                         20, "the alert to follow the queue")
        assert grown["id"] == a["id"] and grown["message"] == "10 tasks waiting (> 3)"
        assert grown["data"]["opened_value"] == 4 and grown["data"]["updated_at"]
        assert c.get(f"{API}/system/alerts/history").json()["data"]["total"] == 1
        for tid in ids[:7]:  # 3 left: not above the threshold
            c.post(f"{API}/tasks/{tid}/cancel")
        wait_for(lambda: ("queue_backlog", "queue") not in active(c), 20, "backlog alert to resolve")
        assert c.get(f"{API}/system/alerts/history").json()["data"]["items"][0]["status"] == "resolved"


def test_consecutive_failures_of_one_model(tmp_path):
    with make_client(tmp_path, workers=1) as c:  # default threshold: 5 in a row
        engine = c.app.state.observability.alerts

        def run(cif: str, n: int, status: str) -> None:
            tasks = [{"type": "single-point", "structure": cif, "model": "emt"} for _ in range(n)]
            ids = [t["id"] for t in c.post(f"{API}/tasks/batch", json={"tasks": tasks}).json()["data"]["tasks"]]
            for tid in ids:
                assert wait_for(lambda tid=tid: c.get(f"{API}/tasks/{tid}").json()["data"]["status"]
                                in ("COMPLETED", "FAILED"), 60, "task") is True
                assert c.get(f"{API}/tasks/{tid}").json()["data"]["status"] == status

        run(ZN, 4, "FAILED")
        assert engine.evaluate()[0] == []  # 4 < 5
        run(ZN, 1, "FAILED")
        opened, _ = engine.evaluate()
        assert [(a["rule"], a["key"], a["data"]["value"]) for a in opened] == [("model_failures", "emt", 5)]
        run(CU, 1, "COMPLETED")  # a success breaks the streak
        _, resolved = engine.evaluate()
        assert [(a["rule"], a["key"]) for a in resolved] == [("model_failures", "emt")]


def test_disk_api_latency_and_worker_rules(tmp_path):
    with make_client(tmp_path, workers=2, alert_api_min_samples=20, alert_disk_free_gb=50) as c:
        obs = c.app.state.observability
        engine = obs.alerts
        rules = {r["name"]: r for r in c.get(f"{API}/system/alerts/rules").json()["data"]}
        assert set(rules) == {"gpu_unavailable", "gpu_memory_low", "gpu_temperature_high", "queue_backlog",
                              "model_failures", "disk_free_low", "api_latency_p99", "worker_offline"}
        assert (rules["gpu_memory_low"]["threshold"], rules["gpu_temperature_high"]["threshold"],
                rules["queue_backlog"]["threshold"], rules["model_failures"]["threshold"],
                rules["disk_free_low"]["threshold"], rules["api_latency_p99"]["threshold"]) == (2, 85, 100, 5, 50, 5)
        for r in ("disk_free_low", "api_latency_p99", "worker_offline"):
            engine.rules[r].enabled = r == "disk_free_low"
        # disk: the real free space of the database's file system against a moved threshold
        engine.rules["disk_free_low"].threshold = 1e9  # GB: no disk has that much free
        opened, _ = engine.evaluate()
        assert [(a["rule"], a["key"]) for a in opened] == [("disk_free_low", str(tmp_path.resolve()))]
        import shutil

        assert opened[0]["data"]["value"] == pytest.approx(shutil.disk_usage(tmp_path).free / GIB, rel=0.01)
        engine.rules["disk_free_low"].threshold = 0
        assert [a["rule"] for a in engine.evaluate()[1]] == ["disk_free_low"]
        engine.rules["disk_free_low"].enabled = False

        # API p99 from recorded request latencies (the middleware records real ones too)
        engine.rules["api_latency_p99"].enabled = True
        c.get(f"{API}/system/queue")
        assert obs.metrics.latency.quantile(0.99)[1] >= 1
        assert engine.evaluate() == ([], [])  # too few samples / fast
        for _ in range(25):
            obs.metrics.observe_request("GET", "/api/v1/slow", 200, 6.0)
        opened, _ = engine.evaluate()
        assert [(a["rule"], a["data"]["value"]) for a in opened] == [("api_latency_p99", 6.0)]
        for _ in range(3000):
            obs.metrics.observe_request("GET", "/api/v1/fast", 200, 0.01)
        assert [a["rule"] for a in engine.evaluate()[1]] == ["api_latency_p99"]
        engine.rules["api_latency_p99"].enabled = False

        # workers: the in-process executor's threads, then an injected outage
        engine.rules["worker_offline"].enabled = True
        real = engine.providers.workers()
        assert real == {"matcalc-worker-0": True, "matcalc-worker-1": True}
        assert engine.evaluate() == ([], [])
        engine.providers.workers = lambda: {"matcalc-worker-0": True, "matcalc-worker-1": False}
        assert [(a["rule"], a["key"]) for a in engine.evaluate()[0]] == [("worker_offline", "matcalc-worker-1")]
        engine.providers.workers = lambda: {"matcalc-worker-0": True}  # gone entirely: same alert
        assert engine.evaluate() == ([], [])
        engine.providers.workers = lambda: dict(real)
        assert [(a["rule"], a["key"]) for a in engine.evaluate()[1]] == [("worker_offline", "matcalc-worker-1")]


def test_thresholds_and_disabled_rules_from_settings(tmp_path, nvml):
    nvml.devices[0]["temp"] = 82
    with make_client(tmp_path, alert_gpu_temperature_c=80, alert_rules_disabled=["gpu_memory_low"]) as c:
        nvml.devices[0]["free"] = 0.5 * GIB
        engine = c.app.state.observability.alerts
        opened, _ = engine.evaluate()
        assert [(a["rule"], a["key"]) for a in opened] == [("gpu_temperature_high", "0")]
        rules = {r["name"]: r for r in c.get(f"{API}/system/alerts/rules").json()["data"]}
        assert rules["gpu_temperature_high"]["threshold"] == 80 and rules["gpu_memory_low"]["enabled"] is False
    with make_client(tmp_path) as c:  # a restart picks the open alert up and resolves it when it clears
        nvml.devices[0]["temp"] = 50
        _, resolved = c.app.state.observability.alerts.evaluate()
        assert [(a["rule"], a["key"]) for a in resolved] == [("gpu_temperature_high", "0")]
    with pytest.raises(ValueError, match="unknown rule"):
        builtin_rules(disabled=["no_such_rule"])
