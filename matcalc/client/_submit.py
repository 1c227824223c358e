"""Task submissions, derived from the property declarations (`matcalc.calculations.contract`).

Each property's client method takes the property's remote parameters (``Property.remote_params``)
plus the task options every task type shares (``matcalc.submission.TASK_OPTIONS``, declared once for the
server and the client). Before
anything is sent, the values are checked with ``Property.resolve``, the same validation the local
function and the REST route run, so a bad value raises ``ValueError`` naming the parameter without
a request. The method signatures and docstrings are built here from the same declarations.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypedDict

from matcalc.calculations import get_property, properties
from matcalc.calculations.contract import Molecule, Param, Property
from matcalc.client._base import (
    ApiRequest,
    StructureLike,
    guest_field,
    jsonable,
    structure_fields,
)
from matcalc.client._errors import MatcalcError, ValidationError
from matcalc.submission import HEADER_OPTIONS, IDEMPOTENCY_HEADER, TASK_OPTIONS

OPTION_NAMES = frozenset(o.name for o in TASK_OPTIONS)
INVALID_PARAMETER = 40001
"""The server's code for a parameter out of range (422): the code of the same error raised here."""
HEADERS: Mapping[str, str] = HEADER_OPTIONS

STRUCTURE_DOC = ("a path, structure text (CIF, POSCAR, XYZ/extXYZ), `ase.Atoms`, pymatgen `Structure`, builtin "
                 "name, uploaded structure id or `StructureInfo`")
MODEL_DOC = 'model name on the server (`"chgnet"`, `"emt"`, `"chgnet+d3"`, an uploaded model, ...)'

if TYPE_CHECKING:
    TaskOptions = dict[str, Any]
else:
    TaskOptions = TypedDict("TaskOptions", {o.name: o.kind.annotation() for o in TASK_OPTIONS}, total=False)
    TaskOptions.__doc__ = "Options every task type takes (keyword arguments of the submit methods)."


def options_markdown() -> str:
    """The docs table of `TASK_OPTIONS` (rendered by ``docs/hooks.py``)."""
    rows = ["| keyword | unit | type / range | meaning |", "|---|---|---|---|"]
    rows += [f"| `{o.name}` | {o.unit or '–'} | {o.kind.describe()} | {o.doc} |" for o in TASK_OPTIONS]
    return "\n".join(rows)


# ----------------------------------------------------------------------------- properties
def property_for(kind: str) -> Property[Any]:
    """The property of a REST task type or a local function name (``relax`` = ``optimization``)."""
    try:
        return get_property(kind)
    except ValueError:
        types = ", ".join(spec.task_type for spec in properties().values())
        raise ValueError(f"task type must be one of {types} (or a function name: relax, bulk_modulus, ...), "
                         f"got {kind!r}") from None


def task_type(name: str) -> str:
    """The REST task type for a REST type or a local function name (``relax`` -> ``optimization``)."""
    return str(property_for(name).task_type)


def method_names(spec: Property[Any]) -> tuple[str, ...]:
    """The client methods of a property: its ``client_method`` and, when different, its name
    (``optimization`` and ``relax``)."""
    return tuple(dict.fromkeys((spec.client_method, spec.name)))


def _optional(annotation: Any) -> Any:
    return f"{annotation} | None" if isinstance(annotation, str) else annotation | None


def method_signature(spec: Property[Any]) -> inspect.Signature:
    """``(self, structure, model="chgnet", *, <remote params>, <task options>)``: every keyword ``None``
    (unset: the protocol decides)."""
    kw = inspect.Parameter.KEYWORD_ONLY
    pos = inspect.Parameter.POSITIONAL_OR_KEYWORD
    out = [inspect.Parameter("self", pos), inspect.Parameter("structure", pos, annotation="StructureLike"),
           inspect.Parameter("model", pos, default="chgnet", annotation="str")]
    out += [inspect.Parameter(p.name, kw, default=None, annotation=_optional(p.kind.annotation()))
            for p in (*spec.remote_params, *TASK_OPTIONS)]
    return inspect.Signature(out, return_annotation="Op[H]")


def method_doc(spec: Property[Any]) -> str:
    """The docstring of a property's client method: the declaration's summary and every keyword's line."""
    lines = [f"Submit `matcalc.{spec.name}` to the server (`POST /tasks/{spec.task_type}`): {spec.summary}", "",
             (f"Returns at once the task (`RemoteTask`; awaitable `AsyncRemoteTask` from `AsyncClient`); its "
              f"`result()` is the `{spec.result.__name__}` the local function returns. Every value is checked "
              "here first, by the declaration the local function and the server check it with."), "",
             "Args:", f"    structure: {STRUCTURE_DOC}.", f"    model: {MODEL_DOC}."]
    lines += [f"    {p.name}: {p.doc_line().rstrip('.')}." for p in (*spec.remote_params, *TASK_OPTIONS)]
    lines += ["", "Raises:",
              ("    ValidationError: a value out of its declared range, before anything is sent (also a "
               "ValueError; the message names it; code 40001 as the server would answer), or the server "
               "refused the request (HTTP 422)."),
              "    TypeError: a keyword this property does not take over REST."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- requests
def _encode(p: Param, value: Any) -> Any:
    """A checked value as JSON: a guest molecule as its name or structure text; arrays as lists."""
    return guest_field(value) if isinstance(p.kind, Molecule) else jsonable(value)


def _check_model(model: Any) -> str:
    if not isinstance(model, str) or not model.strip() or len(model) > 128:
        raise ValueError(f"model must be a model name (1-128 characters), got {model!r}")
    return model.strip()


def submission_parts(spec: Property[Any], structure: StructureLike, model: Any,
                     given: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``(body, headers)`` of a submission of ``spec``, every value checked first: the task options
    against `TASK_OPTIONS`, the parameters with ``spec.resolve`` (``None`` = unset).

    Raises:
        ValidationError: a value out of its declared range (a ``ValueError``; the message names the
            parameter; ``code`` 40001 as the server's answer would have).
        TypeError: a keyword the property does not take over REST.
    """
    values = {k: v for k, v in given.items() if v is not None}
    remote = {p.name for p in spec.remote_params}
    unknown = sorted(set(values) - remote - OPTION_NAMES)
    if unknown:
        local = [k for k in unknown if k in {p.name for p in spec.params}]
        raise TypeError(f"{spec.client_method}() got unexpected keyword argument(s) {', '.join(unknown)}"
                        + (f" ({', '.join(local)}: local calls only)" if local else ""))
    try:
        options = {o.name: o.coerce(values.pop(o.name)) for o in TASK_OPTIONS if o.name in values}
        _, resolved = spec.resolve(options.get("protocol"), values)
        model = _check_model(model)
    except ValidationError:
        raise
    except ValueError as exc:  # what the server would answer (422, 40001), without asking it
        raise ValidationError(str(exc), code=INVALID_PARAMETER) from exc
    headers = {HEADERS[k]: options.pop(k) for k in HEADERS if k in options}
    fmt = options.pop("format", None)
    body: dict[str, Any] = {"type": spec.task_type, **structure_fields(structure, fmt), "model": model,
                            **options, **{k: _encode(spec.param(k), resolved[k]) for k in values}}
    return body, headers


def submission(spec: Property[Any], structure: StructureLike, model: Any, given: Mapping[str, Any]) -> ApiRequest:
    """``POST /tasks/{type}`` for ``spec`` (see `submission_parts`), with its Idempotency-Key."""
    body, headers = submission_parts(spec, structure, model, given)
    return ApiRequest.submission(f"/tasks/{spec.task_type}", body, headers.get(IDEMPOTENCY_HEADER))


def batch_entry(entry: Mapping[str, Any], index: int) -> dict[str, Any]:
    """The body of one batch entry ``{"type": ..., "structure" | "builtin" | "structure_id": ..., "model": ...,
    **params}``, checked like a single submission (the error names ``tasks[index]``)."""
    entry = dict(entry)
    if "type" not in entry:
        raise ValueError(f"tasks[{index}] needs a 'type' (optimization/relax, single-point, bulk-modulus, ...)")
    spec = property_for(entry.pop("type"))
    model = entry.pop("model", "chgnet")
    refs = [k for k in ("structure", "builtin", "structure_id") if k in entry]
    if len(refs) != 1:
        raise ValueError(f"tasks[{index}] needs exactly one of 'structure', 'builtin', 'structure_id'")
    structure = entry.pop(refs[0])
    if set(HEADERS) & set(entry):
        raise TypeError(f"tasks[{index}]: give idempotency_key to submit_batch, for the whole batch")
    try:
        body, _ = submission_parts(spec, structure, model, entry)
    except MatcalcError as exc:
        raise type(exc)(f"tasks[{index}]: {exc.message}", code=exc.code, data=exc.data) from exc
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"tasks[{index}]: {exc}") from exc
    return body


__all__ = [
    "HEADERS",
    "MODEL_DOC",
    "OPTION_NAMES",
    "STRUCTURE_DOC",
    "TASK_OPTIONS",
    "TaskOptions",
    "batch_entry",
    "method_doc",
    "method_names",
    "method_signature",
    "options_markdown",
    "property_for",
    "submission",
    "submission_parts",
    "task_type",
]
