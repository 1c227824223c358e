"""The property contract: every declared parameter is checked the same way by the local function and by the
REST route, generated from the declarations (a new parameter or property is covered with no new test code).

For every parameter of every property: each bound, just outside it, NaN and ±Infinity for numbers, every
choice and a wrong one. The local side is the real public function with a model whose first evaluation
raises :class:`ModelReached` (so an accepted value proves that validation passed and work began; nothing
heavy ever runs); the REST side is ``POST /tasks/{type}`` on a queue-only server. Both must accept, or both
reject naming the parameter (HTTP 422 with code 40001) — and a rejected request stores nothing.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ase import Atoms
from ase.io import write

import matcalc as mc
from matcalc.calculations import contract, properties
from matcalc.models import Evaluation, Potential

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from matcalc.server import Settings, create_app  # noqa: E402
from matcalc.server.errors import ErrorCode  # noqa: E402
from matcalc.store import Structure, Task  # noqa: E402

API = "/api/v1"


class ModelReached(Exception):
    """Raised by the sentinel model: validation passed and the calculation asked for forces."""


class Sentinel(Potential):
    def __init__(self) -> None:
        super().__init__("sentinel", elements=frozenset({"Cu", "C", "O", "H", "N"}))

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        raise ModelReached


def host() -> Atoms:
    """Two Cu atoms in a 10 Å cubic cell: roomy enough for a guest, small enough for every check."""
    return Atoms("Cu2", positions=[[1, 1, 1], [3.5, 1, 1]], cell=np.eye(3) * 10.0, pbc=True)


def complex_() -> Atoms:
    """The host with a tagged CO guest (ASE tags: 0 framework, 1 guest)."""
    atoms = host() + Atoms("CO", positions=[[6, 6, 6], [6, 6, 7.13]])
    atoms.set_tags([0, 0, 1, 1])
    return atoms


def text(atoms: Atoms) -> str:
    """extXYZ text (keeps the ASE tags that mark the guest, which a CIF would drop)."""
    buf = io.StringIO()
    write(buf, atoms, format="extxyz")
    return buf.getvalue()


# the structure and base keywords a parameter is probed in (everything else left to the protocol)
CONTEXT: dict[tuple[str, str], tuple[Any, dict[str, Any]]] = {
    ("interaction_energy", "position"): (host, {"guest": "CO2"}),
    ("interaction_energy", "box_A"): (host, {"guest": "CO2"}),
    ("interaction_energy", "guest"): (host, {}),
}


def context(prop: str, name: str) -> tuple[Atoms, dict[str, Any]]:
    make, base = CONTEXT.get((prop, name), (complex_ if prop == "interaction_energy" else host, {}))
    return make(), dict(base)


def _step(x: float, integer: bool) -> float:
    return 1 if integer else max(abs(x), 1.0) * 1e-6


def number_probes(kind: contract.Number) -> Iterator[Any]:
    """Each bound from inside and from outside (an open bound is itself outside), then NaN/±inf."""
    yield str(kind.max_value)  # a number as text is refused everywhere
    if kind.integer:
        yield from (kind.min_value, kind.max_value, kind.min_value - 1, kind.max_value + 1, kind.min_value + 0.5)
        return
    d_lo, d_hi = _step(kind.lo, False), _step(kind.hi, False)
    yield kind.lo + d_lo if kind.lo_open else kind.lo
    yield kind.hi - d_hi if kind.hi_open else kind.hi
    yield kind.lo if kind.lo_open else kind.lo - d_lo
    yield kind.hi if kind.hi_open else kind.hi + d_hi
    yield from (math.nan, math.inf, -math.inf)


KIND_PROBES: dict[str, tuple[Any, ...]] = {
    "BandPath": ("auto", "GXG", "GX,XG", "", "G", 5, "G-X"),  # phonons' band path
    "Points": ([[5.0, 5.0, 5.0]], [[7.0, 7.0, 7.0], [3.0, 7.0, 7.0]], [], [[1e5, 0.0, 0.0]], [[0.0, 0.0]],
               [[math.nan, 0.0, 0.0]], "x"),  # binding sites' start positions (Å)
}
"""Probes of kinds declared by single properties (valid and invalid values)."""


def probes(kind: Any) -> Iterator[Any]:
    """Values at and around the declared bounds of ``kind``."""
    if isinstance(kind, contract.Number):
        yield from number_probes(kind)
    elif isinstance(kind, contract.Vector):
        for v in number_probes(kind.item):
            yield [v] * kind.length
        yield [kind.item.min_value] * (kind.length - 1)  # too short
    elif isinstance(kind, contract.Either):
        yield from probes(kind.number)
        yield from probes(kind.vector)
    elif isinstance(kind, contract.Choice):
        yield from kind.options
        yield kind.options[0].upper()
        yield "no-such-option"
    elif isinstance(kind, contract.Flag):
        yield from (True, False, 1, "yes")
    elif isinstance(kind, contract.Indices):
        yield from ([0], [], [-1], [0.5])
    elif isinstance(kind, contract.Molecule):
        yield from ("CO2", "", "Unobtainium")
    elif isinstance(kind, contract.FilePath):
        import tempfile

        yield from ("/no/such/dir/x.traj", str(Path(tempfile.gettempdir()) / "matcalc-probe.traj"))
    elif type(kind).__name__ in KIND_PROBES:
        yield from KIND_PROBES[type(kind).__name__]
    else:  # pragma: no cover - a new kind must get probes here
        raise AssertionError(f"no probes for {kind!r}: add them to KIND_PROBES")


def cases() -> Iterator[tuple[str, str, Any]]:
    for name, spec in properties().items():
        for p in spec.params:
            default = [] if p.default is None else [p.default]  # the protocol's own value, alone, must pass
            for value in [*probes(p.kind), *default]:
                yield name, p.name, value


CASES = list(cases())


def local_outcome(prop: str, name: str, value: Any) -> str | None:
    """None when the real function accepted ``value`` (reached the model), else the ValueError text."""
    atoms, base = context(prop, name)
    fn = properties()[prop].function
    try:
        fn(atoms, model=Sentinel(), **{**base, name: value})
    except ModelReached:
        return None
    except ValueError as exc:
        return str(exc)
    raise AssertionError(f"{prop}({name}={value!r}) neither reached the model nor raised ValueError")


@pytest.fixture(scope="module")
def rest():
    """A queue-only server (nothing runs): what it accepts is stored, what it refuses must leave nothing."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Settings(db_url=f"sqlite:///{tmp}/contract.db", workers=0))
        with TestClient(app) as c:
            yield c


def _json_value(value: Any) -> Any:
    return value


@pytest.mark.parametrize(("prop", "name", "value"), CASES, ids=[f"{p}-{n}-{v!r}" for p, n, v in CASES])
def test_local_and_rest_agree(rest, prop: str, name: str, value: Any) -> None:
    spec = properties()[prop]
    param = spec.param(name)
    local = local_outcome(prop, name, value)
    if local is not None:
        assert name in local or any(q.name in local for q in spec.params), local
    if not param.remote:
        return
    atoms, base = context(prop, name)
    store = rest.app.state.store
    before = (store.count(Task), store.count(Structure))
    body = {"structure": text(atoms), "model": "emt", **base, name: value}
    r = rest.post(f"{API}/tasks/{spec.task_type}", content=_dumps(body), headers={"content-type": "application/json"})
    if local is None:
        assert r.status_code == 201, (r.json(), "local accepted")
        stored = r.json()["data"]["parameters"]
        assert name in stored or value in (None, [], "")
    else:
        payload = r.json()
        assert r.status_code == 422 and payload["code"] == int(ErrorCode.VALIDATION_ERROR), (payload, local)
        assert name in payload["message"] or any(q.name in payload["message"] for q in spec.params), payload
        assert (store.count(Task), store.count(Structure)) == before, "a rejected request stored something"


def _dumps(body: dict[str, Any]) -> str:
    """JSON with NaN and Infinity written as the literals Python's and JavaScript's parsers emit."""
    import json

    return json.dumps(body, allow_nan=True)


def test_every_parameter_is_probed_and_some_values_pass() -> None:
    """No vacuous agreement: every parameter has at least one accepted and one refused probe locally."""
    outcome: dict[tuple[str, str], set[bool]] = {}
    for prop, name, value in CASES:
        outcome.setdefault((prop, name), set()).add(local_outcome(prop, name, value) is None)
    for key, seen in outcome.items():
        assert seen == {True, False}, f"{key}: probes were all {'accepted' if True in seen else 'refused'}"


def test_every_size_like_knob_has_a_finite_upper_bound() -> None:
    for spec in properties().values():
        for p in spec.params:
            kinds = [p.kind.number, p.kind.vector.item] if isinstance(p.kind, contract.Either) else \
                [p.kind.item] if isinstance(p.kind, contract.Vector) else [p.kind]
            for k in kinds:
                if isinstance(k, contract.Number):
                    assert math.isfinite(k.hi) and math.isfinite(k.lo), (spec.name, p.name)


def test_signature_docstring_and_presets_come_from_the_declaration() -> None:
    import inspect

    for name, spec in properties().items():
        fn = getattr(mc, name)
        assert fn is spec.function and fn.__module__ == spec.compute.__module__
        sig = inspect.signature(fn)
        declared = {p.name for p in spec.params}
        assert declared <= set(sig.parameters), name
        assert set(sig.parameters) - declared == {spec.structure_arg, *contract.RESERVED}, name
        for p in spec.params:
            assert f"    {p.name}: " in fn.__doc__, (name, p.name)
        for proto in contract.PROTOCOL_NAMES:
            assert mc.calculations.protocols.presets()[proto][name] == spec.defaults(proto)


def test_unknown_keyword_is_a_type_error_and_protocol_is_checked() -> None:
    with pytest.raises(TypeError, match="fmaxx"):
        mc.relax(host(), Sentinel(), fmaxx=0.1)
    with pytest.raises(ValueError, match="protocol must be one of"):
        mc.relax(host(), Sentinel(), protocol="slow")


def test_structure_dependent_limits_refused_before_any_model_call_and_over_rest(rest) -> None:
    """A q-point mesh or supercell too large for the structure fails fast, locally and on submission."""
    big_mesh = {"mesh": [1000, 1000, 1000]}
    with pytest.raises(ValueError, match="mesh"):
        mc.heat_capacity(host(), Sentinel(), **big_mesh)
    store = rest.app.state.store
    before = store.count(Task)
    r = rest.post(f"{API}/tasks/heat-capacity", json={"structure": text(host()), "model": "emt", **big_mesh})
    assert r.status_code == 422 and "mesh" in r.json()["message"]
    r = rest.post(f"{API}/tasks/heat-capacity", json={"structure": text(host()), "model": "emt",
                                                      "supercell": [20, 20, 20]})
    assert r.status_code == 422 and "supercell" in r.json()["message"]
    assert store.count(Task) == before


def test_openapi_documents_every_request_and_result_field(rest) -> None:
    """OpenAPI types every task request and every result kind field by field (a non-Python client sees them)."""
    import dataclasses
    import json

    raw = rest.get("/openapi.json").text
    spec_json = json.loads(raw, parse_constant=lambda c: pytest.fail(f"/openapi.json is not strict JSON: {c}"))
    comps = spec_json["components"]["schemas"]
    assert comps["ModelOut"]["properties"].keys() >= {"name", "family", "dtype", "batching", "loaded_on"}
    assert "extras" not in comps["ModelOut"]["properties"]
    for spec in properties().values():
        request = comps["".join(w.capitalize() for w in spec.task_type.split("-")) + "Request"]
        assert {p.name for p in spec.remote_params} <= set(request["properties"]), spec.name
        result = comps[f"{spec.result.__name__}Data"]
        assert {f.name for f in dataclasses.fields(spec.result)} <= set(result["properties"]), spec.name
        assert result["properties"]["kind"]["const"] == spec.result.kind
    result_ref = comps["TaskResultOut"]["properties"]["result"]
    assert len(result_ref["oneOf"]) == len(properties()) and result_ref["discriminator"]["propertyName"] == "kind"


def option_cases() -> Iterator[tuple[str, Any]]:
    from matcalc.submission import BODY_OPTIONS

    for o in BODY_OPTIONS:
        for value in probes(o.kind):
            yield o.name, value


KIND_PROBES.update({
    "Text": ("x", "https://example.org/hook", "", "   ", 5),
    "Names": (["task.completed"], ["task.nonsense"], [], "task.completed"),
})
OPTION_CASES = list(option_cases())


@pytest.mark.parametrize(("name", "value"), OPTION_CASES, ids=[f"{n}-{v!r}" for n, v in OPTION_CASES])
def test_task_options_are_checked_by_their_declaration_over_rest(rest, name: str, value: Any) -> None:
    """The shared task options (matcalc.submission) are the request fields: REST refuses what their kind refuses."""
    from matcalc.submission import option

    try:
        option(name).coerce(value)
        accepted = True
    except ValueError:
        accepted = False
    body: dict[str, Any] = {"model": "emt", name: value}
    body.update({"structure": text(host())} if name == "format" else {"builtin": "RSM0009"})
    if name in ("notify_events", "notify_secret"):
        body["notify_url"] = "http://127.0.0.1:9/hook"
    if name == "format" and accepted and value not in ("extxyz", "xyz"):
        return  # a valid format name for text in another format is the structure's error, not the option's
    r = rest.post(f"{API}/tasks/single-point", content=_dumps(body), headers={"content-type": "application/json"})
    assert (r.status_code == 201) == accepted, (r.json(), accepted)
    if not accepted:
        assert r.json()["code"] == int(ErrorCode.VALIDATION_ERROR) and name in r.json()["message"]
