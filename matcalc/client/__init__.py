"""Python SDK of a matcalc server: `Client` (sync) and `AsyncClient` (asyncio), both on
httpx, with the same methods (written once, in `matcalc.client._core`; one method per declared
property, with that property's keywords); tasks come back as `RemoteTask` /
`AsyncRemoteTask` whose ``result()`` is the same result dataclass as the local function's.

>>> from matcalc.client import Client
>>> with Client("http://127.0.0.1:8000", api_key="...") as c:          # doctest: +SKIP
...     task = c.bulk_modulus("MOF-5", model="chgnet", protocol="fast")
...     mc.widgets.progress(task)          # live, like a local cluster Task
...     task.result().bulk_modulus_GPa

Errors are `MatcalcError` subclasses mapped from the server's 5-digit codes.
"""

from __future__ import annotations

from matcalc.client._async_client import AsyncClient, AsyncRemoteTask
from matcalc.client._base import RetryPolicy, StructureLike
from matcalc.client._client import Client, RemoteTask
from matcalc.client._errors import (
    AuthError,
    MatcalcError,
    NotFoundError,
    ServerError,
    TaskFailed,
    TaskStateError,
    TimeoutError,
    ValidationError,
)
from matcalc.client._models import CustomModelInfo, LogRecord, ModelInfo, Page, StructureInfo, TaskInfo
from matcalc.client._submit import TASK_OPTIONS, TaskOptions, options_markdown, task_type

__all__ = [
    "TASK_OPTIONS",
    "AsyncClient",
    "AsyncRemoteTask",
    "AuthError",
    "Client",
    "CustomModelInfo",
    "LogRecord",
    "MatcalcError",
    "ModelInfo",
    "NotFoundError",
    "Page",
    "RemoteTask",
    "RetryPolicy",
    "ServerError",
    "StructureInfo",
    "StructureLike",
    "TaskFailed",
    "TaskInfo",
    "TaskOptions",
    "TaskStateError",
    "TimeoutError",
    "ValidationError",
    "options_markdown",
    "task_type",
]
