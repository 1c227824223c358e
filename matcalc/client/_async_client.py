"""The asyncio client (``httpx.AsyncClient``) and :class:`AsyncRemoteTask` — the twin of
:mod:`matcalc.client._client` with awaitable methods and async iterators."""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Unpack

import httpx

from matcalc.client._base import (
    ApiRequest,
    BaseClient,
    Optimizer,
    SSEDecoder,
    StructureLike,
    TaskOptions,
    parse_response,
    route_missing,
    transport_error,
)
from matcalc.client._errors import MatcalcError, TaskFailed, TaskStateError
from matcalc.client._errors import TimeoutError as ClientTimeout
from matcalc.client._models import CustomModelInfo, LogRecord, ModelInfo, Page, StructureInfo, TaskInfo

if TYPE_CHECKING:
    from matcalc.calculations.results import Result

log = logging.getLogger("matcalc.client")


class AsyncRemoteTask:
    """Handle of a task on a matcalc server, for asyncio code (``await task.result()``).

    Attribute reads never do I/O here: ``status``/``progress``/``info`` are the last snapshot;
    ``await task.refresh()`` (or :meth:`wait`) updates it. For a live progress widget use the sync
    :class:`~matcalc.client.RemoteTask` (``Client(url).get_task(task.id)``), whose callbacks run on a
    poller thread.
    """

    def __init__(self, client: AsyncClient, info: TaskInfo) -> None:
        self._client = client
        self.id = info.id
        self._info = info
        self._result: Result | None = None

    @property
    def info(self) -> TaskInfo:
        """The last snapshot fetched from the server."""
        return self._info

    @property
    def status(self) -> str:
        """Status of the last snapshot (``await refresh()`` for a fresh one)."""
        return self._info.status

    @property
    def progress(self) -> dict[str, Any] | None:
        """Latest progress event of the last snapshot."""
        return self._info.progress

    @property
    def error(self) -> str | None:
        return self._info.error

    def done(self) -> bool:
        """The last snapshot is terminal."""
        return self._info.done

    async def refresh(self) -> TaskInfo:
        """Fetch the task from the server (terminal snapshots are final and not fetched again)."""
        if not self._info.done:
            self._info = await self._client._get_task_info(self.id)
        return self._info

    async def wait(self, timeout: float | None = None, poll: float = 1.0) -> TaskInfo:
        """Poll every ``poll`` s until the task finishes; the final snapshot. Raises
        :class:`matcalc.client.TimeoutError` after ``timeout`` s (the task goes on)."""
        if poll <= 0:
            raise ValueError(f"poll must be > 0 seconds, got {poll!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = await self.refresh()
            if info.done:
                return info
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ClientTimeout(f"task {self.id} not finished after {timeout} s (status {info.status})",
                                    data={"status": info.status})
            await asyncio.sleep(poll if left is None else min(poll, left))

    async def result(self, timeout: float | None = None, poll: float = 1.0) -> Result:
        """Wait and return the result dataclass; :class:`TaskFailed` unless COMPLETED."""
        if self._result is not None:
            return self._result
        info = await self.wait(timeout, poll)
        if info.status != "COMPLETED":
            raise await self._failure(info)
        self._result = await self._client._fetch_result(self.id)
        return self._result

    async def _failure(self, info: TaskInfo) -> TaskFailed:
        try:
            await self._client._fetch_result(self.id)
        except TaskFailed as exc:
            return exc
        except TaskStateError as exc:
            return TaskFailed(exc.message, code=exc.code, http_status=exc.http_status, request_id=exc.request_id,
                              data={"status": info.status, "error": info.error})
        return TaskFailed(f"task {self.id} is {info.status}: {info.error}", data={"status": info.status})

    async def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait; the :class:`TaskFailed` that :meth:`result` would raise, or ``None``."""
        info = await self.wait(timeout)
        return None if info.status == "COMPLETED" else await self._failure(info)

    async def cancel(self) -> bool:
        """Cancel the task; False when it had already finished."""
        ok = await self._client.cancel(self.id)
        if ok:
            try:
                await self.refresh()
            except MatcalcError:
                log.debug("refresh after cancel failed", exc_info=True)
        return ok

    async def logs(self, level: str | None = None, limit: int = 1000, after: int | None = None) -> list[LogRecord]:
        """Stored log records (oldest first); see :meth:`RemoteTask.logs`."""
        return await self._client._task_logs(self.id, level, limit, after)

    def stream_logs(self, level: str | None = None, poll: float = 1.0,
                    read_timeout_s: float | None = None) -> AsyncIterator[LogRecord]:
        """``async for record in task.stream_logs()``: the backlog, then live lines until the task
        ends (SSE; polling ``/logs?after=`` on a server without the stream)."""
        return self._client._stream_logs(self.id, level, poll, read_timeout_s)

    def __repr__(self) -> str:
        return f"<AsyncRemoteTask {self.id} {self._info.type}/{self._info.model} {self._info.status}>"

    @builtins.property
    def property(self) -> str:
        """The local function's name (``relax``...)."""
        return self._info.property


class AsyncClient(BaseClient):
    """Asyncio client of a matcalc server: :class:`~matcalc.client.Client`'s methods as coroutines.

    >>> async with AsyncClient("http://127.0.0.1:8000") as c:            # doctest: +SKIP
    ...     tasks = [await c.single_point(s, model="chgnet") for s in structures]
    ...     results = await asyncio.gather(*(t.result() for t in tasks))
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0, retries: int = 3, *,
                 backoff_s: float = 0.5, max_backoff_s: float = 8.0, poll_interval: float = 1.0,
                 headers: Mapping[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, timeout, retries, backoff_s=backoff_s, max_backoff_s=max_backoff_s,
                         poll_interval=poll_interval, headers=headers)
        self._http = httpx.AsyncClient(base_url=self.base_url + "/", headers=self._headers, timeout=self.timeout,
                                       transport=transport)

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    close = aclose

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def _send(self, req: ApiRequest) -> Any:
        attempt = 0
        while True:
            try:
                response = await self._http.send(req.build(self._http))
            except httpx.TransportError as exc:
                if self.retry.retry_error(req, exc, attempt):
                    delay = self.retry.delay(attempt)
                    log.info("%s %s: %r; retry %d in %.2f s", req.method, req.path, exc, attempt + 1, delay)
                    await asyncio.sleep(delay)
                    attempt += 1
                    continue
                raise transport_error(exc, req, attempt + 1) from exc
            if self.retry.retry_response(req, response, attempt):
                delay = self.retry.delay(attempt, response)
                log.info("%s %s: HTTP %d; retry %d in %.2f s", req.method, req.path, response.status_code,
                         attempt + 1, delay)
                await response.aclose()
                await asyncio.sleep(delay)
                attempt += 1
                continue
            return parse_response(response)

    def _task(self, data: Any) -> AsyncRemoteTask:
        return AsyncRemoteTask(self, self._p_task(data))

    async def _get_task_info(self, task_id: str) -> TaskInfo:
        return self._p_task(await self._send(self._r_get_task(task_id)))

    async def _fetch_result(self, task_id: str) -> Result:
        result: Result = self._p_result(await self._send(self._r_result(task_id)))
        return result

    async def _task_logs(self, task_id: str, level: str | None, limit: int, after: int | None) -> list[LogRecord]:
        return self._p_logs(await self._send(self._r_logs(task_id, level, limit, after)))

    async def _stream_logs(self, task_id: str, level: str | None, poll: float,
                           read_timeout_s: float | None) -> AsyncIterator[LogRecord]:
        req = self._r_stream(task_id, level, None)
        timeout = httpx.Timeout(self.timeout, read=read_timeout_s)
        last_id: int | None = None
        try:
            async with self._http.stream(req.method, req.path.lstrip("/"), params=req.params,
                                         headers=dict(req.headers), timeout=timeout) as response:
                if response.status_code != 200 or "text/event-stream" not in response.headers.get("content-type", ""):
                    await response.aread()
                    parse_response(response)
                    raise TaskStateError(f"GET {req.path}: not an event stream "
                                         f"({response.headers.get('content-type')})")
                decoder = SSEDecoder()
                async for line in response.aiter_lines():
                    record = decoder.feed(line)
                    if record is not None:
                        rec = LogRecord.from_json(record)
                        last_id = rec.id if rec.id is not None else last_id
                        yield rec
                    if decoder.ended:
                        return
                tail = decoder.flush()
                if tail is not None:
                    yield LogRecord.from_json(tail)
            # the stream closed without its end: resume by polling when the task goes on
            if last_id is None or (await self._get_task_info(task_id)).done:
                return
            log.info("log stream of %s closed early; polling from record %d", task_id, last_id)
        except MatcalcError as exc:
            if not route_missing(exc):
                raise
            log.info("server has no log stream; polling %s/logs every %g s", task_id, poll)
        except httpx.TransportError as exc:
            raise transport_error(exc, req, 1) from exc
        async for rec in self._poll_logs(task_id, level, poll, last_id):
            yield rec

    async def _poll_logs(self, task_id: str, level: str | None, poll: float,
                         after: int | None) -> AsyncIterator[LogRecord]:
        if poll <= 0:
            raise ValueError(f"poll must be > 0 seconds, got {poll!r}")
        while True:
            finished = (await self._get_task_info(task_id)).done
            while True:
                batch = await self._task_logs(task_id, level, 1000, after)
                for rec in batch:
                    if rec.id is not None:
                        after = rec.id
                    yield rec
                if len(batch) < 1000:
                    break
            if finished:
                return
            await asyncio.sleep(poll)

    # ------------------------------------------------------------------ task submission
    async def optimization(self, structure: StructureLike, model: str = "chgnet", *, fmax: float | None = None,
                           max_steps: int | None = None, optimizer: Optimizer | None = None,
                           relax_cell: bool | None = None, fixed_atoms: Sequence[int] | Sequence[bool] | None = None,
                           **options: Unpack[TaskOptions]) -> AsyncRemoteTask:
        """Submit a relaxation; see :meth:`Client.optimization`."""
        params = {"fmax": fmax, "max_steps": max_steps, "optimizer": optimizer, "relax_cell": relax_cell,
                  "fixed_atoms": fixed_atoms, **options}
        return self._task(await self._send(self._r_submit("optimization", structure, model, params)))

    relax = optimization

    async def single_point(self, structure: StructureLike, model: str = "chgnet",
                           **options: Unpack[TaskOptions]) -> AsyncRemoteTask:
        """Submit energy, forces and stress; see :meth:`Client.single_point`."""
        return self._task(await self._send(self._r_submit("single-point", structure, model, dict(options))))

    async def bulk_modulus(self, structure: StructureLike, model: str = "chgnet", *, strain: float | None = None,
                           n_points: int | None = None,
                           eos: Literal["birchmurnaghan", "murnaghan", "vinet", "sj"] | None = None,
                           relax_first: bool | None = None, fmax: float | None = None,
                           relax_max_steps: int | None = None, relax_optimizer: Optimizer | None = None,
                           fixed_cell_max_steps: int | None = None, fixed_cell_optimizer: Optimizer | None = None,
                           **options: Unpack[TaskOptions]) -> AsyncRemoteTask:
        """Submit an equation-of-state fit; see :meth:`Client.bulk_modulus`."""
        params = {"strain": strain, "n_points": n_points, "eos": eos, "relax_first": relax_first, "fmax": fmax,
                  "relax_max_steps": relax_max_steps, "relax_optimizer": relax_optimizer,
                  "fixed_cell_max_steps": fixed_cell_max_steps, "fixed_cell_optimizer": fixed_cell_optimizer,
                  **options}
        return self._task(await self._send(self._r_submit("bulk-modulus", structure, model, params)))

    async def heat_capacity(self, structure: StructureLike, model: str = "chgnet", *,
                            supercell: Sequence[int] | None = None, displacement: float | None = None,
                            mesh: float | Sequence[int] | None = None, t_min: float | None = None,
                            t_max: float | None = None, t_step: float | None = None,
                            relax_first: bool | None = None, fmax: float | None = None,
                            relax_max_steps: int | None = None, relax_optimizer: Optimizer | None = None,
                            **options: Unpack[TaskOptions]) -> AsyncRemoteTask:
        """Submit phonons and thermal properties; see :meth:`Client.heat_capacity`."""
        params = {"supercell": supercell, "displacement": displacement,
                  "mesh": float(mesh) if isinstance(mesh, int) else mesh, "t_min": t_min,
                  "t_max": t_max, "t_step": t_step, "relax_first": relax_first, "fmax": fmax,
                  "relax_max_steps": relax_max_steps, "relax_optimizer": relax_optimizer, **options}
        return self._task(await self._send(self._r_submit("heat-capacity", structure, model, params)))

    async def stability(self, structure: StructureLike, model: str = "chgnet", *,
                        temperature_K: float | None = None, timestep_fs: float | None = None,
                        nvt_steps: int | None = None, npt_steps: int | None = None,
                        pressure_bar: float | None = None, friction_per_fs: float | None = None,
                        tdamp_fs: float | None = None, pdamp_fs: float | None = None,
                        ensemble: Literal["nvt", "npt"] | None = None, interval: int | None = None,
                        seed: int | None = None, relax_first: bool | None = None, fmax: float | None = None,
                        relax_max_steps: int | None = None, **options: Unpack[TaskOptions]) -> AsyncRemoteTask:
        """Submit an MD stability run; see :meth:`Client.stability`."""
        params = {"temperature_K": temperature_K, "timestep_fs": timestep_fs, "nvt_steps": nvt_steps,
                  "npt_steps": npt_steps, "pressure_bar": pressure_bar, "friction_per_fs": friction_per_fs,
                  "tdamp_fs": tdamp_fs, "pdamp_fs": pdamp_fs, "ensemble": ensemble, "interval": interval,
                  "seed": seed, "relax_first": relax_first, "fmax": fmax, "relax_max_steps": relax_max_steps,
                  **options}
        return self._task(await self._send(self._r_submit("stability", structure, model, params)))

    async def interaction_energy(self, structure: StructureLike, model: str = "chgnet", *, guest: Any = None,
                                 guest_indices: Sequence[int] | None = None, guest_tag: int | None = None,
                                 position: Sequence[float] | None = None, box_A: float | None = None,
                                 **options: Unpack[TaskOptions]) -> AsyncRemoteTask:
        """Submit a host-guest interaction energy; see :meth:`Client.interaction_energy`."""
        params = {"guest": guest, "guest_indices": guest_indices, "guest_tag": guest_tag, "position": position,
                  "box_A": box_A, **options}
        return self._task(await self._send(self._r_submit("interaction-energy", structure, model, params)))

    async def submit(self, kind: str, structure: StructureLike, model: str = "chgnet",
                     **params: Any) -> AsyncRemoteTask:
        """Submit any task type by name."""
        return self._task(await self._send(self._r_submit(kind, structure, model, params)))

    async def submit_batch(self, specs: Iterable[Mapping[str, Any]]) -> list[AsyncRemoteTask]:
        """Submit many tasks atomically; see :meth:`Client.submit_batch`."""
        return [AsyncRemoteTask(self, t) for t in self._p_batch(await self._send(self._r_batch(specs)))]

    # ------------------------------------------------------------------ tasks
    async def get_task(self, task_id: str) -> AsyncRemoteTask:
        return AsyncRemoteTask(self, await self._get_task_info(task_id))

    async def list_tasks(self, *, status: str | Iterable[str] | None = None, type: str | None = None,  # noqa: A002
                         model: str | None = None, priority: str | None = None, batch_id: str | None = None,
                         created_after: datetime | str | None = None, created_before: datetime | str | None = None,
                         page: int = 1, page_size: int = 50) -> Page[AsyncRemoteTask]:
        p = self._p_tasks(await self._send(self._r_list_tasks(status, type, model, priority, batch_id, created_after,
                                                              created_before, page, page_size)))
        return Page([AsyncRemoteTask(self, t) for t in p.items], p.total, p.page, p.page_size)

    async def cancel(self, task_id: str) -> bool:
        try:
            data = await self._send(self._r_cancel(task_id))
        except TaskStateError as exc:
            if exc.code == 50003:
                return False
            raise
        return bool(data.get("cancelled", True)) if isinstance(data, dict) else True

    # ------------------------------------------------------------------ structures
    async def upload_structure(self, structure: StructureLike, *, name: str | None = None,
                               format: str | None = None) -> StructureInfo:  # noqa: A002
        return self._p_structure(await self._send(self._r_upload_structure(structure, name, format)))

    async def list_structures(self, *, page: int = 1, page_size: int = 50,
                              source: str | None = None) -> Page[StructureInfo]:
        return self._p_structures(await self._send(self._r_list_structures(page, page_size, source)))

    async def get_structure(self, structure_id: str) -> StructureInfo:
        return self._p_structure(await self._send(self._r_get_structure(structure_id)))

    async def builtin_structures(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = await self._send(ApiRequest.get("/structures/builtin"))
        return data

    # ------------------------------------------------------------------ models
    async def list_models(self, *, include_d3: bool = True) -> list[ModelInfo]:
        return self._p_models(await self._send(self._r_list_models(include_d3)))

    async def get_model(self, name: str) -> ModelInfo:
        return self._p_model(await self._send(self._r_model(name)))

    async def load_model(self, name: str) -> ModelInfo:
        return self._p_model(await self._send(self._r_model(name, "load")))

    async def unload_model(self, name: str) -> bool:
        data = await self._send(self._r_model(name, "unload"))
        return bool(data.get("unloaded")) if isinstance(data, dict) else False

    async def upload_model(self, path: str | os.PathLike[str], *, name: str, family: str,
                     format: str | None = None, description: str = "", options: Mapping[str, Any] | None = None,
                     validate: bool = False, timeout: float | None = None, poll: float = 1.0) -> CustomModelInfo:
        """Upload a model file (TorchScript, or the family's weights-only checkpoint) under ``name``.

        ``options`` go to the family loader (e.g. ``dtype``, ``elements``, ``cutoff_A``). The model runs
        tasks only once validated: pass ``validate=True`` to validate at once and wait (see
        :meth:`validate_model`). Refused files raise :class:`ValidationError` (unsafe, corrupt, wrong format).
        """
        meta = {"format": format, "description": description or None, "options": dict(options) if options else None}
        req, fh = self._r_upload_model(path, name, family, meta)
        try:
            info = self._p_custom(await self._send(req))
        finally:
            fh.close()
        if validate:
            info = await self.validate_model(info.id, timeout=timeout, poll=poll)
        return info

    async def list_custom_models(self) -> list[CustomModelInfo]:
        """Uploaded models with their status and last validation report."""
        return self._p_customs(await self._send(self._r_custom()))

    async def get_custom_model(self, model_id: str) -> CustomModelInfo:
        return self._p_custom(await self._send(self._r_custom(model_id)))

    async def validate_model(self, model_id: str, *, wait: bool = True, timeout: float | None = None,
                       poll: float = 1.0) -> CustomModelInfo:
        """Validate an uploaded model on the server (in an isolated process: finite results, forces =
        -dE/dx, stress = dE/dstrain, rotation invariance, batch = one by one). With ``wait``, poll every
        ``poll`` s until it is VALIDATED or FAILED (:class:`TimeoutError` after ``timeout`` s)."""
        if poll <= 0:
            raise ValueError(f"poll must be > 0 seconds, got {poll!r}")
        info = self._p_custom(await self._send(self._r_custom(model_id, "validate", "POST")))
        deadline = None if timeout is None else time.monotonic() + timeout
        while wait and info.status == "VALIDATING":
            if deadline is not None and time.monotonic() >= deadline:
                raise ClientTimeout(f"model {info.name} still validating after {timeout} s",
                                    data={"status": info.status})
            await asyncio.sleep(poll)
            info = await self.get_custom_model(model_id)
        return info

    async def delete_model(self, model_id: str) -> CustomModelInfo:
        """Delete an uploaded model and its file (refused while queued or running tasks use it)."""
        return self._p_custom(await self._send(self._r_custom(model_id, method="DELETE")))

    # ------------------------------------------------------------------ system
    async def health(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = await self._send(self._r_system("health"))
        except MatcalcError as exc:
            if exc.http_status == 503 and isinstance(exc.data, dict) and "ready" in exc.data:
                return exc.data
            raise
        return data

    async def system_status(self) -> dict[str, Any]:
        queue: dict[str, Any] = await self._send(self._r_system("queue"))
        return {"health": await self.health(), "queue": queue}

    async def config(self) -> dict[str, Any]:
        data: dict[str, Any] = await self._send(self._r_system("config"))
        return data

    async def gpus(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = await self._send(self._r_system("gpus"))
        return data

    async def alerts(self, which: Literal["active", "rules", "history"] = "active", *, page: int = 1,
                     page_size: int = 50) -> list[dict[str, Any]]:
        """Alerts: ``active`` ones, the ``rules``, or the ``history`` (newest first, paged);
        :class:`NotFoundError` on a server without alerting."""
        data = await self._send(self._r_alerts(which, page, page_size))
        return self._p_alerts(data)
