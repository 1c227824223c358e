"""The FastAPI application: ``create_app(settings)``.

Everything under ``/api/v1``; OpenAPI at ``/openapi.json``, ``/docs`` and ``/redoc``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import matcalc
from matcalc.server.auth import RateLimiter
from matcalc.server.config import Settings
from matcalc.server.custom_models import CustomModelService
from matcalc.server.envelope import envelope, error_response
from matcalc.server.errors import ApiError, ErrorCode, error_table
from matcalc.server.events import EventBus
from matcalc.server.executor import Executor
from matcalc.server.metrics import MetricsMiddleware
from matcalc.server.middleware import RequestContextMiddleware, install_log_filter
from matcalc.server.observability import Observability
from matcalc.server.pool import make_executor
from matcalc.server.service import TaskService
from matcalc.store import Store

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"

DESCRIPTION = """Materials properties with universal ML interatomic potentials, over REST.

Every response is an envelope `{success, code, message, data, timestamp, request_id}`. Errors carry
a stable 5-digit `code`: 10xxx system, 20xxx auth, 30xxx resource, 40xxx request, 50xxx task.
Send `X-API-Key` when the server has keys configured. Every response has an `X-Request-ID`.
"""


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",))
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def _allowed_methods(request: Request) -> list[str]:
    """Methods the OpenAPI document lists for this path; a literal path wins over templated ones
    (``/tasks/batch`` is POST only, although ``/tasks/{task_id}`` would match it too)."""
    import re

    table = getattr(request.app.state, "allowed_methods", None)
    if table is None:
        table = [(path, re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(path)) + "$"),
                  sorted(m.upper() for m in ops if m in ("get", "post", "put", "patch", "delete")))
                 for path, ops in request.app.openapi().get("paths", {}).items()]
        request.app.state.allowed_methods = table
    path = request.scope["path"]
    exact = [methods for literal, _, methods in table if literal == path]
    if exact:
        return sorted(set(exact[0]))
    return sorted({m for _, regex, methods in table if regex.match(path) for m in methods})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        if exc.code.http_status >= 500:
            log.error("%s: %s", exc.code.name, exc.message)
        return error_response(exc.code, exc.message, exc.data, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg")), "type": str(e.get("type"))}
                  for e in exc.errors()]
        if any(e["type"] == "json_invalid" for e in errors):
            return error_response(ErrorCode.MALFORMED_JSON, "malformed JSON body: " + _validation_message(errors),
                                  {"errors": errors})
        return error_response(ErrorCode.VALIDATION_ERROR, _validation_message(errors), {"errors": errors})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        unparsable = _unparsable_body(request, exc)
        if unparsable is not None:
            return error_response(ErrorCode.MALFORMED_JSON, unparsable)
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED,
                415: ErrorCode.UNSUPPORTED_MEDIA_TYPE, 413: ErrorCode.PAYLOAD_TOO_LARGE,
                400: ErrorCode.VALIDATION_ERROR, 422: ErrorCode.VALIDATION_ERROR}.get(exc.status_code)
        if code is None:
            code = ErrorCode.INTERNAL_ERROR if exc.status_code >= 500 else ErrorCode.VALIDATION_ERROR
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # list every method of every route on this path, not just the first match
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return JSONResponse(envelope(code, str(exc.detail)), status_code=exc.status_code, headers=headers or None)


def _unparsable_body(request: Request, exc: StarletteHTTPException) -> str | None:
    """The message for a JSON body FastAPI could not even decode (its 400 "error parsing the body"):
    invalid UTF-8, nesting too deep for the parser; ``None`` for any other error."""
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None:
        return None
    if isinstance(cause, UnicodeDecodeError):
        return f"malformed JSON body: not valid UTF-8 ({cause.reason} at byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "malformed JSON body: nested too deeply"
    content_type = request.headers.get("content-type", "")
    if not content_type or "json" in content_type.split(";")[0]:
        return f"malformed JSON body: {type(cause).__name__}: {cause}"
    return None


def create_app(settings: Settings | None = None, *, executor: Executor | None = None) -> FastAPI:
    """The matcalc REST application. The store is opened (and migrated) and the executor started
    in the app's lifespan; unfinished tasks from a previous run are requeued then."""
    settings = settings or Settings()
    settings.check_security()
    install_log_filter()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import anyio.to_thread

        from matcalc.models import load_plugins

        for plugin in await anyio.to_thread.run_sync(load_plugins):  # before anything looks a model up
            if not plugin.loaded:
                log.error("model plugin %s failed to import: %s", plugin.name, plugin.error)
        store = Store(settings.db_url)
        ex = executor or make_executor(settings)
        service = TaskService(store, ex, max_atoms=settings.max_atoms, max_batch=settings.max_batch,
                              default_timeout_s=settings.default_timeout_s,
                              progress_interval_s=settings.progress_interval_s, bus=app.state.bus,
                              max_crashes=settings.max_crashes)
        app.state.store = store
        app.state.service = service
        app.state.custom_models = CustomModelService(
            store, ex, settings.custom_models_path, max_bytes=settings.max_model_upload_bytes, device=settings.device,
            validation_timeout_s=settings.validation_timeout_s)
        service.custom_models = app.state.custom_models
        obs: Observability = app.state.observability
        service.observer = obs
        obs.install_logging()
        await anyio.to_thread.run_sync(obs.start, store, service)
        n = await anyio.to_thread.run_sync(service.start)
        n_custom = await anyio.to_thread.run_sync(app.state.custom_models.start)
        if n_custom:
            log.info("registered %d validated custom model(s)", n_custom)
        log.info("matcalc server ready (executor %s, %d task(s) requeued, db %s)", ex.name, n,
                 settings.redacted()["db_url"] or "default")
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(service.shutdown, settings.shutdown_timeout_s)
            await anyio.to_thread.run_sync(obs.stop)
            store.close()
            log.info("matcalc server stopped")

    app = FastAPI(
        title="matcalc",
        version=matcalc.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url="/redoc",
        openapi_tags=[{"name": "tasks"}, {"name": "structures"}, {"name": "models"}, {"name": "system"}],
        generate_unique_id_function=lambda route: route.name,  # operationId = the function's name
    )
    app.state.settings = settings
    app.state.bus = EventBus()
    app.state.observability = Observability(settings)
    app.state.metrics = app.state.observability.metrics
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
    app.state.error_codes = error_table()
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_upload_bytes,
                       path_limits={f"{API_PREFIX}/models/custom": settings.max_model_upload_bytes + 1024 * 1024})
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)

    from matcalc.server.routes import custom_models, models, observability, structures, system, tasks

    # custom_models before models: /models/custom must not be read as a model named "custom"
    for module in (tasks, structures, custom_models, models, system, observability):
        app.include_router(module.router, prefix=API_PREFIX)
    app.include_router(observability.metrics_router)
    return app
