"""The webhook outbox: every webhook is a row of ``webhook_outbox`` before anything is sent, every
attempt a row of ``webhook_deliveries`` (linked by ``delivery_id``).

A delivery is PENDING until an attempt gets a 2xx answer (DELIVERED) or the dispatcher gives up
(FAILED: attempts exhausted, or a 4xx other than 408/429). PENDING rows survive any restart (a
SIGTERM or a kill -9): `Outbox.pending` hands them back, with the attempts already made and
the time the next one is due, so the dispatcher resumes where it stopped. An attempt whose answer
was not recorded (killed in flight) is made again with the same delivery id: at least once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update

from matcalc.store.models import WebhookDelivery, WebhookOutbox, new_id, utcnow

log = logging.getLogger(__name__)

DELIVERY_STATUSES = ("PENDING", "DELIVERED", "FAILED")


@dataclass
class OutboxItem:
    """One delivery as the dispatcher works on it."""

    url: str
    event: str
    payload: dict[str, Any]
    secret: str | None = None
    task_id: str | None = None
    delivery_id: str = field(default_factory=new_id)
    attempts: int = 0
    """Attempts made so far."""
    next_attempt_at: datetime | None = None
    """When the next attempt is due (UTC); ``None``: now."""
    row_id: int | None = None
    """Primary key of the outbox row (``None`` when not stored)."""


@dataclass
class Attempt:
    """The outcome of one attempt."""

    status_code: int | None
    success: bool
    error: str | None
    duration_s: float
    at: datetime = field(default_factory=utcnow)


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat().replace("+00:00", "Z")


class Outbox:
    """Reads and writes of the outbox over a `Store`."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def add(self, item: OutboxItem) -> OutboxItem:
        """Store a new PENDING delivery (committed when this returns); sets ``item.row_id``."""
        with self.store.write() as s:
            row = WebhookOutbox(delivery_id=item.delivery_id, task_id=item.task_id, event=item.event, url=item.url,
                                payload=item.payload, secret=item.secret, status="PENDING", attempts=item.attempts,
                                created_at=utcnow(), next_attempt_at=item.next_attempt_at or utcnow())
            s.add(row)
            s.flush()
            item.row_id = row.id
        return item

    def pending(self) -> list[OutboxItem]:
        """Every PENDING delivery, oldest first (the order events happened in)."""
        with self.store.read() as s:
            rows = s.scalars(select(WebhookOutbox).where(WebhookOutbox.status == "PENDING")
                             .order_by(WebhookOutbox.id)).all()
        return [OutboxItem(url=r.url, event=r.event, payload=r.payload, secret=r.secret, task_id=r.task_id,
                           delivery_id=r.delivery_id, attempts=r.attempts, next_attempt_at=r.next_attempt_at,
                           row_id=r.id) for r in rows]

    def record(self, item: OutboxItem, attempt: Attempt, *, final: bool,
               next_attempt_at: datetime | None = None) -> None:
        """Store one attempt (``item.attempts`` is its number) and the delivery's new state, in one
        transaction: DELIVERED on success, FAILED when ``final`` without success, else PENDING until
        ``next_attempt_at``. The signing key is forgotten once the delivery is finished."""
        status = "DELIVERED" if attempt.success else ("FAILED" if final else "PENDING")
        with self.store.write() as s:
            s.add(WebhookDelivery(delivery_id=item.delivery_id, task_id=item.task_id, event=item.event, url=item.url,
                                  payload=item.payload, attempt=item.attempts, status_code=attempt.status_code,
                                  success=attempt.success, error=attempt.error, created_at=attempt.at,
                                  duration_s=attempt.duration_s))
            if item.row_id is None:
                return
            values: dict[str, Any] = {"attempts": item.attempts, "status": status,
                                      "last_status_code": attempt.status_code, "last_error": attempt.error}
            if status == "PENDING":
                values["next_attempt_at"] = next_attempt_at or utcnow()
            else:
                values.update(finished_at=attempt.at, secret=None)
            s.execute(update(WebhookOutbox).where(WebhookOutbox.id == item.row_id).values(**values)
                      .execution_options(synchronize_session=False))

    def has_event(self, task_id: str, event: str) -> bool:
        with self.store.read() as s:
            return s.scalar(select(WebhookOutbox.id).where(WebhookOutbox.task_id == task_id,
                                                           WebhookOutbox.event == event).limit(1)) is not None

    def oldest(self) -> datetime | None:
        """When the first delivery ever was stored (``None``: the outbox is empty)."""
        with self.store.read() as s:
            return s.scalar(select(func.min(WebhookOutbox.created_at)))

    # ------------------------------------------------------------- queries for the API
    def list(self, *, task_id: str | None = None, status: str | None = None, event: str | None = None,
             page: int = 1, page_size: int = 50) -> tuple[list[dict[str, Any]], int]:
        """Deliveries with every attempt, as JSON-ready dicts; ``(items, total)``. With ``task_id``:
        that task's in the order they happened; otherwise newest first."""
        conds: list[Any] = []
        if task_id is not None:
            conds.append(WebhookOutbox.task_id == task_id)
        if status is not None:
            conds.append(WebhookOutbox.status == status)
        if event is not None:
            conds.append(WebhookOutbox.event == event)
        order = WebhookOutbox.id if task_id is not None else WebhookOutbox.id.desc()
        with self.store.read() as s:
            total = int(s.scalar(select(func.count()).select_from(WebhookOutbox).where(*conds)) or 0)
            rows = s.scalars(select(WebhookOutbox).where(*conds).order_by(order)
                             .offset((page - 1) * page_size).limit(page_size)).all()
            ids = [r.delivery_id for r in rows]
            attempts: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
            if ids:
                for a in s.scalars(select(WebhookDelivery).where(WebhookDelivery.delivery_id.in_(ids))
                                   .order_by(WebhookDelivery.id)).all():
                    attempts[a.delivery_id or ""].append(
                        {"attempt": a.attempt, "at": _iso(a.created_at), "status_code": a.status_code,
                         "success": a.success, "error": a.error, "duration_s": a.duration_s})
        items = [{"id": r.delivery_id, "task_id": r.task_id, "event": r.event, "url": r.url, "status": r.status,
                  "created_at": _iso(r.created_at), "finished_at": _iso(r.finished_at),
                  "next_attempt_at": _iso(r.next_attempt_at) if r.status == "PENDING" else None,
                  "last_status_code": r.last_status_code, "last_error": r.last_error, "payload": r.payload,
                  "attempts": attempts[r.delivery_id]} for r in rows]
        return items, total


def finished_without_webhook(store: Any, since: datetime) -> list[str]:
    """Ids of tasks with a ``notify_url`` that reached a terminal status after ``since`` and have no
    outbox row for that terminal event (their event was lost between the status change and the
    outbox write, e.g. by a kill -9 in that instant); oldest first."""
    from sqlalchemy import and_, exists, literal_column

    from matcalc.store.models import Task
    from matcalc.tasks import TERMINAL

    event = func.lower(literal_column("'task.'") + Task.status)  # task.completed for COMPLETED, as sent
    has_row = exists().where(and_(WebhookOutbox.task_id == Task.id, WebhookOutbox.event == event))
    with store.read() as s:
        return list(s.scalars(select(Task.id).where(Task.notify_url.is_not(None),
                                                    Task.status.in_([t.value for t in TERMINAL]),
                                                    Task.finished_at >= since, ~has_row)
                              .order_by(Task.finished_at)).all())
