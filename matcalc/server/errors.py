"""Stable 5-digit error codes and the exception the routes raise.

Ranges: 10xxx system, 20xxx auth, 30xxx resource, 40xxx request, 50xxx task. A code never
changes meaning; new ones are appended. Rule of thumb: an id in the *path* that does not exist is
a 30xxx/404; a bad value in the *body or query* (including an unknown id or model named there)
is a 40xxx/4xx and changes nothing stored.
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.IntEnum):
    """``code -> (HTTP status, description)`` via `http_status` / `description`."""

    OK = 0
    # 10xxx system
    INTERNAL_ERROR = 10000
    DATABASE_UNAVAILABLE = 10001
    EXECUTOR_UNAVAILABLE = 10002
    SHUTTING_DOWN = 10003
    # 20xxx auth
    API_KEY_MISSING = 20001
    API_KEY_INVALID = 20002
    RATE_LIMITED = 20003
    ADMIN_REQUIRED = 20004
    # 30xxx resource
    NOT_FOUND = 30000
    TASK_NOT_FOUND = 30001
    MODEL_NOT_FOUND = 30002
    STRUCTURE_NOT_FOUND = 30003
    MODEL_UNAVAILABLE = 30004
    CUSTOM_MODEL_NOT_FOUND = 30005
    MODEL_NOT_VALIDATED = 30006
    MODEL_IN_USE = 30007
    VALIDATION_IN_PROGRESS = 30008
    MODEL_NAME_TAKEN = 30009
    # 40xxx request
    VALIDATION_ERROR = 40001
    INVALID_STRUCTURE = 40002
    PAYLOAD_TOO_LARGE = 40003
    TOO_MANY_ATOMS = 40004
    UNKNOWN_MODEL = 40005
    UNSUPPORTED_FORMAT = 40006
    UNKNOWN_STRUCTURE = 40007
    MALFORMED_JSON = 40008
    METHOD_NOT_ALLOWED = 40009
    BATCH_TOO_LARGE = 40010
    INVALID_PARAMETER = 40011
    UNSUPPORTED_MEDIA_TYPE = 40012
    MODEL_FILE_UNSAFE = 40013
    MODEL_FILE_INVALID = 40014
    UNSUPPORTED_MODEL_FORMAT = 40015
    INVALID_HEADER = 40016
    IDEMPOTENCY_KEY_REUSED = 40017
    # 50xxx task
    TASK_NOT_FINISHED = 50001
    TASK_FAILED = 50002
    TASK_ALREADY_FINISHED = 50003
    TASK_CANCELLED = 50004
    TASK_TIMED_OUT = 50005

    @property
    def http_status(self) -> int:
        return _HTTP[self]

    @property
    def description(self) -> str:
        return _DESCRIPTION[self]


_HTTP: dict[ErrorCode, int] = {
    ErrorCode.OK: 200,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.DATABASE_UNAVAILABLE: 503,
    ErrorCode.EXECUTOR_UNAVAILABLE: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.API_KEY_MISSING: 401,
    ErrorCode.API_KEY_INVALID: 401,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.ADMIN_REQUIRED: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.TASK_NOT_FOUND: 404,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.STRUCTURE_NOT_FOUND: 404,
    ErrorCode.MODEL_UNAVAILABLE: 409,
    ErrorCode.CUSTOM_MODEL_NOT_FOUND: 404,
    ErrorCode.MODEL_NOT_VALIDATED: 409,
    ErrorCode.MODEL_IN_USE: 409,
    ErrorCode.VALIDATION_IN_PROGRESS: 409,
    ErrorCode.VALIDATION_ERROR: 422,
    ErrorCode.INVALID_STRUCTURE: 422,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.TOO_MANY_ATOMS: 422,
    ErrorCode.UNKNOWN_MODEL: 422,
    ErrorCode.UNSUPPORTED_FORMAT: 422,
    ErrorCode.UNKNOWN_STRUCTURE: 422,
    ErrorCode.MALFORMED_JSON: 400,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.BATCH_TOO_LARGE: 422,
    ErrorCode.INVALID_PARAMETER: 422,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.MODEL_NAME_TAKEN: 409,
    ErrorCode.MODEL_FILE_UNSAFE: 422,
    ErrorCode.MODEL_FILE_INVALID: 422,
    ErrorCode.UNSUPPORTED_MODEL_FORMAT: 422,
    ErrorCode.INVALID_HEADER: 400,
    ErrorCode.IDEMPOTENCY_KEY_REUSED: 422,
    ErrorCode.TASK_NOT_FINISHED: 409,
    ErrorCode.TASK_FAILED: 409,
    ErrorCode.TASK_ALREADY_FINISHED: 409,
    ErrorCode.TASK_CANCELLED: 409,
    ErrorCode.TASK_TIMED_OUT: 409,
}

_DESCRIPTION: dict[ErrorCode, str] = {
    ErrorCode.OK: "success",
    ErrorCode.INTERNAL_ERROR: "unexpected server error (see the server log with the request id)",
    ErrorCode.DATABASE_UNAVAILABLE: "the database cannot be reached",
    ErrorCode.EXECUTOR_UNAVAILABLE: "the executor (cluster) is not available",
    ErrorCode.SHUTTING_DOWN: "the server is shutting down and accepts no new tasks",
    ErrorCode.API_KEY_MISSING: "the X-API-Key header is required",
    ErrorCode.API_KEY_INVALID: "the X-API-Key is not valid",
    ErrorCode.RATE_LIMITED: "too many requests for this key; retry after the Retry-After seconds",
    ErrorCode.ADMIN_REQUIRED: "the endpoint needs an admin API key",
    ErrorCode.NOT_FOUND: "no such route",
    ErrorCode.TASK_NOT_FOUND: "no task with that id",
    ErrorCode.MODEL_NOT_FOUND: "no model with that name",
    ErrorCode.STRUCTURE_NOT_FOUND: "no structure with that id",
    ErrorCode.MODEL_UNAVAILABLE: "the model is registered but cannot load here",
    ErrorCode.CUSTOM_MODEL_NOT_FOUND: "no custom model with that id",
    ErrorCode.MODEL_NOT_VALIDATED: "the custom model has not passed validation; only validated models run tasks",
    ErrorCode.MODEL_IN_USE: "queued or running tasks use the model",
    ErrorCode.VALIDATION_IN_PROGRESS: "the custom model is being validated",
    ErrorCode.VALIDATION_ERROR: "the request does not match the schema (details in data.errors)",
    ErrorCode.INVALID_STRUCTURE: "the structure could not be read or failed validation",
    ErrorCode.PAYLOAD_TOO_LARGE: "the request body exceeds the upload limit",
    ErrorCode.TOO_MANY_ATOMS: "the structure has more atoms than the server accepts",
    ErrorCode.UNKNOWN_MODEL: "the request names a model that is not registered",
    ErrorCode.UNSUPPORTED_FORMAT: "the structure format is not supported",
    ErrorCode.UNKNOWN_STRUCTURE: "the request names a structure id or builtin that does not exist",
    ErrorCode.MALFORMED_JSON: "the body is not valid JSON",
    ErrorCode.METHOD_NOT_ALLOWED: "method not allowed on this route",
    ErrorCode.BATCH_TOO_LARGE: "the batch holds more tasks than the server accepts",
    ErrorCode.INVALID_PARAMETER: "a calculation parameter is invalid",
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: "unsupported content type",
    ErrorCode.MODEL_NAME_TAKEN: "a model with that name exists",
    ErrorCode.MODEL_FILE_UNSAFE: "the model file would run code when loaded (a pickle of arbitrary objects)",
    ErrorCode.MODEL_FILE_INVALID: "the model file is empty, corrupt or truncated",
    ErrorCode.UNSUPPORTED_MODEL_FORMAT: "the model file's format is not accepted for that family",
    ErrorCode.INVALID_HEADER: "a request header has an invalid value (e.g. Last-Event-ID not a log id)",
    ErrorCode.IDEMPOTENCY_KEY_REUSED: "the Idempotency-Key was used before for a different request (another "
                                      "endpoint or body); use a new key for a new request",
    ErrorCode.TASK_NOT_FINISHED: "the task has no result yet",
    ErrorCode.TASK_FAILED: "the task failed; see its error",
    ErrorCode.TASK_ALREADY_FINISHED: "the task has already finished",
    ErrorCode.TASK_CANCELLED: "the task was cancelled",
    ErrorCode.TASK_TIMED_OUT: "the task timed out",
}


class ApiError(Exception):
    """An error the API reports in the envelope with its code and HTTP status."""

    def __init__(self, code: ErrorCode, message: str | None = None, data: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        self.code = code
        self.message = message or code.description
        self.data = data
        self.headers = headers
        super().__init__(self.message)

    @property
    def http_status(self) -> int:
        return self.code.http_status


def error_table() -> list[dict[str, Any]]:
    """Every code with its name, HTTP status and description (documented in the OpenAPI info)."""
    return [{"code": int(c), "name": c.name, "http_status": c.http_status, "description": c.description}
            for c in ErrorCode if c != ErrorCode.OK]
