"""What matcalc adds to a dask scheduler (`MatcalcSchedulerPlugin`, registered by every
`Cluster` client: `start`, `connect`,
SLURM/PBS).

* The workers' batching counters (`matcalc.cluster.worker.batching_counters`, sent with each heartbeat)
  on the scheduler's HTTP server, the one that serves the dashboard:

  - ``/metrics`` (dask's Prometheus endpoint): ``matcalc_worker_batching_*`` per worker, model and device
    (calls, requests, structures, atoms and model seconds as counters; mean fill, atoms per model second and
    the atom budget as gauges);
  - ``/matcalc/batching`` (an HTML table that refreshes itself) and ``/matcalc/batching.json``.

* A dead worker's matcalc task is not rerun by the scheduler itself: its key is marked as already suspicious up
  to the scheduler's ``allowed-failures``, so the first worker death ends that key with ``KilledWorker`` and the
  client sends the task again under a new key (counting the crash; FAILED after ``max_crashes``). Without this,
  a scheduler started with dask's defaults could run it twice: once by itself, once from the client.
"""

from __future__ import annotations

import html
import json
import logging
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from matcalc.cluster.worker import BATCHING_METRIC, is_task_key

log = logging.getLogger(__name__)

BATCHING_PATH = "/matcalc/batching"
"""Path of the batching page on the scheduler's HTTP (dashboard) server; ``.json`` appended: the same as JSON."""
METRIC_PREFIX = "matcalc_worker_batching"
COUNTERS = {"calls": ("calls", "Fused model calls made by the worker's batching engine"),
            "requests": ("requests", "evaluate() calls received by the worker's batching engine"),
            "structures": ("structures", "Structures requested from the worker's batching engine"),
            "atoms": ("atoms", "Atoms evaluated in the worker's fused model calls"),
            "model_seconds": ("model_time_s", "Seconds spent inside the model by the worker's batching engine")}
"""Prometheus counter name (``matcalc_worker_batching_<name>_total``) -> (field of the counters, help)."""
GAUGES = {"mean_fill_ratio": ("mean_fill", "Mean atoms per fused call divided by the atom budget (0..1)"),
          "atoms_per_second": ("atoms_per_s", "Atoms evaluated per second of model time"),
          "mean_batch_size": ("mean_batch_size", "Mean structures per fused model call"),
          "budget_atoms": ("budget_atoms", "Atom budget of the worker's batching engine")}
"""Prometheus gauge name (``matcalc_worker_batching_<name>``) -> (field of the counters, help)."""

_SCHEDULERS: weakref.WeakSet[Any] = weakref.WeakSet()
_COLLECTOR: list[Any] = []
_LOCK = threading.Lock()


def batching_rows(scheduler: Any) -> list[dict[str, Any]]:
    """One row per worker and engine from the counters the workers' heartbeats brought: worker (address),
    name, then the fields of `batching_counters`."""
    rows = []
    for addr, ws in sorted(getattr(scheduler, "workers", {}).items()):
        for row in (getattr(ws, "metrics", None) or {}).get(BATCHING_METRIC, None) or []:
            rows.append({"worker": addr, "name": str(ws.name), **row})
    return rows


def scheduler_batching_rows(dask_scheduler: Any = None) -> list[dict[str, Any]]:
    """`batching_rows` of the scheduler this runs on (``Client.run_on_scheduler``)."""
    return batching_rows(dask_scheduler)


class BatchingCollector:
    """Prometheus collector (registered once per process in ``prometheus_client.REGISTRY``, the registry dask's
    ``/metrics`` serves) over the schedulers of this process that run `MatcalcSchedulerPlugin`."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["worker", "model", "device"]
        counters = {name: (field, CounterMetricFamily(f"{METRIC_PREFIX}_{name}", doc, labels=labels))
                    for name, (field, doc) in COUNTERS.items()}
        gauges = {name: (field, GaugeMetricFamily(f"{METRIC_PREFIX}_{name}", doc, labels=labels))
                  for name, (field, doc) in GAUGES.items()}
        for scheduler in list(_SCHEDULERS):
            for row in batching_rows(scheduler):
                values = [str(row["worker"]), str(row.get("model", "")), str(row.get("device", ""))]
                for field, fam in [*counters.values(), *gauges.values()]:
                    fam.add_metric(values, float(row.get(field, 0) or 0))
        for _, fam in [*counters.values(), *gauges.values()]:
            yield fam


def _register_collector() -> None:
    try:
        import prometheus_client
    except ImportError:  # dask's /metrics then says Prometheus is not available
        return
    with _LOCK:
        if not _COLLECTOR:
            collector = BatchingCollector()
            prometheus_client.REGISTRY.register(collector)
            _COLLECTOR.append(collector)


def _page(rows: list[dict[str, Any]]) -> str:
    cols = ["name", "worker", "model", "device", "calls", "structures", "atoms", "mean_fill", "atoms_per_s",
            "model_time_s", "mean_batch_size", "budget_atoms"]

    def cell(v: Any) -> str:
        return html.escape(f"{v:.3g}" if isinstance(v, float) else str(v))

    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    head = "".join(f"<th>{c}</th>" for c in cols)
    empty = "" if rows else "<p>No batching engine has run on any worker yet.</p>"
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='2'>"
            "<title>matcalc batching</title><style>body{font-family:sans-serif}td,th{padding:2px 8px;"
            "text-align:right}th{background:#eee}</style></head><body><h3>matcalc: batching engines per worker</h3>"
            f"{empty}<table><tr>{head}</tr>{body}</table><p><a href='../status'>dask dashboard</a> · "
            f"<a href='batching.json'>JSON</a> · <a href='../metrics'>Prometheus</a></p></body></html>")


def _add_routes(scheduler: Any) -> None:
    app = getattr(scheduler, "http_application", None)
    if app is None or not hasattr(app, "add_application"):
        return
    from tornado import web

    class Page(web.RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.write(_page(batching_rows(scheduler)))

    class Json(web.RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "application/json")
            self.write(json.dumps(batching_rows(scheduler)))

    app.add_application(web.Application([(BATCHING_PATH, Page), (BATCHING_PATH + ".json", Json)]))


class MatcalcSchedulerPlugin(SchedulerPlugin):
    """See the module doc. Idempotent: the first client to register it on a scheduler installs it."""

    name = "matcalc-scheduler"
    idempotent = True

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        _SCHEDULERS.add(scheduler)
        try:
            _register_collector()
            _add_routes(scheduler)
        except Exception as exc:  # noqa: BLE001 - diagnostics must never break a scheduler
            log.warning("matcalc: batching counters not served by this scheduler: %s", exc)

    def update_graph(self, scheduler: Any, *, tasks: list[Any] | None = None, **kwargs: Any) -> None:
        floor = int(getattr(scheduler, "allowed_failures", 0) or 0)
        if floor <= 0:
            return
        for key in tasks or ():
            if is_task_key(key):
                ts = scheduler.tasks.get(key)
                if ts is not None and ts.suspicious < floor:
                    ts.suspicious = floor  # one worker death ends this key; the client sends the task again

    async def close(self) -> None:
        _SCHEDULERS.discard(getattr(self, "scheduler", None))


__all__ = ["BATCHING_PATH", "BatchingCollector", "MatcalcSchedulerPlugin", "batching_rows",
           "scheduler_batching_rows"]
