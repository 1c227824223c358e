"""The sans-I/O machinery under both clients: operations, effects, and the two thin drivers.

Every endpoint is written once, as an *operation*: a generator that ``yield``\\ s `Effect`\\ s
(send this request, sleep this long, read the next line of this stream) and receives each outcome
back (the response, or the exception, thrown in where the effect was yielded). An operation never
touches the network or the clock itself, so the same code serves both surfaces:

* `SyncSide` performs the effects with an ``httpx.Client`` and ``time.sleep``;
* `AsyncSide` performs them with an ``httpx.AsyncClient`` and ``asyncio.sleep``.

`Endpoint` turns an operation into the public method of both: on a `SyncSide`
object it returns the result, on an `AsyncSide` object it returns a coroutine (and
`Stream` an iterator or an async iterator). This is httpx's own layout (one request model,
sync and async twins) carried through to every call, with the layout of the ``h11``/sans-I/O
libraries: protocol logic apart from I/O.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Concatenate, Generic, ParamSpec, TypeAlias, TypeVar, overload

import httpx

P = ParamSpec("P")
T = TypeVar("T")


class Effect:
    """One piece of I/O an operation asks for; `run` performs it synchronously, `arun`
    asynchronously (the only two places where it happens)."""

    def run(self, http: httpx.Client) -> Any:
        raise NotImplementedError

    async def arun(self, http: httpx.AsyncClient) -> Any:
        raise NotImplementedError


Op: TypeAlias = Generator[Effect, Any, T]
"""An operation returning ``T``: what every endpoint is written as."""


@dataclass(frozen=True)
class Transmit(Effect):
    """Send a built request; the response (read, or with ``stream`` left open for `NextLine`)."""

    request: httpx.Request
    stream: bool = False

    def run(self, http: httpx.Client) -> httpx.Response:
        return http.send(self.request, stream=self.stream)

    async def arun(self, http: httpx.AsyncClient) -> httpx.Response:
        return await http.send(self.request, stream=self.stream)


@dataclass(frozen=True)
class Sleep(Effect):
    """Wait ``seconds`` (backoff, polling)."""

    seconds: float

    def run(self, http: httpx.Client) -> None:
        time.sleep(self.seconds)

    async def arun(self, http: httpx.AsyncClient) -> None:
        await asyncio.sleep(self.seconds)


@dataclass(frozen=True)
class ReadBody(Effect):
    """Read the rest of a streamed response (so that it can be parsed)."""

    response: httpx.Response

    def run(self, http: httpx.Client) -> bytes:
        return self.response.read()

    async def arun(self, http: httpx.AsyncClient) -> bytes:
        return await self.response.aread()


@dataclass(frozen=True)
class Lines(Effect):
    """The line iterator of a streamed response (for `NextLine`)."""

    response: httpx.Response

    def run(self, http: httpx.Client) -> Iterator[str]:
        return self.response.iter_lines()

    async def arun(self, http: httpx.AsyncClient) -> AsyncIterator[str]:
        return self.response.aiter_lines()


@dataclass(frozen=True)
class NextLine(Effect):
    """The next text line from `Lines`, ``None`` at the end of the stream."""

    lines: Any

    def run(self, http: httpx.Client) -> str | None:
        return next(self.lines, None)

    async def arun(self, http: httpx.AsyncClient) -> str | None:
        return await anext(self.lines, None)


@dataclass(frozen=True)
class Close(Effect):
    """Close a streamed response (its connection goes back to the pool)."""

    response: httpx.Response

    def run(self, http: httpx.Client) -> None:
        self.response.close()

    async def arun(self, http: httpx.AsyncClient) -> None:
        await self.response.aclose()


@dataclass(frozen=True)
class Emit(Effect):
    """An item for the caller of a streaming operation (performed by nobody: handed out)."""

    value: Any


class Steps(Generic[T]):
    """Walks an operation: iterating gives the effects to perform; `settle` hands an outcome
    back (a value, or the exception it raised); `value` is the operation's result.

    As a context manager it closes the operation when left early, and `leftovers` names the
    streamed responses still open then (the driver closes them)."""

    def __init__(self, op: Op[T]) -> None:
        self._op = op
        self._reply: tuple[Any, BaseException | None] = (None, None)
        self._current: Effect | None = None
        self._open: list[httpx.Response] = []
        self.value: T

    def __iter__(self) -> Steps[T]:
        return self

    def __next__(self) -> Effect:
        value, error = self._reply
        self._reply = (None, None)
        try:
            effect = self._op.send(value) if error is None else self._op.throw(error)
        except StopIteration as stop:
            self.value = stop.value
            raise StopIteration from None
        self._current = effect
        return effect

    def settle(self, value: Any = None, error: BaseException | None = None) -> None:
        """The outcome of the current effect (sent, or thrown, into the operation next)."""
        effect = self._current
        if isinstance(effect, Transmit) and effect.stream and error is None:
            self._open.append(value)
        elif isinstance(effect, Close) and effect.response in self._open:
            self._open.remove(effect.response)
        self._reply = (value, error)

    def leftovers(self) -> list[Close]:
        """Streams the operation left open (closed by the driver on the way out)."""
        out, self._open = [Close(r) for r in self._open], []
        return out

    def __enter__(self) -> Steps[T]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._op.close()


def _no_emit(effect: Effect) -> Effect:
    if isinstance(effect, Emit):
        raise TypeError("an operation that emits items is a Stream endpoint, not an Endpoint")
    return effect


class SyncSide:
    """Performs operations with an ``httpx.Client``: the synchronous surface."""

    asynchronous: ClassVar[bool] = False
    _http: httpx.Client

    def _drive(self, op: Op[T]) -> T:
        """Run an operation to its end; its result."""
        with Steps(op) as steps:
            for effect in steps:
                self._perform(steps, _no_emit(effect))
        return steps.value

    def _iterate(self, op: Op[Any]) -> Iterator[Any]:
        """Run a streaming operation, handing out what it emits."""
        with Steps(op) as steps:
            try:
                for effect in steps:
                    if isinstance(effect, Emit):
                        yield effect.value
                    else:
                        self._perform(steps, effect)
            finally:
                for close in steps.leftovers():
                    close.run(self._http)

    def _perform(self, steps: Steps[Any], effect: Effect) -> None:
        try:
            steps.settle(effect.run(self._http))
        except Exception as exc:  # noqa: BLE001 - thrown into the operation, which decides
            steps.settle(error=exc)


class AsyncSide:
    """Performs operations with an ``httpx.AsyncClient``: the asyncio surface."""

    asynchronous: ClassVar[bool] = True
    _http: httpx.AsyncClient

    async def _drive(self, op: Op[T]) -> T:
        """Run an operation to its end; its result."""
        with Steps(op) as steps:
            for effect in steps:
                await self._perform(steps, _no_emit(effect))
        return steps.value

    async def _iterate(self, op: Op[Any]) -> AsyncIterator[Any]:
        """Run a streaming operation, handing out what it emits."""
        with Steps(op) as steps:
            try:
                for effect in steps:
                    if not isinstance(effect, Emit):
                        await self._perform(steps, effect)
                        continue
                    yield effect.value
            finally:
                for close in steps.leftovers():
                    await close.arun(self._http)

    async def _perform(self, steps: Steps[Any], effect: Effect) -> None:
        try:
            outcome = await effect.arun(self._http)
        except Exception as exc:  # noqa: BLE001 - thrown into the operation, which decides
            steps.settle(error=exc)
        else:
            steps.settle(outcome)


# ----------------------------------------------------------------------------- endpoints
def _public_signature(op: Callable[..., Any], handle: str, bound: bool = True) -> inspect.Signature:
    """The operation's signature (without ``self`` when ``bound``), returning what the operation returns
    (``Op[Page[H]]`` -> ``Page[RemoteTask]``)."""
    sig = inspect.signature(op)
    returns = re.sub(r"^Op\[(.*)\]$", r"\1", str(sig.return_annotation))
    returns = re.sub(r"\bH\b", handle, returns)
    params = list(sig.parameters.values())
    return sig.replace(parameters=params[1:] if bound else params, return_annotation=returns)


class _Method:
    """What `Endpoint` and `Stream` share: the operation, and the public method's
    name, docstring and signature taken from it (``__signature__`` when it has one)."""

    def __init__(self, op: Callable[..., Any]) -> None:
        self.op = op
        functools.update_wrapper(self, op)
        self.__signature__ = _public_signature(op, "RemoteTask | AsyncRemoteTask", bound=False)

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.__name__ = name

    def _dress(self, method: Callable[..., Any], obj: Any) -> Callable[..., Any]:
        method.__name__ = self.__name__
        method.__qualname__ = f"{type(obj).__name__}.{self.__name__}"
        method.__doc__ = self.op.__doc__
        method.__signature__ = _public_signature(self.op, getattr(obj, "handle_name", "H"))  # type: ignore[attr-defined]
        return method

    def __call__(self, obj: Any, *args: Any, **kwargs: Any) -> Any:
        """``Client.method(client, ...)``, like a plain function on the class."""
        return self.__get__(obj)(*args, **kwargs)  # type: ignore[attr-defined]


class Endpoint(_Method, Generic[P, T]):
    """A public method of both surfaces, from one operation returning ``T``.

    ``obj.method(...)`` runs ``op(obj, ...)``: to its result on a `SyncSide` object, as a
    coroutine on an `AsyncSide` one. On the class, the endpoint itself.
    """

    def __init__(self, op: Callable[Concatenate[Any, P], Op[T]]) -> None:
        super().__init__(op)

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Endpoint[P, T]: ...

    @overload
    def __get__(self, obj: SyncSide, owner: type[Any] | None = None) -> Callable[P, T]: ...

    @overload
    def __get__(self, obj: AsyncSide, owner: type[Any] | None = None) -> Callable[P, Coroutine[Any, Any, T]]: ...

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        op = self.op

        def method(*args: Any, **kwargs: Any) -> Any:
            return obj._drive(op(obj, *args, **kwargs))

        async def amethod(*args: Any, **kwargs: Any) -> Any:
            return await obj._drive(op(obj, *args, **kwargs))

        return self._dress(amethod if obj.asynchronous else method, obj)


class Stream(_Method, Generic[P, T]):
    """An endpoint whose operation emits items of type ``T``: an iterator on a `SyncSide`
    object, an async iterator on an `AsyncSide` one."""

    def __init__(self, op: Callable[Concatenate[Any, P], Op[None]], item: type[T]) -> None:
        super().__init__(op)
        self.item = item

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Stream[P, T]: ...

    @overload
    def __get__(self, obj: SyncSide, owner: type[Any] | None = None) -> Callable[P, Iterator[T]]: ...

    @overload
    def __get__(self, obj: AsyncSide, owner: type[Any] | None = None) -> Callable[P, AsyncIterator[T]]: ...

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        op = self.op

        def method(*args: Any, **kwargs: Any) -> Any:
            return obj._iterate(op(obj, *args, **kwargs))

        return self._dress(method, obj)


def endpoint(op: Callable[Concatenate[Any, P], Op[T]]) -> Endpoint[P, T]:
    """Decorate an operation: the public method of both surfaces."""
    return Endpoint(op)


def stream(item: type[T]) -> Callable[[Callable[Concatenate[Any, P], Op[None]]], Stream[P, T]]:
    """Decorate a streaming operation that ``yield``\\ s ``Emit(item)``\\ s."""
    def wrap(op: Callable[Concatenate[Any, P], Op[None]]) -> Stream[P, T]:
        return Stream(op, item)
    return wrap


__all__ = [
    "AsyncSide",
    "Close",
    "Effect",
    "Emit",
    "Endpoint",
    "Lines",
    "NextLine",
    "Op",
    "ReadBody",
    "Sleep",
    "Steps",
    "Stream",
    "SyncSide",
    "Transmit",
    "endpoint",
    "stream",
]
