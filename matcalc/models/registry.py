"""The model registry: names -> factories, model cards, and a per-process cache of loaded models.

Loading never touches the network: every built-in model loads weights shipped inside its
package or from a local file. ``"<name>+d3"`` adds D3(BJ) dispersion to any registered model.
Model plugins (``MATCALC_PLUGINS``, entry points ``matcalc.models``; `matcalc.models.plugins`)
are imported on the first lookup.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from matcalc.models.base import Potential, SumPotential
from matcalc.models.d3 import D3_CUTOFF_A
from matcalc.models.identity import ModelIdentity
from matcalc.models.plugins import ensure_plugins
from matcalc.models.weights import Family, WeightsEntry
from matcalc.version import install_hint

log = logging.getLogger(__name__)

D3_SUFFIX = "+d3"

Factory = Callable[..., Potential]


class UnknownModelError(ValueError):
    """No model of that name is registered; the message lists the registered names."""


class ModelUnavailableError(RuntimeError):
    """The model is registered but cannot load here; the message says what to install or where."""


def _importable(module: str) -> bool:
    """True when ``module`` (dotted names too: ``fairchem.core``) can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


@dataclass
class ModelSpec:
    """How to build a model and what it needs."""

    name: str
    factory: Factory
    family: str = "custom"
    description: str = ""
    elements: str = "all"
    cutoff_A: float | None = None
    requires: tuple[str, ...] = ()
    """Import names of the packages the model needs."""
    install_hint: str = ""
    check: Callable[[], str | None] | None = None
    """Extra availability check returning a reason when unavailable (e.g. a missing weight file)."""
    dtype: str = "float64"
    """Precision of the model's arithmetic."""
    batching: bool = False
    """True when one model call evaluates many structures together."""
    package: str = ""
    """Import name of the package implementing the model (its version is part of the identity)."""
    version: str = ""
    """The model's own version or checkpoint name (part of the identity)."""
    weights: Callable[[], Path | None] | None = None
    """Where the weights file is (``None`` or returning ``None``: weights ship in ``package``)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Loader options that change the model's numbers (part of the identity)."""
    cpu_only: bool = False
    """The model runs on the CPU whatever the device (classical potentials): no device probe, no torch import."""

    def identity(self) -> ModelIdentity:
        """The model's identity without loading it (the weights file, if any, is hashed once per change)."""
        path = self.weights() if self.weights is not None else None
        if path is not None and not Path(path).is_file():
            raise ModelUnavailableError(f"model {self.name!r}: weights file not found: {path}")
        return ModelIdentity.of(name=self.name, family=self.family, dtype=self.dtype, version=self.version,
                                package=self.package, weights=path, options=self.options)

    def unavailable_reason(self) -> str | None:
        missing = [m for m in self.requires if not _importable(m)]
        if missing:
            hint = f"; install it with: {self.install_hint}" if self.install_hint else ""
            return f"missing package(s) {', '.join(missing)}{hint}"
        if self.check is not None:
            return self.check()
        return None


@dataclass
class ModelCard:
    """What ``list_models()`` reports about one model name."""

    name: str
    """the name tasks use"""
    family: str
    """model family (chgnet, sevennet, mace, classical, custom, ...)"""
    description: str
    elements: str
    """elements the model covers (e.g. H-Pu)"""
    cutoff_A: float | None
    """interaction cutoff (Å); null when unknown"""
    device: str
    """device it runs on (cpu, cuda, cuda:1, ...)"""
    available: bool
    """its package and weights are present here"""
    dtype: str = "float64"
    """precision of the model's arithmetic (float32 or float64)"""
    batching: bool = False
    """one model call evaluates many structures together"""
    reason: str = ""
    """why it is not available"""
    loaded: bool = False
    """loaded in this process (or a worker)"""
    extras: dict[str, Any] = field(default_factory=dict)
    """family-specific details (not served over REST)"""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_REGISTRY: dict[str, ModelSpec] = {}
_LOADED: dict[tuple[str, str], Potential] = {}
_LOCK = threading.RLock()
_LOAD_TIMES_S: dict[tuple[str, str], float] = {}
_FAMILIES: dict[str, Family] = {}

FAMILY_MODULES = (
    "matcalc.models.torchscript",
    "matcalc.models.sevennet",
    "matcalc.models.mace",
    "matcalc.models.mattersim",
    "matcalc.models.orb",
    "matcalc.models.fairchem",
    "matcalc.models.grace",
)
"""Modules that declare ``FAMILY`` (a `Family`); importing them is cheap:
each imports its package only when a model loads."""


def register_model(
    name: str,
    factory: Factory,
    *,
    family: str = "custom",
    description: str = "",
    elements: str = "all",
    cutoff_A: float | None = None,
    requires: tuple[str, ...] = (),
    install_hint: str = "",
    check: Callable[[], str | None] | None = None,
    dtype: str = "float64",
    batching: bool = False,
    overwrite: bool = False,
    package: str = "",
    version: str = "",
    weights: Callable[[], Path | None] | None = None,
    options: dict[str, Any] | None = None,
    cpu_only: bool = False,
) -> None:
    """Register ``factory(name=..., device=...) -> Potential`` under ``name`` (lower-case).

    ``package``, ``version``, ``weights`` (a function returning the weights file) and ``options`` make up
    the model's identity (`model_identity`) with its name, family and dtype: results are cached
    under it, so give a new ``version`` (or weights file) when a factory's numbers change.
    """
    key = name.lower()
    if not key or D3_SUFFIX in key or key != key.strip():
        raise ValueError(f"invalid model name {name!r}: non-empty, no spaces, must not contain '{D3_SUFFIX}'")
    with _LOCK:
        if key in _REGISTRY and not overwrite:
            raise ValueError(f"model {name!r} is already registered (pass overwrite=True to replace it)")
        _REGISTRY[key] = ModelSpec(key, factory, family, description, elements, cutoff_A, tuple(requires),
                                   install_hint, check, dtype, batching, package or (requires[0] if requires else ""),
                                   version, weights, dict(options or {}), cpu_only)
        for k in [k for k in _LOADED if k[0] in (key, key + D3_SUFFIX)]:
            del _LOADED[k]


def unregister_model(name: str) -> bool:
    """Remove ``name`` from the registry (and drop it from the cache); True if it was registered."""
    key = name.strip().lower()
    with _LOCK:
        known = _REGISTRY.pop(key, None) is not None
        for k in [k for k in _LOADED if k[0] in (key, key + D3_SUFFIX)]:
            del _LOADED[k]
    return known


def _split(name: str) -> tuple[str, bool]:
    key = name.strip().lower()
    if key.endswith(D3_SUFFIX):
        return key[: -len(D3_SUFFIX)], True
    return key, False


def default_device() -> str:
    """``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch comes with chgnet
        return "cpu"


def _device_for(base: str, with_d3: bool) -> str:
    """The default device of a model: ``"cpu"`` for CPU-only models (without importing torch), else
    `default_device`."""
    spec = _REGISTRY.get(base)
    return "cpu" if spec is not None and spec.cpu_only and not with_d3 else default_device()


def _spec(key: str) -> ModelSpec:
    if key not in _REGISTRY:
        raise UnknownModelError(
            f"unknown model {key!r}; available: {', '.join(model_names())} "
            f"(append '{D3_SUFFIX}' to add D3 dispersion)"
        )
    return _REGISTRY[key]


def is_registered(name: str) -> bool:
    """True when ``name`` (without ``+d3``) is taken in the registry, the D3 component included."""
    ensure_plugins()
    return name.strip().lower() in _REGISTRY


def model_names(include_d3: bool = False) -> list[str]:
    """Registered model names (optionally with their ``+d3`` variants); plugins are imported first."""
    ensure_plugins()
    names = sorted(k for k in _REGISTRY if k != "d3")
    if include_d3:
        names = sorted(names + [n + D3_SUFFIX for n in names])
    return names


def get_model(name: str | Potential, device: str | None = None) -> Potential:
    """Load (once per process and device) and return the model ``name``.

    Raises:
        UnknownModelError: ``name`` is not registered.
        ModelUnavailableError: a package or weight file is missing (the message says which).
    """
    if isinstance(name, Potential):
        return name
    if not isinstance(name, str):
        raise TypeError(f"model must be a name or a Potential, not {type(name).__name__}")
    ensure_plugins()  # outside _LOCK: a plugin being imported in another thread registers under it
    base, with_d3 = _split(name)
    device = device or _device_for(base, with_d3)
    cache_key = (base + (D3_SUFFIX if with_d3 else ""), device)
    with _LOCK:
        if cache_key in _LOADED:
            changed = [k for k in ((base, device), ("d3", device))[: 2 if with_d3 else 1] if _weights_changed(k)]
            if not changed:
                return _LOADED[cache_key]
            log.info("weights file of %s changed since it was loaded: loading it again", changed[0][0])
            for part, dev in changed:
                for k in [k for k in _LOADED if k[1] == dev and k[0] in (part, part + D3_SUFFIX)]:
                    del _LOADED[k]
            _LOADED.pop(cache_key, None)
        spec = _spec(base)
        potential = _load(spec, device)
        if with_d3:
            d3 = _load(_spec("d3"), device)
            potential = SumPotential(cache_key[0], potential, d3)
        _LOADED[cache_key] = potential
        return potential


def _load(spec: ModelSpec, device: str) -> Potential:
    key = (spec.name, device)
    if key in _LOADED:
        return _LOADED[key]
    reason = spec.unavailable_reason()
    if reason:
        raise ModelUnavailableError(f"model {spec.name!r} is not available: {reason}")
    t0 = time.perf_counter()
    try:
        potential = spec.factory(name=spec.name, device=device)
    except ModelUnavailableError:
        raise
    except (ImportError, FileNotFoundError) as exc:
        raise ModelUnavailableError(f"model {spec.name!r} failed to load: {exc}") from exc
    _LOAD_TIMES_S[key] = time.perf_counter() - t0
    _stamp(potential, spec)
    if potential.weights_path is not None:
        _WEIGHTS_STAT[key] = (potential.weights_path, _file_stat(potential.weights_path))
    log.info("loaded model %s on %s in %.2f s", spec.name, device, _LOAD_TIMES_S[key],
             extra={"model": spec.name, "device": device, "load_time_s": _LOAD_TIMES_S[key]})
    _LOADED[key] = potential
    return potential


_WEIGHTS_STAT: dict[tuple[str, str], tuple[Path, tuple[int, int] | None]] = {}
"""(name, device) -> the weights file a loaded model came from and its (size, mtime) then."""


def _file_stat(path: Path) -> tuple[int, int] | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _weights_changed(key: tuple[str, str]) -> bool:
    """True when the weights file of the loaded model ``key`` changed (size or mtime) since it loaded."""
    known = _WEIGHTS_STAT.get(key)
    return known is not None and _file_stat(known[0]) != known[1]


def _stamp(potential: Potential, spec: ModelSpec) -> None:
    """Give a loaded potential its registered identity (package, version, weights file, options), so that
    ``potential.identity()`` and `model_identity` agree; a registered dtype that the loaded model
    contradicts is corrected (with a warning)."""
    potential.registered = True
    potential.package = spec.package
    potential.version = spec.version
    potential.options = dict(spec.options)
    path = spec.weights() if spec.weights is not None else None
    potential.weights_path = Path(path) if path is not None else None
    if potential.dtype != spec.dtype:
        log.warning("model %s computes in %s but was registered as %s; its card and cache key now say %s",
                    spec.name, potential.dtype, spec.dtype, potential.dtype)
        spec.dtype = potential.dtype


def model_identity(name: str | Potential) -> ModelIdentity:
    """The identity of a model name (``"chgnet"``, ``"mace-mpa-0-medium+d3"``) without loading it, or of a
    loaded Potential. The device is left empty for a name (it does not change the identity's key).

    Raises:
        UnknownModelError: ``name`` is not registered.
        ModelUnavailableError: its weights file is missing.
    """
    if isinstance(name, Potential):
        return name.identity()
    ensure_plugins()
    base, with_d3 = _split(name)
    with _LOCK:
        spec = _spec(base)
        d3 = _spec("d3") if with_d3 else None
    ident = spec.identity()
    if d3 is not None:
        ident = ModelIdentity.combine(base + D3_SUFFIX, ident, d3.identity())
    return ident


def register_family(family: Family, *, overwrite: bool = False) -> None:
    """Register every catalogue entry of ``family``: each loads its local weight file on first use."""
    with _LOCK:
        _FAMILIES[family.name] = family
    for entry in family.catalogue:
        register_model(
            entry.name,
            partial(_load_entry, family, entry),
            family=family.name,
            description=entry.description,
            elements=entry.elements,
            cutoff_A=entry.cutoff_A,
            requires=family.requires,
            install_hint=family.install_hint,
            check=entry.missing_reason,
            dtype=entry.dtype,
            batching=family.supports_batching,
            overwrite=overwrite,
            weights=entry.path,
            options=entry.options,
        )


def _load_entry(family: Family, entry: WeightsEntry, *, name: str, device: str) -> Potential:
    return family.loader(entry.path(), name=name, device=device, **entry.options)


def get_family(name: str) -> Family:
    """The declared family ``name`` (``mace``, ``orb``, ...); ``UnknownModelError`` lists the known ones."""
    with _LOCK:
        if name not in _FAMILIES:
            raise UnknownModelError(f"unknown model family {name!r}; known: {', '.join(sorted(_FAMILIES))}")
        return _FAMILIES[name]


def family_unavailable_reason(family: Family) -> str | None:
    """Why ``family``'s packages cannot be imported here (with the install hint), or ``None``."""
    missing = [m for m in family.requires if not _importable(m)]
    if not missing:
        return None
    return f"missing package(s) {', '.join(missing)}; install it with: {family.install_hint}"


def families() -> list[str]:
    """Names of the declared model families."""
    with _LOCK:
        return sorted(_FAMILIES)


def unload_model(name: str, device: str | None = None) -> bool:
    """Drop a loaded model (and its ``+d3`` variant) from the cache; True if one was loaded."""
    base, _ = _split(name)
    with _LOCK:
        keys = [k for k in _LOADED if k[0] in (base, base + D3_SUFFIX) and (device is None or k[1] == device)]
        for k in keys:
            del _LOADED[k]
        return bool(keys)


def loaded_models() -> list[tuple[str, str]]:
    """``(name, device)`` of every model loaded in this process."""
    with _LOCK:
        return sorted(_LOADED)


def model_load_times() -> dict[tuple[str, str], float]:
    """Seconds each loaded ``(name, device)`` took to load."""
    with _LOCK:
        return dict(_LOAD_TIMES_S)


def model_card(name: str, device: str | None = None) -> ModelCard:
    """The card of one model name (``+d3`` variants included)."""
    ensure_plugins()
    base, with_d3 = _split(name)
    spec = _spec(base)
    device = device or _device_for(base, with_d3)
    reason = spec.unavailable_reason()
    if with_d3 and not reason:
        reason = _spec("d3").unavailable_reason()
    full = base + (D3_SUFFIX if with_d3 else "")
    with _LOCK:
        loaded = any(k[0] == full for k in _LOADED)
    return ModelCard(
        name=full,
        family=spec.family,
        description=spec.description + (" + D3(BJ) dispersion" if with_d3 else ""),
        elements=spec.elements,
        cutoff_A=spec.cutoff_A,
        device=device,
        available=reason is None,
        dtype=spec.dtype,
        batching=spec.batching,
        reason=reason or "",
        loaded=loaded,
    )


def list_models(device: str | None = None, include_d3: bool = True) -> list[ModelCard]:
    """Cards of every registered model: family, elements, cutoff, device, availability and why not."""
    return [model_card(n, device) for n in model_names(include_d3=include_d3)]


def _register_builtins() -> None:
    from matcalc.models.chgnet import CHGNET_VERSION

    def emt(name: str, device: str) -> Potential:
        from matcalc.models.emt import EMTPotential

        return EMTPotential(name, device)

    def lj(name: str, device: str) -> Potential:
        from matcalc.models.lj import LJPotential

        return LJPotential(name, device)

    def chgnet(name: str, device: str) -> Potential:
        from matcalc.models.chgnet import CHGNetPotential

        return CHGNetPotential(name, device)

    def sevennet(name: str, device: str) -> Potential:  # "sevennet" = 7net-0, the name before the catalogue
        from matcalc.models.sevennet import load

        return load(None, name=name, device=device, checkpoint="7net-0")

    def d3(name: str, device: str) -> Potential:
        from matcalc.models.d3 import D3Potential

        return D3Potential(name, device)

    register_model("emt", emt, family="emt", description="ASE Effective Medium Theory (instant; fcc metals)",
                   elements="Al Cu Ag Au Ni Pd Pt H C N O", package="ase", cpu_only=True)
    register_model("lj", lj, family="lj", description="Lennard-Jones, argon parameters (instant; toy)",
                   cutoff_A=10.2, package="ase", cpu_only=True)
    register_model("chgnet", chgnet, family="chgnet", description="CHGNet 0.3.0 (MPtrj), weights in the wheel",
                   elements="H-Pu (Z 1-94)", cutoff_A=5.0, requires=("chgnet",), install_hint="pip install chgnet",
                   dtype="float32", batching=True, version=CHGNET_VERSION)
    register_model("sevennet", sevennet, family="sevennet", description="SevenNet-0 (MPtrj), weights in the wheel "
                   "(same as 7net-0)",
                   elements="H-Bi and more (89 elements)", cutoff_A=5.0, requires=("sevenn",),
                   install_hint=install_hint("sevennet"), dtype="float32", batching=True, version="7net-0")
    register_model("d3", d3, family="d3", description="Grimme D3(BJ) dispersion, PBE parameters (torch-dftd)",
                   elements="H-Pu", cutoff_A=D3_CUTOFF_A, requires=("torch_dftd",),
                   install_hint=install_hint("d3"))

    for module_name in FAMILY_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a family module not written yet in a development tree
            if exc.name != module_name:
                raise
            continue
        family = getattr(module, "FAMILY", None)
        if family is not None:
            register_family(family)


_register_builtins()
