"""Async Python client for the llm-relay.v1 WebSocket protocol.

    async with RelayClient("ws://127.0.0.1:8765/ws") as client:
        stream = client.stream("demo", [{"role": "user", "content": "hi"}])
        async for event in stream:          # Started, Token, ..., Finish (last)
            ...
        result = await client.complete("demo", [{"role": "user", "content": "hi"}])

Contracts:

* One connection per client. Entering the context connects (offering subprotocol
  ``llm-relay.v1``), sends ``hello`` and waits for ``welcome`` (``client.welcome``).
  Leaving it cancels the background reader task and closes the socket; no task outlives it.
* A single reader task decodes every server frame and routes it by ``id`` to the owning
  stream's queue, so any number of streams (from any number of tasks) share the connection.
  Frames of unknown type are ignored, as the protocol requires. ``pong`` frames resolve
  :meth:`RelayClient.ping` waiters; an ``error`` frame without ``id`` is logged and kept in
  ``client.errors``. Frames for ids with no live stream are dropped.
* :meth:`RelayClient.stream` is synchronous and returns a :class:`RelayStream`; the
  ``start`` frame is sent **lazily**, on the first iteration (or an explicit
  ``await stream.start()``).
* A stream yields only its own events, in arrival (``seq``) order, and stops after
  ``Finish``. A start refused with an ``error`` frame raises :class:`StreamRejected`.
  If the connection drops before ``Finish``, iteration raises :class:`ConnectionLost`
  with the text received so far (resuming a stream is not supported yet).
* ``await stream.cancel()`` asks the server to stop; iteration then ends with the
  cancelled ``Finish``. Leaving an ``async for`` early (``break``, exception) cancels the
  stream on the server too: the iterator is an async generator whose cleanup sends
  ``cancel`` (run by asyncio's async-generator finaliser right after the loop is left).
  ``await stream.aclose()`` does the same deterministically and waits for ``Finish``.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from protocol import (
    PROTOCOL_VERSION,
    Error,
    Finish,
    Pong,
    Reasoning,
    Started,
    Token,
    ToolCallChunk,
    ToolCallComplete,
    Usage,
    Welcome,
    decode_server_frame,
    encode_frame,
)

__all__ = [
    "CompletionResult",
    "ConnectionLost",
    "HandshakeFailed",
    "RelayClient",
    "RelayClientError",
    "RelayStream",
    "StreamEvent",
    "StreamRejected",
]

logger = logging.getLogger(__name__)

#: What a :class:`RelayStream` yields.
StreamEvent: TypeAlias = Started | Token | Reasoning | ToolCallChunk | ToolCallComplete | Finish

_LOST = object()  # queue sentinel: the connection is gone

#: ``RelayClient(token=...)``: a token, or a zero-argument function (plain or async) that
#: returns a fresh one; it is called before every connect, so a reconnect is not refused
#: for a token that expired meanwhile.
TokenSource: TypeAlias = str | Callable[[], str | None | Awaitable[str | None]] | None


class RelayClientError(Exception):
    """Base class of every error this client raises."""


class HandshakeFailed(RelayClientError):
    """The relay answered ``hello`` with something other than ``welcome``."""

    def __init__(self, code: str | None, message: str) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.code = code
        self.message = message


class StreamRejected(RelayClientError):
    """The relay refused a ``start`` with an ``error`` frame (e.g. ``unknown_model``)."""

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after


class ConnectionLost(RelayClientError):
    """The connection ended before the stream's ``Finish``. ``partial_text`` holds the answer
    text received so far. Resuming is not supported yet: start a new stream to retry."""

    def __init__(self, message: str, partial_text: str = "") -> None:
        super().__init__(message)
        self.partial_text = partial_text


@dataclass(frozen=True)
class CompletionResult:
    """The outcome of :meth:`RelayClient.complete`: a stream folded into one value."""

    text: str
    reasoning: str
    tool_calls: list[ToolCallComplete]
    usage: Usage
    status: str
    reason: str | None
    error: Any = None  # protocol.ErrorInfo for failed streams


@dataclass
class _Route:
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    abandoned: bool = False  # iteration left early: the reader drops the route at its end


class RelayStream:
    """One stream on a :class:`RelayClient`. Create it with :meth:`RelayClient.stream`.

    Iterate it once (``async for``) to receive its events; accumulated state is exposed as
    ``text``, ``reasoning``, ``tool_calls``, ``usage`` and ``finish`` (``None`` until the
    ``Finish`` was received)."""

    def __init__(self, client: RelayClient, id: str, start_frame: dict[str, Any]) -> None:
        self._client = client
        self.id = id
        self._start_frame = start_frame
        self._route: _Route | None = None
        self._started = False
        self._done = False
        self._cancel_sent = False
        self.text = ""
        self.reasoning = ""
        self.tool_calls: list[ToolCallComplete] = []
        self.finish: Finish | None = None

    @property
    def usage(self) -> Usage | None:
        """Usage from ``Finish`` (``None`` before it arrived)."""
        return self.finish.usage if self.finish else None

    @property
    def done(self) -> bool:
        """True once the stream ended (Finish, rejection, connection loss or abandon)."""
        return self._done

    async def start(self) -> None:
        """Send ``start`` now (idempotent). Iteration calls this itself."""
        if self._started:
            return
        self._started = True
        self._route = self._client._register(self.id)
        try:
            await self._client._send(self._start_frame)
        except BaseException:
            self._client._unregister(self.id, self._route)
            self._done = True
            raise

    async def cancel(self) -> None:
        """Ask the relay to stop this stream (idempotent). Iteration then ends with the
        cancelled ``Finish``. Before the stream was started this just marks it done."""
        if not self._started:
            self._started = self._done = True
            return
        if self._done or self._cancel_sent:
            return
        self._cancel_sent = True
        try:
            await self._client._send({"type": "cancel", "id": self.id})
        except ConnectionLost:
            pass  # the stream's iteration reports the loss

    async def aclose(self) -> None:
        """Cancel if still running and wait for the ``Finish`` (connection loss is ignored)."""
        if self._done:
            return
        await self.cancel()
        try:
            while not self._done:
                await self._next()
        except ConnectionLost:
            pass

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[StreamEvent]:
        try:
            while not self._done:
                yield await self._next()
        finally:
            if not self._done:  # left early: break, exception or task cancellation
                await self._abandon()

    async def _abandon(self) -> None:
        # Not marked done: a concurrent aclose() may still be waiting for the Finish.
        if self._route is None:
            self._done = True
            return
        self._route.abandoned = True
        if not self._cancel_sent:
            self._cancel_sent = True
            try:
                await self._client._send({"type": "cancel", "id": self.id})
            except (ConnectionLost, ConnectionClosed):
                pass

    async def _next(self) -> StreamEvent:
        await self.start()
        assert self._route is not None
        item = await self._route.queue.get()
        if item is _LOST:
            self._done = True
            raise ConnectionLost(f"connection lost during stream {self.id!r}", self.text)
        if isinstance(item, Error):
            self._done = True
            self._client._unregister(self.id, self._route)
            raise StreamRejected(item.code, item.message, item.retry_after)
        self._apply(item)
        return item

    def _apply(self, event: StreamEvent) -> None:
        if isinstance(event, Token):
            self.text += event.text
        elif isinstance(event, Reasoning):
            self.reasoning += event.text
        elif isinstance(event, ToolCallComplete):
            self.tool_calls.append(event)
        elif isinstance(event, Finish):
            self.finish = event
            self._done = True
            self._client._unregister(self.id, self._route)


class RelayClient:
    """A connection to an llm-relay server. Use as ``async with RelayClient(url) as c``.

    ``welcome`` and ``models`` are available once entered. All methods may be called
    concurrently from several tasks."""

    def __init__(
        self,
        url: str,
        token: TokenSource = None,
        client_name: str = "llm-relay-python",
        client_version: str = "1",
        **connect_kwargs: Any,
    ) -> None:
        self.url = url
        self.token = token
        self.client_name = client_name
        self.client_version = client_version
        self._connect_kwargs = connect_kwargs
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._routes: dict[str, _Route] = {}
        self._pings: dict[int, asyncio.Future[float]] = {}
        self._ping_ids = itertools.count(1)
        self._lost: str | None = None
        self.welcome: Welcome | None = None
        self.errors: list[Error] = []  # connection-level errors (error frames without id)

    @property
    def models(self) -> list[str]:
        """Model names from ``welcome``."""
        return list(self.welcome.models) if self.welcome else []

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._lost is None

    # ---------------------------------------------------------------- lifecycle

    async def connect(self) -> RelayClient:
        """Open the socket, do the hello/welcome handshake and start the reader task.
        Raises :class:`HandshakeFailed` if the relay does not welcome us."""
        kwargs = {"subprotocols": [PROTOCOL_VERSION], **self._connect_kwargs}
        self._ws = await connect(self.url, **kwargs)
        try:
            hello: dict[str, Any] = {
                "type": "hello",
                "client": {"name": self.client_name, "version": self.client_version},
            }
            token = await self._fresh_token()
            if token is not None:
                hello["token"] = token
            await self._ws.send(encode_frame(hello).decode())
            self.welcome = await self._await_welcome()
        except BaseException:
            await self._ws.close()
            self._ws = None
            raise
        self._reader = asyncio.create_task(self._read_loop(), name="llm-relay client reader")
        return self

    async def _fresh_token(self) -> str | None:
        """The token for ``hello``: ``token`` itself, or what its function returns now."""
        source = self.token
        if source is None or isinstance(source, str):
            return source
        token = source()
        if inspect.isawaitable(token):
            token = await token
        return token

    async def _await_welcome(self) -> Welcome:
        assert self._ws is not None
        while True:
            try:
                frame = decode_server_frame(await self._ws.recv())
            except ConnectionClosed as exc:
                raise HandshakeFailed(None, f"connection closed during handshake: {exc}") from exc
            if isinstance(frame, Welcome):
                return frame
            if isinstance(frame, Error):
                raise HandshakeFailed(frame.code, frame.message)
            # unknown frame types are ignored

    async def close(self) -> None:
        """Cancel the reader task and close the socket. Idempotent. Streams still running
        raise :class:`ConnectionLost` from their iteration."""
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
            self._reader = None
        if self._ws is not None:
            await self._ws.close()
        self._mark_lost("client closed")

    async def __aenter__(self) -> RelayClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- API

    def stream(
        self,
        model: str,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        id: str | None = None,
        **params: Any,
    ) -> RelayStream:
        """A new stream (not started yet: ``start`` is sent on first iteration).

        ``params`` are sampling parameters (``max_tokens``, ``temperature``...); the relay
        only accepts its allowlist. ``id`` defaults to a random unique id."""
        sid = id or uuid.uuid4().hex
        frame: dict[str, Any] = {"type": "start", "id": sid, "model": model,
                                 "messages": list(messages)}
        if tools is not None:
            frame["tools"] = list(tools)
        if tool_choice is not None:
            frame["tool_choice"] = tool_choice
        if params:
            frame["params"] = params
        return RelayStream(self, sid, frame)

    async def complete(
        self,
        model: str,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        **params: Any,
    ) -> CompletionResult:
        """Run a stream to its end and return the folded result. Raises
        :class:`StreamRejected` or :class:`ConnectionLost` like iteration does. If the
        calling task is cancelled, the stream is cancelled on the relay."""
        s = self.stream(model, messages, tools=tools, tool_choice=tool_choice, **params)
        async for _ in s:
            pass
        finish = s.finish
        assert finish is not None
        return CompletionResult(text=s.text, reasoning=s.reasoning, tool_calls=s.tool_calls,
                                usage=finish.usage, status=str(finish.status),
                                reason=finish.reason, error=finish.error)

    async def ping(self, timeout: float | None = 10.0) -> float:
        """Application-level ping; returns the round-trip time in seconds."""
        ping_id = next(self._ping_ids)
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = future
        sent = time.monotonic()
        try:
            await self._send({"type": "ping", "data": ping_id})
            async with asyncio.timeout(timeout):
                await future
        finally:
            self._pings.pop(ping_id, None)
        return time.monotonic() - sent

    # ---------------------------------------------------------------- internals

    async def _send(self, frame: dict[str, Any]) -> None:
        if self._ws is None or self._lost is not None:
            raise ConnectionLost(f"not connected ({self._lost or 'never connected'})")
        try:
            await self._ws.send(encode_frame(frame).decode())
        except ConnectionClosed as exc:
            raise ConnectionLost(f"connection closed: {exc}") from exc

    def _register(self, sid: str) -> _Route:
        if self._lost is not None or self._ws is None:
            raise ConnectionLost(f"not connected ({self._lost or 'never connected'})")
        if sid in self._routes:
            raise ValueError(f"stream id {sid!r} is already in use on this connection")
        route = self._routes[sid] = _Route()
        return route

    def _unregister(self, sid: str, route: _Route | None) -> None:
        if route is not None and self._routes.get(sid) is route:
            del self._routes[sid]

    async def _read_loop(self) -> None:
        assert self._ws is not None
        reason = "connection closed"
        try:
            async for raw in self._ws:
                try:
                    frame = decode_server_frame(raw)
                except ValueError:
                    logger.warning("ignoring undecodable frame from relay: %.200r", raw)
                    continue
                if frame is not None:
                    self._dispatch(frame)
        except ConnectionClosed as exc:
            reason = f"connection closed: {exc}"
        finally:
            self._mark_lost(reason)

    def _dispatch(self, frame: Any) -> None:
        if isinstance(frame, Pong):
            future = self._pings.get(frame.data) if isinstance(frame.data, int) else None
            if future is not None and not future.done():
                future.set_result(0.0)
            return
        sid = getattr(frame, "id", None)
        if isinstance(frame, Error):
            if sid is None:
                logger.warning("relay error: %s: %s", frame.code, frame.message)
                self.errors.append(frame)
                return
            if frame.ref == "cancel":
                return  # cancel raced the finish: harmless
        route = self._routes.get(sid) if sid is not None else None
        if route is not None:
            route.queue.put_nowait(frame)
            if route.abandoned and isinstance(frame, (Finish, Error)):
                self._unregister(sid, route)

    def _mark_lost(self, reason: str) -> None:
        if self._lost is not None:
            return
        self._lost = reason
        for route in self._routes.values():
            route.queue.put_nowait(_LOST)
        self._routes.clear()
        for future in self._pings.values():
            if not future.done():
                future.set_exception(ConnectionLost(reason))
