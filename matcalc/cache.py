"""A content-addressed result cache: a result computed once is served again, identical, from the store.

The key (`cache_key`) is the sha256 of

* the structure: its `structure_hash` and an exact digest (`structure_digest`:
  atom order, positions, cell, pbc, tags, initial moments and charges, constraints) - the canonical hash
  alone ignores atom order, but per-atom results (forces, guest indices) depend on it;
* the property and the protocol name;
* every resolved parameter (defaults included; a guest structure by its digest, a guest file by its bytes);
* the model identity (`ModelIdentity`: name, family, version, package
  version, weights sha256, dtype, loader options - not the device);
* `CACHE_VERSION` (bumped whenever a property's numbers change).

Entries live in the ``result_cache`` table of the SQLAlchemy store (`matcalc.store.models.CacheEntry`):
``$MATCALC_CACHE_URL``, else ``$MATCALC_DB_URL``, else ``~/.matcalc/matcalc.db`` (SQLite, WAL); a server
keeps them in its own database (PostgreSQL or SQLite). The cache is on by default; ``cache=False`` on a
call or ``MATCALC_CACHE=0`` turns it off. A hit is the stored result with ``provenance["cached"] = True``
(and its original timestamps); the label is the caller's.

Safety: each entry stores the sha256 of its JSON text; an entry that does not verify or does not parse
is dropped with a `CacheWarning` and computed again; an unreadable database is a warning and the
calculation runs uncached. Writers insert-or-ignore on the unique key, so threads, processes and dask
workers writing the same key leave one entry; within a process, two calls with the same key compute once
(the second waits for the first and is served from the cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import typing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
from ase import Atoms

from matcalc.switches import env_flag

if TYPE_CHECKING:
    from sqlalchemy import Engine, Table

    from matcalc.calculations.contract import Property
    from matcalc.calculations.results import Result
    from matcalc.models import Potential
    from matcalc.models.identity import ModelIdentity

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no file lock around the first migration
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Part of every key: bump it when a change in matcalc changes any property's numbers."""
ENABLE_ENV = "MATCALC_CACHE"
"""``0``/``false``/``no``/``off`` turns the cache off everywhere (library, ``matcalc run``, server)."""
URL_ENV = "MATCALC_CACHE_URL"
"""Database of the local cache (default: the store's, ``$MATCALC_DB_URL`` or ``~/.matcalc/matcalc.db``)."""


class CacheWarning(UserWarning):
    """The cache could not be used for one call (the result is computed instead); the message says why."""


def enabled(flag: bool | None = None) -> bool:
    """Whether to use the cache: ``flag`` when given, else ``$MATCALC_CACHE`` (default on)."""
    if flag is not None:
        return bool(flag)
    return env_flag(ENABLE_ENV)


def cache_url() -> str:
    """The local cache's database URL: ``$MATCALC_CACHE_URL``, else the store's default."""
    from matcalc.store.db import default_url

    return os.environ.get(URL_ENV, "").strip() or default_url()


# ============================================================================ the key
def structure_digest(atoms: Atoms) -> str:
    """sha256 of ``atoms`` exactly as given, to 1e-8: species and positions in order, cell, pbc, tags, initial
    magnetic moments and charges, constraints (unlike `structure_hash`)."""
    h = hashlib.sha256(b"matcalc-structure-v1")

    def add(array: Any, dtype: str = "<f8") -> None:
        arr = np.asarray(array)
        if dtype == "<f8":
            arr = np.round(arr.astype(float), 8) + 0.0  # -0.0 -> 0.0
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).astype(dtype).tobytes())

    add(atoms.numbers, "<i8")
    add(atoms.positions)
    add(np.asarray(atoms.cell))
    add(atoms.pbc, "<i8")
    add(atoms.get_tags(), "<i8")
    add(atoms.get_initial_magnetic_moments())
    add(atoms.get_initial_charges())
    h.update(json.dumps([c.todict() for c in atoms.constraints], sort_keys=True, default=_plain).encode())
    return h.hexdigest()


def _plain(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else str(value)


def _file_sha256(path: str | PathLike[str]) -> str:
    from matcalc.models.identity import file_sha256

    return file_sha256(path)


def canonical_value(kind: Any, value: Any) -> Any:
    """A parameter value as stable JSON for the key: structures by digest, guest files by their bytes."""
    from matcalc.calculations.contract import Molecule

    if isinstance(value, Atoms):
        return {"structure_sha256": structure_digest(value)}
    if isinstance(value, PathLike) or (isinstance(kind, Molecule) and isinstance(value, str)
                                       and "\n" not in value.strip() and value not in kind.names
                                       and Path(value.strip()).is_file()):
        return {"file_sha256": _file_sha256(Path(str(value).strip()).expanduser())}
    if isinstance(kind, Molecule) and isinstance(value, str) and "\n" in value.strip():
        return {"text_sha256": hashlib.sha256(value.encode()).hexdigest()}
    return json.loads(json.dumps(value, default=_plain))


def canonical_parameters(prop: Property[Any], params: dict[str, Any]) -> dict[str, Any] | None:
    """The resolved parameters as key JSON; ``None`` when the call cannot be cached (it writes a file)."""
    from matcalc.calculations.contract import FilePath

    out: dict[str, Any] = {}
    for name in sorted(params):
        kind = _kind(prop, name)
        if isinstance(kind, FilePath):
            return None  # an output file: a cached result would not write it
        out[name] = canonical_value(kind, params[name])
    return out


def provenance_parameters(prop: Property[Any], params: dict[str, Any]) -> dict[str, Any]:
    """The resolved parameters as provenance records them: the key's form, an output file by its path."""
    from matcalc.calculations.contract import FilePath

    return {name: str(value) if isinstance(_kind(prop, name), FilePath) else
            canonical_value(_kind(prop, name), value) for name, value in sorted(params.items())}


def _kind(prop: Property[Any], name: str) -> Any:
    """The declared kind of a parameter (``None`` for a value a cross-parameter check added)."""
    try:
        return prop.param(name).kind
    except KeyError:
        return None


def cache_key(*, prop: str, protocol: str, parameters: dict[str, Any], structure_hash: str,
              structure_sha256: str, model: ModelIdentity | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(key, key_data)``: the sha256 (hex) of the canonical JSON of every key component, and those components."""
    model_key = model if isinstance(model, dict) else model.key()
    data = {"cache_version": CACHE_VERSION, "property": prop, "protocol": protocol, "parameters": parameters,
            "structure_hash": structure_hash, "structure_sha256": structure_sha256, "model": model_key}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest(), data


# ============================================================================ the store
@dataclass
class CacheStats:
    """What ``matcalc cache stats`` prints."""

    url: str
    entries: int
    size_bytes: int
    hits: int
    stale: int
    """Entries of an older `CACHE_VERSION` (never served; ``matcalc cache clear --stale``)."""
    by_property: dict[str, int] = field(default_factory=dict)
    by_model: dict[str, int] = field(default_factory=dict)
    oldest: datetime | None = None
    newest: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["oldest"] = self.oldest.isoformat() if self.oldest else None
        d["newest"] = self.newest.isoformat() if self.newest else None
        return d


class ResultCache:
    """The cache table of one database (see the module docstring).

    Args:
        url: database URL (default `cache_url`); ignored when ``engine`` is given.
        engine: an existing engine (the server passes its store's).
        migrate: bring the schema to the newest migration first (serialised across processes on SQLite).
        warn: called with a message when an entry is dropped (default: `CacheWarning`).
    """

    def __init__(self, url: str | None = None, *, engine: Engine | None = None, migrate: bool = True,
                 warn: Callable[[str], None] | None = None) -> None:
        from sqlalchemy.orm import sessionmaker

        from matcalc.store import db

        self.engine = engine or db.make_engine(url or cache_url())
        self.url = db.redact_url(self.engine.url.render_as_string(hide_password=False))
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.warn = warn or _warn
        if migrate:
            _migrate(self.engine)

    # ---------------------------------------------------------------- read
    def get(self, key: str) -> dict[str, Any] | None:
        """The stored ``Result.to_dict()`` of ``key`` (``None``: no entry, or a corrupt one, now dropped)."""
        from matcalc.store.models import CacheEntry

        with self._sessions() as s:
            row = s.get(CacheEntry, key)
            if row is None:
                return None
            text, checksum = row.result, row.sha256
        problem = None
        data: Any = None
        if not isinstance(text, str) or hashlib.sha256(text.encode()).hexdigest() != checksum:
            problem = "its checksum does not match"
        else:
            try:
                data = json.loads(text)
            except ValueError as exc:
                problem = f"it is not JSON ({exc})"
            else:
                if not isinstance(data, dict) or "kind" not in data:
                    problem = "it is not a result"
        if problem is not None:
            self.drop(key, f"cache entry {key[:12]} ignored and recomputed: {problem}")
            return None
        self._count_hit(key)
        return data

    def get_result(self, key: str) -> Result | None:
        """The cached result of ``key``, marked ``provenance["cached"] = True`` (``None``: a miss)."""
        from matcalc.calculations import load_all
        from matcalc.calculations.results import Result

        data = self.get(key)
        if data is None:
            return None
        try:
            load_all()
            result = Result.from_dict(data)
        except Exception as exc:  # noqa: BLE001 - an entry this matcalc cannot rebuild is a miss
            self.drop(key, f"cache entry {key[:12]} ignored and recomputed: it does not rebuild a result "
                           f"({type(exc).__name__}: {exc})")
            return None
        result.provenance = {**(result.provenance or {}), "cached": True, "cache_key": key}
        return result

    def __contains__(self, key: str) -> bool:
        from matcalc.store.models import CacheEntry

        with self._sessions() as s:
            return s.get(CacheEntry, key) is not None

    def __len__(self) -> int:
        from sqlalchemy import func, select

        from matcalc.store.models import CacheEntry

        with self._sessions() as s:
            return int(s.scalar(select(func.count()).select_from(CacheEntry)) or 0)

    # ---------------------------------------------------------------- write
    def put(self, key: str, key_data: dict[str, Any], result: Result | dict[str, Any]) -> bool:
        """Store ``result`` under ``key`` unless an entry exists (insert-or-ignore); True when inserted."""

        data = result if isinstance(result, dict) else result.to_dict()
        prov = dict(data.get("provenance") or {})
        if prov.get("cached"):
            return False  # a served copy is never stored again
        data = {**data, "provenance": {**prov, "cache_key": key}}
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
        values = {"key": key, "property": str(key_data.get("property", data.get("kind", ""))),
                  "model": str((key_data.get("model") or {}).get("name", data.get("model", "")))[:128],
                  "structure_hash": str(key_data.get("structure_hash", data.get("structure_hash", ""))),
                  "cache_version": int(key_data.get("cache_version", CACHE_VERSION)), "key_data": key_data,
                  "result": text, "sha256": hashlib.sha256(text.encode()).hexdigest(),
                  "size_bytes": len(text.encode()), "created_at": datetime.now(UTC), "hits": 0}
        stmt = _insert_ignore(self.engine.dialect.name, _table(), values)
        with self.engine.begin() as conn:
            if stmt is not None:
                return bool(conn.execute(stmt).rowcount)
            from sqlalchemy import insert
            from sqlalchemy.exc import IntegrityError

            try:
                with conn.begin_nested():
                    conn.execute(insert(_table()).values(**values))
                return True
            except IntegrityError:
                return False

    def drop(self, key: str, reason: str | None = None) -> None:
        """Delete the entry of ``key`` (warning ``reason`` first, when given)."""
        from sqlalchemy import delete


        if reason:
            self.warn(reason)
        try:
            with self.engine.begin() as conn:
                conn.execute(delete(_table()).where(_table().c.key == key))
        except Exception as exc:  # noqa: BLE001 - a read-only database: the entry stays ignored
            log.debug("could not delete cache entry %s: %s", key[:12], exc)

    def _count_hit(self, key: str) -> None:
        from sqlalchemy import update


        t = _table()
        try:
            with self.engine.begin() as conn:
                conn.execute(update(t).where(t.c.key == key).values(hits=t.c.hits + 1, last_hit_at=datetime.now(UTC)))
        except Exception as exc:  # noqa: BLE001 - counting is best effort (e.g. a read-only database)
            log.debug("could not count a hit of %s: %s", key[:12], exc)

    # ---------------------------------------------------------------- manage
    def _where(self, prop: str | None, model: str | None, before: datetime | None, stale: bool) -> list[Any]:

        t = _table().c
        conds: list[Any] = []
        if prop is not None:
            from matcalc.calculations import get_property

            conds.append(t.property == get_property(prop).name)
        if model is not None:
            conds.append(t.model == model.strip().lower())
        if before is not None:
            conds.append(t.created_at < before)
        if stale:
            conds.append(t.cache_version != CACHE_VERSION)
        return conds

    def stats(self) -> CacheStats:
        """Entries, bytes, hits, stale entries and counts per property and model."""
        from sqlalchemy import func, select


        t = _table().c
        with self._sessions() as s:
            n, size, hits, oldest, newest = s.execute(select(func.count(), func.coalesce(func.sum(t.size_bytes), 0),
                                                             func.coalesce(func.sum(t.hits), 0),
                                                             func.min(t.created_at), func.max(t.created_at))).one()
            stale = s.scalar(select(func.count()).where(t.cache_version != CACHE_VERSION)) or 0
            by_prop: dict[Any, Any] = dict(s.execute(select(t.property, func.count()).group_by(t.property)).tuples().all())
            by_model: dict[Any, Any] = dict(s.execute(select(t.model, func.count()).group_by(t.model)).tuples().all())
        return CacheStats(self.url, int(n), int(size), int(hits), int(stale), {str(k): int(v) for k, v in by_prop.items()},
                          {str(k): int(v) for k, v in by_model.items()}, _aware(oldest), _aware(newest))

    def clear(self, *, prop: str | None = None, model: str | None = None, before: datetime | None = None,
              stale: bool = False) -> int:
        """Delete the entries matching every filter given (none: all); returns how many."""
        from sqlalchemy import delete


        with self.engine.begin() as conn:
            return int(conn.execute(delete(_table()).where(*self._where(prop, model, before, stale)))
                       .rowcount or 0)

    def entries(self, *, prop: str | None = None, model: str | None = None) -> Iterator[dict[str, Any]]:
        """Every entry as ``{key, property, model, structure_hash, cache_version, created_at, hits, key_data,
        result}`` (``result``: the stored ``to_dict()``; an entry that does not verify is skipped, warned)."""
        from sqlalchemy import select


        t = _table()
        with self.engine.connect() as conn:
            rows = conn.execute(select(t).where(*self._where(prop, model, None, False)).order_by(t.c.created_at))
            for row in rows.mappings():
                text = row["result"]
                if hashlib.sha256(str(text).encode()).hexdigest() != row["sha256"]:
                    self.warn(f"cache entry {row['key'][:12]} skipped: its checksum does not match")
                    continue
                created = _aware(row["created_at"])
                yield {"key": row["key"], "property": row["property"], "model": row["model"],
                       "structure_hash": row["structure_hash"], "cache_version": row["cache_version"],
                       "created_at": created.isoformat() if created else None, "hits": row["hits"],
                       "key_data": row["key_data"], "result": json.loads(text)}

    def export(self, out: str | PathLike[str] | TextIO, *, prop: str | None = None, model: str | None = None) -> int:
        """Write the entries as JSON lines (see `entries`) to a file or stream; returns how many."""
        with contextlib.ExitStack() as stack:
            fh = out if hasattr(out, "write") else stack.enter_context(Path(out).open("w"))  # type: ignore[arg-type]
            n = 0
            for entry in self.entries(prop=prop, model=model):
                fh.write(json.dumps(entry, separators=(",", ":")) + "\n")  # type: ignore[union-attr]
                n += 1
        return n

    def close(self) -> None:
        self.engine.dispose()


def _table() -> Table:
    """The ``result_cache`` table (`matcalc.store.models.CacheEntry`)."""
    from matcalc.store.models import CacheEntry

    return typing.cast("Table", CacheEntry.__table__)


def _aware(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _insert_ignore(dialect: str, table: Any, values: dict[str, Any]) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` where the dialect has it (SQLite, PostgreSQL), else ``None``."""
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
    else:
        return None
    return insert(table).values(**values).on_conflict_do_nothing(index_elements=["key"])


MIGRATION_LOCK_ID = 0x6D6174_63616C63
"""PostgreSQL advisory lock taken around the schema upgrade (``matcalc`` in ASCII)."""


def _migrate(engine: Engine) -> None:
    """Upgrade the schema under an exclusive lock (SQLite: a file lock next to the database; PostgreSQL: an
    advisory lock), so processes opening a new database at once do not race to create it."""
    from sqlalchemy import text

    from matcalc.store import db

    path = engine.url.database if engine.dialect.name == "sqlite" else None
    with contextlib.ExitStack() as stack:
        if path and path != ":memory:" and fcntl is not None:
            fh = stack.enter_context(open(f"{path}.lock", "a"))
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            stack.callback(fcntl.flock, fh.fileno(), fcntl.LOCK_UN)
        elif engine.dialect.name == "postgresql":
            conn = stack.enter_context(engine.connect())
            conn.execute(text(f"SELECT pg_advisory_lock({MIGRATION_LOCK_ID})"))
            stack.callback(conn.execute, text(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_ID})"))
        if db.current_revision(engine) != db.head_revision():
            db.upgrade(engine)


def _warn(message: str) -> None:
    warnings.warn(message, CacheWarning, stacklevel=3)


_OPEN: dict[str, ResultCache] = {}
_OPEN_LOCK = threading.Lock()


def open_cache(url: str | None = None) -> ResultCache:
    """The process-wide `ResultCache` of ``url`` (default `cache_url`), opened once."""
    url = url or cache_url()
    with _OPEN_LOCK:
        cache = _OPEN.get(url)
        if cache is None:
            cache = _OPEN[url] = ResultCache(url)
        return cache


def close_all() -> None:
    """Close every cache `open_cache` opened (e.g. after the cache URL changed)."""
    with _OPEN_LOCK:
        for cache in _OPEN.values():
            cache.close()
        _OPEN.clear()


# ============================================================================ the skeleton's hook
_KEY_LOCKS: dict[str, list[Any]] = {}
_KEY_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def key_lock(key: str) -> Iterator[None]:
    """Serialise the calls of this process that compute ``key`` (the second is then served from the cache)."""
    with _KEY_LOCKS_GUARD:
        entry = _KEY_LOCKS.setdefault(key, [threading.Lock(), 0])
        entry[1] += 1
    try:
        with entry[0]:
            yield
    finally:
        with _KEY_LOCKS_GUARD:
            entry[1] -= 1
            if entry[1] == 0:
                _KEY_LOCKS.pop(key, None)


@dataclass
class Plan:
    """A cacheable call: its key, and the structure already read for it."""

    key: str
    key_data: dict[str, Any]
    atoms: Atoms
    label: str
    parameters: dict[str, Any]
    """The canonical parameters (what provenance records)."""


def plan(prop: Property[Any], structure: Any, model: str | Potential, protocol: str,
         params: dict[str, Any]) -> Plan | None:
    """The key of a call, or ``None`` when it cannot be cached (a hand-built Potential, an output file) or
    its model or structure does not load (the uncached path then raises the proper error)."""
    from matcalc.calculations.common import label_of
    from matcalc.models.registry import model_identity
    from matcalc.structures import load_structure, structure_hash

    try:
        ident = model_identity(model)
    except Exception:  # noqa: BLE001 - unknown or unavailable model: the calculation raises it
        return None
    if not ident.cacheable:
        log.debug("%s: model %s was built by hand (not registered): not cached", prop.name, ident.name)
        return None
    canonical = canonical_parameters(prop, params)
    if canonical is None:
        return None
    try:
        atoms = load_structure(structure, require_cell=prop.requires_cell)
    except Exception:  # noqa: BLE001 - the calculation reads it again and raises the error
        return None
    key, data = cache_key(prop=prop.name, protocol=protocol, parameters=canonical,
                          structure_hash=structure_hash(atoms), structure_sha256=structure_digest(atoms), model=ident)
    return Plan(key, data, atoms, label_of(structure), canonical)


def _open_or_warn() -> ResultCache | None:
    try:
        return open_cache()
    except Exception as exc:  # noqa: BLE001 - an unreadable database: compute without the cache
        _warn(f"result cache unavailable ({type(exc).__name__}: {exc}); computing without it")
        return None


def run(prop: Property[Any], structure: Any, model: str | Potential, protocol: str, params: dict[str, Any],
        flag: bool | None, compute: Callable[[Any, str | None, Plan | None], Result]) -> Result:
    """Serve a call from the cache, or ``compute(structure, label, plan)`` it and store the result.

    What `Property.run` calls: ``flag`` is its ``cache`` keyword (``None``: ``$MATCALC_CACHE``).
    """
    p = plan(prop, structure, model, protocol, params) if enabled(flag) else None
    cache = _open_or_warn() if p is not None else None
    if p is None or cache is None:
        return compute(structure, None, p)
    with key_lock(p.key):
        hit = _get(cache, p.key)
        if hit is not None:
            hit.label = p.label
            return hit
        result = compute(p.atoms, p.label, p)
        used = model_key((result.provenance or {}).get("model") or {})
        if used != p.key_data["model"]:  # e.g. a registration whose dtype differs from the loaded model's
            _warn(f"{prop.name}: the model that ran ({used}) is not the one the cache key names "
                  f"({p.key_data['model']}); result not cached")
            return result
        try:
            cache.put(p.key, p.key_data, result)
        except Exception as exc:  # noqa: BLE001 - the result stands; only caching it failed
            _warn(f"could not store the result in the cache ({type(exc).__name__}: {exc})")
    return result


def model_key(model: dict[str, Any]) -> dict[str, Any]:
    """The key part of a provenance ``model`` entry (`ModelIdentity.key`: no device, no file path)."""
    out = {k: v for k, v in model.items() if k not in ("weights_file", "device", "components")}
    if model.get("components"):
        out["components"] = [model_key(c) for c in model["components"]]
    return out


def _get(cache: ResultCache, key: str) -> Result | None:
    try:
        return cache.get_result(key)
    except Exception as exc:  # noqa: BLE001 - an unreadable database: compute
        _warn(f"result cache unreadable ({type(exc).__name__}: {exc}); computing")
        return None


__all__ = [
    "CACHE_VERSION",
    "ENABLE_ENV",
    "URL_ENV",
    "CacheStats",
    "CacheWarning",
    "Plan",
    "ResultCache",
    "cache_key",
    "cache_url",
    "canonical_parameters",
    "canonical_value",
    "close_all",
    "enabled",
    "key_lock",
    "model_key",
    "open_cache",
    "plan",
    "provenance_parameters",
    "run",
    "structure_digest",
]
