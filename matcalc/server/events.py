"""In-process publish/subscribe of task events (status, progress, log lines).

Worker threads publish; asyncio consumers (the SSE routes of the observability layer) subscribe
to one task or to everything (``task_id=None``). A slow subscriber loses its oldest events rather
than blocking a task; a closed task ends its subscribers' streams (``None`` is delivered).
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


class EventBus:
    def __init__(self, maxsize: int = 1000) -> None:
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()
        self.maxsize = maxsize

    def publish(self, task_id: str, event: dict[str, Any]) -> None:
        item = {"task_id": task_id, **event}
        with self._lock:
            subs = [s for s in self._subs if s.task_id in (None, task_id)]
        for s in subs:
            with contextlib.suppress(RuntimeError):  # loop closed
                s.loop.call_soon_threadsafe(s._put, item)

    def close(self, task_id: str) -> None:
        """The task ended: its subscribers receive ``None``."""
        with self._lock:
            subs = [s for s in self._subs if s.task_id == task_id]
        for s in subs:
            with contextlib.suppress(RuntimeError):
                s.loop.call_soon_threadsafe(s._put, END)

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
