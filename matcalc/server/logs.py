"""Structured logs: JSON records, daily log files with gzip/monthly packing, and the live streams.

* `JsonFormatter` turns a `logging.LogRecord` into one JSON object per line with
  ``timestamp, level, logger, kind, message, task_id, request_id, worker, gpu`` plus every ``extra``
  field (``step``, ``energy_eV``, ``status``, ``duration_s``...). ``kind`` is ``access``, ``audit``,
  ``task`` (a record emitted while a task runs) or ``system``.
* `DailyJsonFileHandler` writes ``<dir>/matcalc.jsonl`` and rotates it at UTC midnight into
  ``matcalc-YYYY-MM-DD.jsonl``; `maintain_log_dir` gzips rotated files older than
  ``compress_after_days`` and packs those older than ``pack_after_days`` into one uncompressed tar per
  month (``matcalc-YYYY-MM.tar`` holding the ``.jsonl.gz`` members). Ages come from the file names, so
  the maintenance is deterministic (and testable with an injected ``today``).
* `LogHub` keeps the last records in a ring and fans them out to ``GET /system/logs/stream``.
* `TaskLogFeeds`: one `TaskLogFeed` per task that has open log streams; it reads the
  stored log once per new batch of lines and hands the batch to every stream of the task, so 20
  streams cost the store (and the task) what one does.
* `parse_last_event_id` and `sse` for the Server-Sent Events.
"""

from __future__ import annotations

import asyncio
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
from collections.abc import Callable, Iterator
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
    from matcalc.execution import current_task_id
    from matcalc.server.envelope import request_id_var

    rid = getattr(record, "request_id", None) or request_id_var.get()
    task_id = getattr(record, "task_id", None) or current_task_id()
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
    """One JSON object per record (see `record_dict`)."""

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
    after each rotation the directory is maintained (`maintain_log_dir`)."""

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


MAX_LOG_ID = 2**63 - 1
"""Largest log id (a signed 64-bit integer): the bound of ``after`` and ``Last-Event-ID``."""


def parse_last_event_id(value: str | None) -> int | None:
    """The log id of a ``Last-Event-ID`` header: ``None`` when absent or empty (as EventSource sends
    after a reset); a `ValueError` unless it is a plain ASCII non-negative integer <= `MAX_LOG_ID`
    (``"²"``, ``"-1"``, ``"1e3"`` and ``2**63`` are refused)."""
    if value is None or not value.strip():
        return None
    v = value.strip()
    if not (v.isascii() and v.isdigit()) or len(v) > 19 or int(v) > MAX_LOG_ID:
        raise ValueError(f"Last-Event-ID must be a log id (an integer 0..{MAX_LOG_ID}), got {value[:40]!r}")
    return int(v)


# ----------------------------------------------------------------------------- shared task log feeds
END_OF_LOG = None
"""What a feed hands its streams when the task ended and its last lines were sent."""


@dataclass(eq=False)
class FeedStream:
    """One stream's end of a feed: batches of log rows (dicts with an ``id``), then `END_OF_LOG`.
    ``lagged`` is set when the stream fell more than ``maxsize`` batches behind (its queue was
    emptied): it must catch up from the store itself."""

    queue: asyncio.Queue[list[dict[str, Any]] | None]
    lagged: bool = False

    def _put(self, item: list[dict[str, Any]] | None) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.lagged = True
            while not self.queue.empty():
                self.queue.get_nowait()
            if item is END_OF_LOG:
                self.queue.put_nowait(item)


class TaskLogFeed:
    """Reads the new stored log lines of one task, once per wake-up, for all its streams.

    ``start()`` returns ``(last log id, task ended)``; ``read(cursor, check_status)`` the rows after
    ``cursor`` and, when ``check_status``, whether the task had ended before the rows were read (one
    query for the rows, a second only then). The feed wakes on the bus (`EventBus.watch`:
    lines written, status changes, the end); without a wake-up it polls every ``poll_s``."""

    def __init__(self, task_id: str, bus: Any, start: Callable[[], tuple[int | None, bool]],
                 read: Callable[[int | None, bool], tuple[list[dict[str, Any]], bool]], *, poll_s: float = 2.0,
                 maxsize: int = 256, on_read: Callable[[], None] | None = None) -> None:
        self.task_id = task_id
        self.bus = bus
        self._start = start
        self._read = read
        self.poll_s = poll_s
        self.maxsize = maxsize
        self.on_read = on_read
        self.streams: set[FeedStream] = set()
        self.cursor: int | None = None
        self.reads = 0
        """Store reads made (the start included)."""
        self.batches = 0
        self.ready = asyncio.Event()
        self.done = False
        self.task: asyncio.Task[None] | None = None

    def add(self) -> FeedStream:
        st = FeedStream(asyncio.Queue(self.maxsize))
        self.streams.add(st)
        return st

    def _broadcast(self, item: list[dict[str, Any]] | None) -> None:
        for st in list(self.streams):
            st._put(item)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.reads += 1
        if self.on_read is not None:
            self.on_read()
        return await asyncio.to_thread(fn, *args)

    async def run(self) -> None:
        try:
            with self.bus.watch(self.task_id) as w:  # before the first read: nothing falls in between
                self.cursor, ended = await self._call(self._start)
                self.ready.set()
                while not ended:
                    woken = w.event.is_set() or w.ended
                    if not woken:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(w.event.wait(), self.poll_s)
                            woken = True
                    w.event.clear()
                    ended = w.ended  # the store was written before the bus said so: this read gets the end
                    # woken: lines were stored; otherwise a poll, which also checks whether the task ended
                    try:
                        rows, ended_now = await self._call(self._read, self.cursor, not woken and not ended)
                    except Exception as exc:  # noqa: BLE001 - e.g. the database is briefly unreachable
                        log.warning("log feed of task %s: read failed (%s); retrying in %g s", self.task_id, exc,
                                    self.poll_s)
                        await asyncio.sleep(self.poll_s)
                        w.event.set()  # read again, whatever came meanwhile (the end included)
                        ended = False
                        continue
                    ended = ended or ended_now
                    if rows:
                        self.cursor = rows[-1]["id"]
                        self.batches += 1
                        self._broadcast(rows)
                self._broadcast(END_OF_LOG)
        except Exception:  # noqa: BLE001 - the first read failed: end the streams (they may reconnect)
            log.warning("log feed of task %s failed", self.task_id, exc_info=True)
            self._broadcast(END_OF_LOG)
        finally:
            self.done = True
            self.ready.set()


class TaskLogFeeds:
    """The feeds of one app, created with a task's first stream and dropped with its last (or when
    the task ended): a finished task leaves nothing behind."""

    def __init__(self, bus: Any, start: Callable[[str], tuple[int | None, bool]],
                 read: Callable[[str, int | None, bool], tuple[list[dict[str, Any]], bool]], *, poll_s: float = 2.0,
                 on_read: Callable[[], None] | None = None) -> None:
        self.bus = bus
        self._start = start
        self._read = read
        self.poll_s = poll_s
        self.on_read = on_read
        self.feeds: dict[str, TaskLogFeed] = {}

    async def join(self, task_id: str) -> tuple[TaskLogFeed, FeedStream]:
        """The task's feed (started if needed, its cursor established) and a new stream of it."""
        feed = self.feeds.get(task_id)
        if feed is None or feed.done:
            def start() -> tuple[int | None, bool]:
                return self._start(task_id)

            def read(cursor: int | None, check: bool) -> tuple[list[dict[str, Any]], bool]:
                return self._read(task_id, cursor, check)

            feed = TaskLogFeed(task_id, self.bus, start, read, poll_s=self.poll_s, on_read=self.on_read)
            self.feeds[task_id] = feed
            feed.task = asyncio.get_running_loop().create_task(feed.run())
            feed.task.add_done_callback(lambda _t, f=feed: self._drop(f))
        stream = feed.add()
        await feed.ready.wait()
        return feed, stream

    def leave(self, feed: TaskLogFeed, stream: FeedStream) -> None:
        feed.streams.discard(stream)
        if not feed.streams and feed.task is not None and not feed.task.done():
            feed.task.cancel()
        if not feed.streams:
            self._drop(feed)

    def _drop(self, feed: TaskLogFeed) -> None:
        if self.feeds.get(feed.task_id) is feed:
            del self.feeds[feed.task_id]
