"""ASGI middleware: request ids (``X-Request-ID`` on every response and in every log line),
the request-body size limit, and one access-log line per request."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from matcalc.server.envelope import error_body, request_id_var, unexpected_error
from matcalc.server.errors import ErrorCode

access_log = logging.getLogger("matcalc.server.access")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
REQUEST_ID_HEADER = "X-Request-ID"


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (``-`` outside a request) to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


def install_log_filter() -> None:
    """Attach `RequestIdFilter` to the root handlers (so formatters may use %(request_id)s)."""
    root = logging.getLogger()
    for h in root.handlers:
        if not any(isinstance(f, RequestIdFilter) for f in h.filters):
            h.addFilter(RequestIdFilter())


class _BodyTooLarge(Exception):
    pass


class RequestContextMiddleware:
    """Request id + body limit + access log, as one pure ASGI middleware (works with streaming bodies)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, path_limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.path_limits = dict(path_limits or {})
        """Larger (or smaller) body limits for exact paths, e.g. model uploads."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = ""
        length: int | None = None
        for k, v in scope.get("headers", []):
            if k == b"x-request-id":
                given = v.decode("latin-1")
            elif k == b"content-length":
                try:
                    length = int(v)
                except ValueError:
                    length = None
        rid = given if _VALID_ID.match(given or "") else uuid.uuid4().hex
        token = request_id_var.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        status = {"code": 0}
        started = {"sent": False}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                started["sent"] = True
                status["code"] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        received = {"n": 0}
        limit = self.path_limits.get(scope.get("path", ""), self.max_body_bytes)

        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                received["n"] += len(message.get("body", b""))
                if received["n"] > limit:
                    raise _BodyTooLarge
            return message

        try:
            if length is not None and length > limit:
                await self._too_large(send_wrapper, length, limit)
            else:
                try:
                    await self.app(scope, receive_wrapper, send_wrapper)
                except _BodyTooLarge:
                    if started["sent"]:
                        raise
                    await self._too_large(send_wrapper, received["n"], limit)
                except Exception as exc:  # answered here, inside the request's context (request id)
                    if started["sent"]:
                        raise
                    code, message = unexpected_error(exc)
                    body = error_body(code, message)
                    await send_wrapper({"type": "http.response.start", "status": code.http_status,
                                        "headers": [(b"content-type", b"application/json"),
                                                    (b"content-length", str(len(body)).encode())]})
                    await send_wrapper({"type": "http.response.body", "body": body})
        finally:
            dt = time.perf_counter() - t0
            access_log.info("%s %s %s %.1f ms", scope.get("method"), scope.get("path"), status["code"], dt * 1e3,
                            extra={"request_id": rid, "status": status["code"], "duration_s": dt})
            request_id_var.reset(token)

    @staticmethod
    async def _too_large(send: Send, size: int, limit: int) -> None:
        limit_mb = limit / 1024 / 1024
        body = error_body(ErrorCode.PAYLOAD_TOO_LARGE,
                          f"request body of {size} bytes or more exceeds the upload limit of {limit_mb:g} MB",
                          {"max_bytes": limit})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
