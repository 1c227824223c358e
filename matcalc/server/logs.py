"""Structured logs: JSON records, daily log files with gzip/monthly packing, and the live streams.

* :class:`JsonFormatter` turns a :class:`logging.LogRecord` into one JSON object per line with
  ``timestamp, level, logger, kind, message, task_id, request_id, worker, gpu`` plus every ``extra``
  field (``step``, ``energy_eV``, ``status``, ``duration_s``...). ``kind`` is ``access``, ``audit``,
  ``task`` (a record emitted while a task runs) or ``system``.
* :class:`DailyJsonFileHandler` writes ``<dir>/matcalc.jsonl`` and rotates it at UTC midnight into
  ``matcalc-YYYY-MM-DD.jsonl``; :func:`maintain_log_dir` gzips rotated files older than
  ``compress_after_days`` and packs those older than ``pack_after_days`` into one uncompressed tar per
  month (``matcalc-YYYY-MM.tar`` holding the ``.jsonl.gz`` members). Ages come from the file names, so
  the maintenance is deterministic (and testable with an injected ``today``).
* :class:`LogHub` keeps the last records in a ring and fans them out to ``GET /system/logs/stream``.
* :func:`sse` formats one Server-Sent Event.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import logging.handlers
import os
import re
import shutil
import socket
import tarfile
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from matcalc.server.events import EventBus

log = logging.getLogger(__name__)

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ACCESS_LOGGER = "matcalc.server.access"
AUDIT_LOGGER = "matcalc.server.audit"
audit_log = logging.getLogger(AUDIT_LOGGER)
_HOST = socket.gethostname()
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id", "taskName"}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    try:  # numpy scalars
        return value.item()
    except AttributeError:
        return str(value)


def record_dict(record: logging.LogRecord) -> dict[str, Any]:
    """The structured form of a log record (JSON-safe)."""
    from matcalc.server.executor import _current_task
    from matcalc.server.middleware import request_id_var

    rid = getattr(record, "request_id", None) or request_id_var.get()
    task_id = getattr(record, "task_id", None) or _current_task.get()
    if task_id is None and isinstance(rid, str) and rid.startswith("task:"):
        task_id = rid[5:]
    if record.name == ACCESS_LOGGER:
        kind = "access"
    elif record.name == AUDIT_LOGGER:
        kind = "audit"
    elif task_id is not None:
        kind = "task"
    else:
        kind = "system"
    d: dict[str, Any] = {
        "timestamp": _iso(record.created),
        "level": record.levelname,
        "logger": record.name,
        "kind": kind,
        "message": record.getMessage(),
        "task_id": task_id,
        "request_id": None if rid in (None, "-") else rid,
        "worker": getattr(record, "worker", None) or f"{_HOST}:{record.process}/{record.threadName}",
        "gpu": getattr(record, "gpu", None),
    }
    extra = {k: _json_safe(v) for k, v in record.__dict__.items() if k not in _STANDARD and k not in d
             and not k.startswith("_")}
    if extra:
        d["extra"] = extra
    if record.exc_info and record.exc_info[0] is not None:
        d["exception"] = logging.Formatter().formatException(record.exc_info)
    return d


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see :func:`record_dict`)."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(record_dict(record), ensure_ascii=False, default=str)


# ----------------------------------------------------------------------------- files
_DAILY = re.compile(r"^(?P<stem>.+)-(?P<day>\d{4}-\d{2}-\d{2})\.jsonl(?P<gz>\.gz)?$")


@dataclass
class MaintenanceReport:
    gzipped: list[str] = field(default_factory=list)
    packed: dict[str, list[str]] = field(default_factory=dict)
    """archive name -> member names added this run."""


def maintain_log_dir(directory: str | Path, *, today: date | None = None, compress_after_days: int = 7,
                     pack_after_days: int = 30) -> MaintenanceReport:
    """Gzip daily files older than ``compress_after_days``; move those older than ``pack_after_days``
    (gzipped) into ``<stem>-YYYY-MM.tar``. The age of a file is ``today`` minus the date in its name."""
    if compress_after_days < 0 or pack_after_days < 0:
        raise ValueError("compress_after_days and pack_after_days must be >= 0")
    directory = Path(directory)
    today = today or datetime.now(UTC).date()
    report = MaintenanceReport()
    if not directory.is_dir():
        return report
    for path in sorted(directory.iterdir()):
        m = _DAILY.match(path.name)
        if m is None or not path.is_file():
            continue
        try:
            day = date.fromisoformat(m["day"])
        except ValueError:
            continue
        age = (today - day).days
        if age <= compress_after_days and age <= pack_after_days:
            continue
        if not m["gz"]:
            gz = path.with_name(path.name + ".gz")
            with open(path, "rb") as src, gzip.open(gz, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.utime(gz, (path.stat().st_atime, path.stat().st_mtime))
            path.unlink()
            report.gzipped.append(gz.name)
            path = gz
        if age > pack_after_days:
            archive = directory / f"{m['stem']}-{day:%Y-%m}.tar"
            with tarfile.open(archive, "a") as tar:
                if path.name not in tar.getnames():
                    tar.add(path, arcname=path.name)
            path.unlink()
            report.packed.setdefault(archive.name, []).append(path.name)
    return report


class DailyJsonFileHandler(logging.handlers.TimedRotatingFileHandler):
    """``<dir>/<stem>.jsonl`` in JSON lines, rotated at UTC midnight to ``<stem>-YYYY-MM-DD.jsonl``;
    after each rotation the directory is maintained (:func:`maintain_log_dir`)."""

    def __init__(self, directory: str | Path, stem: str = "matcalc", *, compress_after_days: int = 7,
                 pack_after_days: int = 30) -> None:
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stem = stem
        self.compress_after_days = compress_after_days
        self.pack_after_days = pack_after_days
        super().__init__(self.directory / f"{stem}.jsonl", when="midnight", utc=True, backupCount=0,
                         encoding="utf-8")
        self.namer = self._rotated_name
        self.setFormatter(JsonFormatter())

    def _rotated_name(self, default: str) -> str:
        day = default.rsplit(".", 1)[-1]  # "<dir>/matcalc.jsonl.2026-11-28"
        return str(self.directory / f"{self.stem}-{day}.jsonl")

    def doRollover(self) -> None:
        super().doRollover()
        self.maintain()

    def maintain(self, today: date | None = None) -> MaintenanceReport:
        try:
            return maintain_log_dir(self.directory, today=today, compress_after_days=self.compress_after_days,
                                    pack_after_days=self.pack_after_days)
        except Exception as exc:  # noqa: BLE001 - log housekeeping must never break logging
            log.warning("log maintenance in %s failed: %s", self.directory, exc)
            return MaintenanceReport()


# ----------------------------------------------------------------------------- live system log
class LogHub(logging.Handler):
    """Keeps the last ``backlog`` structured records and publishes each to the ``system`` channel of
    its bus (for ``GET /system/logs/stream``). Publishing never blocks the logging thread."""

    CHANNEL = "system"

    def __init__(self, backlog: int = 200, level: int = logging.DEBUG) -> None:
        super().__init__(level)
        self.bus = EventBus(maxsize=2000)
        self.recent: deque[dict[str, Any]] = deque(maxlen=max(1, backlog))
        self._seq = 0
        self._seq_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            d = record_dict(record)
            with self._seq_lock:
                self._seq += 1
                d["seq"] = self._seq
                self.recent.append(d)
            if self.bus.n_subscribers:
                self.bus.publish(self.CHANNEL, d)
        except Exception:  # noqa: BLE001 - never raise from logging
            self.handleError(record)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._seq_lock:
            return list(self.recent)


def level_at_least(level: str, minimum: str | None) -> bool:
    if minimum is None:
        return True
    try:
        return LEVELS.index(level.upper()) >= LEVELS.index(minimum.upper())
    except ValueError:
        return True


@contextlib.contextmanager
def installed(handlers: list[logging.Handler], logger_names: tuple[str, ...] = ("",)) -> Iterator[None]:
    """Attach ``handlers`` to the named loggers (root by default) for the duration of the block."""
    loggers = [logging.getLogger(n) for n in logger_names]
    for lg in loggers:
        for h in handlers:
            lg.addHandler(h)
    try:
        yield
    finally:
        for lg in loggers:
            for h in handlers:
                lg.removeHandler(h)
                with contextlib.suppress(Exception):
                    h.flush()


# ----------------------------------------------------------------------------- SSE
def sse(data: dict[str, Any] | None = None, *, event: str | None = None,
        id: int | str | None = None) -> bytes:  # noqa: A002
    """One Server-Sent Event: optional ``event:``/``id:`` lines and one ``data:`` line of JSON."""
    lines = []
    if event:
        lines.append(f"event: {event}")
    if id is not None:
        lines.append(f"id: {id}")
    if data is not None:
        lines.append("data: " + json.dumps(data, ensure_ascii=False, default=str, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


HEARTBEAT = b": keep-alive\n\n"
