"""Webhooks: signed JSON POSTs, delivered in background threads with exponential-backoff retries.

Each delivery is a POST of a JSON body with the headers

* ``X-Matcalc-Event``: the event (``task.completed``...),
* ``X-Matcalc-Delivery``: an id shared by every attempt of one delivery (receivers can de-duplicate),
* ``X-Matcalc-Timestamp``: UNIX seconds when the attempt was signed,
* ``X-Matcalc-Signature``: ``sha256=<hex>``, HMAC-SHA256 with the task's ``notify_secret`` over
  ``b"<timestamp>." + body`` (only when a secret was given).

A receiver recomputes the HMAC over the raw body and rejects a timestamp older than its tolerance
(replays); :func:`verify_signature` does both. Attempts run in worker threads (a task only enqueues),
a non-2xx answer (except 4xx other than 408/429) or a network error is retried after
``backoff_s * 2**(attempt-1)`` s (capped), up to ``max_attempts``; every attempt is a row of
``webhook_deliveries``. Deliveries of one task go to the same worker (in order unless retried).
Pending retries do not survive a restart.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import matcalc

log = logging.getLogger(__name__)

TASK_EVENTS = ("task.started", "task.progress", "task.completed", "task.failed", "task.cancelled", "task.timeout")
DEFAULT_EVENTS = tuple(e for e in TASK_EVENTS if e != "task.progress")
"""Events sent when a task gives ``notify_url`` without ``notify_events``."""
STATUS_EVENTS = {"RUNNING": "task.started", "COMPLETED": "task.completed", "FAILED": "task.failed",
                 "CANCELLED": "task.cancelled", "TIMEOUT": "task.timeout"}
SIGNATURE_HEADER = "X-Matcalc-Signature"
TIMESTAMP_HEADER = "X-Matcalc-Timestamp"
EVENT_HEADER = "X-Matcalc-Event"
DELIVERY_HEADER = "X-Matcalc-Delivery"


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


@dataclass(order=True)
class _Pending:
    due: float
    seq: int
    delivery: Delivery = field(compare=False)


@dataclass
class Delivery:
    url: str
    event: str
    payload: dict[str, Any]
    secret: str | None = None
    task_id: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    attempt: int = 0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:  # a redirect is an answer, not followed
        return None


class WebhookDispatcher:
    """Background delivery with retries; ``record(delivery, status, ok, error, seconds)`` stores each attempt."""

    def __init__(self, store: Any = None, *, max_attempts: int = 5, backoff_s: float = 1.0,
                 backoff_max_s: float = 300.0, timeout_s: float = 10.0, workers: int = 4,
                 on_attempt: Callable[[Delivery, bool], None] | None = None) -> None:
        if max_attempts < 1:
            raise ValueError(f"webhook max_attempts must be >= 1, got {max_attempts}")
        if backoff_s < 0 or backoff_max_s < 0 or timeout_s <= 0:
            raise ValueError("webhook backoff_s/backoff_max_s must be >= 0 and timeout_s > 0")
        self.store = store
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.on_attempt = on_attempt
        self._n = max(1, int(workers))
        self._heaps: list[list[_Pending]] = [[] for _ in range(self._n)]
        self._conds = [threading.Condition() for _ in range(self._n)]
        self._busy = [0] * self._n
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._opener = urllib.request.build_opener(_NoRedirect)

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        for i in range(self._n):
            t = threading.Thread(target=self._loop, args=(i,), name=f"matcalc-webhook-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout_s: float = 5.0) -> int:
        """Stop the workers (an attempt in flight may finish); returns the number of dropped deliveries."""
        self._stop.set()
        for c in self._conds:
            with c:
                c.notify_all()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        dropped = self.pending
        if dropped:
            log.warning("webhooks: %d delivery(ies) still pending at shutdown were dropped", dropped)
        return dropped

    @property
    def pending(self) -> int:
        return sum(len(h) for h in self._heaps) + sum(self._busy)

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
        """Queue a delivery (never blocks, never raises on a bad receiver); returns its delivery id."""
        d = Delivery(url, event, payload, secret, task_id)
        self._push(d, time.monotonic())
        return d.id

    def _shard(self, d: Delivery) -> int:
        key = d.task_id or d.url
        return int(hashlib.blake2b(key.encode(), digest_size=4).hexdigest(), 16) % self._n

    def _push(self, d: Delivery, due: float) -> None:
        i = self._shard(d)
        with self._conds[i]:
            heapq.heappush(self._heaps[i], _Pending(due, next(self._seq), d))
            self._conds[i].notify()

    # -------------------------------------------------------------- workers
    def _loop(self, i: int) -> None:
        heap, cond = self._heaps[i], self._conds[i]
        while not self._stop.is_set():
            with cond:
                while not self._stop.is_set():
                    now = time.monotonic()
                    if heap and heap[0].due <= now:
                        item = heapq.heappop(heap)
                        self._busy[i] += 1
                        break
                    cond.wait(None if not heap else heap[0].due - now)
                else:
                    return
            try:
                self._attempt(item.delivery)
            except Exception:  # noqa: BLE001 - a delivery worker must survive anything
                log.exception("webhook delivery %s crashed", item.delivery.id)
            finally:
                with cond:
                    self._busy[i] -= 1

    def _attempt(self, d: Delivery) -> None:
        d.attempt += 1
        body = json.dumps(d.payload, separators=(",", ":"), default=str).encode()
        ts = int(time.time())
        headers = {"Content-Type": "application/json", "User-Agent": f"matcalc/{matcalc.__version__}",
                   EVENT_HEADER: d.event, DELIVERY_HEADER: d.id, TIMESTAMP_HEADER: str(ts)}
        if d.secret:
            headers[SIGNATURE_HEADER] = signature(d.secret, ts, body)
        status: int | None = None
        error: str | None = None
        t0 = time.perf_counter()
        try:
            req = urllib.request.Request(d.url, data=body, headers=headers, method="POST")
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                status = resp.status
                resp.read(65536)
        except urllib.error.HTTPError as exc:
            status = exc.code
            error = f"HTTP {exc.code}"
        except Exception as exc:  # noqa: BLE001 - URLError, timeouts, refused connections...
            error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        dt = time.perf_counter() - t0
        ok = status is not None and 200 <= status < 300
        if status is not None and not ok and error is None:
            error = f"HTTP {status}"
        self._record(d, status, ok, error, dt)
        if self.on_attempt is not None:
            try:
                self.on_attempt(d, ok)
            except Exception:  # noqa: BLE001
                log.debug("webhook on_attempt hook failed", exc_info=True)
        if ok:
            return
        retryable = status is None or status >= 500 or status in (408, 429) or 300 <= status < 400
        if retryable and d.attempt < self.max_attempts and not self._stop.is_set():
            wait = self.backoff(d.attempt)
            log.info("webhook %s to %s failed (attempt %d/%d: %s); retrying in %.3g s", d.event, d.url, d.attempt,
                     self.max_attempts, error, wait)
            self._push(d, time.monotonic() + wait)
        else:
            log.warning("webhook %s to %s failed after %d attempt(s): %s", d.event, d.url, d.attempt, error)

    def _record(self, d: Delivery, status: int | None, ok: bool, error: str | None, seconds: float) -> None:
        if self.store is None:
            return
        from matcalc.store.models import WebhookDelivery

        try:
            with self.store.write() as s:
                s.add(WebhookDelivery(task_id=d.task_id, event=d.event, url=d.url, payload=d.payload,
                                      attempt=d.attempt, status_code=status, success=ok, error=error,
                                      duration_s=seconds))
        except Exception as exc:  # noqa: BLE001 - e.g. the task row was deleted: keep delivering
            log.warning("could not record webhook attempt %s #%d: %s", d.id, d.attempt, exc)
