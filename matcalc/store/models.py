"""SQLAlchemy 2.x ORM models of the persistent store.

Timestamps are stored as UTC and always come back timezone-aware (`UTCDateTime`), on
SQLite as on PostgreSQL. JSON columns hold plain JSON (never pickles) through `SafeJSON`:
NaN and ±Infinity become ``null`` (and numpy values plain numbers) the same way on every database.
"""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from matcalc.tasks import ACTIVE, TERMINAL, Priority, TaskSnapshot, TaskStatus  # noqa: F401 - the lifecycle, re-exported


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as naive UTC and returned timezone-aware (UTC)."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use timezone-aware UTC datetimes")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON data: NaN/±inf -> ``None``, numpy scalars/arrays -> numbers/lists,
    tuples -> lists, keys -> strings. Raises TypeError for objects JSON cannot hold."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars
    if callable(tolist):
        return json_safe(tolist())
    raise TypeError(f"a {type(value).__name__} cannot be stored as JSON")


class SafeJSON(TypeDecorator[Any]):
    """JSON that never holds NaN/Infinity (PostgreSQL refuses them, SQLite would keep them as
    non-standard tokens): both store ``null`` instead (see `json_safe`)."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value is None:
            return None
        try:  # the common case (already strict JSON) at C speed; walk only when something needs fixing
            json.dumps(value, allow_nan=False)
            return value
        except (ValueError, TypeError):
            return json_safe(value)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: SafeJSON(), list[Any]: SafeJSON()}


class Structure(Base):
    """An uploaded (or builtin) structure, deduplicated by `matcalc.structure_hash`."""

    __tablename__ = "structures"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    """sha256 (hex) of the canonical form: the structure's identity."""
    content: Mapped[str] = mapped_column(Text)
    """The original text as first uploaded."""
    format: Mapped[str] = mapped_column(String(16))
    formula: Mapped[str] = mapped_column(String(256))
    n_atoms: Mapped[int] = mapped_column(Integer)
    periodic: Mapped[bool] = mapped_column(Boolean, default=True)
    name: Mapped[str | None] = mapped_column(String(256), default=None)
    source: Mapped[str] = mapped_column(String(16), default="upload")
    """``upload``, ``inline`` (came with a task) or ``builtin``."""
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Task(Base):
    """One calculation request and its outcome."""

    __tablename__ = "tasks"
    __table_args__ = (
        Index("ix_tasks_status_priority_created", "status", "priority_rank", "created_at"),
        Index("ix_tasks_created", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    type: Mapped[str] = mapped_column(String(32), index=True)
    """Property: optimization, single_point, bulk_modulus, heat_capacity, stability, interaction_energy."""
    model: Mapped[str] = mapped_column(String(128), index=True)
    protocol: Mapped[str | None] = mapped_column(String(32), default=None)
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    structure_id: Mapped[str] = mapped_column(ForeignKey("structures.id"), index=True)
    label: Mapped[str | None] = mapped_column(String(256), default=None, index=True)
    priority: Mapped[str] = mapped_column(String(16), default=Priority.NORMAL.value)
    priority_rank: Mapped[int] = mapped_column(Integer, default=Priority.NORMAL.rank)
    status: Mapped[str] = mapped_column(String(16), default=TaskStatus.PENDING.value)
    timeout_s: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    worker: Mapped[str | None] = mapped_column(String(256), default=None)
    gpu: Mapped[str | None] = mapped_column(String(64), default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """How many times a worker started the task (a restart can make it > 1)."""
    crashes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """How many of those executions died (the worker process aborted, segfaulted or was killed, or the
    server stopped under it); at the server's ``max_crashes`` the task is FAILED instead of run again."""
    progress: Mapped[dict[str, Any] | None] = mapped_column(SafeJSON, default=None)
    """The latest progress event (stage, step, total_steps, fraction, energy_eV, fmax_eV_per_A)."""
    result: Mapped[dict[str, Any] | None] = mapped_column(SafeJSON, default=None)
    """``Result.to_dict()`` once COMPLETED; immutable from then on."""
    error: Mapped[str | None] = mapped_column(Text, default=None)
    notify_url: Mapped[str | None] = mapped_column(String(2048), default=None)
    notify_events: Mapped[list[Any] | None] = mapped_column(SafeJSON, default=None)
    notify_secret: Mapped[str | None] = mapped_column(String(256), default=None)
    batch_id: Mapped[str | None] = mapped_column(String(32), default=None, index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    """The ``Idempotency-Key`` the task was submitted with (see `IdempotencyKey`)."""

    structure: Mapped[Structure] = relationship(lazy="raise")

    def snapshot(self) -> TaskSnapshot:
        """The shared task snapshot (`matcalc.tasks.TaskSnapshot`; ``property`` is the task type)."""
        return TaskSnapshot.of({"id": self.id, "status": self.status, "type": self.type, "model": self.model,
                                "priority": self.priority, "label": self.label, "attempts": self.attempts,
                                "crashes": self.crashes, "worker": self.worker, "progress": self.progress,
                                "error": self.error, "created_at": self.created_at, "started_at": self.started_at,
                                "finished_at": self.finished_at})


class IdempotencyKey(Base):
    """An ``Idempotency-Key`` of a submission and the tasks it created, stored in the same transaction.

    A retry with the same key (and the same body) gets those tasks back instead of new ones.
    """

    __tablename__ = "idempotency_keys"

    scope: Mapped[str] = mapped_column(String(64), primary_key=True)
    """Whose key: the API key's fingerprint (``key:…``), or ``""`` on a server without keys."""
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    """The route submitted to, e.g. ``POST /tasks/bulk-modulus``."""
    request_sha256: Mapped[str] = mapped_column(String(64))
    """Fingerprint of the request body: a reused key with another body is refused."""
    batch_id: Mapped[str | None] = mapped_column(String(32), default=None)
    task_ids: Mapped[list[Any]] = mapped_column(SafeJSON)
    """Ids of the tasks created, in submission order."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TaskLog(Base):
    """One log line of a task (lifecycle events, progress, messages from the calculation)."""

    __tablename__ = "task_logs"
    __table_args__ = (Index("ix_task_logs_task_seq", "task_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    timestamp: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(10), default="INFO")
    event: Mapped[str] = mapped_column(String(32), default="log")
    """``status``, ``progress`` or ``log``."""
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(SafeJSON, default=None)


class CustomModel(Base):
    """A user-uploaded model (TorchScript / weights only; never unpickled code)."""

    __tablename__ = "custom_models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    family: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    description: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), default="UPLOADED")
    """UPLOADED -> VALIDATING -> VALIDATED | FAILED; only VALIDATED models run tasks."""
    validation: Mapped[dict[str, Any] | None] = mapped_column(SafeJSON, default=None)
    options: Mapped[dict[str, Any] | None] = mapped_column(SafeJSON, default=None)
    """Keyword arguments for the family loader (dtype, elements, cutoff_A, architecture, ...)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Alert(Base):
    """An alert raised by a rule; open until ``resolved_at`` is set."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rule: Mapped[str] = mapped_column(String(64), index=True)
    severity: Mapped[str] = mapped_column(String(16), default="warning")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(SafeJSON, default=None)
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(default=None)


class WebhookOutbox(Base):
    """A webhook to deliver (the outbox): stored when its event happens, attempted until it is
    DELIVERED or FAILED (gave up); PENDING rows are resumed after a restart. ``delivery_id`` is the
    ``X-Matcalc-Delivery`` header of every attempt (receivers drop duplicates by it)."""

    __tablename__ = "webhook_outbox"
    __table_args__ = (Index("ix_webhook_outbox_status_id", "status", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    """Order of the events (deliveries of one task to one receiver are attempted in this order)."""
    delivery_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_id)
    task_id: Mapped[str | None] = mapped_column(ForeignKey("tasks.id", ondelete="SET NULL"), index=True)
    event: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[dict[str, Any]] = mapped_column(SafeJSON)
    secret: Mapped[str | None] = mapped_column(String(256), default=None)
    """Signing key while PENDING; cleared once the delivery is finished."""
    status: Mapped[str] = mapped_column(String(16), default="PENDING")
    """PENDING, DELIVERED (a 2xx answer) or FAILED (attempts exhausted or a final 4xx)."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    last_status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)


class WebhookDelivery(Base):
    """One attempt to deliver a webhook (of the outbox row ``delivery_id``)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str | None] = mapped_column(String(32), index=True, default=None)
    task_id: Mapped[str | None] = mapped_column(ForeignKey("tasks.id", ondelete="SET NULL"), index=True)
    event: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[dict[str, Any]] = mapped_column(SafeJSON)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    success: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    duration_s: Mapped[float | None] = mapped_column(Float, default=None)


class CacheEntry(Base):
    """One cached result (`matcalc.cache`): the key is the sha256 of every key component."""

    __tablename__ = "result_cache"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    property: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(128), index=True)
    structure_hash: Mapped[str] = mapped_column(String(64), index=True)
    cache_version: Mapped[int] = mapped_column(Integer)
    key_data: Mapped[dict[str, Any]] = mapped_column(SafeJSON)
    """The key's components (structure hashes, property, protocol, parameters, model identity, version)."""
    result: Mapped[str] = mapped_column(Text)
    """``Result.to_dict()`` as JSON text."""
    sha256: Mapped[str] = mapped_column(String(64))
    """Of `result`: an entry that does not match is dropped and recomputed."""
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    hits: Mapped[int] = mapped_column(Integer, default=0)
    last_hit_at: Mapped[datetime | None] = mapped_column(default=None)
