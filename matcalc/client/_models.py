"""Typed views of the server's JSON (``data`` of the envelope): tasks, structures, models, logs, pages."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from matcalc.calculations import TASK_TYPES
from matcalc.tasks import TERMINAL

T = TypeVar("T")

TASK_PROPERTY: dict[str, str] = TASK_TYPES
"""REST task type -> the local function's name (one table with the server's)."""


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 timestamp of the API (``...Z`` allowed) as an aware ``datetime``."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


@dataclass(frozen=True)
class TaskInfo:
    """A task as the server stored it (``GET /tasks/{id}``). Times are aware datetimes (UTC)."""

    id: str
    type: str
    model: str
    status: str
    priority: str
    protocol: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    structure_id: str = ""
    label: str | None = None
    timeout_s: float | None = None
    created_at: datetime | None = None
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    worker: str | None = None
    gpu: str | None = None
    attempts: int = 0
    crashes: int = 0
    """Executions of the task that died with their worker (FAILED at the server's ``max_crashes``)."""
    progress: dict[str, Any] | None = None
    """Latest progress event (stage, step, total_steps, fraction, energy_eV, fmax_eV_per_A)."""
    error: str | None = None
    batch_id: str | None = None
    result_url: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The server's JSON, including fields this client version does not know."""

    @property
    def done(self) -> bool:
        """The task reached a terminal status."""
        return self.status in TERMINAL

    @property
    def property(self) -> str:
        """The local function's name (``relax`` for ``optimization``)."""
        return TASK_PROPERTY.get(self.type, self.type.replace("-", "_"))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TaskInfo:
        progress = d.get("progress")
        return cls(
            id=str(d["id"]), type=str(d.get("type", "")), model=str(d.get("model", "")),
            status=str(d.get("status", "PENDING")), priority=str(d.get("priority", "NORMAL")),
            protocol=d.get("protocol"), parameters=_dict(d.get("parameters")),
            structure_id=str(d.get("structure_id") or ""), label=d.get("label"), timeout_s=d.get("timeout_s"),
            created_at=parse_time(d.get("created_at")), queued_at=parse_time(d.get("queued_at")),
            started_at=parse_time(d.get("started_at")), finished_at=parse_time(d.get("finished_at")),
            worker=d.get("worker"), gpu=d.get("gpu"), attempts=int(d.get("attempts") or 0),
            crashes=int(d.get("crashes") or 0),
            progress=dict(progress) if isinstance(progress, dict) else None, error=d.get("error"),
            batch_id=d.get("batch_id"), result_url=d.get("result_url"), raw=dict(d),
        )


@dataclass(frozen=True)
class StructureInfo:
    """A stored structure. ``id`` is its sha256 (pass the object, or the id, as a task's structure)."""

    id: str
    formula: str
    n_atoms: int
    format: str
    periodic: bool
    name: str | None = None
    source: str = ""
    size_bytes: int = 0
    created_at: datetime | None = None
    content: str | None = None
    """The original text (only from ``get_structure``)."""
    created: bool | None = None
    """From ``upload_structure``: False when an identical structure was already stored."""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StructureInfo:
        return cls(id=str(d["id"]), formula=str(d.get("formula", "")), n_atoms=int(d.get("n_atoms", 0)),
                   format=str(d.get("format", "")), periodic=bool(d.get("periodic", True)), name=d.get("name"),
                   source=str(d.get("source", "")), size_bytes=int(d.get("size_bytes") or 0),
                   created_at=parse_time(d.get("created_at")), content=d.get("content"), created=d.get("created"))


@dataclass(frozen=True)
class ModelInfo:
    """A model card: availability here, and where it is loaded. ``cutoff_A`` in Å."""

    name: str
    family: str = ""
    description: str = ""
    elements: str = ""
    cutoff_A: float | None = None
    device: str = ""
    available: bool = False
    reason: str = ""
    loaded: bool = False
    loaded_on: list[str] = field(default_factory=list)
    dtype: str = ""
    """Precision of the model's arithmetic (``float32`` / ``float64``)."""
    batching: bool = False
    """True when one model call evaluates many structures together."""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelInfo:
        return cls(name=str(d["name"]), family=str(d.get("family", "")), description=str(d.get("description", "")),
                   elements=str(d.get("elements", "")), cutoff_A=d.get("cutoff_A"), device=str(d.get("device", "")),
                   available=bool(d.get("available", False)), reason=str(d.get("reason", "")),
                   loaded=bool(d.get("loaded", False)), loaded_on=[str(x) for x in d.get("loaded_on") or []],
                   dtype=str(d.get("dtype", "")), batching=bool(d.get("batching", False)))


@dataclass(frozen=True)
class CustomModelInfo:
    """An uploaded model on the server: its file, status and last validation report."""

    id: str
    name: str
    family: str
    format: str
    status: str
    """``UPLOADED``, ``VALIDATING``, ``VALIDATED`` (may run tasks) or ``FAILED``."""
    sha256: str = ""
    size_bytes: int = 0
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] | None = None
    """The validation report: ``passed``, ``checks`` (name, value, tolerance, unit), ``error``."""
    created_at: datetime | None = None

    @property
    def validated(self) -> bool:
        return self.status == "VALIDATED"

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CustomModelInfo:
        return cls(id=str(d["id"]), name=str(d["name"]), family=str(d.get("family", "")),
                   format=str(d.get("format", "")), status=str(d.get("status", "")), sha256=str(d.get("sha256", "")),
                   size_bytes=int(d.get("size_bytes") or 0), description=str(d.get("description", "")),
                   options=dict(d.get("options") or {}), validation=d.get("validation"),
                   created_at=parse_time(d.get("created_at")))


@dataclass(frozen=True)
class LogRecord:
    """One log line of a task (stored, or streamed live)."""

    message: str
    level: str = "INFO"
    event: str = "log"
    """``log`` for a log line, ``progress`` for a progress step, ``status`` for a status change."""
    id: int | None = None
    """Cursor: pass it as ``after`` to continue (``None`` for live-only records)."""
    timestamp: datetime | None = None
    data: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LogRecord:
        rid = d.get("id")
        data = d.get("data")
        return cls(message=str(d.get("message", "")), level=str(d.get("level", "INFO")).upper(),
                   event=str(d.get("event", "log")), id=int(rid) if isinstance(rid, int) else None,
                   timestamp=parse_time(d.get("timestamp")), data=dict(data) if isinstance(data, dict) else None,
                   raw=dict(d))


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing (``page`` counts from 1)."""

    items: list[T]
    total: int
    page: int
    page_size: int

    @property
    def pages(self) -> int:
        """Number of pages at this page size."""
        return max(1, -(-self.total // max(1, self.page_size)))

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)
