"""The task service: glue between the REST routes, the store and the executor.

Submission: validate everything (structures parsed, model known) *before* writing, then store
structures and tasks in one transaction, then hand them to the executor. The HTTP response is
sent only after the commit. On start, every unfinished task is requeued; on shutdown, running
tasks get ``shutdown_timeout_s`` to finish and are otherwise left QUEUED for the next start.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ase import Atoms

from matcalc.calculations import TASK_TYPES
from matcalc.server.errors import ApiError, ErrorCode
from matcalc.server.events import EventBus
from matcalc.execution import Job
from matcalc.server.executor import Executor
from matcalc.server.schemas import GAS_NAMES, TaskRequestBase
from matcalc.store import ImmutableResultError, NewTask, Store, Task, TaskFilter
from matcalc.store.repository import IdempotencyClaim, NewStructure
from matcalc.tasks import DEFAULT_MAX_CRASHES, TaskStatus

log = logging.getLogger(__name__)



@dataclass
class ParsedStructure:
    atoms: Atoms
    content: str
    fmt: str
    name: str | None
    source: str

    @property
    def id(self) -> str:
        from matcalc.structures import structure_hash

        return structure_hash(self.atoms)

    def new(self) -> NewStructure:
        return NewStructure(self.atoms, self.content, self.fmt, name=self.name, source=self.source)


def parse_structure(content: str | bytes, fmt: str | None, *, max_atoms: int, name: str | None = None,
                    source: str = "upload", what: str = "structure") -> ParsedStructure:
    """Read and validate uploaded structure text; errors as 40xxx `ApiError` naming the problem.

    Only file *contents* are accepted: a one-line string is never taken as a server path.
    """
    from matcalc.structures import (
        FORMAT_ALIASES,
        FORMATS,
        StructureError,
        TooManyAtomsError,
        detect_format,
        read_structure,
        validate_structure,
    )

    if isinstance(content, bytes):
        try:
            content = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(ErrorCode.INVALID_STRUCTURE,
                           f"{what}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if "\x00" in content:
        raise ApiError(ErrorCode.INVALID_STRUCTURE, f"{what}: binary data (NUL bytes) is not a structure file")
    if not content.strip():
        raise ApiError(ErrorCode.INVALID_STRUCTURE, f"{what}: empty structure text")
    if "\n" not in content.strip():
        raise ApiError(ErrorCode.INVALID_STRUCTURE,
                       f"{what}: expected the contents of a CIF, XYZ or POSCAR file (one line given); "
                       "use `builtin` for shipped structures or `structure_id` for uploaded ones")
    if fmt is not None:
        fmt = FORMAT_ALIASES.get(fmt.lower(), fmt.lower())
        if fmt not in FORMATS:
            names = ", ".join(FORMATS + tuple(FORMAT_ALIASES))
            raise ApiError(ErrorCode.UNSUPPORTED_FORMAT, f"{what}: unsupported format {fmt!r}; use one of {names}")
    try:
        detected = fmt or detect_format(content)
        atoms = read_structure(content, fmt=detected, max_atoms=max_atoms)  # bounded before any expansion
    except TooManyAtomsError as exc:
        raise ApiError(ErrorCode.TOO_MANY_ATOMS, f"{what}: {exc}",
                       data={"n_atoms": exc.n_atoms, "max_atoms": exc.max_atoms}) from exc
    except StructureError as exc:
        unknown = "recognise the structure format" in str(exc)
        code = ErrorCode.UNSUPPORTED_FORMAT if unknown else ErrorCode.INVALID_STRUCTURE
        raise ApiError(code, f"{what}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a parser crash on hostile input is still the input's fault
        raise ApiError(ErrorCode.INVALID_STRUCTURE,
                       f"{what}: malformed structure ({type(exc).__name__}: {exc})") from exc
    if len(atoms) > max_atoms:
        raise ApiError(ErrorCode.TOO_MANY_ATOMS, f"{what}: too many atoms: {len(atoms)} > limit {max_atoms}",
                       data={"n_atoms": len(atoms), "max_atoms": max_atoms})
    try:
        atoms.calc = None
        validate_structure(atoms, require_cell=False, max_atoms=None)
    except StructureError as exc:
        raise ApiError(ErrorCode.INVALID_STRUCTURE, f"{what}: {exc}") from exc
    return ParsedStructure(atoms, content, detected, name, source)


def builtin_structure(name: str) -> ParsedStructure:
    from matcalc.structures import StructureError, builtin_path, load_structure

    try:
        path = builtin_path(name)
    except StructureError as exc:
        raise ApiError(ErrorCode.UNKNOWN_STRUCTURE, str(exc)) from exc
    text = path.read_text()
    return ParsedStructure(load_structure(path), text, "cif", path.stem, "builtin")


def check_model(name: str) -> str:
    """The normalised model name; 40005 when unknown, 30004 when it cannot load here."""
    from matcalc.models.registry import UnknownModelError, model_card

    try:
        card = model_card(name)
    except UnknownModelError as exc:
        raise ApiError(ErrorCode.UNKNOWN_MODEL, str(exc)) from exc
    if not card.available:
        raise ApiError(ErrorCode.MODEL_UNAVAILABLE, f"model {card.name!r} is not available here: {card.reason}")
    return card.name


class TaskService:
    """Owns the store and the executor; implements `ExecutorCallbacks`."""

    def __init__(self, store: Store, executor: Executor, *, max_atoms: int = 10_000, max_batch: int = 1000,
                 default_timeout_s: float | None = None, progress_interval_s: float = 0.5,
                 bus: EventBus | None = None, max_crashes: int = DEFAULT_MAX_CRASHES,
                 cache: bool | None = None) -> None:
        from matcalc.cache import enabled as cache_enabled
        from matcalc.server.result_cache import ServerCache

        self.store = store
        self.cache = ServerCache(store) if cache_enabled(cache) else None
        """The result cache in the server's database (``None``: off, ``MATCALC_CACHE=0``)."""
        self.executor = executor
        self.max_crashes = max_crashes
        """A task whose execution died this many times is FAILED (also at start: see `start`)."""
        self.max_atoms = max_atoms
        self.max_batch = max_batch
        self.default_timeout_s = default_timeout_s
        self.progress_interval_s = progress_interval_s
        self.bus = bus or EventBus()
        self.accepting = False
        self.observer: Any = None
        self.custom_models: Any = None
        """The `CustomModelService` (only validated models run)."""
        """The observability layer (`Observability`), told of task events."""
        self._last_progress: dict[str, float] = {}
        self._lock = threading.Lock()
        self.started_at = time.time()

    def _observe(self, hook: str, *args: Any) -> None:
        """Tell the observability layer (metrics, webhooks); never raises into a worker or a request."""
        if self.observer is None:
            return
        try:
            getattr(self.observer, hook)(*args)
        except Exception:  # noqa: BLE001
            log.warning("observability hook %s failed", hook, exc_info=True)

    # -------------------------------------------------------------- lifecycle
    def start(self) -> int:
        """Start the executor and requeue every unfinished task; returns how many were requeued.

        A task that was RUNNING died with the previous server process: that counts a crash, and a task
        that has died ``max_crashes`` times is FAILED instead of run again (a task that kills its server
        is not requeued forever)."""
        self.executor.start(self)
        running = [t.id for t in self.store.list_tasks(TaskFilter(status=[TaskStatus.RUNNING.value]),
                                                       page_size=1_000_000).items]
        ids = self.store.requeue_active("server restarted", max_crashes=self.max_crashes,
                                        charge_running=not self.executor.isolated)
        for row in self.store.get_tasks(running):
            if row.status == TaskStatus.FAILED.value:
                log.error("task %s not requeued: %s", row.id, row.error)
                self._observe("task_finished", row.id, row.status, row.error, None)
        for tid in ids:
            self._dispatch(self.store.get_task(tid))
        if ids:
            log.info("requeued %d unfinished task(s) from the store", len(ids))
        self.accepting = True
        return len(ids)

    def shutdown(self, timeout_s: float) -> list[str]:
        """Stop accepting, wait up to ``timeout_s`` for running tasks, requeue the rest."""
        self.accepting = False
        left = self.executor.shutdown(timeout_s)
        for tid in left:
            self.store.requeue(tid, f"server shut down before it finished (waited {timeout_s:g} s)")
        if left:
            log.warning("shutdown: %d running task(s) left QUEUED for the next start", len(left))
        return left

    # -------------------------------------------------------------- submission
    def _resolve(self, req: TaskRequestBase) -> tuple[NewTask, ParsedStructure | None]:
        if self.custom_models is not None:
            self.custom_models.check_runnable(req.model)
        model = check_model(req.model)
        parsed: ParsedStructure | None = None
        if req.structure is not None:
            parsed = parse_structure(req.structure, req.format, max_atoms=self.max_atoms, source="inline",
                                     name=req.label, what="structure")
            structure_id = parsed.id
        elif req.builtin is not None:
            parsed = builtin_structure(req.builtin)
            structure_id = parsed.id
        else:
            assert req.structure_id is not None
            if not self.store.has_structure(req.structure_id):
                raise ApiError(ErrorCode.UNKNOWN_STRUCTURE, f"structure_id {req.structure_id!r}: no such structure "
                               "(upload it with POST /api/v1/structures)")
            structure_id = req.structure_id
        params = req.calculation_parameters()
        guest = params.get("guest")
        if isinstance(guest, str):
            gases = {g.upper(): g for g in GAS_NAMES}  # canonical spelling ("Ar", "CO2"), any case in
            if guest.strip().upper() in gases:
                params["guest"] = gases[guest.strip().upper()]
            else:
                parse_structure(guest, None, max_atoms=self.max_atoms, what="guest")
        self._check_with_structure(req, params, parsed, structure_id)
        if req.protocol is not None:
            params["protocol"] = req.protocol
        if req.cache is False:  # stored with the task: computed at dispatch (and after restarts), never cached
            params["cache"] = False
        timeout_s = req.timeout_s if req.timeout_s is not None else self.default_timeout_s
        label = req.label if req.label is not None else (parsed.name if parsed and parsed.source == "builtin" else None)
        new = NewTask(type=req.type, model=model, structure_id=structure_id, parameters=params,
                      protocol=req.protocol, priority=req.priority, timeout_s=timeout_s, label=label,
                      notify_url=req.notify_url, notify_events=list(req.notify_events) if req.notify_events else None,
                      notify_secret=req.notify_secret)
        return new, parsed

    def _check_with_structure(self, req: TaskRequestBase, params: dict[str, Any], parsed: ParsedStructure | None,
                              structure_id: str) -> None:
        """The property's checks that need the structure (supercell and q-point mesh sizes, atom indices),
        before anything is stored: the same checks the calculation runs before its first model call."""
        from matcalc.calculations import get_property

        spec = get_property(req.type)
        if spec.check_structure is None and not spec.requires_cell:
            return
        if parsed is not None:
            atoms = parsed.atoms
        else:
            stored = self.store.get_structure(structure_id)
            atoms = parse_structure(stored.content, stored.format, max_atoms=self.max_atoms).atoms
        if spec.requires_cell:  # the calculation would refuse it at its start: refuse it before storing
            from matcalc.structures import StructureError, validate_structure

            try:
                validate_structure(atoms, require_cell=True, max_atoms=None)
            except StructureError as exc:
                raise ApiError(ErrorCode.INVALID_STRUCTURE, f"structure: {exc} ({req.type} needs a 3D periodic "
                               "cell)") from exc
        if spec.check_structure is None:
            return
        from matcalc.models.registry import model_card

        try:
            _, resolved = spec.resolve(req.protocol, params)
            spec.check_structure(resolved, atoms, model_card(req.model))
        except ValueError as exc:
            raise ApiError(ErrorCode.VALIDATION_ERROR, str(exc)) from exc

    def submit(self, requests: Sequence[TaskRequestBase], *, batch: bool = False,
               idempotency: IdempotencyClaim | None = None) -> tuple[str | None, list[Task]]:
        """Validate all, store all in one transaction (with the ``idempotency`` key), then queue them;
        ``(batch_id, tasks)``."""
        if not self.accepting:
            raise ApiError(ErrorCode.SHUTTING_DOWN)
        if len(requests) > self.max_batch:
            raise ApiError(ErrorCode.BATCH_TOO_LARGE,
                           f"batch of {len(requests)} tasks exceeds max_batch={self.max_batch}")
        news, structures = [], {}
        for i, req in enumerate(requests):
            try:
                new, parsed = self._resolve(req)
            except ApiError as exc:
                if batch:
                    exc.message = f"tasks[{i}]: {exc.message}"
                    exc.data = {**(exc.data or {}), "index": i}
                raise
            news.append(new)
            if parsed is not None:
                structures.setdefault(parsed.id, parsed.new())
        batch_id = uuid.uuid4().hex if batch else None
        rows = self.store.create_tasks(news, batch_id=batch_id, structures=list(structures.values()),
                                       idempotency=idempotency)
        for row in rows:
            self._dispatch(row)
        self._observe("task_submitted", rows)
        return batch_id, self.store.get_tasks([r.id for r in rows])

    def submit_once(self, requests: Sequence[TaskRequestBase], *, batch: bool = False,
                    idempotency: IdempotencyClaim | None = None) -> tuple[str | None, list[Task], bool]:
        """`submit`, unless ``idempotency``'s key was stored before: then ``(batch_id, tasks, True)``
        with the tasks that submission created (their current state) and nothing new is stored or run.
        A key used before for another endpoint or body: 422/40017."""
        from matcalc.store.repository import IdempotencyKeyReusedError, IdempotencyKeyTakenError

        if idempotency is None:
            return (*self.submit(requests, batch=batch), False)
        while True:
            try:
                found = self.store.find_idempotent(idempotency)
            except IdempotencyKeyReusedError as exc:
                raise ApiError(ErrorCode.IDEMPOTENCY_KEY_REUSED, str(exc),
                               data={"idempotency_key": idempotency.key, "endpoint": exc.endpoint}) from exc
            if found is not None:
                return (*found, True)
            try:
                return (*self.submit(requests, batch=batch, idempotency=idempotency), False)
            except IdempotencyKeyTakenError:  # a concurrent retry stored it first: answer with its tasks
                continue

    def _dispatch(self, row: Task) -> None:
        structure = self.store.get_structure(row.structure_id)
        if self.cache is not None and self._served_from_cache(row, structure):
            return
        params = {**(row.parameters or {}), "cache": False}  # workers never cache: this service does
        job = Job(task_id=row.id, prop=TASK_TYPES.get(row.type, row.type), model=row.model,
                  structure=structure.content, fmt=structure.format, params=params, priority=row.priority,
                  timeout_s=row.timeout_s, label=row.label or structure.name, crashes=row.crashes or 0)
        self.store.mark_queued(row.id)
        try:
            self.executor.submit(job)
        except Exception as exc:  # noqa: BLE001 - leave it QUEUED for the next start, say why
            log.error("could not hand task %s to the executor: %s", row.id, exc)
            self.store.add_logs([{"task_id": row.id, "level": "ERROR", "event": "log",
                                  "message": f"executor refused the task: {exc}"}])
            return
        self.bus.publish(row.id, {"event": "status", "status": TaskStatus.QUEUED.value})

    def _served_from_cache(self, row: Task, structure: Any) -> bool:
        """Complete ``row`` from the result cache, or let it wait for the identical task in flight: True when
        it is not to be run (see `matcalc.server.result_cache`)."""
        if (row.parameters or {}).get("cache") is False:  # the submission asked for a fresh computation
            return False
        routed = self.cache.route(row, structure) if self.cache is not None else None
        if routed is None:
            return False
        if isinstance(routed, str):
            if self.store.mark_queued(row.id):
                self.bus.publish(row.id, {"event": "status", "status": TaskStatus.QUEUED.value})
            log.info("task %s waits for task %s (same result cache key)", row.id, routed)
            return True
        log.info("task %s served from the result cache", row.id)
        self.on_done(row.id, TaskStatus.COMPLETED.value, routed, None, None)
        return True

    def _release(self, task_id: str, status: str, result: dict[str, Any] | None) -> None:
        """After ``task_id`` ended: cache its result and complete its followers, or (it did not complete)
        dispatch them again."""
        if self.cache is None:
            return
        completed = status == TaskStatus.COMPLETED.value and result is not None
        key, followers = self.cache.finished(task_id, completed, result)
        for row in self.store.get_tasks(followers):
            if TaskStatus(row.status).terminal:
                continue
            if completed and key is not None:
                label = row.label or self.store.get_structure(row.structure_id).name
                self.on_done(row.id, TaskStatus.COMPLETED.value, self.cache.served(result or {}, key, label),
                             None, None)
            else:
                self._dispatch(row)

    def cancel(self, task_id: str) -> tuple[bool, str]:
        changed, status = self.store.cancel(task_id)
        if changed:
            self.executor.cancel(task_id)
            self.bus.publish(task_id, {"event": "status", "status": status})
            self.bus.close(task_id)
            self._observe("task_finished", task_id, status, "cancelled on request", None)
        return changed, status

    # -------------------------------------------------------------- executor callbacks
    def on_assigned(self, task_id: str, worker: str | None, gpu: str | None) -> None:
        if self.store.mark_assigned(task_id, worker, gpu):
            self.bus.publish(task_id, {"event": "status", "status": TaskStatus.ASSIGNED.value, "worker": worker})

    def on_started(self, task_id: str, worker: str | None, gpu: str | None) -> int | None:
        attempt = self.store.mark_started(task_id, worker, gpu)
        if attempt is not None:
            self.bus.publish(task_id, {"event": "status", "status": TaskStatus.RUNNING.value, "attempt": attempt})
            self._observe("task_started", task_id, attempt, worker)
        return attempt

    def on_progress(self, task_id: str, event: dict[str, Any]) -> None:
        self._observe("task_progress", task_id, event)
        now = time.monotonic()
        with self._lock:
            last = self._last_progress.get(task_id, 0.0)
            final = event.get("total_steps") is not None and event.get("step") == event.get("total_steps")
            if now - last < self.progress_interval_s and not final:
                self.bus.publish(task_id, {"event": "progress", "stored": False, **event})  # no log feed wakes
                return
            self._last_progress[task_id] = now
        if not self.store.set_progress(task_id, event):
            return  # no longer RUNNING (cancelled, timed out): nothing is logged after the terminal status
        msg = f"{event.get('stage')}: step {event.get('step')}" + (
            f"/{event['total_steps']}" if event.get("total_steps") else "")
        if event.get("energy_eV") is not None:
            msg += f" E={event['energy_eV']:.6f} eV"
        if event.get("fmax_eV_per_A") is not None:
            msg += f" fmax={event['fmax_eV_per_A']:.3g} eV/Å"
        self.store.add_logs([{"task_id": task_id, "level": "DEBUG", "event": "progress", "message": msg,
                              "data": event}])
        self.bus.publish(task_id, {"event": "progress", **event})  # after the write: streams read the store

    def on_log(self, task_id: str, record: dict[str, Any]) -> None:
        entry = {"task_id": task_id, "level": str(record.get("level", "INFO")).upper(), "event": "log",
                 "message": str(record.get("message", "")), "data": {"logger": record.get("logger")}}
        try:
            if TaskStatus(self.store.get_task(task_id).status).terminal:
                return  # e.g. the calculation noticing a cancel: nothing is logged after the terminal status
            self.store.add_logs([entry])
        except Exception:  # noqa: BLE001 - e.g. a log line after the task row vanished
            log.debug("could not store a log line of task %s", task_id, exc_info=True)
        self.bus.publish(task_id, {"event": "log", **entry})

    def on_done(self, task_id: str, status: str, result: dict[str, Any] | None, error: str | None,
                attempt: int | None) -> None:
        with self._lock:
            self._last_progress.pop(task_id, None)
        if self.cache is not None:
            result = self.cache.annotate(task_id, result)
        try:
            changed = self.store.finish(task_id, status, result=result, error=error, attempt=attempt)
        except ImmutableResultError:  # a duplicate outcome of a completed task: logged, the worker goes on
            log.exception("could not record the outcome of task %s", task_id)
            return
        except Exception as exc:  # noqa: BLE001 - the outcome cannot be stored: the task fails with the reason
            log.exception("could not record the outcome of task %s", task_id)
            status, result = TaskStatus.FAILED.value, None
            error = f"OutcomeNotRecorded: the outcome could not be stored ({type(exc).__name__}: {exc})"
            try:
                changed = self.store.finish(task_id, status, error=error, attempt=attempt)
            except Exception:  # noqa: BLE001 - the database itself is down: requeued at the next start
                log.exception("could not record the failure of task %s either", task_id)
                return
        if changed:
            self.bus.publish(task_id, {"event": "status", "status": status, "error": error})
            self.bus.close(task_id)
            self._observe("task_finished", task_id, status, error, result)
        self._release(task_id, str(status), result)

    def on_crashed(self, task_id: str, reason: str, attempt: int | None) -> bool:
        status = self.store.record_crash(task_id, reason, max_crashes=self.max_crashes, attempt=attempt)
        if status is None:
            return False
        with self._lock:
            self._last_progress.pop(task_id, None)
        if status == TaskStatus.QUEUED:
            log.warning("task %s: its execution died (%s); running it again", task_id, reason)
            self.bus.publish(task_id, {"event": "status", "status": status.value, "reason": reason})
            return True
        error = self.store.get_task(task_id).error
        log.error("task %s FAILED: %s", task_id, error)
        self.bus.publish(task_id, {"event": "status", "status": status.value, "error": error})
        self.bus.close(task_id)
        self._observe("task_finished", task_id, status.value, error, None)
        self._release(task_id, status.value, None)
        return False

    def on_requeued(self, task_id: str, reason: str) -> bool:
        if not self.store.requeue(task_id, reason):
            return False
        self.bus.publish(task_id, {"event": "status", "status": TaskStatus.QUEUED.value, "reason": reason})
        return True
