"""The client's exceptions, mapped from the server's stable 5-digit error codes.

``MatcalcError`` → ``ValidationError`` (40xxx; also a ``ValueError``), ``NotFoundError`` (30xxx
not-found codes, and routes this server does not have), ``AuthError`` (20xxx), ``TaskFailed``
(50xxx failures; ``result()`` of a FAILED/CANCELLED/TIMEOUT task), ``ServerError`` (10xxx, HTTP 5xx,
unreachable server), ``TimeoutError`` (``wait`` ran out, or the HTTP request timed out; also a
builtin ``TimeoutError``). Each carries the server's ``message``, ``code``, ``http_status``,
``request_id`` and ``data`` (``None`` where the error arose in the client).
"""

from __future__ import annotations

import builtins
from typing import Any


class MatcalcError(Exception):
    """Base of every error the client raises.

    Attributes:
        message: the server's message (or the client's, for local errors).
        code: the server's 5-digit error code, ``None`` when the server sent none.
        http_status: HTTP status of the response, ``None`` when there was no response.
        request_id: the server's request id (quote it when reporting a problem).
        data: the envelope's ``data`` (details such as ``errors`` or ``status``).
    """

    def __init__(self, message: str, *, code: int | None = None, http_status: int | None = None,
                 request_id: str | None = None, data: Any = None) -> None:
        self.message = message
        self.code = code
        self.http_status = http_status
        self.request_id = request_id
        self.data = data
        super().__init__(message)

    def __str__(self) -> str:
        tags = [f"code {self.code}" if self.code is not None else "",
                f"HTTP {self.http_status}" if self.http_status is not None else "",
                f"request {self.request_id}" if self.request_id else ""]
        tag = ", ".join(t for t in tags if t)
        return f"{self.message} ({tag})" if tag else self.message

    def __reduce__(self) -> tuple[Any, ...]:  # picklable with its keyword-only attributes
        return (_rebuild, (type(self), self.message, self.code, self.http_status, self.request_id, self.data))


def _rebuild(cls: type[MatcalcError], message: str, code: int | None, http_status: int | None,
             request_id: str | None, data: Any) -> MatcalcError:
    return cls(message, code=code, http_status=http_status, request_id=request_id, data=data)


class ValidationError(MatcalcError, ValueError):
    """The request was invalid (40xxx): bad structure, parameter, model name, oversized upload..."""


class NotFoundError(MatcalcError, LookupError):
    """No such task, structure or model (30001-30003), or the server has no such route (30000,
    or 405 on a path that exists for other methods: an endpoint this server version lacks)."""


class AuthError(MatcalcError, PermissionError):
    """Missing or invalid API key, or rate limited (20xxx)."""


class TaskFailed(MatcalcError):
    """The task ended without a result (FAILED, CANCELLED or TIMEOUT); ``status`` says which and
    ``message`` holds the task's error."""

    @property
    def status(self) -> str | None:
        """``FAILED``, ``CANCELLED`` or ``TIMEOUT`` (when the server said)."""
        if isinstance(self.data, dict) and isinstance(self.data.get("status"), str):
            return str(self.data["status"])
        return None


class TaskStateError(MatcalcError):
    """The task is in the wrong state for the request: no result yet (50001) or already finished
    (50003)."""


class ServerError(MatcalcError):
    """The server failed (10xxx, HTTP 5xx) or could not be reached (``code`` and ``http_status``
    are ``None`` then)."""


class TimeoutError(MatcalcError, builtins.TimeoutError):  # noqa: A001 - the SDK's name, documented
    """Waiting for a task ran past its ``timeout``, or an HTTP request timed out."""


_NOT_FOUND_CODES = frozenset({30000, 30001, 30002, 30003, 30005})
_STATE_CODES = frozenset({50001, 50003})


def error_class(code: int | None, http_status: int | None) -> type[MatcalcError]:
    """The exception class for a server error ``code`` (falls back on the HTTP status)."""
    if code is not None and code > 0:
        if code in _NOT_FOUND_CODES or code == 40009:  # 40009: method not allowed = endpoint missing
            return NotFoundError
        if code in _STATE_CODES:
            return TaskStateError
        family = code // 10000
        if family == 1:
            return ServerError
        if family == 2:
            return AuthError
        if family in (3, 4):  # 30004 model unavailable here: the request's choice, like 40005
            return ValidationError
        if family == 5:
            return TaskFailed
    if http_status is None:
        return MatcalcError
    if http_status in (401, 403, 429):
        return AuthError
    if http_status in (404, 405):
        return NotFoundError
    if http_status >= 500:
        return ServerError
    if http_status >= 400:
        return ValidationError
    return MatcalcError


__all__ = [
    "AuthError",
    "MatcalcError",
    "NotFoundError",
    "ServerError",
    "TaskFailed",
    "TaskStateError",
    "TimeoutError",
    "ValidationError",
    "error_class",
]
