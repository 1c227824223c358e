"""Custom models on the server: upload, inspection, validation in a separate process, registration.

Lifecycle of a row: UPLOADED -> VALIDATING -> VALIDATED | FAILED (re-validation allowed). Only VALIDATED
models are registered with the executor, and so only they can run tasks. An upload that is refused
leaves nothing behind (no file, no row).
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from matcalc.server.errors import ApiError, ErrorCode
from matcalc.store import ACTIVE, CustomModel, DuplicateError, NotFoundError, Store, Task

log = logging.getLogger(__name__)

_FILE_ERRORS = {
    "unsafe": ErrorCode.MODEL_FILE_UNSAFE,
    "corrupt": ErrorCode.MODEL_FILE_INVALID,
    "empty": ErrorCode.MODEL_FILE_INVALID,
    "not_found": ErrorCode.MODEL_FILE_INVALID,
    "too_large": ErrorCode.PAYLOAD_TOO_LARGE,
    "format": ErrorCode.UNSUPPORTED_MODEL_FORMAT,
}


def _safe_filename(name: str | None) -> str:
    base = Path(name or "model.bin").name
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in base).lstrip(".")
    return cleaned[:128] or "model.bin"


class CustomModelService:
    """Owns the uploaded files (``root/<id>/<file>``) and the ``custom_models`` rows."""

    def __init__(self, store: Store, executor: Any, root: Path, *, max_bytes: int, device: str | None = None,
                 validation_timeout_s: float = 900.0) -> None:
        self.store = store
        self.executor = executor
        self.root = root
        self.max_bytes = max_bytes
        self.device = device or "cpu"
        self.validation_timeout_s = validation_timeout_s
        self._threads: dict[str, threading.Thread] = {}

    # -------------------------------------------------------------- start-up
    def start(self) -> int:
        """Register every VALIDATED model with the executor; rows left VALIDATING by a crash go back to
        UPLOADED. Returns how many models were registered."""
        n = 0
        for row in self.store.list_custom_models():
            if row.status == "VALIDATING":
                self.store.set_custom_model_status(row.id, "UPLOADED", expect=["VALIDATING"])
                log.warning("custom model %s: validation was interrupted by a restart; validate it again", row.name)
            elif row.status == "VALIDATED":
                if Path(row.path).is_file():
                    self._register(row)
                    n += 1
                else:
                    log.error("custom model %s: file %s is missing; not registered", row.name, row.path)
        return n

    # -------------------------------------------------------------- upload
    def upload(self, meta: Any, stream: BinaryIO, filename: str | None) -> CustomModel:
        """Store the file, inspect it, record the row; every refusal leaves nothing behind."""
        from matcalc.models.custom import ModelFileError, inspect_model_file
        from matcalc.models.registry import UnknownModelError, family_unavailable_reason, get_family, is_registered

        try:
            family = get_family(meta.family)
        except UnknownModelError as exc:
            raise ApiError(ErrorCode.UNKNOWN_MODEL, str(exc)) from exc
        reason = family_unavailable_reason(family)
        if reason:
            raise ApiError(ErrorCode.MODEL_UNAVAILABLE, f"family {family.name!r} cannot load here: {reason}")
        if not family.custom_formats:
            raise ApiError(ErrorCode.UNSUPPORTED_MODEL_FORMAT,
                           f"family {family.name!r} accepts no uploads (use a catalogue name with a local file)")
        if self.store.custom_model_by_name(meta.name) is not None:
            raise ApiError(ErrorCode.MODEL_NAME_TAKEN, f"a custom model named {meta.name!r} exists "
                                                       "(delete it first or choose another name)")
        if is_registered(meta.name):
            raise ApiError(ErrorCode.MODEL_NAME_TAKEN, f"model name {meta.name!r} is taken by a built-in model")
        model_id = uuid.uuid4().hex
        folder = self.root / model_id
        folder.mkdir(parents=True, exist_ok=False)
        path = folder / _safe_filename(filename)
        try:
            self._copy(stream, path)
            try:
                info = inspect_model_file(path, family=family.name, fmt=meta.format, max_bytes=self.max_bytes)
            except ModelFileError as exc:
                raise ApiError(_FILE_ERRORS.get(exc.kind, ErrorCode.MODEL_FILE_INVALID), str(exc),
                               {"reason": exc.kind}) from exc
            try:
                return self.store.add_custom_model(name=meta.name, family=family.name, fmt=info.format,
                                                   path=str(path), sha256=info.sha256, size_bytes=info.size_bytes,
                                                   description=meta.description, options=meta.options)
            except DuplicateError as exc:  # a concurrent upload took the name
                raise ApiError(ErrorCode.MODEL_NAME_TAKEN, str(exc)) from exc
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _copy(self, stream: BinaryIO, path: Path) -> None:
        n = 0
        with path.open("wb") as out:
            while block := stream.read(1 << 20):
                n += len(block)
                if n > self.max_bytes:
                    raise ApiError(ErrorCode.PAYLOAD_TOO_LARGE,
                                   f"model file exceeds the limit of {self.max_bytes / 1024**2:g} MB",
                                   {"max_bytes": self.max_bytes, "reason": "too_large"})
                out.write(block)

    # -------------------------------------------------------------- read / delete
    def get(self, model_id: str) -> CustomModel:
        try:
            return self.store.get_custom_model(model_id)
        except NotFoundError as exc:
            raise ApiError(ErrorCode.CUSTOM_MODEL_NOT_FOUND, str(exc)) from exc

    def delete(self, model_id: str) -> CustomModel:
        """Delete the row and file; refused while validating or while queued/running tasks use the model."""
        from sqlalchemy import func, select

        row = self.get(model_id)
        if row.status == "VALIDATING":
            raise ApiError(ErrorCode.VALIDATION_IN_PROGRESS, f"custom model {row.name!r} is being validated")
        with self.store.read() as s:
            busy = int(s.scalar(select(func.count()).select_from(Task).where(
                Task.model.in_([row.name, row.name + "+d3"]), Task.status.in_([a.value for a in ACTIVE]))) or 0)
        if busy:
            raise ApiError(ErrorCode.MODEL_IN_USE, f"custom model {row.name!r} is used by {busy} queued or running "
                                                   "task(s); cancel them or wait", {"tasks": busy})
        self.executor.unregister_custom_model(row.name)
        deleted = self.store.delete_custom_model(model_id)
        shutil.rmtree(Path(row.path).parent, ignore_errors=True)
        return deleted

    # -------------------------------------------------------------- validation
    def start_validation(self, model_id: str) -> CustomModel:
        """Mark VALIDATING and validate in a background thread (the model runs in its own process)."""
        row = self.get(model_id)
        if not self.store.set_custom_model_status(model_id, "VALIDATING", expect=["UPLOADED", "VALIDATED", "FAILED"]):
            raise ApiError(ErrorCode.VALIDATION_IN_PROGRESS, f"custom model {row.name!r} is being validated")
        t = threading.Thread(target=self._validate, args=(model_id,), name=f"validate-{row.name}", daemon=True)
        self._threads[model_id] = t
        t.start()
        return self.get(model_id)

    def wait(self, model_id: str, timeout_s: float | None = None) -> CustomModel:
        t = self._threads.get(model_id)
        if t is not None:
            t.join(timeout_s)
        return self.get(model_id)

    def _validate(self, model_id: str) -> None:
        from matcalc.models.validation import ValidationReport, validate_model_file

        row = self.store.get_custom_model(model_id)
        try:
            report = validate_model_file(row.path, row.family, name=row.name, options=row.options or {},
                                         device=self.device, timeout_s=self.validation_timeout_s)
        except Exception as exc:  # noqa: BLE001 - recorded as a failed validation
            report = ValidationReport(model=row.name, family=row.family, passed=False,
                                      error=f"validation could not run: {type(exc).__name__}: {exc}")
        status = "VALIDATED" if report.passed else "FAILED"
        if report.passed:
            try:
                row.validation = report.to_dict()
                self._register(row)
            except Exception as exc:  # noqa: BLE001
                status = "FAILED"
                report.passed = False
                report.error = f"validated, but registering it with the executor failed: {exc}"
        else:
            self.executor.unregister_custom_model(row.name)
        self.store.set_custom_model_status(model_id, status, report.to_dict())
        self._threads.pop(model_id, None)
        log.info("custom model %s: %s (%s)", row.name, status, report.summary())

    def _register(self, row: CustomModel) -> None:
        from matcalc.models.custom import CustomModel as Spec

        self.executor.register_custom_model(Spec(row.name, row.family, row.path, row.format, row.sha256,
                                                 row.size_bytes, dict(row.options or {}), row.description,
                                                 row.validation))

    def check_runnable(self, model: str) -> None:
        """40xxx/30xxx before a task is stored: a custom model must be VALIDATED to run."""
        base = model.strip().lower().removesuffix("+d3")
        row = self.store.custom_model_by_name(base)
        if row is not None and row.status != "VALIDATED":
            raise ApiError(ErrorCode.MODEL_NOT_VALIDATED,
                           f"custom model {row.name!r} is {row.status}; only validated models run tasks "
                           f"(POST /api/v1/models/custom/{row.id}/validate)")
