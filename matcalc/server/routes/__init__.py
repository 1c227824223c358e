"""Routers, one module per resource."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from matcalc.server.schemas import ErrorEnvelope

_DESCRIPTIONS = {
    400: "malformed request (40xxx)",
    401: "missing or invalid API key (20001/20002)",
    403: "the endpoint needs an admin API key (20004)",
    404: "no such resource (30xxx)",
    409: "conflict with the resource's state (30xxx/50xxx)",
    413: "body exceeds the upload limit (40003)",
    415: "unsupported content type (40012)",
    422: "invalid request (40xxx; details in data.errors)",
    429: "rate limit exceeded (20003, see Retry-After)",
    500: "internal error (10000)",
    503: "database, executor or server not available (10xxx)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorEnvelope, "description": _DESCRIPTIONS[s]} for s in statuses}


COMMON_ERRORS = error_responses(400, 401, 413, 422, 429, 500, 503)


def service(request: Request) -> Any:
    return request.app.state.service


def store(request: Request) -> Any:
    return request.app.state.store
