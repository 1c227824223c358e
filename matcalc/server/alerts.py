"""Alerts: built-in rules evaluated periodically over a `Snapshot` of the system; an alert
opens when a rule's condition starts holding (per GPU, model, path or worker) and resolves when it
stops. Open and resolved alerts are rows of the ``alerts`` table (``data.key`` names the subject); while
an alert is open each evaluation updates its ``message`` and ``data.value`` to the current reading
(``data.opened_value`` keeps the first); opened/resolved events go to the notifiers (log,
JSON-lines file, signed webhooks).

Every input comes from a replaceable provider (`Providers`), GPUs through
`matcalc.cluster.gpus` (NVML), so tests drive each rule with real readings.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from matcalc.tasks import WAITING

log = logging.getLogger(__name__)
GIB = 1024**3


@dataclass
class Condition:
    """One subject for which a rule holds now."""

    key: str
    message: str
    value: float | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Snapshot:
    """What the rules look at, gathered once per evaluation (None: that provider failed)."""

    gpus: list[dict[str, Any]] | None = None
    queue_backlog: int | None = None
    failure_streaks: dict[str, int] | None = None
    disk_free_bytes: dict[str, float] | None = None
    api_p99_s: float | None = None
    api_samples: int = 0
    workers: dict[str, bool] | None = None
    expected_gpus: set[str] = field(default_factory=set)
    known_workers: set[str] = field(default_factory=set)


@dataclass
class Rule:
    """A built-in rule: ``check(rule, snapshot) -> conditions``; ``threshold`` in ``unit``."""

    name: str
    description: str
    severity: str
    threshold: float | None
    unit: str
    check: Callable[[Rule, Snapshot], list[Condition]]
    enabled: bool = True

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "severity": self.severity,
                "threshold": self.threshold, "unit": self.unit, "enabled": self.enabled}


def _gpu_key(g: dict[str, Any]) -> str:
    return str(g.get("index"))


def _gpu_unavailable(rule: Rule, s: Snapshot) -> list[Condition]:
    if s.gpus is None:
        return []
    out = [Condition(_gpu_key(g), f"GPU {g.get('index')} unavailable: {g['error']}", data={"error": g["error"]})
           for g in s.gpus if g.get("error")]
    present = {_gpu_key(g) for g in s.gpus if not g.get("error")}
    flagged = {c.key for c in out}
    for key in sorted(s.expected_gpus - present - flagged):
        out.append(Condition(key, f"GPU {key} is no longer reported by NVML"))
    return out


def _gpu_memory(rule: Rule, s: Snapshot) -> list[Condition]:
    assert rule.threshold is not None
    out = []
    for g in s.gpus or []:
        free = g.get("memory_free_MiB")
        if free is not None and free / 1024 < rule.threshold:
            out.append(Condition(_gpu_key(g), f"GPU {g.get('index')} has {free / 1024:.2f} GB free "
                                 f"(< {rule.threshold:g} GB)", free / 1024))
    return out


def _gpu_temperature(rule: Rule, s: Snapshot) -> list[Condition]:
    assert rule.threshold is not None
    return [Condition(_gpu_key(g), f"GPU {g.get('index')} at {g['temperature_C']:g} °C (> {rule.threshold:g} °C)",
                      float(g["temperature_C"]))
            for g in s.gpus or [] if g.get("temperature_C") is not None and g["temperature_C"] > rule.threshold]


def _queue_backlog(rule: Rule, s: Snapshot) -> list[Condition]:
    assert rule.threshold is not None
    if s.queue_backlog is None or s.queue_backlog <= rule.threshold:
        return []
    return [Condition("queue", f"{s.queue_backlog} tasks waiting (> {rule.threshold:g})", float(s.queue_backlog))]


def _model_failures(rule: Rule, s: Snapshot) -> list[Condition]:
    assert rule.threshold is not None
    return [Condition(model, f"{n} consecutive failed tasks of model {model!r} (>= {rule.threshold:g})", float(n))
            for model, n in sorted((s.failure_streaks or {}).items()) if n >= rule.threshold]


def _disk_free(rule: Rule, s: Snapshot) -> list[Condition]:
    assert rule.threshold is not None
    return [Condition(path, f"{free / GIB:.1f} GB free on {path} (< {rule.threshold:g} GB)", free / GIB)
            for path, free in sorted((s.disk_free_bytes or {}).items()) if free / GIB < rule.threshold]


def _api_p99(rule: Rule, s: Snapshot) -> list[Condition]:
    assert rule.threshold is not None
    if s.api_p99_s is None or s.api_p99_s <= rule.threshold:
        return []
    return [Condition("api", f"API p99 latency {s.api_p99_s:.2f} s over {s.api_samples} requests "
                      f"(> {rule.threshold:g} s)", s.api_p99_s, {"samples": s.api_samples})]


def _worker_offline(rule: Rule, s: Snapshot) -> list[Condition]:
    if s.workers is None:
        return []
    out = [Condition(w, f"worker {w} is offline") for w, online in sorted(s.workers.items()) if not online]
    gone = s.known_workers - set(s.workers)
    out += [Condition(w, f"worker {w} disappeared") for w in sorted(gone)]
    return out


@dataclass
class Thresholds:
    gpu_free_memory_gb: float = 2.0
    gpu_temperature_c: float = 85.0
    queue_backlog: int = 100
    consecutive_failures: int = 5
    disk_free_gb: float = 50.0
    api_p99_s: float = 5.0


def builtin_rules(t: Thresholds | None = None, disabled: tuple[str, ...] | list[str] = ()) -> dict[str, Rule]:
    t = t or Thresholds()
    rules = [
        Rule("gpu_unavailable", "a GPU reports an NVML error or is no longer listed", "critical", None, "",
             _gpu_unavailable),
        Rule("gpu_memory_low", "free GPU memory below the threshold", "warning", t.gpu_free_memory_gb, "GB",
             _gpu_memory),
        Rule("gpu_temperature_high", "GPU temperature above the threshold", "warning", t.gpu_temperature_c, "°C",
             _gpu_temperature),
        Rule("queue_backlog", "tasks waiting to run (PENDING, QUEUED, ASSIGNED) above the threshold", "warning",
             t.queue_backlog, "tasks", _queue_backlog),
        Rule("model_failures", "consecutive FAILED/TIMEOUT tasks of one model at or above the threshold", "critical",
             t.consecutive_failures, "tasks", _model_failures),
        Rule("disk_free_low", "free disk space below the threshold", "warning", t.disk_free_gb, "GB", _disk_free),
        Rule("api_latency_p99", "p99 of API request durations over the window above the threshold", "warning",
             t.api_p99_s, "s", _api_p99),
        Rule("worker_offline", "a worker (thread or dask worker) stopped or disappeared", "critical", None, "",
             _worker_offline),
    ]
    unknown = set(disabled) - {r.name for r in rules}
    if unknown:
        raise ValueError(f"alert_rules_disabled: unknown rule(s) {', '.join(sorted(unknown))}")
    for r in rules:
        r.enabled = r.name not in disabled
    return {r.name: r for r in rules}


# ----------------------------------------------------------------------------- providers
def failure_streaks(store: Any, limit: int = 2000) -> dict[str, int]:
    """Per model: how many of its most recent finished tasks FAILED or TIMED OUT in a row."""
    from sqlalchemy import select

    from matcalc.store.models import Task
    from matcalc.tasks import FAILURES, TaskStatus

    streaks: dict[str, int] = {}
    broken: set[str] = set()
    with store.read() as s:
        rows = s.execute(select(Task.model, Task.status).where(Task.status.in_([TaskStatus.COMPLETED, *FAILURES]))
                         .order_by(Task.finished_at.desc(), Task.id).limit(limit)).all()
    for model, status in rows:
        if model in broken:
            continue
        if status == "COMPLETED":
            broken.add(model)
            streaks.setdefault(model, 0)
        else:
            streaks[model] = streaks.get(model, 0) + 1
    return streaks


def queue_backlog(store: Any) -> int:
    return sum(counts.get(s, 0) for counts in store.queue_stats().values() for s in WAITING)


def disk_free(paths: list[str]) -> dict[str, float]:
    out = {}
    for p in paths:
        path = Path(p).expanduser()
        while not path.exists() and path != path.parent:
            path = path.parent
        out[str(Path(p).expanduser())] = float(shutil.disk_usage(path).free)
    return out


def executor_workers(executor: Any) -> dict[str, bool]:
    """Worker name -> online (`matcalc.server.executor.Executor.workers_online`)."""
    online = getattr(executor, "workers_online", None)
    return dict(online()) if callable(online) else {}


@dataclass
class Providers:
    """Callables the engine reads; replace any of them (tests inject conditions here)."""

    gpus: Callable[[], list[dict[str, Any]]]
    queue_backlog: Callable[[], int]
    failure_streaks: Callable[[], dict[str, int]]
    disk_free_bytes: Callable[[], dict[str, float]]
    api_p99: Callable[[], tuple[float | None, int]]
    workers: Callable[[], dict[str, bool]]


# ----------------------------------------------------------------------------- notifiers
class LogNotifier:
    def __call__(self, event: str, alert: dict[str, Any]) -> None:
        level = logging.INFO if event == "alert.resolved" else (
            logging.ERROR if alert["severity"] == "critical" else logging.WARNING)
        log.log(level, "%s [%s] %s", event, alert["rule"], alert["message"],
                extra={"alert_id": alert["id"], "alert_rule": alert["rule"], "alert_event": event})


class FileNotifier:
    """Appends one JSON line per event to ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def __call__(self, event: str, alert: dict[str, Any]) -> None:
        line = json.dumps({"event": event, **alert}, default=str)
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


class WebhookNotifier:
    """Signed POSTs through the webhook dispatcher (recorded in ``webhook_deliveries``, task_id null)."""

    def __init__(self, dispatcher: Any, urls: list[str], secret: str | None = None) -> None:
        self.dispatcher = dispatcher
        self.urls = list(urls)
        self.secret = secret

    def __call__(self, event: str, alert: dict[str, Any]) -> None:
        payload = {"event": event, "timestamp": _now_iso(), "alert": alert}
        for url in self.urls:
            self.dispatcher.enqueue(url, event, payload, secret=self.secret)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def alert_dict(row: Any) -> dict[str, Any]:
    data = dict(row.data or {})
    return {"id": row.id, "rule": row.rule, "key": data.get("key"), "severity": row.severity, "message": row.message,
            "status": "resolved" if row.resolved_at else "open", "opened_at": row.opened_at,
            "resolved_at": row.resolved_at, "data": data}


# ----------------------------------------------------------------------------- engine
class AlertEngine:
    """Evaluates the rules every ``interval_s`` in a thread (or on `evaluate`)."""

    def __init__(self, store: Any, providers: Providers, rules: dict[str, Rule] | None = None, *,
                 notifiers: list[Callable[[str, dict[str, Any]], None]] | None = None, interval_s: float = 30.0,
                 expected_gpus: int | None = None, on_open: Callable[[str], None] | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"alert interval_s must be > 0, got {interval_s}")
        self.store = store
        self.providers = providers
        self.rules = rules if rules is not None else builtin_rules()
        self.notifiers = list(notifiers) if notifiers is not None else [LogNotifier()]
        self.interval_s = interval_s
        self.on_open = on_open
        self.expected_gpus: set[str] = {str(i) for i in range(expected_gpus or 0)}
        self.known_workers: set[str] = set()
        self.last_evaluated: datetime | None = None
        self.evaluations = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="matcalc-alerts", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.evaluate()
            except Exception:  # noqa: BLE001 - the loop must survive a failing evaluation
                log.exception("alert evaluation failed")

    # -------------------------------------------------------------- evaluation
    def _gather(self) -> Snapshot:
        snap = Snapshot()
        p = self.providers
        enabled = {n for n, r in self.rules.items() if r.enabled}

        def get(name: str, fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - a failing provider mutes its rules, nothing else
                log.warning("alert provider %s failed: %s", name, exc)
                return None

        if enabled & {"gpu_unavailable", "gpu_memory_low", "gpu_temperature_high"}:
            snap.gpus = get("gpus", p.gpus)
        if "queue_backlog" in enabled:
            snap.queue_backlog = get("queue_backlog", p.queue_backlog)
        if "model_failures" in enabled:
            snap.failure_streaks = get("failure_streaks", p.failure_streaks)
        if "disk_free_low" in enabled:
            snap.disk_free_bytes = get("disk_free", p.disk_free_bytes)
        if "api_latency_p99" in enabled:
            snap.api_p99_s, snap.api_samples = get("api_p99", p.api_p99) or (None, 0)
        if "worker_offline" in enabled:
            snap.workers = get("workers", p.workers)
        if snap.gpus is not None:  # GPUs seen once are expected from then on
            self.expected_gpus |= {_gpu_key(g) for g in snap.gpus if not g.get("error")}
        snap.expected_gpus = set(self.expected_gpus)
        snap.known_workers = set(self.known_workers)
        if snap.workers is not None:
            self.known_workers |= set(snap.workers)
        return snap

    def evaluate(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """One evaluation; returns ``(opened, resolved)`` alerts."""
        from sqlalchemy import select

        from matcalc.store.models import Alert, utcnow

        with self._lock:
            snap = self._gather()
            firing: dict[tuple[str, str], tuple[Rule, Condition]] = {}
            for rule in self.rules.values():
                if not rule.enabled:
                    continue
                try:
                    for c in rule.check(rule, snap):
                        firing[(rule.name, c.key)] = (rule, c)
                except Exception:  # noqa: BLE001
                    log.exception("alert rule %s failed", rule.name)
            opened, resolved = [], []
            now = utcnow()
            with self.store.write() as s:
                open_rows = s.scalars(select(Alert).where(Alert.resolved_at.is_(None))).all()
                current = {(r.rule, str((r.data or {}).get("key"))): r for r in open_rows}
                for key, row in current.items():
                    if key not in firing and key[0] in self.rules:
                        row.resolved_at = now
                        resolved.append(row)
                new_rows = []
                for key, (rule, c) in firing.items():
                    data = {"key": c.key, "value": c.value, "threshold": rule.threshold, "unit": rule.unit, **c.data}
                    if key in current:  # still open: it carries the current reading (the first one stays too)
                        row = current[key]
                        old = dict(row.data or {})
                        data["opened_value"] = old.get("opened_value", old.get("value"))
                        if row.message != c.message or {k: v for k, v in old.items() if k != "updated_at"} != data:
                            row.message = c.message
                            row.data = {**data, "updated_at": now.isoformat().replace("+00:00", "Z")}
                        continue
                    row = Alert(rule=rule.name, severity=rule.severity, message=c.message, opened_at=now,
                                data={**data, "opened_value": c.value})
                    s.add(row)
                    new_rows.append(row)
                s.flush()
                opened = [alert_dict(r) for r in new_rows]
                resolved_d = [alert_dict(r) for r in resolved]
            self.last_evaluated = now
            self.evaluations += 1
        for a in opened:
            if self.on_open is not None:
                self.on_open(a["rule"])
            self._notify("alert.opened", a)
        for a in resolved_d:
            self._notify("alert.resolved", a)
        return opened, resolved_d

    def _notify(self, event: str, alert: dict[str, Any]) -> None:
        payload = {k: (v.isoformat().replace("+00:00", "Z") if isinstance(v, datetime) else v)
                   for k, v in alert.items()}
        for n in self.notifiers:
            try:
                n(event, payload)
            except Exception:  # noqa: BLE001 - one broken notifier must not silence the others
                log.exception("alert notifier %r failed", n)

    # -------------------------------------------------------------- queries
    def open_alerts(self) -> list[dict[str, Any]]:
        from sqlalchemy import select

        from matcalc.store.models import Alert

        with self.store.read() as s:
            return [alert_dict(r) for r in s.scalars(select(Alert).where(Alert.resolved_at.is_(None))
                                                      .order_by(Alert.id)).all()]

    def history(self, *, page: int = 1, page_size: int = 50,
                rule: str | None = None) -> tuple[list[dict[str, Any]], int]:
        from sqlalchemy import func, select

        from matcalc.store.models import Alert

        conds = [Alert.rule == rule] if rule else []
        with self.store.read() as s:
            total = int(s.scalar(select(func.count()).select_from(Alert).where(*conds)) or 0)
            rows = s.scalars(select(Alert).where(*conds).order_by(Alert.id.desc())
                             .offset((page - 1) * page_size).limit(page_size)).all()
            return [alert_dict(r) for r in rows], total
