"""Repository layer: every read and write of the store goes through `Store`.

Invariants enforced here (and tested):

* a task is committed before `Store.create_tasks` returns (the server acknowledges after);
* status changes are conditional updates, so a stale or duplicate worker cannot move a task that
  already finished, and a completed result is never overwritten (`ImmutableResultError`);
* `Store.requeue_active` puts every task that was PENDING/QUEUED/ASSIGNED/RUNNING back in
  the queue after a crash or restart, counting a crash for each RUNNING one, and
  `Store.record_crash` counts one for a task whose worker died; a task that reaches the
  crashes cap is FAILED instead (never requeued forever).

SQLite allows one writer at a time: writes from this process are serialised by a lock (readers
never wait thanks to WAL); other processes wait up to the busy timeout.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from ase import Atoms
from sqlalchemy import Engine, and_, event, func, inspect, select, update
from sqlalchemy.orm import Session, sessionmaker

from matcalc.store import db
from matcalc.store.models import Base, CustomModel, Structure, Task, TaskLog, utcnow
from matcalc.tasks import (
    ACTIVE,
    DEFAULT_MAX_CRASHES,
    FAILURES,
    ON_WORKER,
    TERMINAL,
    Priority,
    TaskStatus,
    can_advance,
    crash_error,
)

log = logging.getLogger(__name__)

_Row = TypeVar("_Row", bound=Base)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class StoreError(RuntimeError):
    """A store operation was refused."""


class ImmutableResultError(StoreError):
    """Attempt to change the result or status of a COMPLETED task."""


class DuplicateError(StoreError):
    """A row with that unique name exists."""


class NotFoundError(StoreError, KeyError):
    """No row with that id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


@dataclass
class NewTask:
    """What `Store.create_tasks` needs to store one task."""

    type: str
    model: str
    structure_id: str
    parameters: dict[str, Any] = field(default_factory=dict)
    protocol: str | None = None
    priority: str = Priority.NORMAL.value
    timeout_s: float | None = None
    label: str | None = None
    notify_url: str | None = None
    notify_events: list[str] | None = None
    notify_secret: str | None = None


@dataclass
class NewStructure:
    """A parsed structure to store (deduplicated by hash) together with new tasks."""

    atoms: Atoms
    content: str
    format: str
    name: str | None = None
    source: str = "upload"


@dataclass
class Page:
    """One page of a listing."""

    items: list[Any]
    total: int
    page: int
    page_size: int


@dataclass
class TaskFilter:
    """Filters of `Store.list_tasks` (``None`` = any)."""

    status: Sequence[str] | None = None
    type: str | None = None
    model: str | None = None
    priority: str | None = None
    batch_id: str | None = None
    label: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


@dataclass(frozen=True)
class IdempotencyClaim:
    """An ``Idempotency-Key`` stored with the tasks of one submission (same transaction)."""

    scope: str
    """Whose key (the API key's fingerprint; ``""`` on a server without keys)."""
    key: str
    endpoint: str
    """The route, e.g. ``POST /tasks/bulk-modulus``."""
    request_sha256: str
    """Fingerprint of the request body."""


class IdempotencyKeyReusedError(StoreError):
    """The key was used before for another request (another endpoint or body)."""

    def __init__(self, message: str, *, endpoint: str) -> None:
        super().__init__(message)
        self.endpoint = endpoint


class IdempotencyKeyTakenError(StoreError):
    """A concurrent submission stored the same key first (look its tasks up with `Store.find_idempotent`)."""


# ----------------------------------------------------------------- ORM-level guard of completed results
_GUARDED = ("status", "result", "error", "finished_at", "structure_id", "type", "model", "parameters")


@event.listens_for(Session, "before_flush")
def _guard_completed(session: Session, _ctx: Any, _instances: Any) -> None:
    for obj in session.dirty:
        if not isinstance(obj, Task):
            continue
        state = inspect(obj)
        hist = state.attrs.status.history
        before = (hist.deleted[0] if hist.deleted else None) if hist.has_changes() else obj.status
        if before != TaskStatus.COMPLETED.value:
            continue
        changed = [name for name in _GUARDED if state.attrs[name].history.has_changes()]
        if changed:
            raise ImmutableResultError(f"task {obj.id} is COMPLETED; its {', '.join(changed)} cannot change")
    for obj in session.deleted:
        if isinstance(obj, Task) and obj.status == TaskStatus.COMPLETED.value:
            raise ImmutableResultError(f"task {obj.id} is COMPLETED and cannot be deleted")


def _before(status: TaskStatus) -> list[TaskStatus]:
    """The statuses a task may move to ``status`` from (`matcalc.tasks.can_advance`)."""
    return [s for s in TaskStatus if can_advance(s, status)]


_CLOCK_LOCK = threading.Lock()
_LAST_CREATED: list[datetime] = []


def _creation_times(n: int) -> list[datetime]:
    """``n`` strictly increasing UTC timestamps (1 µs apart at least): FIFO order within a priority."""
    from datetime import timedelta

    with _CLOCK_LOCK:
        t = utcnow()
        if _LAST_CREATED and t <= _LAST_CREATED[0]:
            t = _LAST_CREATED[0] + timedelta(microseconds=1)
        times = [t + timedelta(microseconds=i) for i in range(n)]
        _LAST_CREATED[:] = [times[-1]] if times else _LAST_CREATED
        return times


class Store:
    """The persistent store over one database URL (see `matcalc.store.db`)."""

    def __init__(self, url: str | None = None, *, migrate: bool = True, engine: Engine | None = None) -> None:
        self.engine = engine or db.make_engine(url)
        self.url = self.engine.url.render_as_string(hide_password=False)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if self.is_sqlite else contextlib.nullcontext()
        )
        if migrate:
            db.upgrade(self.engine)

    # ------------------------------------------------------------- sessions
    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading (no commit)."""
        with self._sessions() as s:
            yield s

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A session whose transaction commits on success and rolls back on error."""
        with self._write_lock, self._sessions() as s, s.begin():
            yield s

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """Raise if the database cannot be reached."""
        from sqlalchemy import text

        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def _get(self, table: type[_Row], row_id: str, missing: str) -> _Row:
        """The row of ``table`` with primary key ``row_id``; `NotFoundError` (``missing``) when absent."""
        with self.read() as s:
            row = s.get(table, row_id)
        if row is None:
            raise NotFoundError(missing)
        return row

    def count(self, table: type[Base]) -> int:
        """Rows in ``table`` (an ORM class)."""
        with self.read() as s:
            return int(s.scalar(select(func.count()).select_from(table)) or 0)

    # ------------------------------------------------------------- structures
    def add_structure(self, atoms: Atoms, content: str, fmt: str, *, name: str | None = None,
                      source: str = "upload") -> tuple[Structure, bool]:
        """Store a structure unless one with the same hash exists; ``(row, created)``."""
        with self.write() as s:
            return self._upsert_structure(s, NewStructure(atoms, content, fmt, name, source))

    @staticmethod
    def _upsert_structure(s: Session, new: NewStructure) -> tuple[Structure, bool]:
        from matcalc.structures import formula, structure_hash

        from sqlalchemy.exc import IntegrityError

        sid = structure_hash(new.atoms)
        existing = s.get(Structure, sid)
        if existing is not None:
            return existing, False
        row = Structure(id=sid, content=new.content, format=new.format, formula=formula(new.atoms),
                        n_atoms=len(new.atoms), periodic=bool(new.atoms.pbc.all()), name=new.name,
                        source=new.source, size_bytes=len(new.content.encode()), created_at=utcnow())
        try:
            with s.begin_nested():  # a concurrent writer may insert the same structure first
                s.add(row)
        except IntegrityError:
            existing = s.get(Structure, sid, populate_existing=True)
            if existing is None:
                raise
            return existing, False
        return row, True

    def get_structure(self, structure_id: str) -> Structure:
        return self._get(Structure, structure_id, f"structure {structure_id!r} not found")

    def has_structure(self, structure_id: str) -> bool:
        with self.read() as s:
            return s.get(Structure, structure_id) is not None

    def list_structures(self, page: int = 1, page_size: int = 50, source: str | None = None) -> Page:
        conds = [Structure.source == source] if source else []
        with self.read() as s:
            total = int(s.scalar(select(func.count()).select_from(Structure).where(*conds)) or 0)
            rows = s.scalars(select(Structure).where(*conds).order_by(Structure.created_at.desc(), Structure.id)
                             .offset((page - 1) * page_size).limit(page_size)).all()
        return Page(list(rows), total, page, page_size)

    # ------------------------------------------------------------- tasks
    def create_tasks(self, new: Sequence[NewTask], *, batch_id: str | None = None,
                     structures: Sequence[NewStructure] = (), idempotency: IdempotencyClaim | None = None) -> list[Task]:
        """Insert ``structures`` (unless stored) and all ``new`` tasks (status PENDING) in one
        transaction: all or nothing. With ``idempotency`` the key is stored in the same transaction;
        `IdempotencyKeyTakenError` when a concurrent submission stored it first (nothing is stored)."""
        from sqlalchemy.exc import IntegrityError

        from matcalc.store.models import IdempotencyKey

        times = _creation_times(len(new))
        rows = []
        try:
            with self.write() as s:
                for st in structures:
                    self._upsert_structure(s, st)
                for n, now in zip(new, times, strict=True):
                    prio = Priority(n.priority)
                    row = Task(type=n.type, model=n.model, structure_id=n.structure_id,
                               parameters=dict(n.parameters), protocol=n.protocol, priority=prio.value,
                               priority_rank=prio.rank, status=TaskStatus.PENDING.value, timeout_s=n.timeout_s,
                               label=n.label, notify_url=n.notify_url, notify_events=n.notify_events,
                               notify_secret=n.notify_secret, batch_id=batch_id, created_at=now, attempts=0,
                               idempotency_key=idempotency.key if idempotency else None)
                    s.add(row)
                    rows.append(row)
                s.flush()
                if idempotency is not None:
                    s.add(IdempotencyKey(scope=idempotency.scope, key=idempotency.key, endpoint=idempotency.endpoint,
                                         request_sha256=idempotency.request_sha256, batch_id=batch_id,
                                         task_ids=[r.id for r in rows], created_at=times[0] if times else utcnow()))
                    s.flush()
                s.add_all(TaskLog(task_id=r.id, timestamp=r.created_at, event="status", message="task submitted",
                                  data={"status": TaskStatus.PENDING.value}) for r in rows)
        except IntegrityError:
            if idempotency is not None and self._idempotency_row(idempotency) is not None:
                raise IdempotencyKeyTakenError(f"Idempotency-Key {idempotency.key!r} was stored by a concurrent "
                                               "submission") from None
            raise
        return rows

    def _idempotency_row(self, claim: IdempotencyClaim) -> Any:
        from matcalc.store.models import IdempotencyKey

        with self.read() as s:
            return s.get(IdempotencyKey, (claim.scope, claim.key))

    def find_idempotent(self, claim: IdempotencyClaim) -> tuple[str | None, list[Task]] | None:
        """``(batch_id, tasks)`` a submission with ``claim``'s key stored, or ``None`` when the key is new.

        Raises:
            IdempotencyKeyReusedError: the key was stored for another endpoint or request body.
        """
        row = self._idempotency_row(claim)
        if row is None:
            return None
        if row.endpoint != claim.endpoint or row.request_sha256 != claim.request_sha256:
            what = f"{row.endpoint}" if row.endpoint != claim.endpoint else "another request body"
            raise IdempotencyKeyReusedError(
                f"Idempotency-Key {claim.key!r} was used for {what} at {row.created_at.isoformat()}; "
                "use a new key for a new request", endpoint=row.endpoint)
        return row.batch_id, self.get_tasks(list(row.task_ids))

    def get_task(self, task_id: str) -> Task:
        return self._get(Task, task_id, f"task {task_id!r} not found")

    def get_tasks(self, task_ids: Sequence[str]) -> list[Task]:
        """Tasks by id, in the order given (missing ids are skipped)."""
        with self.read() as s:
            rows = {r.id: r for r in s.scalars(select(Task).where(Task.id.in_(list(task_ids)))).all()}
        return [rows[t] for t in task_ids if t in rows]

    def list_tasks(self, filters: TaskFilter | None = None, page: int = 1, page_size: int = 50) -> Page:
        """Newest first."""
        f = filters or TaskFilter()
        conds: list[Any] = []
        if f.status:
            conds.append(Task.status.in_(list(f.status)))
        for col, value in ((Task.type, f.type), (Task.model, f.model), (Task.priority, f.priority),
                           (Task.batch_id, f.batch_id), (Task.label, f.label)):
            if value is not None:
                conds.append(col == value)
        if f.created_after is not None:
            conds.append(Task.created_at >= f.created_after)
        if f.created_before is not None:
            conds.append(Task.created_at < f.created_before)
        where = and_(*conds) if conds else True
        with self.read() as s:
            total = int(s.scalar(select(func.count()).select_from(Task).where(where)) or 0)
            rows = s.scalars(select(Task).where(where).order_by(Task.created_at.desc(), Task.id.desc())
                             .offset((page - 1) * page_size).limit(page_size)).all()
        return Page(list(rows), total, page, page_size)

    def _transition(self, task_id: str, allowed: Iterable[TaskStatus], values: dict[str, Any],
                    extra: Any = None) -> bool:
        conds = [Task.id == task_id, Task.status.in_([s.value for s in allowed])]
        if extra is not None:
            conds.append(extra)
        with self.write() as s:
            res = s.execute(update(Task).where(*conds).values(**values).execution_options(synchronize_session=False))
            return bool(res.rowcount)

    def mark_queued(self, task_id: str) -> bool:
        """PENDING -> QUEUED (handed to the executor)."""
        return self._transition(task_id, _before(TaskStatus.QUEUED),
                                {"status": TaskStatus.QUEUED.value, "queued_at": utcnow()})

    def mark_assigned(self, task_id: str, worker: str | None = None, gpu: str | None = None) -> bool:
        """PENDING/QUEUED -> ASSIGNED (a worker took it)."""
        return self._transition(task_id, _before(TaskStatus.ASSIGNED),
                                {"status": TaskStatus.ASSIGNED.value, "worker": worker, "gpu": gpu})

    def mark_started(self, task_id: str, worker: str | None = None, gpu: str | None = None) -> int | None:
        """-> RUNNING; returns the attempt number, or ``None`` if the task is no longer runnable."""
        with self.write() as s:
            row = s.get(Task, task_id, with_for_update=not self.is_sqlite)
            if row is None or not can_advance(row.status, TaskStatus.RUNNING):
                return None
            row.status = TaskStatus.RUNNING.value
            row.started_at = utcnow()
            row.queued_at = row.queued_at or row.started_at
            row.worker = worker if worker is not None else row.worker
            row.gpu = gpu if gpu is not None else row.gpu
            row.attempts = (row.attempts or 0) + 1
            attempt = row.attempts
            s.add(TaskLog(task_id=task_id, event="status", message=f"task started (attempt {attempt})",
                          data={"status": TaskStatus.RUNNING.value, "attempt": attempt, "worker": row.worker,
                                "gpu": row.gpu}))
        return attempt

    def set_progress(self, task_id: str, progress: dict[str, Any]) -> bool:
        """Record the latest progress event of a running task."""
        return self._transition(task_id, [TaskStatus.RUNNING], {"progress": progress})

    def finish(self, task_id: str, status: TaskStatus | str, *, result: dict[str, Any] | None = None,
               error: str | None = None, attempt: int | None = None) -> bool:
        """Move an active task to a terminal ``status`` (with its result or error).

        Returns False when the task had already ended (e.g. cancelled) or ``attempt`` is stale.

        Raises:
            ImmutableResultError: the task is COMPLETED already.
            ValueError: ``status`` is not terminal, or COMPLETED without a result.
        """
        status = TaskStatus(status)
        if status not in TERMINAL:
            raise ValueError(f"status must be terminal ({', '.join(sorted(TERMINAL))}), got {status}")
        if status == TaskStatus.COMPLETED and result is None:
            raise ValueError("a COMPLETED task needs a result")
        now = utcnow()
        with self.write() as s:
            row = s.get(Task, task_id, with_for_update=not self.is_sqlite)
            if row is None:
                raise NotFoundError(f"task {task_id!r} not found")
            if row.status == TaskStatus.COMPLETED:
                raise ImmutableResultError(f"task {task_id} is COMPLETED; its result cannot change")
            if row.status in TERMINAL or (attempt is not None and row.attempts != attempt):
                return False
            row.status = status.value
            row.finished_at = now
            row.started_at = row.started_at or now
            if result is not None:
                row.result = result
            row.error = error
            message = f"task {status.value.lower()}" + (f": {error}" if error else "")
            s.add(TaskLog(task_id=task_id, timestamp=now, event="status",
                          level="ERROR" if status in FAILURES else "INFO",
                          message=message, data={"status": status.value, "attempt": row.attempts}))
        return True

    def requeue(self, task_id: str, reason: str) -> bool:
        """ASSIGNED/RUNNING -> QUEUED without counting a crash (e.g. graceful shutdown timed out, or a
        task moved off a worker that died before it started there)."""
        with self.write() as s:
            res = s.execute(update(Task).where(Task.id == task_id, Task.status.in_([t.value for t in ON_WORKER]))
                            .values(status=TaskStatus.QUEUED.value, worker=None, gpu=None, progress=None)
                            .execution_options(synchronize_session=False))
            if res.rowcount:
                s.add(TaskLog(task_id=task_id, event="status", level="WARNING", message=f"task requeued: {reason}",
                              data={"status": TaskStatus.QUEUED.value}))
            return bool(res.rowcount)

    def record_crash(self, task_id: str, reason: str, *, max_crashes: int = DEFAULT_MAX_CRASHES,
                     attempt: int | None = None) -> TaskStatus | None:
        """The execution of a task on a worker died (``reason``: e.g. ``killed by signal 6 (SIGABRT)``):
        count it in ``crashes``; FAILED with a ``worker crashed: ...`` error once ``crashes`` reaches
        ``max_crashes``, else back to QUEUED. Returns the new status, or None when the task was not on a
        worker any more (finished, cancelled) or ``attempt`` is stale."""
        with self.write() as s:
            row = s.get(Task, task_id, with_for_update=not self.is_sqlite)
            if (row is None or row.status not in {t.value for t in ON_WORKER}
                    or (attempt is not None and row.attempts != attempt)):
                return None
            return self._crashed(s, row, reason, max_crashes)

    @staticmethod
    def _crashed(s: Session, row: Task, reason: str, max_crashes: int | None) -> TaskStatus:
        now = utcnow()
        row.crashes = (row.crashes or 0) + 1
        row.worker, row.gpu, row.progress = None, None, None
        if max_crashes is not None and row.crashes >= max_crashes:
            row.status, row.finished_at = TaskStatus.FAILED.value, now
            row.started_at = row.started_at or now
            row.error = crash_error(reason, row.crashes, max_crashes)
            s.add(TaskLog(task_id=row.id, timestamp=now, event="status", level="ERROR",
                          message=f"task failed: {row.error}",
                          data={"status": TaskStatus.FAILED.value, "attempt": row.attempts, "crashes": row.crashes}))
            return TaskStatus.FAILED
        row.status = TaskStatus.QUEUED.value
        s.add(TaskLog(task_id=row.id, timestamp=now, event="status", level="WARNING",
                      message=f"task requeued: its execution died ({reason})",
                      data={"status": TaskStatus.QUEUED.value, "attempt": row.attempts, "crashes": row.crashes}))
        return TaskStatus.QUEUED

    def requeue_active(self, reason: str = "server restarted", *, max_crashes: int | None = None,
                       charge_running: bool = True) -> list[str]:
        """After a crash or restart: every unfinished task back in the queue; ids in execution order
        (priority, then FIFO).

        With ``charge_running`` (calculations ran inside the server process, so a task may have killed it),
        a task that was RUNNING counts a crash (``crashes``), and with ``max_crashes`` given a task that
        reaches it is FAILED (``worker crashed: ...``) instead of requeued, so a task that kills its server
        is never run again and again. Without it (the executor isolates tasks in worker processes, where
        their deaths are counted as they happen) a server restart is not the task's fault: it is requeued
        as it was. ASSIGNED tasks had not started: requeued without a crash.
        """
        with self.write() as s:
            running = s.scalars(select(Task).where(Task.status == TaskStatus.RUNNING.value)).all()
            for row in running:
                if charge_running:
                    self._crashed(s, row, f"the server stopped while it ran: {reason}", max_crashes)
                else:
                    row.status, row.worker, row.gpu, row.progress = TaskStatus.QUEUED.value, None, None, None
            assigned = s.scalars(select(Task.id).where(Task.status == TaskStatus.ASSIGNED.value)).all()
            if assigned:
                s.execute(update(Task).where(Task.id.in_(assigned))
                          .values(status=TaskStatus.QUEUED.value, worker=None, gpu=None, progress=None)
                          .execution_options(synchronize_session=False))
            s.add_all(TaskLog(task_id=t, event="status", level="WARNING", message=f"task requeued: {reason}",
                              data={"status": TaskStatus.QUEUED.value})
                      for t in [*(r.id for r in running if r.status == TaskStatus.QUEUED.value), *assigned])
            s.flush()
            ids = s.scalars(select(Task.id).where(Task.status.in_([a.value for a in ACTIVE]))
                            .order_by(Task.priority_rank, Task.created_at, Task.id)).all()
        return list(ids)

    def cancel(self, task_id: str) -> tuple[bool, str]:
        """Cancel an unfinished task; ``(changed, status_after)``."""
        now = utcnow()
        with self.write() as s:
            row = s.get(Task, task_id, with_for_update=not self.is_sqlite)
            if row is None:
                raise NotFoundError(f"task {task_id!r} not found")
            if row.status in TERMINAL:
                return False, row.status
            row.status = TaskStatus.CANCELLED.value
            row.finished_at = now
            s.add(TaskLog(task_id=task_id, timestamp=now, event="status", message="task cancelled",
                          data={"status": TaskStatus.CANCELLED.value}))
        return True, TaskStatus.CANCELLED.value

    # ------------------------------------------------------------- logs
    def add_logs(self, entries: Sequence[dict[str, Any]]) -> None:
        """Append log lines; each a dict with ``task_id``, ``message`` and optional level/event/data/timestamp."""
        if not entries:
            return
        with self.write() as s:
            s.add_all(TaskLog(**{"timestamp": utcnow(), **e}) for e in entries)

    def get_logs(self, task_id: str, *, level: str | None = None, limit: int = 1000,
                 after: int | None = None) -> list[TaskLog]:
        """Log lines of a task in order; ``level`` is a minimum, ``after`` a log id to continue from."""
        conds = [TaskLog.task_id == task_id]
        if level is not None:
            level = level.upper()
            if level not in LOG_LEVELS:
                raise ValueError(f"level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
            conds.append(TaskLog.level.in_(LOG_LEVELS[LOG_LEVELS.index(level):]))
        if after is not None:
            conds.append(TaskLog.id > after)
        with self.read() as s:
            return list(s.scalars(select(TaskLog).where(*conds).order_by(TaskLog.id).limit(limit)).all())

    # ------------------------------------------------------------- custom models
    def add_custom_model(self, *, name: str, family: str, fmt: str, path: str, sha256: str, size_bytes: int,
                         description: str = "", options: dict[str, Any] | None = None) -> CustomModel:
        """Record an uploaded model (status UPLOADED); DuplicateError when the name is taken."""
        with self.write() as s:
            if s.scalar(select(CustomModel.id).where(CustomModel.name == name)) is not None:
                raise DuplicateError(f"a custom model named {name!r} exists")
            row = CustomModel(name=name, family=family, format=fmt, path=path, sha256=sha256,
                              size_bytes=size_bytes, description=description, options=options or {},
                              status="UPLOADED")
            s.add(row)
            s.flush()
            return row

    def get_custom_model(self, model_id: str) -> CustomModel:
        return self._get(CustomModel, model_id, f"no custom model with id {model_id!r}")

    def custom_model_by_name(self, name: str) -> CustomModel | None:
        with self.read() as s:
            return s.scalar(select(CustomModel).where(CustomModel.name == name))

    def list_custom_models(self) -> list[CustomModel]:
        with self.read() as s:
            return list(s.scalars(select(CustomModel).order_by(CustomModel.created_at, CustomModel.name)).all())

    def set_custom_model_status(self, model_id: str, status: str, validation: dict[str, Any] | None = None,
                                *, expect: Iterable[str] | None = None) -> bool:
        """Move a custom model to ``status`` (only from one of ``expect`` when given); False if it was not."""
        values: dict[str, Any] = {"status": status}
        if validation is not None:
            values["validation"] = validation
        conds = [CustomModel.id == model_id]
        if expect is not None:
            conds.append(CustomModel.status.in_(list(expect)))
        with self.write() as s:
            res = s.execute(update(CustomModel).where(*conds).values(**values))
            return bool(res.rowcount)  # type: ignore[attr-defined]

    def delete_custom_model(self, model_id: str) -> CustomModel:
        """Delete and return the row (tasks that used the model keep their results)."""
        with self.write() as s:
            row = s.get(CustomModel, model_id)
            if row is None:
                raise NotFoundError(f"no custom model with id {model_id!r}")
            s.delete(row)
            return row

    # ------------------------------------------------------------- statistics
    def queue_stats(self) -> dict[str, dict[str, int]]:
        """``{priority: {status: count}}`` over every priority and status (zeros included)."""
        stats = {p.value: {s.value: 0 for s in TaskStatus} for p in Priority}
        with self.read() as s:
            for prio, status, n in s.execute(select(Task.priority, Task.status, func.count())
                                             .group_by(Task.priority, Task.status)):
                stats.setdefault(prio, {})[status] = int(n)
        return stats


__all__ = [
    "DuplicateError",
    "IdempotencyClaim",
    "IdempotencyKeyReusedError",
    "IdempotencyKeyTakenError",
    "ImmutableResultError",
    "NewStructure",
    "NewTask",
    "NotFoundError",
    "Page",
    "Store",
    "StoreError",
    "TaskFilter",
]
