"""What every request and response of the client goes through: URL and headers, structure
encoding, the `ApiRequest` description of a call, envelope parsing and error mapping, the
retry policy and the SSE decoder. The endpoints themselves are written once, in
`matcalc.client._core`, on top of these.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, ClassVar, TypeAlias

import httpx

from matcalc.client._errors import (
    MatcalcError,
    NotFoundError,
    ServerError,
    ValidationError,
    error_class,
)
from matcalc.client._models import StructureInfo
from matcalc.structures import SUFFIX_FORMATS
from matcalc.submission import IDEMPOTENCY_HEADER

log = logging.getLogger("matcalc.client")

API_PREFIX = "/api/v1"
API_KEY_HEADER = "X-API-Key"
USER_AGENT = "matcalc-client"

StructureLike: TypeAlias = Any
"""A path, file text (CIF, POSCAR, XYZ/extXYZ), ``ase.Atoms``, pymatgen ``Structure``, builtin name,
uploaded structure id (64 hex digits) or `StructureInfo` — everything
`matcalc.load_structure` accepts, plus the server's own references."""

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def normalize_base_url(base_url: str) -> str:
    """``http://host:8000`` or ``http://host:8000/api/v1`` → ``http://host:8000/api/v1``."""
    url = str(base_url).strip().rstrip("/")
    if not re.match(r"^https?://", url):
        raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
    if not url.endswith(API_PREFIX):
        url += API_PREFIX
    return url


def default_headers(api_key: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    out = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if api_key:
        out[API_KEY_HEADER] = api_key
    out.update(headers or {})
    return out


# ----------------------------------------------------------------------------- structures
def _builtin_name(name: str) -> str | None:
    from matcalc.structures import list_builtins

    lookup = {n.lower(): n for n in list_builtins()}
    return lookup.get(name.strip().lower().removesuffix(".cif"))


def _local_error(exc: Exception, what: str) -> ValidationError:
    return ValidationError(f"{what}: {exc}", code=40002)


def structure_text(structure: Any, *, what: str = "structure") -> tuple[str, str | None]:
    """``(text, format or None)`` of a structure given as a path, text, bytes, Atoms or pymatgen
    Structure. Files and text are sent as they are (the server keeps the original); objects as
    extended XYZ, which keeps cell and pbc."""
    from matcalc.structures import StructureError, load_structure, to_text

    if isinstance(structure, bytes):
        try:
            structure = structure.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _local_error(exc, what) from exc
    if isinstance(structure, str) and "\n" in structure.strip():
        return structure, None
    if isinstance(structure, (str, os.PathLike)):
        path = Path(os.fspath(structure)).expanduser()
        if not path.is_file():
            raise ValidationError(f"{what}: {str(structure)!r} is neither a file, structure text, a builtin "
                                  "nor an uploaded structure id", code=40002)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise _local_error(exc, f"{what} {path.name}") from exc
        fmt = SUFFIX_FORMATS.get(path.suffix.lower())
        if fmt is None and path.name.upper().startswith(("POSCAR", "CONTCAR")):
            fmt = "vasp"
        return text, fmt
    try:
        atoms = load_structure(structure, require_cell=False, max_atoms=None)
    except StructureError as exc:
        raise _local_error(exc, what) from exc
    return to_text(atoms, "extxyz"), "extxyz"


def structure_fields(structure: StructureLike, fmt: str | None = None) -> dict[str, Any]:
    """The request fields naming ``structure``: ``builtin``, ``structure_id`` or ``structure`` (+ ``format``)."""
    if isinstance(structure, StructureInfo):
        return {"structure_id": structure.id}
    if isinstance(structure, str) and "\n" not in structure.strip() and structure.strip():
        name = structure.strip()
        if _HEX64.match(name) and not Path(name).is_file():
            return {"structure_id": name}
        builtin = _builtin_name(name)
        if builtin is not None and not Path(name).expanduser().is_file():
            return {"builtin": builtin}
    text, detected = structure_text(structure)
    out: dict[str, Any] = {"structure": text}
    if fmt or detected:
        out["format"] = fmt or detected
    return out


def guest_field(guest: Any) -> str:
    """A builtin guest name (``GUEST_MOLECULES``: CO2, H2O, N2, CH4, Ar, Kr, Xe; any case) in its canonical
    spelling; any other guest as structure text."""
    from matcalc.calculations.interaction import GUEST_MOLECULES

    gases = {g.upper(): g for g in GUEST_MOLECULES}
    if isinstance(guest, str) and guest.strip().upper() in gases:
        return str(gases[guest.strip().upper()])
    text, _ = structure_text(guest, what="guest")
    return text


def jsonable(value: Any) -> Any:
    """``value`` with numpy arrays and scalars as lists and numbers, tuples as lists."""
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value


def upload_body(structure: StructureLike, name: str | None, fmt: str | None) -> dict[str, Any]:
    if isinstance(structure, str) and "\n" not in structure.strip():
        builtin = _builtin_name(structure)
        if builtin is not None and not Path(structure).expanduser().is_file():
            from matcalc.structures import builtin_path

            structure = builtin_path(builtin)
            name = name or builtin
    text, detected = structure_text(structure)
    if name is None and isinstance(structure, (str, os.PathLike)) and "\n" not in str(structure):
        name = Path(os.fspath(structure)).name
    body: dict[str, Any] = {"content": text}
    if fmt or detected:
        body["format"] = fmt or detected
    if name:
        body["name"] = name[:256]
    return body


# ----------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class ApiRequest:
    """One call: method and path (under ``/api/v1``), query, JSON or multipart body, extra headers,
    and whether it may be retried (idempotent: GET, cancel, and a submission that carries an
    ``Idempotency-Key``: the server answers its repetition with the tasks it stored the first time)."""

    method: str
    path: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    files: Mapping[str, Any] | None = None
    data: Mapping[str, Any] | None = None
    idempotent: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)
    retry_status: bool = True
    """Retry on HTTP 503/429 (False for ``/health``, whose 503 is the answer: not ready)."""
    timeout: httpx.Timeout | None = None
    """Timeouts of this call (default: the client's)."""

    @classmethod
    def get(cls, path: str, params: Mapping[str, Any] | None = None, **kw: Any) -> ApiRequest:
        return cls("GET", path, params=_clean(params), idempotent=True, **kw)

    @classmethod
    def post(cls, path: str, json: Any = None, *, idempotent: bool = False, headers: Mapping[str, str] | None = None,
             **kw: Any) -> ApiRequest:
        headers = dict(headers or {})
        return cls("POST", path, json=json, idempotent=idempotent or IDEMPOTENCY_HEADER in headers, headers=headers,
                   **kw)

    @classmethod
    def submission(cls, path: str, json: Any, idempotency_key: str | None = None) -> ApiRequest:
        """A task submission (``POST /tasks/*``): it always carries an ``Idempotency-Key`` (the caller's,
        or a new random one), so that it may be retried: the server answers a repetition with the
        task(s) it stored the first time, never a second copy."""
        return cls.post(path, json, headers={IDEMPOTENCY_HEADER: idempotency_key or uuid.uuid4().hex})

    def build(self, client: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        """The httpx request: the client's base URL and headers, then this call's."""
        timeout = self.timeout if self.timeout is not None else httpx.USE_CLIENT_DEFAULT
        return client.build_request(self.method, self.path.lstrip("/"), params=self.params, json=self.json,
                                    files=self.files, data=self.data, headers=dict(self.headers) or None,
                                    timeout=timeout)


def _clean(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if params is None:
        return None
    out: dict[str, Any] = {}
    for k, v in params.items():
        if v is None:
            continue
        if isinstance(v, datetime):
            v = v.isoformat().replace("+00:00", "Z")
        elif isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, (list, tuple)):
            v = [str(x) for x in v]
        out[k] = v
    return out


def statuses(status: str | Iterable[str] | None) -> list[str] | None:
    """A status filter as the list the API repeats (``status=A&status=B``)."""
    if status is None:
        return None
    items = [status] if isinstance(status, str) else list(status)
    return [str(getattr(s, "value", s)).upper() for s in items]


def check_id(value: str, what: str = "task id") -> str:
    """A path segment: non-empty, no slash (``ValueError`` otherwise)."""
    s = str(value).strip()
    if not s or "/" in s or len(s) > 128:
        raise ValueError(f"{what} must be a non-empty string without '/', got {value!r}")
    return s


# ----------------------------------------------------------------------------- responses
def _error_from(response: httpx.Response, body: Any) -> MatcalcError:
    request_id = response.headers.get("x-request-id")
    if isinstance(body, dict) and "code" in body and "message" in body:
        code = body.get("code")
        code = int(code) if isinstance(code, int) else None
        message = str(body.get("message"))
        request_id = body.get("request_id") or request_id
        data = body.get("data")
    else:
        code, data = None, None
        text = response.text.strip()
        message = f"HTTP {response.status_code} {response.reason_phrase}" + (f": {text[:300]}" if text else "")
    cls = error_class(code, response.status_code)
    if code in (30000, 40009) or (code is None and response.status_code in (404, 405)):
        message = (f"{message}: this server has no {response.request.method} {response.request.url.path} "
                   "(an endpoint of a newer server version?)")
    return cls(message, code=code, http_status=response.status_code, request_id=request_id, data=data)


def parse_response(response: httpx.Response) -> Any:
    """``data`` of a success envelope; the mapped `MatcalcError` otherwise."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success and isinstance(body, dict) and body.get("success") is True:
        return body.get("data")
    if response.is_success:
        raise ServerError(f"unexpected response (HTTP {response.status_code}, not a matcalc envelope): "
                          f"{response.text[:300]}", http_status=response.status_code,
                          request_id=response.headers.get("x-request-id"))
    raise _error_from(response, body)


def route_missing(exc: MatcalcError) -> bool:
    """The error says the server lacks the route (not: the task does not exist)."""
    return isinstance(exc, NotFoundError) and (exc.code in (30000, 40009) or (
        exc.code is None and exc.http_status in (404, 405)))


# ----------------------------------------------------------------------------- retries
@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for idempotent calls: ``backoff_s * 2**attempt`` (±25 % jitter, at most
    ``max_backoff_s``), or the server's ``Retry-After`` when it sent one (capped the same way).

    Retried: connection errors and timeouts, HTTP 503 (database, executor or server briefly
    unavailable) and 429 (rate limited). A POST is retried only when it carries an
    ``Idempotency-Key`` (task submissions always do: `ApiRequest.submission`): without one, a
    lost answer could mean the server acted on it, and a retry would do it twice.
    """

    retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    RETRY_STATUS: ClassVar[frozenset[int]] = frozenset({429, 503})

    def __post_init__(self) -> None:
        if int(self.retries) != self.retries or self.retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {self.retries!r}")
        if not self.backoff_s >= 0 or not self.max_backoff_s >= 0:
            raise ValueError("backoff_s and max_backoff_s must be >= 0")

    def retry_response(self, request: ApiRequest, response: httpx.Response, attempt: int) -> bool:
        return (request.idempotent and request.retry_status and attempt < self.retries
                and response.status_code in self.RETRY_STATUS)

    def retry_error(self, request: ApiRequest, exc: Exception, attempt: int) -> bool:
        return request.idempotent and attempt < self.retries and isinstance(exc, httpx.TransportError)

    def delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        if response is not None and (after := _retry_after(response)) is not None:
            return min(self.max_backoff_s, after)
        base = min(self.max_backoff_s, self.backoff_s * 2.0 ** attempt)
        return base * random.uniform(0.75, 1.25)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(when.tzinfo)).total_seconds())


def transport_error(exc: Exception, request: ApiRequest, attempts: int) -> MatcalcError:
    """The client error for an httpx transport failure after ``attempts`` tries."""
    from matcalc.client._errors import TimeoutError as ClientTimeout

    tries = f" after {attempts} attempts" if attempts > 1 else ""
    if isinstance(exc, httpx.TimeoutException):
        return ClientTimeout(f"{request.method} {request.path}: HTTP request timed out{tries} ({exc!r})")
    return ServerError(f"{request.method} {request.path}: cannot reach the server{tries} ({exc!r})")


# ----------------------------------------------------------------------------- server-sent events
class SSEDecoder:
    """Decode ``text/event-stream`` lines into JSON records (one per event's ``data``).

    Comment lines (``:`` keep-alives) are skipped; several ``data:`` lines of one event are joined
    with newlines; an event named ``end``/``close``/``done`` ends the stream.
    """

    END_EVENTS = frozenset({"end", "close", "done", "eof"})

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event = ""
        self.last_id: str | None = None
        self.ended = False

    def feed(self, line: str) -> dict[str, Any] | None:
        """Feed one line (without its newline); returns a record when an event completes."""
        line = line.rstrip("\r")
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self.last_id = value
        return None

    def flush(self) -> dict[str, Any] | None:
        return self._dispatch()

    def _dispatch(self) -> dict[str, Any] | None:
        data, event = "\n".join(self._data), self._event
        self._data, self._event = [], ""
        if event in self.END_EVENTS:
            self.ended = True
        if not data:
            return None
        try:
            record = json.loads(data)
        except ValueError:
            record = {"message": data}
        if not isinstance(record, dict):
            record = {"message": str(record)}
        if event and event not in self.END_EVENTS and "event" not in record:
            record["event"] = event
        return record



# ----------------------------------------------------------------------------- uploads
def model_upload(path: str | os.PathLike[str], name: str, family: str,
                 metadata: Mapping[str, Any]) -> tuple[ApiRequest, Any]:
    """``POST /models/custom``: multipart ``file`` + ``metadata`` (JSON text: name, family, format,
    description, options). Returns the request and the open file (close it after sending)."""
    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise ValueError(f"path: no such model file: {p}")
    meta = {"name": name, "family": family, **{k: jsonable(v) for k, v in metadata.items() if v is not None}}
    fh = p.open("rb")
    req = ApiRequest("POST", "/models/custom", files={"file": (p.name, fh, "application/octet-stream")},
                     data={"metadata": json.dumps(meta), "name": name, "family": family})
    return req, fh


__all__ = [
    "API_KEY_HEADER",
    "API_PREFIX",
    "IDEMPOTENCY_HEADER",
    "ApiRequest",
    "RetryPolicy",
    "SSEDecoder",
    "StructureLike",
    "check_id",
    "default_headers",
    "guest_field",
    "jsonable",
    "model_upload",
    "normalize_base_url",
    "parse_response",
    "route_missing",
    "statuses",
    "structure_fields",
    "structure_text",
    "transport_error",
    "upload_body",
]
