"""Prometheus metrics (``GET /metrics``), one `prometheus_client.CollectorRegistry` per app.

Counters and histograms are updated as things happen (tasks submitted/finished and their
durations, HTTP latency, webhook attempts, alerts); gauges that describe state are read at
scrape time (tasks by type/status and queue depth from the store, GPUs through
`matcalc.cluster.gpus`, model load times from the registry, the batching engines' counters
of this process, live log-stream clients, open alerts).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from matcalc.tasks import WAITING

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
FILL_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class LatencyWindow:
    """Request durations (s) of the last ``window_s`` seconds (at most ``maxlen``), for the p99 alert."""

    def __init__(self, window_s: float = 300.0, maxlen: int = 20_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._items: deque[tuple[float, float]] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._items.append((self.clock(), float(seconds)))

    def values(self) -> list[float]:
        cutoff = self.clock() - self.window_s
        with self._lock:
            while self._items and self._items[0][0] < cutoff:
                self._items.popleft()
            return [v for _, v in self._items]

    def quantile(self, q: float) -> tuple[float | None, int]:
        """``(quantile, n)`` over the window (nearest-rank); ``(None, 0)`` when empty."""
        vals = sorted(self.values())
        if not vals:
            return None, 0
        k = max(0, min(len(vals) - 1, int(-(-q * len(vals) // 1)) - 1))  # ceil(q*n) - 1
        return vals[k], len(vals)


def _histogram(name: str, doc: str, labels: list[str], series: dict[tuple[str, ...], list[float]],
               buckets: tuple[float, ...]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=labels)
    for key, values in series.items():
        vals = sorted(values)
        cum = [(str(float(b)), bisect.bisect_right(vals, b)) for b in buckets]
        cum.append(("+Inf", len(vals)))
        fam.add_metric(list(key), cum, sum_value=float(sum(vals)))
    return fam


class _StateCollector(Collector):
    """Gauges read at scrape time; a failing section is skipped (and logged), never the scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        for section in (self._tasks, self._models, self._batching, self._gpus, self._misc):
            try:
                yield from section()
            except Exception as exc:  # noqa: BLE001
                log.warning("metrics: %s failed: %s", section.__name__, exc)

    def _tasks(self) -> Iterator[Metric]:
        store = self.m.store()
        if store is None:
            return
        from sqlalchemy import func, select

        from matcalc.store.models import Task

        tasks = GaugeMetricFamily("matcalc_tasks", "Stored tasks by type and status", labels=["type", "status"])
        with store.read() as s:
            for type_, status, n in s.execute(select(Task.type, Task.status, func.count()).group_by(Task.type,
                                                                                                   Task.status)):
                tasks.add_metric([type_, status], float(n))
        yield tasks
        depth = GaugeMetricFamily("matcalc_queue_depth", "Tasks waiting to run (PENDING, QUEUED, ASSIGNED) by priority",
                                  labels=["priority"])
        running = GaugeMetricFamily("matcalc_tasks_running", "Tasks running by priority", labels=["priority"])
        for prio, counts in store.queue_stats().items():
            depth.add_metric([prio], float(sum(counts.get(s, 0) for s in WAITING)))
            running.add_metric([prio], float(counts.get("RUNNING", 0)))
        yield depth
        yield running

    def _models(self) -> Iterator[Metric]:
        from matcalc.models.registry import model_load_times

        fam = GaugeMetricFamily("matcalc_model_load_seconds", "Time each loaded model took to load (s)",
                                labels=["model", "device"])
        for (name, device), seconds in sorted(model_load_times().items()):
            fam.add_metric([name, str(device)], float(seconds))
        yield fam

    def _batching(self) -> Iterator[Metric]:
        from matcalc import batching

        sizes: dict[tuple[str, ...], list[float]] = {}
        fills: dict[tuple[str, ...], list[float]] = {}
        counters: dict[str, dict[tuple[str, ...], float]] = {"requests": {}, "structures": {}, "calls": {}}
        budget: dict[tuple[str, ...], float] = {}
        for engine in batching.engines():
            s = engine.stats_snapshot()
            key = (str(engine.potential.name), str(engine.potential.device))
            sizes.setdefault(key, []).extend(float(x) for x in s.structures_per_call)
            fills.setdefault(key, []).extend(float(x) for x in s.fill_per_call)
            for name in counters:
                counters[name][key] = counters[name].get(key, 0.0) + float(getattr(s, name))
            budget[key] = float(s.budget_atoms)
        labels = ["model", "device"]
        yield _histogram("matcalc_batching_batch_size", "Structures per fused model call of the batching engine",
                         labels, sizes, BATCH_BUCKETS)
        yield _histogram("matcalc_batching_fill_ratio", "Atoms per fused call divided by the atom budget",
                         labels, fills, FILL_BUCKETS)
        docs = {"requests": "evaluate() calls received by the batching engine",
                "structures": "Structures requested from the batching engine",
                "calls": "Fused model calls made by the batching engine"}
        for name, values in counters.items():
            counter = CounterMetricFamily(f"matcalc_batching_{name}", docs[name], labels=labels)
            for ckey, v in values.items():
                counter.add_metric(list(ckey), v)
            yield counter
        gauge = GaugeMetricFamily("matcalc_batching_budget_atoms", "Atom budget of each batching engine",
                                  labels=labels)
        for gkey, v in budget.items():
            gauge.add_metric(list(gkey), v)
        yield gauge

    def _gpus(self) -> Iterator[Metric]:
        readings = self.m.gpu_reader()
        labels = ["gpu", "name"]
        fams = {
            "memory_total_MiB": GaugeMetricFamily("matcalc_gpu_memory_total_bytes", "GPU memory (bytes)",
                                                  labels=labels),
            "memory_used_MiB": GaugeMetricFamily("matcalc_gpu_memory_used_bytes", "GPU memory used (bytes)",
                                                 labels=labels),
            "memory_free_MiB": GaugeMetricFamily("matcalc_gpu_memory_free_bytes", "GPU memory free (bytes)",
                                                 labels=labels),
            "utilization_percent": GaugeMetricFamily("matcalc_gpu_utilization_ratio", "GPU busy fraction (0..1)",
                                                     labels=labels),
            "temperature_C": GaugeMetricFamily("matcalc_gpu_temperature_celsius", "GPU temperature", labels=labels),
        }
        count = GaugeMetricFamily("matcalc_gpus", "GPUs reported by NVML")
        count.add_metric([], float(len(readings)))
        for g in readings:
            key = [str(g.get("index")), str(g.get("name") or "")]
            for field_, fam in fams.items():
                v = g.get(field_)
                if v is None:
                    continue
                if field_.endswith("MiB"):
                    v = float(v) * 1024 * 1024
                elif field_ == "utilization_percent":
                    v = float(v) / 100.0
                fam.add_metric(key, float(v))
        yield count
        yield from fams.values()

    def _misc(self) -> Iterator[Metric]:
        streams = GaugeMetricFamily("matcalc_log_stream_clients", "Open SSE log streams", labels=["stream"])
        streams.add_metric(["task"], float(self.m.sse_clients["task"]))
        streams.add_metric(["system"], float(self.m.sse_clients["system"]))
        yield streams
        p99, n = self.m.latency.quantile(0.99)
        fam = GaugeMetricFamily("matcalc_http_request_duration_p99_seconds",
                                "p99 of API request durations over the alert window (s)")
        if p99 is not None:
            fam.add_metric([], p99)
        yield fam
        engine = self.m.alert_engine
        if engine is not None:
            active = GaugeMetricFamily("matcalc_alerts_active", "Open alerts by rule", labels=["rule"])
            counts: dict[str, int] = {r: 0 for r in engine.rules}
            for a in engine.open_alerts():
                counts[a["rule"]] = counts.get(a["rule"], 0) + 1
            for rule, n_open in sorted(counts.items()):
                active.add_metric([rule], float(n_open))
            yield active
        hooks = self.m.webhooks
        if hooks is not None:
            pending = GaugeMetricFamily("matcalc_webhook_pending", "Webhook deliveries queued or in flight")
            pending.add_metric([], float(hooks.pending))
            yield pending
            in_flight = GaugeMetricFamily("matcalc_webhook_in_flight", "Webhook attempts in progress")
            in_flight.add_metric([], float(hooks.in_flight))
            yield in_flight


def _default_gpus() -> list[dict[str, Any]]:
    try:
        from matcalc.cluster import gpus
    except ImportError:
        return []
    return [dict(g) for g in gpus()]


class Metrics:
    """The metrics of one app. ``store`` is a callable returning the store (or None before start)."""

    def __init__(self, store: Callable[[], Any] = lambda: None, *, latency_window_s: float = 300.0,
                 gpu_reader: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.store = store
        self.gpu_reader = gpu_reader or _default_gpus
        self.latency = LatencyWindow(latency_window_s)
        self.sse_clients = {"task": 0, "system": 0}
        self._sse_lock = threading.Lock()
        self.alert_engine: Any = None
        self.webhooks: Any = None
        r = self.registry
        self.tasks_submitted = Counter("matcalc_tasks_submitted", "Tasks accepted, by type", ["type"], registry=r)
        self.tasks_finished = Counter("matcalc_tasks_finished", "Tasks that reached a terminal status",
                                      ["type", "status"], registry=r)
        self.tasks_started = Counter("matcalc_tasks_started", "Task attempts started by a worker", ["type"],
                                     registry=r)
        self.task_duration = Histogram("matcalc_task_duration_seconds", "Run time of finished tasks (start to end)",
                                       ["type", "status"], buckets=DURATION_BUCKETS, registry=r)
        self.http_duration = Histogram("matcalc_http_request_duration_seconds", "API request durations",
                                       ["method", "route", "status"], buckets=HTTP_BUCKETS, registry=r)
        self.webhook_attempts = Counter("matcalc_webhook_attempts", "Webhook delivery attempts",
                                        ["event", "outcome"], registry=r)
        self.webhook_deliveries = Counter("matcalc_webhook_deliveries", "Webhook deliveries finished, by outcome "
                                          "(delivered, failed)", ["event", "outcome"], registry=r)
        self.log_stream_reads = Counter("matcalc_log_stream_reads", "Store reads of the shared task log feeds "
                                        "(one per new batch of log lines, whatever the number of streams)", registry=r)
        self.alerts_opened = Counter("matcalc_alerts_opened", "Alerts opened, by rule", ["rule"], registry=r)
        r.register(_StateCollector(self))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def sse_open(self, stream: str, delta: int) -> None:
        with self._sse_lock:
            self.sse_clients[stream] += delta

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_duration.labels(method, route, str(status)).observe(seconds)
        self.latency.add(seconds)


def route_template(scope: Scope) -> str:
    """``/api/v1/tasks/{task_id}`` for ``/api/v1/tasks/abc`` (bounded label values); ``unmatched`` for 404s."""
    if scope.get("route") is None:
        return "unmatched"
    params = {str(v): k for k, v in (scope.get("path_params") or {}).items()}
    return "/".join(f"{{{params[seg]}}}" if seg in params else seg for seg in scope.get("path", "").split("/"))


class MetricsMiddleware:
    """Times every HTTP request (log streams excluded: they last as long as the task) by route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "").endswith("/stream"):
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = route_template(scope)
            try:
                self.metrics.observe_request(scope.get("method", "?"), template, status["code"],
                                             time.perf_counter() - t0)
            except Exception:  # noqa: BLE001
                log.debug("could not record request latency", exc_info=True)
