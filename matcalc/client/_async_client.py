"""The asyncio surface: `AsyncClient` (``httpx.AsyncClient``) and `AsyncRemoteTask`.

Every method comes from the one core (`matcalc.client._core`) as a coroutine (log streams as
async iterators); what is here is only the transport and the closing.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

import httpx

from matcalc.client._core import ClientCore, TaskCore
from matcalc.client._io import AsyncSide
from matcalc.client._models import TaskInfo


class AsyncRemoteTask(AsyncSide, TaskCore["AsyncClient"]):
    """Handle of a task on a matcalc server, for asyncio code (``await task.result()``).

    Attribute reads never do I/O here: ``status``/``progress``/``info`` are the last snapshot;
    ``await task.refresh()`` (or `wait`) updates it. For a live progress widget use the sync
    `RemoteTask` (``Client(url).get_task(task.id)``), whose callbacks run on a
    poller thread.
    """


class AsyncClient(AsyncSide, ClientCore[AsyncRemoteTask]):
    """Asyncio client of a matcalc server: `Client`'s methods as coroutines.

    >>> async with AsyncClient("http://127.0.0.1:8000") as c:            # doctest: +SKIP
    ...     tasks = [await c.single_point(s, model="chgnet") for s in structures]
    ...     results = await asyncio.gather(*(t.result() for t in tasks))
    """

    handle_name: ClassVar[str] = "AsyncRemoteTask"

    def _connect(self, options: dict[str, Any]) -> httpx.AsyncClient:
        return httpx.AsyncClient(**options)

    def _handle(self, info: TaskInfo) -> AsyncRemoteTask:
        return AsyncRemoteTask(self, info)

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    close = aclose

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    if TYPE_CHECKING:  # the per-property methods, generated from the declarations at import
        def __getattr__(self, name: str) -> Callable[..., Coroutine[Any, Any, AsyncRemoteTask]]: ...
