"""The property contract: every property declares its parameters once, and runs through one skeleton.

A property module builds one `Property` from

* a table of `Param` (name with its unit, a `Kind` giving type and bounds, the default of
  each protocol, a one-line doc),
* its result dataclass, and
* ``compute(run) -> dict``: the property's own step.

Everything else is derived from that declaration, with no second copy: the public function (its
signature and docstring), argument validation, the protocol presets (`presets`), the REST
request models and their OpenAPI schema (``matcalc.server.schemas``), the client methods' keywords,
the ``matcalc run`` options, and the parameter tables in the docs (`Property.markdown`).

The skeleton (`Property.run`): resolve the protocol and validate every keyword -> load the model
and read the structure -> structure-dependent checks -> optional pre-relaxation (`PreRelax`, the
one place it lives, with its warning and result fields) -> ``compute`` -> the result dataclass.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import numpy as np
from ase import Atoms

from matcalc.calculations import checks
from matcalc.calculations.common import Prepared, prepare
from matcalc.structures import bare_copy

if TYPE_CHECKING:
    from ase.calculators.calculator import Calculator

    from matcalc.calculations.optimize import OptimizationTrace
    from matcalc.calculations.results import Result
    from matcalc.models import Potential

log = logging.getLogger(__name__)

PROTOCOL_NAMES: tuple[str, ...] = ("mofsimbench", "fast")
"""Every protocol preset; the first is the default (MOFSimBench's own scripts)."""
DEFAULT_PROTOCOL = PROTOCOL_NAMES[0]


def check_protocol(protocol: str | None) -> str:
    """The canonical protocol name (``None`` -> the default); ``ValueError`` naming the choices."""
    if protocol is None:
        return DEFAULT_PROTOCOL
    name = protocol.lower() if isinstance(protocol, str) else protocol
    if name not in PROTOCOL_NAMES:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOL_NAMES)}, got {protocol!r}")
    return str(name)


# ============================================================================ kinds (type + bounds)
class Kind(Protocol):
    """The type and bounds of a parameter: how to check a value, and how to describe it."""

    def coerce(self, name: str, value: Any) -> Any:
        """The canonical value, or ``ValueError`` naming ``name`` and what is allowed."""

    def annotation(self) -> Any:
        """The Python annotation of the keyword."""

    def json_schema(self) -> dict[str, Any]:
        """JSON schema of the value (REST / OpenAPI)."""

    def describe(self) -> str:
        """Type and range in words, for docstrings and docs tables."""

    def from_text(self, name: str, text: str) -> Any:
        """The value of a command-line word (``matcalc run --name TEXT``); checked by `coerce`."""


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Number:
    """A finite real (or integer) number within bounds; every number has both bounds."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
            raise ValueError(f"a Number needs finite bounds lo < hi, got {self.lo}, {self.hi}")

    @property
    def min_value(self) -> float:
        """Smallest accepted value (integers: the first integer inside the bounds)."""
        if self.integer:
            return math.floor(self.lo) + 1 if self.lo_open else math.ceil(self.lo)
        return self.lo

    @property
    def max_value(self) -> float:
        if self.integer:
            return math.ceil(self.hi) - 1 if self.hi_open else math.floor(self.hi)
        return self.hi

    def coerce(self, name: str, value: Any) -> Any:
        if self.integer:
            return checks.integer(name, value, minimum=int(self.min_value), maximum=int(self.max_value))
        return checks.in_range(name, value, self.lo, self.hi, lo_open=self.lo_open, hi_open=self.hi_open)

    def annotation(self) -> Any:
        return int if self.integer else float

    def json_schema(self) -> dict[str, Any]:
        if self.integer:
            return {"type": "integer", "minimum": int(self.min_value), "maximum": int(self.max_value)}
        schema: dict[str, Any] = {"type": "number"}
        schema["exclusiveMinimum" if self.lo_open else "minimum"] = self.lo
        schema["exclusiveMaximum" if self.hi_open else "maximum"] = self.hi
        return schema

    def describe(self) -> str:
        if self.integer:
            return f"integer {int(self.min_value)}–{int(self.max_value)}"
        lb, rb = ("(" if self.lo_open else "["), (")" if self.hi_open else "]")
        return f"number in {lb}{_fmt(self.lo)}, {_fmt(self.hi)}{rb}"

    def from_text(self, name: str, text: str) -> Any:
        try:
            return int(text) if self.integer else float(text)
        except ValueError:
            raise ValueError(f"{name} must be {self.describe()}, got {text!r}") from None


@dataclass(frozen=True)
class Flag:
    """True or False (nothing else: ``1`` or ``"yes"`` is refused)."""

    def coerce(self, name: str, value: Any) -> Any:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise ValueError(f"{name} must be true or false, got {value!r}")

    def annotation(self) -> Any:
        return bool

    def json_schema(self) -> dict[str, Any]:
        return {"type": "boolean"}

    def describe(self) -> str:
        return "true/false"

    def from_text(self, name: str, text: str) -> Any:
        low = text.strip().lower()
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"{name} must be true or false, got {text!r}")


@dataclass(frozen=True)
class Choice:
    """One of a few names (case-insensitive; the canonical spelling is kept)."""

    options: tuple[str, ...]

    def coerce(self, name: str, value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be one of {', '.join(self.options)}, got {value!r}")
        return checks.choice(name, value, self.options)

    def annotation(self) -> Any:
        return str

    def json_schema(self) -> dict[str, Any]:
        return {"type": "string", "enum": list(self.options),
                "description": "case-insensitive"}

    def describe(self) -> str:
        return " / ".join(f"`{o}`" for o in self.options)

    def from_text(self, name: str, text: str) -> Any:
        return text


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes))


@dataclass(frozen=True)
class Vector:
    """A fixed number of numbers (e.g. a 3x1 supercell, a Cartesian position)."""

    item: Number
    length: int = 3

    def coerce(self, name: str, value: Any) -> Any:
        what = f"{self.length} numbers, each {self.item.describe()}"
        if not _is_sequence(value) or len(value) != self.length:
            raise ValueError(f"{name} must be {what}, got {value!r}")
        try:
            return tuple(self.item.coerce(name, v) for v in value)
        except ValueError:
            raise ValueError(f"{name} must be {what}, got {value!r}") from None

    def annotation(self) -> Any:
        return Sequence[self.item.annotation()]  # type: ignore[misc]

    def json_schema(self) -> dict[str, Any]:
        return {"type": "array", "items": self.item.json_schema(), "minItems": self.length,
                "maxItems": self.length}

    def describe(self) -> str:
        return f"{self.length} × {self.item.describe()}"

    def from_text(self, name: str, text: str) -> Any:
        return [self.item.from_text(name, w) for w in text.replace(",", " ").split()]


@dataclass(frozen=True)
class Either:
    """A value of the first kind that fits: a number (``Number``) or a list (``Vector``)."""

    number: Number
    vector: Vector
    what: str

    def coerce(self, name: str, value: Any) -> Any:
        try:
            if _is_sequence(value):
                return self.vector.coerce(name, value)
            return self.number.coerce(name, value)
        except ValueError:
            raise ValueError(f"{name} must be {self.what}, got {value!r}") from None

    def annotation(self) -> Any:
        return float | Sequence[int]

    def json_schema(self) -> dict[str, Any]:
        return {"oneOf": [self.number.json_schema(), self.vector.json_schema()]}

    def describe(self) -> str:
        return self.what

    def from_text(self, name: str, text: str) -> Any:
        words = text.replace(",", " ").split()
        return self.number.from_text(name, text) if len(words) == 1 else self.vector.from_text(name, text)


@dataclass(frozen=True)
class Indices:
    """Atom indices (non-negative integers), or a boolean mask where ``mask`` is allowed."""

    max_length: int = 100_000
    mask: bool = False

    def coerce(self, name: str, value: Any) -> Any:
        if not _is_sequence(value):
            raise ValueError(f"{name} must be a list of atom indices, got {value!r}")
        if len(value) > self.max_length:
            raise ValueError(f"{name} must have at most {self.max_length} entries, got {len(value)}")
        arr = np.asarray(value)
        if arr.size and arr.dtype == bool:
            if not self.mask:
                raise ValueError(f"{name} must be integer atom indices, not a boolean mask")
            return [bool(b) for b in arr.ravel()]
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{name} must be a list of integer atom indices, got {value!r}")
        if arr.size and arr.min() < 0:
            raise ValueError(f"{name} must be atom indices >= 0, got {int(arr.min())}")
        return [int(i) for i in arr]

    def annotation(self) -> Any:
        return Sequence[int]

    def json_schema(self) -> dict[str, Any]:
        return {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": self.max_length}

    def describe(self) -> str:
        return "atom indices" + (" or a boolean mask" if self.mask else "")

    def from_text(self, name: str, text: str) -> Any:
        try:
            return [int(w) for w in text.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"{name} must be atom indices, got {text!r}") from None


@dataclass(frozen=True)
class Molecule:
    """A guest molecule: a builtin name, structure text or a file path (REST: a string), or ``ase.Atoms``."""

    names: tuple[str, ...]
    max_length: int = 1_000_000

    def coerce(self, name: str, value: Any) -> Any:
        if isinstance(value, (Atoms, PathLike)):
            return value
        if isinstance(value, str) and value.strip() and len(value) <= self.max_length:
            if "\n" in value.strip():
                return value  # structure text (read by the calculation, or by the server at submission)
            lookup = {n.lower(): n for n in self.names}
            if value.strip().lower() in lookup:
                return lookup[value.strip().lower()]
            if Path(value.strip()).is_file():
                return value
        raise ValueError(f"{name} must be one of {', '.join(self.names)}, structure text, a file or Atoms; "
                         f"got {value!r}")

    def annotation(self) -> Any:
        return "str | Atoms"

    def json_schema(self) -> dict[str, Any]:
        return {"type": "string", "minLength": 1, "maxLength": self.max_length,
                "description": f"a gas ({', '.join(self.names)}) or the guest's structure text (XYZ, CIF...)"}

    def describe(self) -> str:
        return f"{', '.join(self.names)}, a structure or Atoms"

    def from_text(self, name: str, text: str) -> Any:
        return text


@dataclass(frozen=True)
class FilePath:
    """A path to write to (local calls only; never taken over REST)."""

    def coerce(self, name: str, value: Any) -> Any:
        if not isinstance(value, (str, PathLike)) or not str(value).strip():
            raise ValueError(f"{name} must be a file path, got {value!r}")
        path = Path(value).expanduser()
        if not path.parent.is_dir():
            raise ValueError(f"{name}: directory {path.parent} does not exist")
        return str(path)

    def annotation(self) -> Any:
        return "str | Path"

    def json_schema(self) -> dict[str, Any]:
        return {"type": "string"}

    def describe(self) -> str:
        return "a file path"

    def from_text(self, name: str, text: str) -> Any:
        return text


@dataclass(frozen=True)
class Text:
    """A non-blank string of at most ``max_length`` characters (matching ``pattern`` when given)."""

    max_length: int
    pattern: str = ""
    what: str = "text"

    def coerce(self, name: str, value: Any) -> Any:
        if not isinstance(value, str) or not value.strip() or len(value) > self.max_length or (
                self.pattern and not re.match(self.pattern, value)):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return value

    def annotation(self) -> Any:
        return str

    def json_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": self.max_length}
        return {**schema, "pattern": self.pattern} if self.pattern else schema

    def describe(self) -> str:
        return f"{self.what} (at most {self.max_length} characters)"

    def from_text(self, name: str, text: str) -> Any:
        return text


@dataclass(frozen=True)
class Names:
    """A non-empty list of names, each one of ``choices`` (when given)."""

    choices: tuple[str, ...] = ()
    max_items: int = 32

    def coerce(self, name: str, value: Any) -> Any:
        if (isinstance(value, str) or not _is_sequence(value) or not 1 <= len(value) <= self.max_items
                or not all(isinstance(v, str) and v.strip() for v in value)
                or (self.choices and not set(value) <= set(self.choices))):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return list(value)

    def annotation(self) -> Any:
        return Sequence[str]

    def json_schema(self) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "string", "enum": list(self.choices)} if self.choices else {"type": "string"}
        return {"type": "array", "items": item, "minItems": 1, "maxItems": self.max_items}

    def describe(self) -> str:
        return f"1–{self.max_items} of " + (", ".join(f"`{c}`" for c in self.choices) if self.choices else "names")

    def from_text(self, name: str, text: str) -> Any:
        return text.replace(",", " ").split()


# ============================================================================ parameters
@dataclass(frozen=True, eq=False)
class Param:
    """One keyword of a property, declared once.

    Attributes:
        name: the keyword (units in the name where it has one, e.g. ``temperature_K``).
        kind: type and bounds (`Number`, `Choice`, ...).
        doc: one line: what it is (the unit is `unit`).
        default: the ``"mofsimbench"`` value; ``None`` = not set unless given.
        presets: other protocols' values where they differ (``{"fast": 0.05}``).
        unit: unit for the docs (``"eV/Å"``), ``""`` when dimensionless.
        remote: offered over REST, by the client and by ``matcalc run`` (False: local calls only).
    """

    name: str
    kind: Kind
    doc: str
    default: Any = None
    presets: Mapping[str, Any] = field(default_factory=dict)
    unit: str = ""
    remote: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.presets) - set(PROTOCOL_NAMES)
        if unknown:
            raise ValueError(f"{self.name}: presets for unknown protocols {sorted(unknown)}")

    def default_for(self, protocol: str) -> Any:
        """The value ``protocol`` gives this parameter (``None``: unset)."""
        return self.presets.get(protocol, self.default)

    def coerce(self, value: Any) -> Any:
        """``None`` stays unset; anything else is checked by the kind."""
        return None if value is None else self.kind.coerce(self.name, value)

    def doc_line(self) -> str:
        """The docstring line: doc, unit, range and the protocol defaults."""
        unit = f" ({self.unit})" if self.unit else ""
        text = f"{self.doc}{unit}; {self.kind.describe()}"
        if self.default is not None:
            text += f"; default {_show(self.default)}"
            others = [f'`"{p}"`: {_show(v)}' for p, v in self.presets.items() if v != self.default]
            if others:
                text += f" ({', '.join(others)})"
        if not self.remote:
            text += "; local calls only"
        return text + "."


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    return str(value)


# ============================================================================ pre-relaxation
@dataclass(frozen=True)
class PreRelax:
    """The optional pre-relaxation before a property's own step (declared once, used by every property).

    Its parameters: ``relax_first``, ``fmax``, ``relax_max_steps`` and (when ``choose_optimizer``)
    ``relax_optimizer``; its result fields: `matcalc.calculations.results.PreRelaxedResult`.
    """

    max_steps: int
    fast_max_steps: int
    optimizer: str = "LBFGS"
    relax_cell: bool = True
    choose_optimizer: bool = True
    fmax_doc: str = "force threshold of the pre-relaxation"

    def params(self) -> tuple[Param, ...]:
        from matcalc.calculations.optimize import OPTIMIZERS

        what = "positions and cell" if self.relax_cell else "positions (cell fixed)"
        out = [
            Param("relax_first", Flag(), f"relax {what} first", default=True),
            fmax_param(self.fmax_doc),
            Param("relax_max_steps", STEPS, "step limit of the pre-relaxation", default=self.max_steps,
                  presets={"fast": self.fast_max_steps}),
        ]
        if self.choose_optimizer:
            out.append(Param("relax_optimizer", Choice(tuple(OPTIMIZERS)), "optimizer of the pre-relaxation",
                             default=self.optimizer))
        return tuple(out)

    def run(self, run: Run) -> OptimizationTrace:
        from matcalc.calculations.optimize import optimize

        p = run.params
        trace = optimize(run.atoms, run.calculator(), fmax=p["fmax"], max_steps=p["relax_max_steps"],
                         optimizer=p.get("relax_optimizer", self.optimizer), relax_cell=self.relax_cell,
                         stage="relax")
        if not trace.stopped_early and (w := trace.warning("pre-relaxation", p["fmax"])) is not None:
            run.warnings.append(w)
        return trace


STEPS = Number(1, 1_000_000, integer=True)
"""Optimizer step limits."""


def fmax_param(doc: str = "force convergence threshold") -> Param:
    """The ``fmax`` keyword every optimisation shares (eV/Å; 1e-3, ``"fast"``: 0.05)."""
    return Param("fmax", Number(0.0, 100.0, lo_open=True), doc, default=1e-3, presets={"fast": 0.05},
                 unit="eV/Å")


RESERVED = ("model", "protocol", "device", "cache")
"""Keywords of every property function that are not parameters of the property."""


# ============================================================================ one run of a property
@dataclass
class Run:
    """What a property's ``compute`` works with: the prepared input, the resolved parameters, the
    warnings so far and the pre-relaxation's trace (``None`` when it did not run)."""

    prep: Prepared
    protocol: str
    params: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    relaxation: OptimizationTrace | None = None
    _calculator: Calculator | None = field(default=None, repr=False)

    @property
    def atoms(self) -> Atoms:
        """The structure being worked on (relaxed in place by the pre-relaxation)."""
        return self.prep.atoms

    def calculator(self) -> Calculator:
        """The run's ASE calculator over the (batched) evaluator, created once."""
        if self._calculator is None:
            self._calculator = self.prep.calculator()
        return self._calculator


R = TypeVar("R", bound="Result")


class ModelInfo(Protocol):
    """What a structure check may know of the model without loading it (a Potential or a model card)."""

    name: str
    cutoff_A: float | None


class PropertyFunction(Protocol[R]):  # type: ignore[misc]
    """The public function of a property: ``fn(structure, model="chgnet", *, protocol, device, **params)``."""

    __signature__: inspect.Signature

    def __call__(self, structure: Any, *args: Any, **kwargs: Any) -> R: ...


@dataclass(frozen=True, eq=False)
class Property(Generic[R]):
    """The declaration of one property; `function` is its public function.

    Attributes:
        name: property name (``"bulk_modulus"``; also the function's name).
        task_type: REST task type (``POST /tasks/{task_type}``) and the client method.
        summary: one line for the docstring and the docs.
        result: the result dataclass.
        params: the parameter table (pre-relaxation parameters are appended from ``prerelax``).
        compute: the property's own step: ``compute(run) -> dict`` of result fields.
        prerelax: the pre-relaxation, when the property has one.
        details: further docstring paragraphs (method, conventions).
        requires_cell: the structure must be 3D periodic.
        structure_arg: name of the first positional argument.
        positional: parameters that may also be given positionally after the structure.
        check: cross-parameter checks on the resolved parameters (may normalise them in place).
        check_structure: checks that need the structure and the model (``check_structure(params, atoms,
            model)``; ``model`` has ``name`` and ``cutoff_A``: the Potential locally, its model card on the
            server), run before any model call; the server runs them at submission.
        setup: called on the run before the pre-relaxation.
        client_method: name of the client method (default: the property name).
    """

    name: str
    task_type: str
    summary: str
    result: type[R]
    params: tuple[Param, ...]
    compute: Callable[[Run], dict[str, Any]]
    prerelax: PreRelax | None = None
    details: str = ""
    requires_cell: bool = True
    structure_arg: str = "structure"
    positional: tuple[str, ...] = ()
    check: Callable[[dict[str, Any]], None] | None = None
    check_structure: Callable[[dict[str, Any], Atoms, ModelInfo], None] | None = None
    setup: Callable[[Run], None] | None = None
    client_method: str = ""
    function: PropertyFunction[R] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        params = self.params + (self.prerelax.params() if self.prerelax else ())
        names = [p.name for p in params]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes or {*RESERVED, self.structure_arg} & set(names):
            raise ValueError(f"{self.name}: duplicate or reserved parameter names {sorted(dupes) or names}")
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "client_method", self.client_method or self.name)
        object.__setattr__(self, "function", self._make_function())

    # ---------------------------------------------------------------- the declaration, read
    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"{self.name} has no parameter {name!r}")

    @property
    def remote_params(self) -> tuple[Param, ...]:
        """The parameters offered over REST, by the client and by ``matcalc run``."""
        return tuple(p for p in self.params if p.remote)

    def defaults(self, protocol: str | None = None) -> dict[str, Any]:
        """The preset of ``protocol`` (default ``"mofsimbench"``): every parameter it sets."""
        name = check_protocol(protocol)
        return {p.name: p.default_for(name) for p in self.params if p.default_for(name) is not None}

    # ---------------------------------------------------------------- validation
    def resolve(self, protocol: str | None = None, given: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """``(protocol name, parameters)``: the protocol's values with ``given`` over them (``None`` = unset),
        each checked against its declaration, then the cross-parameter checks.

        Raises:
            ValueError: a value out of its declared range (the message names the parameter).
            TypeError: a keyword the property does not take.
        """
        name = check_protocol(protocol)
        given = dict(given or {})
        known = {p.name for p in self.params}
        for key in given:
            if key not in known:
                raise TypeError(f"{self.name}() got an unexpected keyword argument {key!r}")
        params: dict[str, Any] = {}
        for p in self.params:
            value = given.get(p.name)
            value = p.coerce(p.default_for(name) if value is None else value)
            if value is not None:
                params[p.name] = value
        if self.check is not None:
            self.check(params)
        return name, params

    # ---------------------------------------------------------------- the skeleton
    def run(self, structure: Any, model: str | Potential = "chgnet", *, protocol: str | None = None,
            device: str | None = None, cache: bool | None = None, **given: Any) -> R:
        """Compute the property (what the public function does; see `function`): served from the result
        cache when the same call was computed before (`matcalc.cache`; ``cache=False`` skips it)."""
        from matcalc import cache as result_cache

        name, params = self.resolve(protocol, given)

        def compute(source: Any, label: str | None, plan: result_cache.Plan | None) -> R:
            return self._compute_once(source, label, model, device, name, params, plan)

        return result_cache.run(self, structure, model, name, params, cache, compute)  # type: ignore[return-value]

    def _compute_once(self, structure: Any, label: str | None, model: str | Potential, device: str | None,
                      name: str, params: dict[str, Any], plan: Any) -> R:
        from matcalc import cache as result_cache
        from matcalc import provenance

        started = provenance.utc_now()
        prep = prepare(structure, model, device, require_cell=self.requires_cell, label=label)
        if self.check_structure is not None:
            self.check_structure(params, prep.atoms, prep.potential)
        run = Run(prep, name, params)
        if self.setup is not None:
            self.setup(run)
        relaxed_fields: dict[str, Any] = {}
        if self.prerelax is not None:
            if params["relax_first"]:
                run.relaxation = self.prerelax.run(run)
            start = bare_copy(run.atoms)
            relaxed_fields = {
                "relax_converged": None if run.relaxation is None else run.relaxation.converged,
                "relax_steps": 0 if run.relaxation is None else run.relaxation.steps,
                "relaxed_structure": start,
            }
        fields = self.compute(run)
        for w in run.warnings:
            log.warning("%s %s: %s", self.name, run.prep.label or run.prep.structure_hash[:8], w)
        result = self.result(**run.prep.common(run.protocol, run.params, run.warnings), **relaxed_fields, **fields)
        result.provenance = provenance.record(
            prop=self.name, potential=prep.potential, protocol=name, structure_hash=prep.structure_hash,
            parameters=result_cache.provenance_parameters(self, params),
            started_at=started, finished_at=provenance.utc_now(), cache_key=plan.key if plan is not None else None)
        return result

    def signature(self) -> inspect.Signature:
        """``(structure, [positional...], model="chgnet", *, <params>, protocol=None, device=None)``."""
        P = inspect.Parameter
        out = [P(self.structure_arg, P.POSITIONAL_OR_KEYWORD, annotation=Any)]
        for n in self.positional:
            out.append(P(n, P.POSITIONAL_OR_KEYWORD, default=None, annotation=self.param(n).kind.annotation()))
        out.append(P("model", P.POSITIONAL_OR_KEYWORD, default="chgnet", annotation="str | Potential"))
        for p in self.params:
            if p.name not in self.positional:
                out.append(P(p.name, P.KEYWORD_ONLY, default=None, annotation=_optional(p.kind.annotation())))
        out.append(P("protocol", P.KEYWORD_ONLY, default=None, annotation="str | None"))
        out.append(P("device", P.KEYWORD_ONLY, default=None, annotation="str | None"))
        out.append(P("cache", P.KEYWORD_ONLY, default=None, annotation="bool | None"))
        return inspect.Signature(out, return_annotation=self.result.__name__)

    def docstring(self) -> str:
        lines = [self.summary, ""]
        if self.details:
            lines += [inspect.cleandoc(self.details), ""]
        lines += ["Args:", f"    {self.structure_arg}: anything `matcalc.load_structure` reads"
                  + (" (3D periodic)." if self.requires_cell else ".")]
        ordered = [self.param(n) for n in self.positional] + [p for p in self.params if p.name not in self.positional]
        for p in ordered[: len(self.positional)]:
            lines.append(f"    {p.name}: {p.doc_line()}")
        lines.append('    model: model name (`"chgnet"`, `"emt"`, `"chgnet+d3"`, ...) or a loaded Potential.')
        for p in ordered[len(self.positional):]:
            lines.append(f"    {p.name}: {p.doc_line()}")
        lines.append(f"    protocol: {' or '.join(f'`{n!r}`' for n in PROTOCOL_NAMES)} (default "
                     f"`{DEFAULT_PROTOCOL!r}`); an explicit keyword always wins over it.")
        lines.append('    device: `"cpu"`, `"cuda"`, `"cuda:1"`...; default: a GPU if torch sees one.')
        lines.append("    cache: serve the result from the result cache when this exact call was computed before, "
                     "and store it (default: on unless `MATCALC_CACHE=0`); `False` always computes.")
        lines += ["", "Returns:", f"    `{self.result.__name__}`.", "",
                  "Raises:", "    ValueError: a parameter out of its range (the message names it).",
                  "    StructureError: the structure cannot be read or is invalid for the model."]
        return "\n".join(lines)

    def _make_function(self) -> PropertyFunction[R]:
        sig = self.signature()
        prop = self

        def function(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            arguments = dict(bound.arguments)
            structure = arguments.pop(prop.structure_arg)
            model = arguments.pop("model", "chgnet")
            protocol = arguments.pop("protocol", None)
            device = arguments.pop("device", None)
            cache = arguments.pop("cache", None)
            return prop.run(structure, model, protocol=protocol, device=device, cache=cache, **arguments)

        function.__name__ = function.__qualname__ = self.name
        function.__module__ = self.compute.__module__  # the property's module: pickles by reference, docs find it
        function.__doc__ = self.docstring()
        function.__signature__ = sig  # type: ignore[attr-defined]
        function.property = self  # type: ignore[attr-defined]
        return function  # type: ignore[return-value]

    # ---------------------------------------------------------------- docs
    def reference_markdown(self) -> str:
        """The API reference entry (markdown): anchor, signature, description, parameter table, result."""
        module = self.compute.__module__
        sig = str(self.signature()).replace("'", "")
        parts = [f"### `{self.name}` {{#{module}.{self.name}}}", "", "```python", f"{self.name}{sig}", "```", "",
                 self.summary, ""]
        if self.details:
            parts += [inspect.cleandoc(self.details), ""]
        parts += [f"`{self.structure_arg}`: anything `matcalc.load_structure` reads"
                  + (" (3D periodic)" if self.requires_cell else "") + "; `model`: a model name or a loaded "
                  "Potential; `protocol`: " + " or ".join(f"`{n}`" for n in PROTOCOL_NAMES)
                  + f" (default `{DEFAULT_PROTOCOL}`); `device`: `cpu`, `cuda`, `cuda:N` (default: a GPU if "
                  "torch sees one); `cache`: `False` computes even when the result cache holds this call.", ""]
        if self.params:
            parts += [self.markdown(), ""]
        parts += [f"Returns `{self.result.__name__}` (`{self.result.__module__}`); POST "
                  f"`/api/v1/tasks/{self.task_type}` over REST, `Client.{self.client_method}` in the client.", ""]
        return "\n".join(parts)

    def markdown(self) -> str:
        """The parameter table of the docs (one row per parameter, every protocol's value)."""
        head = "| parameter | unit | type / range | " + " | ".join(f"`{n}`" for n in PROTOCOL_NAMES) + " | meaning |"
        rows = [head, "|" + "---|" * (4 + len(PROTOCOL_NAMES))]
        for p in self.params:
            values = " | ".join("–" if p.default_for(n) is None else _show(p.default_for(n)) for n in PROTOCOL_NAMES)
            note = p.doc + ("" if p.remote else " (local calls only)")
            rows.append(f"| `{p.name}` | {p.unit or '–'} | {p.kind.describe()} | {values} | {note} |")
        return "\n".join(rows)


def _optional(annotation: Any) -> Any:
    if isinstance(annotation, str):
        return f"{annotation} | None"
    return annotation | None


__all__ = [
    "DEFAULT_PROTOCOL",
    "PROTOCOL_NAMES",
    "STEPS",
    "Choice",
    "Either",
    "FilePath",
    "Flag",
    "Indices",
    "Kind",
    "ModelInfo",
    "Molecule",
    "Names",
    "Number",
    "Param",
    "PreRelax",
    "Property",
    "PropertyFunction",
    "Run",
    "Text",
    "Vector",
    "check_protocol",
    "fmax_param",
]
