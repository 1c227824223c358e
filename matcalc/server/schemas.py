"""Pydantic schemas of the REST API: the envelope, task requests per type, and responses.

Every response is an `Envelope`. The task request models are derived from each property's
declaration (`matcalc.calculations.contract`): the same parameters, checks, units and protocol
defaults as the Python function's keywords.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, create_model, model_validator

from matcalc.calculations import properties
from matcalc.calculations.contract import PROTOCOL_NAMES, Param, Property
from matcalc.calculations.interaction import GUEST_MOLECULES
from matcalc.calculations.results import Result
from matcalc.models.registry import ModelCard
from matcalc.structures import INPUT_FORMATS
from matcalc.submission import BODY_OPTIONS
from matcalc.tasks import PRIORITIES, STATUSES

T = TypeVar("T")

PriorityName = Literal[PRIORITIES]  # type: ignore[valid-type]  # matcalc.tasks: the one order
StatusName = Literal[STATUSES]  # type: ignore[valid-type]
FormatName = Literal[INPUT_FORMATS]  # type: ignore[valid-type]
GAS_NAMES = GUEST_MOLECULES


def _builtin_names() -> tuple[str, ...]:
    from matcalc.structures import list_builtins

    return tuple(list_builtins())


BuiltinName = Literal[_builtin_names()]  # type: ignore[valid-type]

# ----------------------------------------------------------------------------- envelope
class Envelope(BaseModel, Generic[T]):
    """The shape of every response."""

    success: bool
    code: int = Field(description="0 on success, else a stable 5-digit error code")
    message: str
    data: T | None = None
    timestamp: datetime
    request_id: str


class ErrorEnvelope(Envelope[dict[str, Any]]):
    """An error response (``success`` false); ``data`` may hold details such as ``errors``."""


# ----------------------------------------------------------------------------- task requests
def _param_field(p: Param, default: Any = None) -> tuple[Any, Any]:
    """The request field of one declared parameter or task option: its kind's JSON schema in OpenAPI, and the
    kind's own check as the validator (so REST accepts exactly what the Python function and the client accept)."""

    def check(value: Any) -> Any:
        return p.coerce(value)

    schema = p.kind.json_schema()
    description = f"{p.doc}" + (f" ({p.unit})" if p.unit else "") + f"; {p.kind.describe()}"
    if default is None and p.default is not None:
        presets = {n: p.default_for(n) for n in PROTOCOL_NAMES}
        description += "; protocol default " + ", ".join(f"{n}: {v!r}" for n, v in presets.items())
    annotation = Annotated[Any, AfterValidator(check),
                           WithJsonSchema({"anyOf": [schema, {"type": "null"}], "description": description})]
    return annotation, Field(default, description=description)


_TaskOptions = create_model(  # type: ignore[call-overload]
    "TaskOptions", __config__=ConfigDict(extra="forbid", strict=True),
    **{o.name: _param_field(o, o.default) for o in BODY_OPTIONS})


class TaskRequestBase(_TaskOptions):  # type: ignore[misc, valid-type]
    """Fields every task type shares (the task options of `matcalc.submission`, and the structure and
    model). Give the structure in exactly one way."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "oneOf": [{"required": ["structure"]}, {"required": ["structure_id"]}, {"required": ["builtin"]}],
        "examples": [{"builtin": "RSM0009", "model": "chgnet", "protocol": "fast", "priority": "NORMAL"}],
    })

    structure: str | None = Field(None, min_length=1,
                                  description="inline structure file contents (CIF, XYZ/extXYZ or POSCAR)")
    structure_id: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="id of an uploaded structure")
    builtin: BuiltinName | None = Field(None, description="name of a structure shipped with matcalc "
                                                          "(GET /structures/builtin)")
    model: str = Field("chgnet", min_length=1, max_length=128, description="model name (GET /models)")

    @model_validator(mode="after")
    def _notify(self) -> TaskRequestBase:
        if self.notify_secret is not None and not self.notify_secret.strip():
            raise ValueError("notify_secret must not be blank (omit it to send unsigned webhooks)")
        if self.notify_url is None and (self.notify_events is not None or self.notify_secret is not None):
            raise ValueError("notify_events and notify_secret need notify_url")
        return self

    @model_validator(mode="after")
    def _one_structure(self) -> TaskRequestBase:
        given = [n for n in ("structure", "structure_id", "builtin") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give the structure in exactly one way: structure (text), structure_id or builtin"
                             + (f"; got {', '.join(given)}" if given else ""))
        if self.format is not None and self.structure is None:
            raise ValueError("format applies to an inline structure only")
        return self

    def calculation_parameters(self) -> dict[str, Any]:
        """The keyword arguments of the calculation function that were given."""
        return {k: v for k, v in self.model_dump(exclude_none=True).items() if k not in _COMMON and k != "type"}


_COMMON = frozenset(TaskRequestBase.model_fields)


def _request_model(spec: Property[Any]) -> type[TaskRequestBase]:
    """``{TaskType}Request``: the shared fields plus the property's declared parameters."""

    def resolve(self: TaskRequestBase) -> TaskRequestBase:
        spec.resolve(self.protocol, self.calculation_parameters())  # cross-parameter checks, as locally
        return self

    fields = {p.name: _param_field(p) for p in spec.remote_params}
    name = "".join(w.capitalize() for w in spec.task_type.split("-")) + "Request"
    return create_model(  # type: ignore[call-overload, no-any-return]
        name, __base__=TaskRequestBase, __doc__=f"{spec.summary} (`matcalc.{spec.name}`)",
        __validators__={"contract": model_validator(mode="after")(resolve)},
        type=(Literal[spec.task_type], spec.task_type), **fields)


REQUEST_TYPES: dict[str, type[TaskRequestBase]] = {
    spec.task_type: _request_model(spec) for spec in properties().values()
}
"""Task type -> request model, one per property, derived from the property's declaration."""
globals().update({model.__name__: model for model in REQUEST_TYPES.values()})

TaskRequest = Annotated[Union[tuple(REQUEST_TYPES.values())], Field(discriminator="type")]  # type: ignore[valid-type]  # noqa: UP007


class BatchRequest(BaseModel):
    """Many tasks submitted atomically: all are stored, or none (the first problem is reported)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    tasks: list[TaskRequest] = Field(min_length=1, max_length=10_000)


# ----------------------------------------------------------------------------- responses
class TaskOut(BaseModel):
    id: str
    type: str
    model: str
    protocol: str | None
    parameters: dict[str, Any]
    structure_id: str
    label: str | None
    priority: str
    status: StatusName
    timeout_s: float | None
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    worker: str | None
    gpu: str | None
    attempts: int
    crashes: int = Field(0, description="executions of the task that died (worker process crashed or killed); "
                                        "at the server's max_crashes it is FAILED")
    progress: dict[str, Any] | None
    error: str | None
    batch_id: str | None
    notify_url: str | None
    notify_events: list[str] | None
    result_url: str | None = Field(description="where the result is once COMPLETED")

    @classmethod
    def of(cls, row: Any) -> TaskOut:
        return cls(
            id=row.id, type=row.type, model=row.model, protocol=row.protocol, parameters=row.parameters or {},
            structure_id=row.structure_id, label=row.label, priority=row.priority, status=row.status,
            timeout_s=row.timeout_s, created_at=row.created_at, queued_at=row.queued_at, started_at=row.started_at,
            finished_at=row.finished_at, worker=row.worker, gpu=row.gpu, attempts=row.attempts or 0, crashes=row.crashes or 0,
            progress=row.progress, error=row.error, batch_id=row.batch_id, notify_url=row.notify_url,
            notify_events=row.notify_events,
            result_url=f"/api/v1/tasks/{row.id}/result" if row.status == "COMPLETED" else None,
        )


class TaskPage(BaseModel):
    items: list[TaskOut]
    total: int
    page: int
    page_size: int


class BatchOut(BaseModel):
    batch_id: str
    tasks: list[TaskOut]


class StructureData(BaseModel):
    """A structure in a result (``ase.Atoms`` as JSON): rebuild it with ``matcalc.structures.atoms_from_dict``."""

    symbols: list[str]
    positions_A: list[list[float]] = Field(description="Cartesian positions (Å), one row per atom")
    cell_A: list[list[float]] = Field(description="cell vectors (Å), one row each")
    pbc: list[bool]


def _json_annotation(tp: Any) -> Any:
    """The JSON shape of a result field's Python type (as ``Result.to_dict`` writes it)."""
    import types as pytypes
    import typing

    import numpy as np
    from ase import Atoms

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, pytypes.UnionType):
        inner = [_json_annotation(a) for a in args if a is not type(None)]
        return Union[tuple(inner)] | None if len(inner) > 1 else inner[0] | None  # noqa: UP007
    if tp is Atoms:
        return StructureData
    if tp is np.ndarray:
        return list[Any]  # nested lists of numbers (null for NaN)
    if tp is float:
        return float | None  # NaN and ±inf are stored as null
    if tp in (int, str, bool):
        return tp
    if origin is dict:
        return dict[str, _json_annotation(args[1]) if args else Any]  # type: ignore[misc]
    if origin in (list, tuple):
        return list[_json_annotation(args[0]) if args else Any]  # type: ignore[misc]
    return Any


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass and its bases (the string literal after each field)."""
    import ast
    import dataclasses
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # pragma: no cover - classes built at run time
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def dataclass_model(cls: type, name: str, *, exclude: tuple[str, ...] = (), extra: str = "allow",
                    **more: Any) -> type[BaseModel]:
    """A pydantic model of the dataclass ``cls``: every field (but ``exclude``) with its type, default and
    docstring, then the ``more`` fields (``name=(annotation, Field(...))``)."""
    import dataclasses
    import math
    import typing

    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        if f.default is not dataclasses.MISSING:  # NaN/Infinity: no JSON default (OpenAPI must stay JSON)
            finite = not isinstance(f.default, float) or math.isfinite(f.default)
            default: Any = f.default if finite else None
        elif f.default_factory is not dataclasses.MISSING:
            default = None
        else:
            default = ...
        fields[f.name] = (_json_annotation(hints[f.name]), Field(default, description=docs.get(f.name)))
    return create_model(name, __config__=ConfigDict(extra=extra),  # type: ignore[call-overload, no-any-return]
                        __doc__=(cls.__doc__ or "").strip().splitlines()[0], **fields, **more)


def _result_model(cls: type[Result]) -> type[BaseModel]:
    """``{ResultClass}Data``: every field of the result dataclass with its type and docstring."""
    kind = (Literal[cls.kind], Field(description="result kind (dispatches Result.from_dict)"))  # type: ignore[valid-type]
    return dataclass_model(cls, f"{cls.__name__}Data", kind=kind)


RESULT_MODELS: dict[str, type[BaseModel]] = {spec.result.kind: _result_model(spec.result)
                                             for spec in properties().values()}
"""Result kind -> its JSON schema model (derived from the result dataclass)."""
AnyResult = Annotated[Union[tuple(RESULT_MODELS.values())], Field(discriminator="kind")]  # type: ignore[valid-type]  # noqa: UP007


class TaskResultOut(BaseModel):
    task_id: str
    type: str
    kind: str | None = Field(description="result dataclass kind (Result.from_dict dispatches on it)")
    result: AnyResult = Field(description="Result.to_dict() of the calculation: one schema per result kind")


class LogOut(BaseModel):
    id: int
    timestamp: datetime
    level: str
    event: str
    message: str
    data: dict[str, Any] | None


class CancelOut(BaseModel):
    task_id: str
    status: StatusName
    cancelled: bool


class StructureOut(BaseModel):
    id: str
    formula: str
    n_atoms: int
    format: str
    periodic: bool
    name: str | None
    source: str
    size_bytes: int
    created_at: datetime
    content: str | None = Field(None, description="the original text (GET /structures/{id} only)")

    @classmethod
    def of(cls, row: Any, with_content: bool = False) -> StructureOut:
        return cls(id=row.id, formula=row.formula, n_atoms=row.n_atoms, format=row.format, periodic=row.periodic,
                   name=row.name, source=row.source, size_bytes=row.size_bytes, created_at=row.created_at,
                   content=row.content if with_content else None)


class StructureUploadOut(StructureOut):
    created: bool = Field(description="false when an identical structure was already stored (deduplicated)")


class StructurePage(BaseModel):
    items: list[StructureOut]
    total: int
    page: int
    page_size: int


class StructureUpload(BaseModel):
    """JSON form of a structure upload (multipart with a `file` field works too)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    content: str = Field(min_length=1, description="CIF, XYZ/extXYZ or POSCAR text")
    format: FormatName | None = None
    name: str | None = Field(None, max_length=256)


class BuiltinOut(BaseModel):
    name: str
    formula: str
    n_atoms: int


ModelOut = dataclass_model(ModelCard, "ModelOut", exclude=("extras",), extra="ignore", loaded_on=(
    list[str], Field(default_factory=list, description="where it is loaded (process or worker addresses)")))
"""One model of ``GET /models``: the fields of `matcalc.models.registry.ModelCard` and where it is loaded."""


class CustomModelMeta(BaseModel):
    """The JSON ``metadata`` part of a model upload."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$",
                      description="the name tasks use (lower-case letters, digits, . _ -; no '+d3')")
    family: str = Field(min_length=1, max_length=64, description="model family: torchscript, mace, orb, ...")
    format: Literal["torchscript", "weights_only"] | None = Field(None, description="checked against the file")
    description: str = Field("", max_length=2000)
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the family loader "
                                    "(e.g. dtype, elements, cutoff_A; architecture for weights-only checkpoints)")


class CustomModelOut(BaseModel):
    id: str
    name: str
    family: str
    format: str
    sha256: str
    size_bytes: int
    description: str
    options: dict[str, Any]
    status: Literal["UPLOADED", "VALIDATING", "VALIDATED", "FAILED"]
    validation: dict[str, Any] | None = Field(None, description="the last validation report (checks, tolerances)")
    created_at: datetime


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    live: bool
    ready: bool
    checks: dict[str, dict[str, Any]]
    version: str
    uptime_s: float
    warnings: list[str] = Field(default_factory=list, description="problems that do not stop the server, "
                                "e.g. a model plugin that failed to import")


class QueueOut(BaseModel):
    by_priority: dict[str, dict[str, int]]
    by_status: dict[str, int]
    executor: dict[str, Any]
