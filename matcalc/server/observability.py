"""The observability layer of one app: structured logs (files, live hub), webhooks, alerts, metrics.

`Observability` is created with the app (the metrics middleware needs it then), started in
the lifespan once the store and the task service exist, and told about task events by the
service (`task_submitted`, `task_started`, `task_progress`, `task_finished`).
Those hooks never raise and never block on the network: webhooks are only enqueued.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from matcalc.server.alerts import (
    AlertEngine,
    FileNotifier,
    LogNotifier,
    Providers,
    Thresholds,
    WebhookNotifier,
    builtin_rules,
    disk_free,
    executor_workers,
    failure_streaks,
    queue_backlog,
)
from matcalc.server.config import Settings
from matcalc.server.logs import DailyJsonFileHandler, LogHub
from matcalc.server.metrics import Metrics
from matcalc.server.webhooks import STATUS_EVENTS, WebhookDispatcher
from matcalc.store.models import utcnow
from matcalc.store.outbox import finished_without_webhook
from matcalc.submission import DEFAULT_EVENTS
from matcalc.tasks import TERMINAL

log = logging.getLogger(__name__)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def result_summary(result: dict[str, Any] | None, limit: int = 40) -> dict[str, Any]:
    """The scalar fields of ``Result.to_dict()`` (no arrays, trajectories or structures)."""
    out: dict[str, Any] = {}
    for k, v in (result or {}).items():
        if isinstance(v, (bool, int, float, str)) or v is None:
            if isinstance(v, str) and len(v) > 200:
                continue
            out[k] = v
        if len(out) >= limit:
            break
    return out


class Observability:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: Any = None
        self.service: Any = None
        self.metrics = Metrics(lambda: self.store, latency_window_s=settings.alert_api_window_s)
        self.log_hub = LogHub(settings.log_stream_backlog)
        self.file_handler: DailyJsonFileHandler | None = None
        self.webhooks: WebhookDispatcher | None = None
        self.alerts: AlertEngine | None = None
        self._tasks: dict[str, _TaskHooks] = {}
        self._lock = threading.Lock()
        self._handlers: list[logging.Handler] = []

    # -------------------------------------------------------------- lifecycle
    def install_logging(self) -> None:
        """Attach the live hub (and the daily JSON file) to the root logger."""
        s = self.settings
        matcalc_logger = logging.getLogger("matcalc")
        if matcalc_logger.level == logging.NOTSET:
            matcalc_logger.setLevel(getattr(logging, s.log_level.upper(), logging.INFO))
        self._handlers = [self.log_hub]
        if s.log_dir:
            self.file_handler = DailyJsonFileHandler(s.log_dir, compress_after_days=s.log_compress_after_days,
                                                     pack_after_days=s.log_pack_after_days)
            self.file_handler.maintain()
            self._handlers.append(self.file_handler)
        root = logging.getLogger()
        for h in self._handlers:
            root.addHandler(h)

    def start(self, store: Any, service: Any) -> None:
        s = self.settings
        self.store = store
        self.service = service
        self.webhooks = WebhookDispatcher(store, max_attempts=s.webhook_max_attempts, backoff_s=s.webhook_backoff_s,
                                          backoff_max_s=s.webhook_backoff_max_s, timeout_s=s.webhook_timeout_s,
                                          concurrency=s.webhook_concurrency, on_attempt=self._on_webhook_attempt,
                                          on_finished=self._on_webhook_finished)
        self.webhooks.start()
        self.metrics.webhooks = self.webhooks
        try:
            self.recover_terminal_webhooks()
        except Exception:  # noqa: BLE001 - never keep the server from starting
            log.warning("webhooks: could not look for lost terminal events", exc_info=True)
        notifiers: list[Any] = [LogNotifier()]
        if s.alert_file:
            notifiers.append(FileNotifier(s.alert_file))
        if s.alert_webhook_urls:
            notifiers.append(WebhookNotifier(self.webhooks, s.alert_webhook_urls, s.alert_webhook_signing_key))
        thresholds = Thresholds(gpu_free_memory_gb=s.alert_gpu_free_memory_gb,
                                gpu_temperature_c=s.alert_gpu_temperature_c, queue_backlog=s.alert_queue_backlog,
                                consecutive_failures=s.alert_consecutive_failures, disk_free_gb=s.alert_disk_free_gb,
                                api_p99_s=s.alert_api_p99_s)
        self.alerts = AlertEngine(store, self.default_providers(), builtin_rules(thresholds, s.alert_rules_disabled),
                                  notifiers=notifiers, interval_s=s.alert_interval_s,
                                  expected_gpus=s.alert_expected_gpus,
                                  on_open=lambda rule: self.metrics.alerts_opened.labels(rule).inc())
        self.metrics.alert_engine = self.alerts
        self.alerts.start()

    def stop(self) -> None:
        if self.alerts is not None:
            self.alerts.stop()
        if self.webhooks is not None:
            # attempts in flight may end; everything else stays PENDING in the outbox for the next start
            self.webhooks.stop(min(2.0, self.settings.webhook_timeout_s))
        root = logging.getLogger()
        for h in self._handlers:
            root.removeHandler(h)
            h.close()
        self._handlers = []

    def recover_terminal_webhooks(self, max_age: timedelta = timedelta(days=1)) -> int:
        """Queue the terminal webhook of every task that ended (within ``max_age``, and since the
        outbox was first used) without one in the outbox; returns how many were queued."""
        oldest = self.webhooks.outbox.oldest() if self.webhooks and self.webhooks.outbox else None
        if oldest is None:
            return 0
        since = max(oldest, utcnow() - max_age)
        ids = finished_without_webhook(self.store, since)
        n = 0
        for row in self.store.get_tasks(ids):
            hooks = _TaskHooks.of(row)
            event = STATUS_EVENTS.get(row.status, f"task.{row.status.lower()}")
            if hooks.wants(event):
                self._terminal_hook(row, hooks, row.status, row.error, None)
                n += 1
        if n:
            log.info("webhooks: queued %d terminal event(s) lost before a restart", n)
        return n

    def disk_paths(self) -> list[str]:
        paths = list(self.settings.alert_disk_paths)
        if not paths:
            if self.store is not None and self.store.is_sqlite:
                db = self.store.engine.url.database
                if db and db != ":memory:":
                    paths.append(str(Path(db).expanduser().resolve().parent))
            if self.settings.log_dir:
                paths.append(str(Path(self.settings.log_dir).expanduser()))
            if not paths:
                paths.append(str(Path("~/.matcalc").expanduser()))
        return paths

    def default_providers(self) -> Providers:
        min_samples = self.settings.alert_api_min_samples

        def api_p99() -> tuple[float | None, int]:
            p99, n = self.metrics.latency.quantile(0.99)
            return (p99 if n >= min_samples else None), n

        return Providers(
            gpus=lambda: self.metrics.gpu_reader(),
            queue_backlog=lambda: queue_backlog(self.store),
            failure_streaks=lambda: failure_streaks(self.store),
            disk_free_bytes=lambda: disk_free(self.disk_paths()),
            api_p99=api_p99,
            workers=lambda: executor_workers(self.service.executor),
        )

    # -------------------------------------------------------------- task hooks (called by the service)
    def _hooks(self, task_id: str) -> _TaskHooks | None:
        """The webhook state of an unfinished task (cached while it runs); ``None`` once it ended."""
        with self._lock:
            hooks = self._tasks.get(task_id)
        if hooks is not None:
            return hooks
        row = self.store.get_task(task_id)
        if row.status in TERMINAL:
            return None  # a late event of a finished task: nothing is sent, nothing is cached
        with self._lock:
            return self._tasks.setdefault(task_id, _TaskHooks.of(row))

    @property
    def tracked_tasks(self) -> int:
        """Unfinished tasks whose webhook state is held in memory."""
        with self._lock:
            return len(self._tasks)

    def task_submitted(self, rows: Sequence[Any]) -> None:
        for row in rows:
            self.metrics.tasks_submitted.labels(row.type).inc()

    def task_started(self, task_id: str, attempt: int, worker: str | None) -> None:
        hooks = self._hooks(task_id)
        if hooks is None:
            return
        self.metrics.tasks_started.labels(hooks.type).inc()
        with hooks.lock:
            if not hooks.closed:
                self._hook(task_id, hooks, "task.started", "RUNNING", {"attempt": attempt, "worker": worker})

    def task_progress(self, task_id: str, event: dict[str, Any]) -> None:
        hooks = self._hooks(task_id)
        if hooks is None or not hooks.wants("task.progress"):
            return
        with hooks.lock:
            if hooks.closed:
                return
            now = time.monotonic()
            if hooks.last_progress is not None and now - hooks.last_progress < self.settings.webhook_progress_interval_s:
                return
            hooks.last_progress = now
            self._hook(task_id, hooks, "task.progress", "RUNNING", dict(event))

    def task_finished(self, task_id: str, status: str, error: str | None, result: dict[str, Any] | None) -> None:
        row = self.store.get_task(task_id)
        with self._lock:
            hooks = self._tasks.pop(task_id, None)
        self.metrics.tasks_finished.labels(row.type, status).inc()
        if row.started_at is not None and row.finished_at is not None:
            self.metrics.task_duration.labels(row.type, status).observe(
                max(0.0, (row.finished_at - row.started_at).total_seconds()))
        self._terminal_hook(row, hooks or _TaskHooks.of(row), status, error, result)

    def _terminal_hook(self, row: Any, hooks: _TaskHooks, status: str, error: str | None,
                       result: dict[str, Any] | None) -> None:
        summary: dict[str, Any] = {"type": row.type, "model": row.model, "attempts": row.attempts}
        if status == "COMPLETED":
            summary.update(result_summary(result if result is not None else row.result))
        elif error:
            summary["error"] = error
        with hooks.lock:  # after this, no event of the task is sent (progress waits for the lock, then sees closed)
            hooks.closed = True
            self._hook(row.id, hooks, STATUS_EVENTS.get(status, f"task.{status.lower()}"), status, summary)

    def _hook(self, task_id: str, hooks: _TaskHooks, event: str, status: str, summary: dict[str, Any]) -> None:
        if not hooks.url or self.webhooks is None or not hooks.wants(event):
            return
        payload = {"event": event, "task_id": task_id, "status": status, "timestamp": _now_iso(),
                   "result_url": self.result_url(task_id) if status == "COMPLETED" else None, "summary": summary}
        self.webhooks.enqueue(hooks.url, event, payload, secret=hooks.secret, task_id=task_id)

    def result_url(self, task_id: str) -> str:
        base = self.settings.public_url or f"http://{self.settings.host}:{self.settings.port}"
        return f"{base.rstrip('/')}/api/v1/tasks/{task_id}/result"

    def _on_webhook_attempt(self, delivery: Any, ok: bool) -> None:
        self.metrics.webhook_attempts.labels(delivery.event, "success" if ok else "failure").inc()

    def _on_webhook_finished(self, delivery: Any, status: str) -> None:
        self.metrics.webhook_deliveries.labels(delivery.event, status.lower()).inc()


@dataclass(eq=False)
class _TaskHooks:
    """What the webhooks of one unfinished task need; ``lock`` orders its events, ``closed`` is set
    with the terminal event (nothing is sent after it)."""

    type: str
    url: str | None
    events: tuple[str, ...]
    secret: str | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False
    last_progress: float | None = None

    @classmethod
    def of(cls, row: Any) -> _TaskHooks:
        return cls(row.type, row.notify_url, tuple(row.notify_events or DEFAULT_EVENTS), row.notify_secret)

    def wants(self, event: str) -> bool:
        return bool(self.url) and event in self.events
