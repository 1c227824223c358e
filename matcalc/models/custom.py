"""User-supplied model files: safe inspection, validation and registration.

Accepted formats: ``"torchscript"`` (a TorchScript archive: code restricted to TorchScript, loaded with
``torch.jit.load``) and ``"weights_only"`` (a ``torch.save`` file of tensors, numbers, strings and
containers, loaded with ``torch.load(weights_only=True)``). A pickle that would import anything else, and so
could run code, is rejected before any model code sees it; so are empty, oversized and corrupt files.
Which formats a family accepts is declared by the family (``Family.custom_formats``).
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from matcalc.models.identity import file_sha256
from matcalc.models.registry import (
    ModelCard,
    ModelUnavailableError,
    family_unavailable_reason,
    get_family,
    is_registered,
    model_card,
    register_model,
)
from matcalc.models.validation import ValidationReport, validate_model_file
from matcalc.models.weights import Family

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "weights_only")
MAX_MODEL_BYTES_ENV = "MATCALC_MAX_MODEL_BYTES"
DEFAULT_MAX_MODEL_BYTES = 4 * 1024**3


def max_model_bytes() -> int:
    """Largest model file accepted (bytes): ``$MATCALC_MAX_MODEL_BYTES`` or 4 GiB."""
    return int(os.environ.get(MAX_MODEL_BYTES_ENV, DEFAULT_MAX_MODEL_BYTES))


class ModelFileError(ValueError):
    """A model file was refused; ``kind`` says why: not_found, empty, too_large, corrupt, unsafe, format."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ModelValidationError(RuntimeError):
    """The model loaded but failed validation; ``report`` holds every check."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(f"model {report.model!r} failed validation: {report.summary()}")
        self.report = report


@dataclass
class ModelFileInfo:
    """What inspection learnt about a model file."""

    path: Path
    format: str
    size_bytes: int
    sha256: str


def detect_format(path: Path) -> str:
    """``"torchscript"`` or ``"weights_only"`` from the archive layout; ModelFileError when neither."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ModelFileError("corrupt", f"{path.name}: corrupt zip archive: {exc}") from exc
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "weights_only"
        raise ModelFileError("format", f"{path.name}: a zip archive but neither TorchScript nor a torch.save file")
    with path.open("rb") as fh:
        head = fh.read(2)
    if head[:1] == b"\x80":  # a raw pickle (legacy torch.save): may still hold weights only
        return "weights_only"
    raise ModelFileError("corrupt", f"{path.name}: not a TorchScript archive nor a torch.save file "
                                    "(corrupt or an unsupported format)")


def inspect_model_file(path: str | os.PathLike[str], *, family: str | None = None, fmt: str | None = None,
                       max_bytes: int | None = None) -> ModelFileInfo:
    """Check that ``path`` is a model file matcalc may load, without running any code from it.

    Raises:
        ModelFileError: missing, empty, larger than ``max_bytes``, corrupt, of a format the family does not
            accept, or a pickle that imports something other than tensors and plain containers.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelFileError("not_found", f"no such model file: {p}")
    size = p.stat().st_size
    limit = max_model_bytes() if max_bytes is None else max_bytes
    if size == 0:
        raise ModelFileError("empty", f"{p.name}: the file is empty")
    if size > limit:
        raise ModelFileError("too_large", f"{p.name}: {size / 1024**2:.1f} MiB exceeds the limit of "
                                          f"{limit / 1024**2:.1f} MiB (set {MAX_MODEL_BYTES_ENV} to change it)")
    detected = detect_format(p)
    if fmt is not None and fmt not in FORMATS:
        raise ModelFileError("format", f"unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
    if fmt is not None and fmt != detected:
        raise ModelFileError("format", f"{p.name}: declared {fmt!r} but the file is {detected!r}")
    fam = get_family(family) if family is not None else None
    extra = fam.weights_only_globals() if fam is not None and fam.weights_only_globals is not None else []
    _safe_load(p, detected, extra)  # before the format check: an unsafe file is reported as unsafe
    if fam is not None:
        if detected not in fam.custom_formats:
            accepted = ", ".join(fam.custom_formats) or "none (use a catalogue name with a local weight file)"
            raise ModelFileError("format", f"family {fam.name!r} does not accept {detected!r} uploads; "
                                           f"it accepts: {accepted}")
    return ModelFileInfo(p, detected, size, file_sha256(p))


def _safe_load(path: Path, fmt: str, extra_globals: list[Any] | None = None) -> None:
    import torch

    if fmt == "torchscript":
        try:
            torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError and friends for bad archives
            raise ModelFileError("corrupt", f"{path.name}: not a loadable TorchScript archive: "
                                            f"{_first_line(exc)}") from exc
        return
    try:
        with torch.serialization.safe_globals(list(extra_globals or [])):
            torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelFileError("unsafe", f"{path.name}: refused: unpickling it would run code or build objects "
                                       f"other than tensors and plain containers ({_first_line(exc)}); export "
                                       "the weights (a state_dict or the family's weights-only checkpoint) or "
                                       "TorchScript instead") from exc
    except Exception as exc:  # noqa: BLE001 - truncated zips, bad magic numbers, ...
        raise ModelFileError("corrupt", f"{path.name}: corrupt or truncated torch file: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():  # torch's weights-only message: the line naming the refused global
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.replace("WeightsUnpickler error:", "").strip()[:300]
    for line in text.splitlines():
        if line.strip() and not line.lower().startswith("weights only load failed"):
            return line.strip()[:300]
    return text.splitlines()[0][:300] if text else type(exc).__name__


@dataclass
class CustomModel:
    """A registered user model: where it lives and what validation said."""

    name: str
    family: str
    path: str
    format: str
    sha256: str
    size_bytes: int
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    validation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_CUSTOM: dict[str, CustomModel] = {}
_LOCK = threading.Lock()


def custom_models() -> list[CustomModel]:
    """The user models registered in this process."""
    with _LOCK:
        return list(_CUSTOM.values())


def register_model_file(
    path: str | os.PathLike[str],
    family: str,
    name: str,
    *,
    fmt: str | None = None,
    description: str = "",
    options: dict[str, Any] | None = None,
    validate: bool = True,
    device: str = "cpu",
    overwrite: bool = False,
    timeout_s: float = 900.0,
) -> ModelCard:
    """Register a user model file under ``name`` so that every calculation can use it by name.

    The file is inspected first (`inspect_model_file`); with ``validate`` (the default) it is then
    loaded in a separate process and checked (`validate_model_file`);
    only a model that passes is registered. ``options`` go to the family loader (e.g. ``dtype``,
    ``elements``, ``cutoff_A`` for TorchScript; an architecture name for a weights-only checkpoint).

    Raises:
        ModelFileError: the file was refused (see its ``kind``).
        ModelValidationError: the model loaded but failed a check (see its ``report``).
        ModelUnavailableError: the family's packages are not installed here.
        UnknownModelError: ``family`` is not a known family.
        ValueError: ``name`` is taken by a built-in model (or by another user model without ``overwrite``).
    """
    fam = get_family(family)
    reason = family_unavailable_reason(fam)
    if reason:
        raise ModelUnavailableError(f"family {fam.name!r} cannot load here: {reason}")
    key = name.strip().lower()
    with _LOCK:
        custom = key in _CUSTOM
    if is_registered(key) and not custom:
        raise ValueError(f"model name {name!r} is taken by a built-in model; choose another name")
    if custom and not overwrite:
        raise ValueError(f"a user model named {name!r} is already registered (pass overwrite=True to replace it)")
    info = inspect_model_file(path, family=family, fmt=fmt)
    opts = dict(options or {})
    report = None
    if validate:
        report = validate_model_file(info.path, family, name=key, options=opts, device=device, timeout_s=timeout_s)
        if not report.passed:
            raise ModelValidationError(report)
    model = CustomModel(key, family, str(info.path), info.format, info.sha256, info.size_bytes, opts, description,
                        report.to_dict() if report else None)
    _register(model, fam)
    return model_card(key)


def register_validated(model: CustomModel) -> None:
    """Register a model that was inspected and validated before (e.g. by the server at start-up)."""
    _register(model, get_family(model.family))


def _register(model: CustomModel, fam: Family) -> None:
    path = Path(model.path)

    def factory(*, name: str, device: str) -> Any:
        return fam.loader(path, name=name, device=device, **model.options)

    def check() -> str | None:
        return None if path.is_file() else f"the model file is gone: {path}"

    register_model(model.name, factory, family=fam.name, description=model.description or f"user model ({path.name})",
                   elements=" ".join(model.options.get("elements", [])) or "see the model",
                   cutoff_A=model.options.get("cutoff_A"), requires=fam.requires, install_hint=fam.install_hint,
                   check=check, dtype=str((model.validation or {}).get("dtype") or _dtype(model.options)),
                   batching=fam.supports_batching,
                   overwrite=True, weights=lambda: path, options=model.options)
    with _LOCK:
        _CUSTOM[model.name] = model
    log.info("registered user model %s (%s, %s)", model.name, fam.name, path.name)


def _dtype(options: dict[str, Any]) -> str:
    """The precision a loader option asks for (``dtype``, or a family's ``precision``/``default_dtype``)."""
    for key in ("dtype", "precision", "default_dtype"):
        if key in options:
            return "float64" if "64" in str(options[key]) else "float32"
    return "float32"


def unregister_model_file(name: str) -> bool:
    """Forget a user model (it can no longer be loaded by name); True if it was registered."""
    from matcalc.models.registry import unregister_model

    key = name.strip().lower()
    with _LOCK:
        known = _CUSTOM.pop(key, None) is not None
    if known:
        unregister_model(key)
    return known
