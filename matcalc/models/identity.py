"""What exactly a model is: name, family, version, weights (sha256 of the file, or the package that ships them),
dtype and loader options; the model part of a result's provenance and of the result cache's key.

Weight files are hashed once per (path, size, mtime): a multi-GB checkpoint costs one read per process,
and a file that changes (new size or mtime) is hashed again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import threading
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

_HASHES: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()
_HASH_BLOCK = 1 << 22


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file's bytes, remembered per (resolved path, size, mtime) in this process."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    memo = (str(p), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        known = _HASHES.get(memo)
    if known is not None:
        return known
    h = hashlib.sha256()
    with p.open("rb") as fh:
        for block in iter(lambda: fh.read(_HASH_BLOCK), b""):
            h.update(block)
    digest = h.hexdigest()
    with _HASH_LOCK:
        _HASHES[memo] = digest
    return digest


def hashes_computed() -> int:
    """How many (file, size, mtime) hashes this process has computed (for tests and diagnostics)."""
    with _HASH_LOCK:
        return len(_HASHES)


@cache
def package_version(package: str) -> str | None:
    """Installed version of ``package`` (an import name such as ``sevenn`` or a distribution name such as
    ``mace-torch``), without importing it; ``None`` when it is not installed."""
    if not package:
        return None
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        pass
    dists = _import_to_distributions().get(package.split(".")[0], [])
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@cache
def _import_to_distributions() -> dict[str, list[str]]:
    return {k: list(v) for k, v in importlib.metadata.packages_distributions().items()}


@dataclass(frozen=True)
class ModelIdentity:
    """The identity of a model (see the module docstring).

    ``key()`` is what the result cache compares: everything but the device and where the weight file lives
    (a file moved elsewhere with the same bytes is the same model). ``components`` are the parts of a sum
    (``"chgnet+d3"``: CHGNet and D3).
    """

    name: str
    family: str
    dtype: str
    version: str = ""
    """The model's own version or checkpoint name (e.g. CHGNet ``0.3.0``, SevenNet ``7net-0``), when known."""
    package: str = ""
    """Import name of the package that implements (and for wheel-shipped weights: ships) the model."""
    package_version: str | None = None
    weights_file: str | None = None
    """Path of the weights file (``None``: weights ship inside ``package``, or a classical potential)."""
    weights_sha256: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    """Loader options that change the model (task head, fidelity, cutoff, dtype...)."""
    device: str = ""
    components: tuple[ModelIdentity, ...] = ()
    cacheable: bool = True
    """False for a Potential object built by hand (not through the registry, no weights file): nothing
    tells two such objects apart, so their results are never served from the cache."""

    @classmethod
    def of(cls, *, name: str, family: str, dtype: str, version: str = "", package: str = "",
           weights: str | os.PathLike[str] | None = None, options: dict[str, Any] | None = None, device: str = "",
           cacheable: bool = True) -> ModelIdentity:
        """An identity with the package version looked up and the weights file hashed (if there is one)."""
        path = None if weights is None else str(Path(weights).expanduser())
        return cls(name=name, family=family, dtype=dtype, version=str(version or ""), package=package,
                   package_version=package_version(package), weights_file=path,
                   weights_sha256=None if path is None else file_sha256(path),
                   options=_plain(options or {}), device=device, cacheable=cacheable)

    @classmethod
    def combine(cls, name: str, *parts: ModelIdentity) -> ModelIdentity:
        """The identity of a sum of models (named ``name``; dtype, family and device of the first part)."""
        first = parts[0]
        return cls(name=name, family=first.family, dtype=first.dtype, device=first.device, components=tuple(parts),
                   cacheable=all(p.cacheable for p in parts))

    def on(self, device: str) -> ModelIdentity:
        """The same identity on ``device``."""
        return replace(self, device=device, components=tuple(c.on(device) for c in self.components))

    def key(self) -> dict[str, Any]:
        """What identifies the model's numbers (the cache key part): no device, no file location."""
        out: dict[str, Any] = {"name": self.name, "family": self.family, "dtype": self.dtype,
                               "version": self.version, "package": self.package, "package_version": self.package_version,
               "weights_sha256": self.weights_sha256, "options": self.options}
        if self.components:
            out["components"] = [c.key() for c in self.components]
        return out

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-safe (the ``model`` entry of a result's provenance)."""
        out = {**self.key(), "weights_file": self.weights_file, "device": self.device}
        if self.components:
            out["components"] = [c.to_dict() for c in self.components]
        return out


def _plain(value: Any) -> Any:
    """JSON-safe, order-stable copy of loader options."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


__all__ = ["ModelIdentity", "file_sha256", "hashes_computed", "package_version"]
