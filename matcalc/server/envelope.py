"""The response envelope ``{success, code, message, data, timestamp, request_id}`` and the request id it
carries: the bottom of the server package (routes, middleware, the app and the logs build on it, it on
nothing of theirs)."""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import UTC, datetime
from typing import Any

from fastapi.responses import JSONResponse

from matcalc.server.errors import ErrorCode

log = logging.getLogger("matcalc.server.app")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("matcalc_request_id", default="-")
"""The id of the request (or ``task:ID`` in a task's thread) this context serves; ``-`` outside one."""


def envelope(code: ErrorCode, message: str, data: Any = None) -> dict[str, Any]:
    return {"success": code == ErrorCode.OK, "code": int(code), "message": message, "data": data,
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"), "request_id": request_id_var.get()}


def ok(data: Any = None, message: str = "ok") -> dict[str, Any]:
    """A success envelope around ``data``."""
    return envelope(ErrorCode.OK, message, data)


def error_response(code: ErrorCode, message: str, data: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(envelope(code, message, data), status_code=code.http_status, headers=headers)


def error_body(code: ErrorCode, message: str, data: Any = None, request_id: str | None = None) -> bytes:
    """An error envelope as JSON bytes (for raw ASGI responses)."""
    return json.dumps({**envelope(code, message, data), "request_id": request_id or request_id_var.get()}).encode()


def unexpected_error(exc: Exception) -> tuple[ErrorCode, str]:
    """Code and message for an exception no handler knew (logged with the request id)."""
    from sqlalchemy.exc import OperationalError

    if isinstance(exc, OperationalError):
        log.error("database error: %s", exc)
        return ErrorCode.DATABASE_UNAVAILABLE, "database error; retry later"
    log.error("unhandled error", exc_info=exc)
    return ErrorCode.INTERNAL_ERROR, f"internal error ({type(exc).__name__}); request id {request_id_var.get()}"
