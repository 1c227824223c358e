"""Model plugins: user Python modules that register potentials with `matcalc.register_model`.

Two sources, both imported once per process on the first use of the model registry (so the
library, ``matcalc serve``, its worker processes and every dask worker see the same models):

* ``MATCALC_PLUGINS``: comma-separated importable module names, e.g.
  ``MATCALC_PLUGINS=mylab.potentials,mylab.other``;
* installed packages exposing the entry-point group ``matcalc.models``; the entry point names
  a module (imported) or a callable (imported, then called without arguments).

A plugin that fails to import never stops matcalc: it is reported as a `PluginWarning`
naming the module and the error, and listed by `plugin_status` (``matcalc models``,
``GET /api/v1/system/config`` and ``/health`` show it).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import traceback
import types
import warnings
from dataclasses import asdict, dataclass
from importlib.metadata import entry_points
from typing import Any

log = logging.getLogger(__name__)

ENV_VAR = "MATCALC_PLUGINS"
ENTRY_POINT_GROUP = "matcalc.models"


class PluginWarning(UserWarning):
    """A model plugin could not be imported (matcalc goes on without it)."""


@dataclass(frozen=True)
class PluginStatus:
    """The outcome of importing one plugin."""

    name: str
    """Module name (``MATCALC_PLUGINS``) or ``entry-point-name = value`` (entry points)."""
    source: str
    """``env`` or ``entry_point``."""
    loaded: bool
    error: str | None = None
    """``ExceptionType: message`` when it failed to import."""
    models: tuple[str, ...] = ()
    """Model names the plugin registered."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["models"] = list(self.models)
        return d


_LOCK = threading.RLock()
_STATUS: list[PluginStatus] = []
_STATE = {"started": False, "done": False}


def env_plugins(value: str | None = None) -> list[str]:
    """The module names listed in ``MATCALC_PLUGINS`` (or ``value``), in order, duplicates dropped."""
    text = os.environ.get(ENV_VAR, "") if value is None else value
    names: list[str] = []
    for part in text.split(","):
        name = part.strip()
        if name and name not in names:
            names.append(name)
    return names


def _registered() -> set[str]:
    from matcalc.models import registry

    return set(registry.model_names())


def _import_one(name: str, source: str, load: Any) -> PluginStatus:
    before = _registered()
    try:
        obj = load()
        if source == "entry_point" and callable(obj) and not isinstance(obj, types.ModuleType):
            obj()
    except BaseException as exc:  # noqa: BLE001 - SystemExit from a plugin must not stop matcalc either
        if isinstance(exc, KeyboardInterrupt):
            raise
        error = f"{type(exc).__name__}: {exc}"
        where = [f for f in traceback.extract_tb(exc.__traceback__)[1:]
                 if not f.filename.startswith("<frozen") and "importlib" not in f.filename]
        if where:  # the plugin's own line that failed
            error += f" (at {where[-1].filename}:{where[-1].lineno})"
        message = f"matcalc model plugin {name!r} ({ENV_VAR if source == 'env' else ENTRY_POINT_GROUP}) " \
                  f"failed to import: {error}"
        log.debug(message)
        warnings.warn(message, PluginWarning, stacklevel=4)
        return PluginStatus(name, source, False, error)
    models = tuple(sorted(_registered() - before))
    log.info("matcalc model plugin %s loaded (%s)", name, ", ".join(models) or "no new models")
    return PluginStatus(name, source, True, None, models)


def load_plugins(*, force: bool = False) -> list[PluginStatus]:
    """Import every plugin once per process (again with ``force``); never raises for a broken plugin."""
    with _LOCK:
        if _STATE["started"] and not force:
            return list(_STATUS)
        _STATE["started"] = True  # first: a plugin that uses the registry while importing must not recurse
        done = {s.name for s in _STATUS if s.loaded} if force else set()
        statuses = [s for s in _STATUS if s.loaded] if force else []
        for name in env_plugins():
            if name not in done:
                statuses.append(_import_one(name, "env", lambda n=name: importlib.import_module(n)))
        try:
            eps = list(entry_points(group=ENTRY_POINT_GROUP))
        except Exception as exc:  # noqa: BLE001 - broken package metadata
            log.warning("could not read the %s entry points: %s", ENTRY_POINT_GROUP, exc)
            eps = []
        for ep in eps:
            label = f"{ep.name} = {ep.value}"
            if label not in done:
                statuses.append(_import_one(label, "entry_point", ep.load))
        _STATUS[:] = statuses
        _STATE["done"] = True
        return list(_STATUS)


def ensure_plugins() -> None:
    """`load_plugins` unless it ran already (cheap: the registry calls it on every lookup).

    Another thread waits until the plugins are imported; the importing thread itself (a plugin
    that uses the registry) goes on with what is registered so far."""
    if not _STATE["done"]:
        load_plugins()


def plugin_status() -> list[PluginStatus]:
    """What `load_plugins` did in this process (it runs first if it has not yet)."""
    return load_plugins()


def plugin_errors() -> list[str]:
    """One line per plugin that failed to import (empty when all are fine)."""
    return [f"{s.name}: {s.error}" for s in plugin_status() if not s.loaded]


__all__ = ["ENTRY_POINT_GROUP", "ENV_VAR", "PluginStatus", "PluginWarning", "ensure_plugins", "env_plugins",
           "load_plugins", "plugin_errors", "plugin_status"]
