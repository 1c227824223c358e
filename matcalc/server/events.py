"""In-process publish/subscribe of task events (status, progress, log lines).

Worker threads publish; asyncio consumers (the SSE routes of the observability layer) subscribe
to one task or to everything (``task_id=None``). A slow subscriber loses its oldest events rather
than blocking a task; a closed task ends its subscribers' streams (``None`` is delivered).

A `Watch` is the cheap kind of subscriber: it only learns *that* something happened (an
`asyncio.Event`, set at most once per wake-up however many events came), which is all the
shared log feeds need; events with ``"stored": False`` (progress not written to the store) do not
wake it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

END = None


@dataclass(eq=False)
class Subscription:
    task_id: str | None
    queue: asyncio.Queue[dict[str, Any] | None]
    loop: asyncio.AbstractEventLoop

    def _put(self, item: dict[str, Any] | None) -> None:
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
        self.queue.put_nowait(item)


@dataclass(eq=False)
class Watch:
    """Wakes its owner when the task has new stored events (coalesced) or ends (``ended``)."""

    task_id: str
    loop: asyncio.AbstractEventLoop
    event: asyncio.Event
    ended: bool = False
    _scheduled: bool = False

    def _poke(self, end: bool = False) -> None:  # publisher thread
        if end:
            self.ended = True
        if not self._scheduled:
            self._scheduled = True
            with contextlib.suppress(RuntimeError):  # loop closed
                self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:  # loop thread
        self._scheduled = False
        self.event.set()


class EventBus:
    def __init__(self, maxsize: int = 1000) -> None:
        self._subs: list[Subscription] = []
        self._watches: dict[str, list[Watch]] = {}
        self._lock = threading.Lock()
        self.maxsize = maxsize

    def publish(self, task_id: str, event: dict[str, Any]) -> None:
        with self._lock:
            subs = [s for s in self._subs if s.task_id in (None, task_id)]
            watches = list(self._watches.get(task_id, ())) if event.get("stored", True) else []
        for w in watches:
            w._poke()
        if not subs:
            return
        item = {"task_id": task_id, **event}
        for s in subs:
            with contextlib.suppress(RuntimeError):  # loop closed
                s.loop.call_soon_threadsafe(s._put, item)

    def close(self, task_id: str) -> None:
        """The task ended: its subscribers receive ``None``."""
        with self._lock:
            subs = [s for s in self._subs if s.task_id == task_id]
            watches = list(self._watches.get(task_id, ()))
        for w in watches:
            w._poke(end=True)
        for s in subs:
            with contextlib.suppress(RuntimeError):
                s.loop.call_soon_threadsafe(s._put, END)

    @contextlib.contextmanager
    def watch(self, task_id: str) -> Iterator[Watch]:
        """A `Watch` of one task, from a running event loop; removed on exit."""
        w = Watch(task_id, asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._watches.setdefault(task_id, []).append(w)
        try:
            yield w
        finally:
            with self._lock:
                ws = self._watches.get(task_id, [])
                if w in ws:
                    ws.remove(w)
                if not ws:
                    self._watches.pop(task_id, None)

    @contextlib.contextmanager
    def subscribe(self, task_id: str | None = None) -> Iterator[Subscription]:
        """Subscribe from a running event loop; unsubscribes on exit."""
        sub = Subscription(task_id, asyncio.Queue(self.maxsize), asyncio.get_running_loop())
        with self._lock:
            self._subs.append(sub)
        try:
            yield sub
        finally:
            with self._lock:
                self._subs.remove(sub)

    @property
    def n_subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    @property
    def n_watches(self) -> int:
        with self._lock:
            return sum(len(w) for w in self._watches.values())
