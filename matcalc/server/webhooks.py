"""Webhooks: signed JSON POSTs from a durable outbox, fair across receivers, in order per task.

Each delivery is a POST of a JSON body with the headers

* ``X-Matcalc-Event``: the event (``task.completed``...),
* ``X-Matcalc-Delivery``: the delivery id, the same for every attempt of one delivery, across
  restarts too (receivers drop duplicates by it: delivery is *at least once*),
* ``X-Matcalc-Attempt``: the attempt number (1, 2, ...),
* ``X-Matcalc-Timestamp``: UNIX seconds when the attempt was signed,
* ``X-Matcalc-Signature``: ``sha256=<hex>``, HMAC-SHA256 with the task's ``notify_secret`` over
  ``b"<timestamp>." + body`` (only when a secret was given).

A receiver recomputes the HMAC over the raw body and rejects a timestamp older than its tolerance
(replays); `verify_signature` does both.

Durability: `WebhookDispatcher.enqueue` stores the delivery in the outbox
(`matcalc.store.outbox`) before it returns; every attempt and the delivery's state are stored
when the attempt ends; on start the dispatcher resumes every PENDING delivery (a kill -9 or SIGTERM
loses nothing; an attempt cut off in flight is made again, with the same delivery id).

Fairness: deliveries are queued per *destination* (scheme, host and port of the URL), at most
``concurrency`` attempts in flight per destination, each cut off after ``timeout_s`` (the whole
attempt: connect, send, answer), so a slow or hung receiver only delays its own deliveries. Within
a destination, the deliveries of one task (and the alert events) form a lane attempted strictly in
order: the next event of a task waits until the previous one is delivered or given up.

Retries: a 5xx, 408, 429, 3xx (redirects are not followed) or a network error is retried after
``backoff_s * 2**(attempt-1)`` s (capped at ``backoff_max_s``), up to ``max_attempts``; another 4xx
ends the delivery as FAILED.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import matcalc
from matcalc.store.models import utcnow
from matcalc.store.outbox import Attempt, Outbox, OutboxItem
from matcalc.tasks import TERMINAL

log = logging.getLogger(__name__)

ALERT_EVENTS = ("alert.opened", "alert.resolved")
"""Events of the alert webhooks (the task events are `matcalc.submission.TASK_EVENTS`)."""
STATUS_EVENTS = {"RUNNING": "task.started", "COMPLETED": "task.completed", "FAILED": "task.failed",
                 "CANCELLED": "task.cancelled", "TIMEOUT": "task.timeout"}
TERMINAL_EVENTS = frozenset(STATUS_EVENTS[s] for s in TERMINAL)
SIGNATURE_HEADER = "X-Matcalc-Signature"
TIMESTAMP_HEADER = "X-Matcalc-Timestamp"
EVENT_HEADER = "X-Matcalc-Event"
DELIVERY_HEADER = "X-Matcalc-Delivery"
ATTEMPT_HEADER = "X-Matcalc-Attempt"
MAX_ANSWER_BYTES = 65536
"""At most this much of a receiver's answer is read."""


def signature(secret: str, timestamp: int | str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256(secret, ``b"<timestamp>." + body``)."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(secret: str, body: bytes, timestamp: str | None, sig: str | None, *,
                     tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """Receiver side: the signature matches and the timestamp is within ``tolerance_s`` of ``now``."""
    if not timestamp or not sig:
        return False
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    now = time.time() if now is None else now
    if abs(now - ts) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, ts, body), sig)


def destination(url: str) -> str:
    """The queue a URL's deliveries share: ``scheme://host:port`` (default ports filled in)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        port = 0
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}"


def retryable(status: int | None) -> bool:
    """Whether an attempt with this answer (``None``: no answer) is worth repeating."""
    return status is None or status >= 500 or status in (408, 429) or 300 <= status < 400


def _describe(exc: BaseException) -> str:
    """``Type: message`` of an error and of its root cause (``ConnectError: ... (ConnectionRefusedError: ...)``)."""
    root = exc
    seen = {id(exc)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        root = nxt
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if root is not exc:
        text += f" ({type(root).__name__}: {root})"
    return text


Delivery = OutboxItem
"""A delivery as the dispatcher's hooks see it (``.event``, ``.delivery_id``, ``.attempts``...)."""


@dataclass(eq=False)
class _Destination:
    name: str
    sem: asyncio.Semaphore
    lanes: dict[str, deque[OutboxItem]] = field(default_factory=dict)


class WebhookDispatcher:
    """Durable, fair webhook delivery (see the module doc).

    ``store`` may be ``None`` (deliveries then live in memory only). ``on_attempt(item, ok)`` is
    called after every attempt, ``on_finished(item, status)`` when a delivery ends (DELIVERED/FAILED).
    """

    def __init__(self, store: Any = None, *, max_attempts: int = 5, backoff_s: float = 1.0,
                 backoff_max_s: float = 300.0, timeout_s: float = 10.0, concurrency: int = 4,
                 on_attempt: Callable[[OutboxItem, bool], None] | None = None,
                 on_finished: Callable[[OutboxItem, str], None] | None = None) -> None:
        if max_attempts < 1:
            raise ValueError(f"webhook max_attempts must be >= 1, got {max_attempts}")
        if backoff_s < 0 or backoff_max_s < 0 or timeout_s <= 0:
            raise ValueError("webhook backoff_s/backoff_max_s must be >= 0 and timeout_s > 0")
        if concurrency < 1:
            raise ValueError(f"webhook concurrency must be >= 1, got {concurrency}")
        self.store = store
        self.outbox = Outbox(store) if store is not None else None
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self.on_attempt = on_attempt
        self.on_finished = on_finished
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._dests: dict[str, _Destination] = {}
        self._lane_tasks: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._pending = 0
        self._count_lock = threading.Lock()
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="matcalc-webhook-db")
        self._client: Any = None
        self.resumed = 0
        """Deliveries taken up from the outbox at start."""

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the delivery loop and resume every PENDING delivery of the outbox."""
        backlog = self.outbox.pending() if self.outbox is not None else []
        self._thread = threading.Thread(target=self._run, name="matcalc-webhooks", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        self.resumed = len(backlog)
        if backlog:
            log.info("webhooks: resuming %d pending delivery(ies) from the outbox", len(backlog))
        for item in backlog:
            self._hand_over(item)

    def _run(self) -> None:
        import httpx

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._stopping = asyncio.Event()
        self._client = httpx.AsyncClient(
            follow_redirects=False, timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
            headers={"User-Agent": f"matcalc/{matcalc.__version__}"})
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(self._client.aclose())
            loop.close()

    def stop(self, timeout_s: float = 5.0) -> int:
        """Stop: no new attempt starts, attempts in flight get up to ``timeout_s`` to end (else they
        are cut off and made again after the next start). Returns how many deliveries are left
        unfinished (PENDING in the outbox when there is a store, lost otherwise)."""
        loop = self._loop
        if loop is None or self._thread is None:
            return self.pending
        left = self.pending

        async def _shutdown() -> None:
            assert self._stopping is not None
            self._stopping.set()
            tasks = [t for t in self._lane_tasks if not t.done()]
            if tasks:
                _, still = await asyncio.wait(tasks, timeout=timeout_s)
                for t in still:
                    t.cancel()
                if still:
                    await asyncio.wait(still, timeout=1.0)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_shutdown(), loop).result(timeout_s + 5)
        left = self.pending
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._db.shutdown(wait=True)
        self._loop = None
        if left:
            where = "left PENDING in the outbox for the next start" if self.outbox is not None else "dropped"
            log.warning("webhooks: %d unfinished delivery(ies) %s", left, where)
        return left

    @property
    def pending(self) -> int:
        """Deliveries not finished yet (queued, waiting for a retry or in flight)."""
        with self._count_lock:
            return self._pending

    @property
    def in_flight(self) -> int:
        """Attempts in progress now."""
        with self._count_lock:
            return self._in_flight

    def destinations(self) -> dict[str, int]:
        """Unfinished deliveries per destination (a snapshot)."""
        return {name: sum(len(lane) for lane in list(d.lanes.values())) for name, d in list(self._dests.items())}

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until nothing is pending (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.pending

    # -------------------------------------------------------------- enqueue
    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))

    def enqueue(self, url: str, event: str, payload: dict[str, Any], *, secret: str | None = None,
                task_id: str | None = None) -> str:
        """Store a delivery in the outbox and queue it (never blocks on the network, never raises
        on a bad receiver); returns its delivery id. Calls for one task must come in event order."""
        item = OutboxItem(url=url, event=event, payload=payload, secret=secret, task_id=task_id)
        if self.outbox is not None:
            try:
                self.outbox.add(item)
            except Exception as exc:  # noqa: BLE001 - e.g. no such task row: still deliver, from memory
                log.warning("webhook %s for %s could not be stored (%s); delivering from memory only", event, url, exc)
                item.row_id = None
        self._hand_over(item)
        return item.delivery_id

    def _hand_over(self, item: OutboxItem) -> None:
        with self._count_lock:
            self._pending += 1
        loop = self._loop
        if loop is None:
            raise RuntimeError("the webhook dispatcher is not started")
        loop.call_soon_threadsafe(self._add, item)

    # -------------------------------------------------------------- the loop's side
    def _add(self, item: OutboxItem) -> None:
        assert self._stopping is not None
        if self._stopping.is_set():
            return  # stays PENDING in the outbox
        name = destination(item.url)
        dest = self._dests.get(name)
        if dest is None:
            dest = self._dests[name] = _Destination(name, asyncio.Semaphore(self.concurrency))
        key = item.task_id or "system"
        lane = dest.lanes.get(key)
        if lane is not None:
            lane.append(item)  # its runner is working through the lane
            return
        dest.lanes[key] = deque([item])
        task = asyncio.get_running_loop().create_task(self._run_lane(dest, key))
        self._lane_tasks.add(task)
        task.add_done_callback(self._lane_tasks.discard)

    async def _sleep_until(self, due_wall: Any) -> bool:
        """Wait until ``due_wall`` (UTC) or the stop; True when it is time."""
        assert self._stopping is not None
        delay = (due_wall - utcnow()).total_seconds() if due_wall is not None else 0.0
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
        return not self._stopping.is_set()

    async def _run_lane(self, dest: _Destination, key: str) -> None:
        lane = dest.lanes[key]
        loop = asyncio.get_running_loop()
        try:
            while lane:
                item = lane[0]
                if not await self._sleep_until(item.next_attempt_at):
                    return
                async with dest.sem:
                    if self._stopping is not None and self._stopping.is_set():
                        return
                    with self._count_lock:
                        self._in_flight += 1
                    try:
                        attempt = await self._attempt(item)
                    finally:
                        with self._count_lock:
                            self._in_flight -= 1
                item.attempts += 1
                final = attempt.success or not retryable(attempt.status_code) or item.attempts >= self.max_attempts
                wait = 0.0 if final else self.backoff(item.attempts)
                item.next_attempt_at = None if final else utcnow() + timedelta(seconds=wait)  # after the answer
                await loop.run_in_executor(self._db, self._record, item, attempt, final)
                self._hook(self.on_attempt, item, attempt.success)
                if final:
                    lane.popleft()
                    with self._count_lock:
                        self._pending -= 1
                    status = "DELIVERED" if attempt.success else "FAILED"
                    if not attempt.success:
                        log.warning("webhook %s to %s failed after %d attempt(s): %s", item.event, item.url,
                                    item.attempts, attempt.error)
                    self._hook(self.on_finished, item, status)
                else:
                    log.info("webhook %s to %s failed (attempt %d/%d: %s); retrying in %.3g s", item.event,
                             item.url, item.attempts, self.max_attempts, attempt.error, wait)
        finally:  # an empty lane goes (a stopped one stays, its items PENDING in the outbox)
            if not lane:
                dest.lanes.pop(key, None)
            if not dest.lanes and self._dests.get(dest.name) is dest:
                self._dests.pop(dest.name, None)

    async def _attempt(self, item: OutboxItem) -> Attempt:
        body = json.dumps(item.payload, separators=(",", ":"), default=str).encode()
        ts = int(time.time())
        headers = {"Content-Type": "application/json", EVENT_HEADER: item.event, DELIVERY_HEADER: item.delivery_id,
                   ATTEMPT_HEADER: str(item.attempts + 1), TIMESTAMP_HEADER: str(ts)}
        if item.secret:
            headers[SIGNATURE_HEADER] = signature(item.secret, ts, body)
        status: int | None = None
        error: str | None = None
        at = utcnow()
        t0 = time.perf_counter()

        async def post() -> int:
            async with self._client.stream("POST", item.url, content=body, headers=headers) as resp:
                got = 0
                async for chunk in resp.aiter_raw():
                    got += len(chunk)
                    if got >= MAX_ANSWER_BYTES:
                        break
                return int(resp.status_code)

        try:
            status = await asyncio.wait_for(post(), self.timeout_s)
        except TimeoutError:
            error = f"timed out after {self.timeout_s:g} s"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - refused connections, DNS, TLS, protocol errors...
            error = _describe(exc)
        ok = status is not None and 200 <= status < 300
        if status is not None and not ok:
            error = f"HTTP {status}"
        return Attempt(status, ok, error, time.perf_counter() - t0, at)

    def _record(self, item: OutboxItem, attempt: Attempt, final: bool) -> None:
        if self.outbox is None:
            return
        try:
            self.outbox.record(item, attempt, final=final, next_attempt_at=item.next_attempt_at)
        except Exception as exc:  # noqa: BLE001 - e.g. a database hiccup: keep delivering
            log.warning("could not record webhook attempt %s #%d: %s", item.delivery_id, item.attempts, exc)

    @staticmethod
    def _hook(fn: Callable[..., None] | None, *args: Any) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:  # noqa: BLE001
            log.debug("webhook hook failed", exc_info=True)
