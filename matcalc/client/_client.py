"""The synchronous surface: `Client` (``httpx.Client``) and `RemoteTask`.

Every method comes from the one core (`matcalc.client._core`); what is here is what only a
synchronous program has: the blocking transport, a status that refreshes itself when read, and the
callback poller thread that drives `matcalc.widgets.progress`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

import httpx

from matcalc.client._core import ClientCore, TaskCore
from matcalc.client._io import SyncSide
from matcalc.client._models import TaskInfo

log = logging.getLogger("matcalc.client")

FRESH_S = 0.2
"""``RemoteTask.status`` reuses a snapshot younger than this (s) instead of asking again (a progress
view reads the status right after the poller fetched it)."""

_WATCHER_LOCK = threading.Lock()

DoneCallback = Callable[["RemoteTask"], None]
ProgressCallback = Callable[["RemoteTask", dict[str, Any]], None]
StatusCallback = Callable[["RemoteTask", str], None]


class RemoteTask(SyncSide, TaskCore["Client"]):
    """Handle of a task on a matcalc server; the same task-like protocol as
    `matcalc.cluster.Task`, so `matcalc.widgets.progress` shows it live.

    ``status`` asks the server when the snapshot is older than `FRESH_S` (terminal states are
    final); ``info`` is the last snapshot. Callbacks (``add_done_callback``, ``add_progress_callback``,
    ``add_status_callback``) are driven by one background poller thread per client, started on the
    first registration, polling every ``client.poll_interval`` s each task that has callbacks and is
    not finished, and stopping when none is left; callbacks run on that thread (keep them quick).
    """

    def __init__(self, client: Client, info: TaskInfo) -> None:
        super().__init__(client, info)
        self._done_callbacks: list[DoneCallback] = []
        self._progress_callbacks: list[ProgressCallback] = []
        self._status_callbacks: list[StatusCallback] = []

    def _freshen(self) -> None:
        if not self._info.done and time.monotonic() - self._fetched_at > FRESH_S:
            self._drive(self._fetch())

    # ------------------------------------------------------------------ callbacks (task-like protocol)
    def add_done_callback(self, fn: DoneCallback) -> None:
        """Call ``fn(task)`` once the task finished (at once when it already has)."""
        with self._lock:
            if not self._info.done:
                self._done_callbacks.append(fn)
                self._client.watcher.watch(self)
                return
        _safe(fn, self)

    def add_progress_callback(self, fn: ProgressCallback) -> None:
        """Call ``fn(task, event)`` for each new progress snapshot seen by the poller (the server
        stores one per ``progress_interval_s``, and always the last step of a run)."""
        with self._lock:
            self._progress_callbacks.append(fn)
        if not self._info.done:
            self._client.watcher.watch(self)

    def add_status_callback(self, fn: StatusCallback) -> None:
        """Call ``fn(task, status)`` on each status change seen by the poller."""
        with self._lock:
            self._status_callbacks.append(fn)
        if not self._info.done:
            self._client.watcher.watch(self)

    def _poll(self) -> bool:
        """One poller step: fetch, fire the callbacks for what changed; True once finished."""
        old = self._info
        info = self._drive(self._fetch())
        with self._lock:
            status_cbs = list(self._status_callbacks) if info.status != old.status else []
            progress_cbs = list(self._progress_callbacks) if info.progress and info.progress != old.progress else []
            done_cbs: list[DoneCallback] = []
            if info.done:
                done_cbs, self._done_callbacks = self._done_callbacks, []
        for pcb in progress_cbs:  # the newest progress first (also the last one of a task that just ended)
            _safe(pcb, self, dict(info.progress or {}))
        for scb in status_cbs:
            _safe(scb, self, info.status)
        for dcb in done_cbs:
            _safe(dcb, self)
        return info.done


def _safe(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - a broken callback must not stop the poller
        log.exception("task callback %r failed", fn)


class Watcher:
    """A client's callback poller: one daemon thread, started when a task is watched, ending when
    every watched task has finished (or the client closes)."""

    def __init__(self, poll_interval: float) -> None:
        self.poll_interval = poll_interval
        self._tasks: dict[str, RemoteTask] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, task: RemoteTask) -> None:
        with self._lock:
            self._tasks[task.id] = task
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="matcalc-client-poller", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                tasks = list(self._tasks.values())
            for task in tasks:
                if self._stop.is_set():
                    return
                try:
                    finished = task._poll()
                except Exception as exc:  # noqa: BLE001 - keep polling the others; try again next round
                    if self._stop.is_set():
                        return
                    log.warning("polling task %s failed: %s", task.id, exc)
                    continue
                if finished:
                    with self._lock:
                        self._tasks.pop(task.id, None)
            with self._lock:
                if not self._tasks:
                    self._thread = None
                    return
            self._stop.wait(self.poll_interval)

    def close(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)


class Client(SyncSide, ClientCore[RemoteTask]):
    """Synchronous client of a matcalc server (``matcalc serve``).

    >>> with Client("http://127.0.0.1:8000", api_key="...") as c:       # doctest: +SKIP
    ...     task = c.relax("MOF-5.cif", model="chgnet", protocol="fast")
    ...     r = task.result()                # RelaxResult, as matcalc.relax returns it

    One method per property (``optimization``/``relax``, ``single_point``, ``bulk_modulus``,
    ``heat_capacity``, ``stability``, ``interaction_energy``, and every property declared later),
    generated from the property's declaration: its keywords, checked here before anything is sent,
    and the task options (priority, timeout_s, label, notify_*, idempotency_key). The arguments are
    those of `ClientCore`.
    """

    handle_name: ClassVar[str] = "RemoteTask"
    _watcher: Watcher | None = None

    @property
    def watcher(self) -> Watcher:
        """The callback poller of this client's tasks (started with the first callback)."""
        with _WATCHER_LOCK:
            if self._watcher is None:
                self._watcher = Watcher(self.poll_interval)
            return self._watcher

    def _connect(self, options: dict[str, Any]) -> httpx.Client:
        return httpx.Client(**options)

    def _handle(self, info: TaskInfo) -> RemoteTask:
        return RemoteTask(self, info)

    def close(self) -> None:
        """Stop the callback poller and close the connections."""
        if self._watcher is not None:
            self._watcher.close()
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    if TYPE_CHECKING:  # the per-property methods, generated from the declarations at import
        def __getattr__(self, name: str) -> Callable[..., RemoteTask]: ...
