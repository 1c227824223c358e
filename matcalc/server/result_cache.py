"""The server's side of the result cache (`matcalc.cache`), in the server's own database.

* A submission whose key is cached completes at once: the task goes PENDING -> COMPLETED with the cached
  result (``provenance["cached"] = True``, original timestamps) before the POST answers.
* Identical submissions in flight compute once: the first one runs (the *leader*), later ones wait QUEUED
  (*followers*, never handed to the executor) and complete with a copy of its result; if the leader does
  not complete (failed, cancelled, timed out), the followers are dispatched again.
* A completed task's result is stored under its key; workers never write the cache themselves
  (they run with ``cache=False``).

The key is the same as a local call's (`matcalc.cache.cache_key`), computed from the stored
structure text exactly as the worker parses it, and the model's registered identity (never loading it).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from matcalc.cache import ResultCache, cache_key, canonical_parameters, structure_digest

if TYPE_CHECKING:
    from matcalc.store import Store, Structure, Task

log = logging.getLogger(__name__)

_DIGESTS_MAX = 4096


class ServerCache:
    """Cache lookups, in-flight de-duplication and storage for `TaskService`."""

    def __init__(self, store: Store) -> None:
        self.cache = ResultCache(engine=store.engine, migrate=False, warn=log.warning)
        self._lock = threading.Lock()
        self._keys: dict[str, tuple[str, dict[str, Any]]] = {}
        """task id -> (key, key data) of every task running or waiting here."""
        self._leaders: dict[str, str] = {}
        """key -> the task computing it."""
        self._followers: dict[str, list[str]] = {}
        """leader task id -> tasks waiting for its result."""
        self._structures: OrderedDict[str, tuple[str, str]] = OrderedDict()
        """structure id -> (structure hash, exact digest): stored structures never change."""

    def _structure(self, structure: Structure) -> tuple[str, str]:
        with self._lock:
            known = self._structures.get(structure.id)
        if known is not None:
            return known
        from matcalc.structures import load_structure, structure_hash

        atoms = load_structure(structure.content, fmt=structure.format, require_cell=False, max_atoms=None)
        value = (structure_hash(atoms), structure_digest(atoms))
        with self._lock:
            self._structures[structure.id] = value
            while len(self._structures) > _DIGESTS_MAX:
                self._structures.popitem(last=False)
        return value

    def key_for(self, row: Task, structure: Structure) -> tuple[str, dict[str, Any]] | None:
        """The key of a stored task (``None``: not cacheable)."""
        from matcalc.calculations import get_property
        from matcalc.models.registry import model_identity

        prop = get_property(row.type)
        given = dict(row.parameters or {})
        protocol = given.pop("protocol", None) or row.protocol
        name, params = prop.resolve(protocol, given)
        canonical = canonical_parameters(prop, params)
        if canonical is None:
            return None
        shash, digest = self._structure(structure)
        return cache_key(prop=prop.name, protocol=name, parameters=canonical, structure_hash=shash,
                         structure_sha256=digest, model=model_identity(row.model))

    def route(self, row: Task, structure: Structure) -> dict[str, Any] | str | None:
        """What to do with a task about to be dispatched: its cached result (a dict: complete it now), the id
        of the task already computing its key (a str: it waits for that one), or ``None`` (run it)."""
        try:
            found = self.key_for(row, structure)
        except Exception as exc:  # noqa: BLE001 - never let the cache refuse a task: it just runs
            log.warning("task %s: no cache key (%s: %s); running it", row.id, type(exc).__name__, exc)
            return None
        if found is None:
            return None
        key, _ = found
        with self._lock:
            leader = self._leaders.get(key)
            if leader is not None and leader != row.id:
                self._followers.setdefault(leader, []).append(row.id)
                self._keys[row.id] = found
                return leader
            try:
                hit = self.cache.get(key)
            except Exception as exc:  # noqa: BLE001 - an unreadable cache: compute
                log.warning("result cache unreadable (%s: %s); running task %s", type(exc).__name__, exc, row.id)
                hit = None
            if hit is None:
                self._leaders[key] = row.id
                self._keys[row.id] = found
                return None
        return self.served(hit, key, row.label or structure.name)

    @staticmethod
    def served(result: dict[str, Any], key: str, label: str | None) -> dict[str, Any]:
        """A copy of a stored result as served from the cache (``cached`` set, the task's label)."""
        out = copy.deepcopy(result)
        out["provenance"] = {**(out.get("provenance") or {}), "cached": True, "cache_key": key}
        if label is not None:
            out["label"] = label
        return out

    def annotate(self, task_id: str, result: dict[str, Any] | None) -> dict[str, Any] | None:
        """``result`` with its cache key in the provenance (the worker computed it without the cache)."""
        with self._lock:
            found = self._keys.get(task_id)
        if found is None or not isinstance(result, dict):
            return result
        return {**result, "provenance": {**(result.get("provenance") or {}), "cache_key": found[0]}}

    def finished(self, task_id: str, completed: bool, result: dict[str, Any] | None) -> tuple[str | None, list[str]]:
        """Store a completed result and release the task's followers: ``(key, followers)``."""
        with self._lock:
            found = self._keys.pop(task_id, None)
        if found is None:
            return None, []
        key, data = found
        if completed and isinstance(result, dict) and not (result.get("provenance") or {}).get("cached"):
            try:
                self.cache.put(key, data, result)
            except Exception as exc:  # noqa: BLE001 - the task's result stands; only caching it failed
                log.warning("could not cache the result of task %s: %s: %s", task_id, type(exc).__name__, exc)
        with self._lock:
            if self._leaders.get(key) == task_id:
                del self._leaders[key]
            followers = self._followers.pop(task_id, [])
            for f in followers:
                self._keys.pop(f, None)
        return key, followers


__all__ = ["ServerCache"]
