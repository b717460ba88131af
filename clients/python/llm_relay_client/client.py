"""Async Python client for the llm-relay.v1 WebSocket protocol, with automatic reconnect and
resume.

    async with RelayClient("ws://127.0.0.1:8765/ws") as client:
        stream = client.stream("demo", [{"role": "user", "content": "hi"}])
        async for event in stream:          # Started, Token, ..., Finish (last)
            ...
        result = await client.complete("demo", [{"role": "user", "content": "hi"}])

Contracts:

* One connection at a time per client. Entering the context connects (offering subprotocol
  ``llm-relay.v1``), sends ``hello`` and waits for ``welcome`` (``client.welcome``); a failure
  of this *first* connect raises at once (no retry). Leaving the context cancels the
  background connection task and closes the socket; no task outlives it.
* A single connection task reads every server frame and routes it by ``id`` to the owning
  stream's queue, so any number of streams (from any number of tasks) share the connection.
  Frames of unknown type are ignored, as the protocol requires. ``pong`` frames resolve
  :meth:`RelayClient.ping` waiters; an ``error`` frame without ``id`` is logged and kept in
  ``client.errors``. Frames for ids with no live stream are dropped.
* :meth:`RelayClient.stream` is synchronous and returns a :class:`RelayStream`; the
  ``start`` frame is sent **lazily**, on the first iteration (or an explicit
  ``await stream.start()``).
* A stream yields only its own events, in ``seq`` order, each exactly once, and stops after
  ``Finish``. A start refused with an ``error`` frame raises :class:`StreamRejected`.
* ``await stream.cancel()`` asks the server to stop; iteration then ends with the
  cancelled ``Finish`` (the relay's). A stream cancelled before its ``start`` was sent ends
  with ``llm_relay_protocol.client_policy.local_cancel_finish``: a valid ``Finish`` (cancelled,
  ``client_cancel``, zero usage flagged ``estimated``); nothing is sent. Leaving an ``async for`` early (``break``, exception) cancels the
  stream on the server too: the iterator is an async generator whose cleanup sends
  ``cancel`` (run by asyncio's async-generator finaliser right after the loop is left).
  ``await stream.aclose()`` does the same deterministically and waits for ``Finish``.

Reconnect and resume (``reconnect=True``, the default; PROTOCOL.md "Resume and detached
streams"):

The policy (which close is retried, the backoff, what is resumed, which frames are
replays, what a cancel does) is :mod:`llm_relay_protocol.client_policy`, shared with relay-client.js;
this module carries out its decisions (a :class:`llm_relay_protocol.client_policy.ClientStreamTracker`
holds every stream's phase, ``stream_key`` and last ``seq``).

* When the connection ends with a close the policy retries (the rule: PROTOCOL.md "Close
  codes", implemented by :func:`llm_relay_protocol.client_policy.close_decision`; 4401 ``token
  expired`` after a welcome counts when ``token`` is a function), the client reconnects
  with exponential backoff and jitter (attempt ``n`` waits ``min(backoff_max, backoff *
  2**n) * uniform(0.5, 1)`` seconds, at most ``max_reconnect_attempts`` attempts, default
  ``llm_relay_protocol.client_policy.MAX_RECONNECT_ATTEMPTS`` = 8), calls the token source again,
  does hello/welcome, and sends ``{"type": "resume", "stream_key": K, "after_seq": LAST,
  "id": ID}`` for every stream that had ``started`` and no ``finish``, but only when the
  *previous* and the new ``welcome.limits.detach_grace`` are > 0. After ``resumed`` the
  replay and then the live frames continue the same iteration; frames whose ``seq`` is not
  above the last one seen are dropped, so the application sees an uninterrupted stream. The
  relay may merge consecutive token frames in a replay (one ``Token`` with the concatenated
  text and the last ``seq``): that is normal.
* A stream that cannot be resumed raises :class:`ConnectionLost` from its iteration, carrying
  the partial text, reasoning and completed tool calls, the close code and, when the relay
  refused the resume, the error code (``unknown_stream``, ``stream_lost``...). That happens
  when ``detach_grace`` is 0, when the stream's ``start`` had no answer yet (it is never
  sent twice: the relay may be running it), when the close is final (e.g. 4401, 4400,
  1000), when the attempts are exhausted, or when the relay answers the resume with an
  ``error``. The one exception: after 4401 ``token expired`` (refreshed as above) starts
  without an answer are sent again, because the relay guarantees it did not run them.
* While reconnecting, new streams and ``ping`` **wait** for the new connection (then run on
  it, after the resumes), or raise :class:`ConnectionLost` if the client gives up; a
  ``cancel`` of a stream being resumed is sent right after its ``resumed``. Pings in flight when the connection dropped raise :class:`ConnectionLost` (their answer
  is gone with the connection); later pings work on the new connection.
* After a non-retryable close, or when the attempts are exhausted, the client is closed for
  good (``client.state == "closed"``): every unfinished stream raises :class:`ConnectionLost`
  and further calls raise it at once.
* With ``reconnect=False`` any connection loss closes the client for good and every
  unfinished stream raises :class:`ConnectionLost` (the behaviour of earlier versions).

Watching (PROTOCOL.md "Viewers"): :meth:`RelayClient.watch` follows a stream started
elsewhere (another tab, device or process of the same principal) by its ``stream_key``: a
:class:`RelayStream` like any other, fed by a ``resume`` that joins the stream as a viewer
(every frame after ``after_seq``, then the live ones, then its one ``Finish``); it is
resumed after a loss like the client's own streams, and ``cancel`` stops the stream for
everyone. A refused watch raises :class:`ConnectionLost` with the relay's ``code``.

Takeover: when another connection of the same principal resumes one of this client's
running streams with ``"takeover": true``, the relay moves the stream there alone and ends
it here with ``error`` ``stream_taken_over``; its iteration raises
:class:`StreamTakenOver` (a :class:`ConnectionLost` with that ``code`` and the partial
results), never waits forever. The connection and the other streams are unaffected. (A
plain ``resume``, e.g. another client's ``watch``, leaves this stream streaming here.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import itertools
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidMessage,
    InvalidStatus,
)

from llm_relay_protocol import (
    PROTOCOL_VERSION,
    Error,
    ErrorCode,
    Finish,
    Pong,
    Reasoning,
    Refusal,
    Started,
    Token,
    ToolCallChunk,
    ToolCallComplete,
    Usage,
    Welcome,
    decode_server_frame,
    encode_frame,
    frames,
)
from llm_relay_protocol.client_policy import (
    ABNORMAL_CLOSURE,
    MAX_RECONNECT_ATTEMPTS,
    RETRYABLE_UPGRADE_STATUSES,
    ReconnectSchedule,
    BACKOFF,
    Backoff,
    CancelAction,
    ClientStreamTracker,
    CloseDecision,
    FrameAction,
    StreamFailure,
    StreamPhase,
    close_decision,
    close_meaning,
    is_retryable_close,
    local_cancel_finish,
)

from llm_relay_client.aio import cancel_and_wait

__all__ = [
    "CompletionResult",
    "ConnectionLost",
    "ConnectionState",
    "HandshakeFailed",
    "RelayClient",
    "RelayClientError",
    "RelayStream",
    "StreamEvent",
    "StreamRejected",
    "StreamTakenOver",
    "is_retryable_close",
]

logger = logging.getLogger(__name__)

#: What a :class:`RelayStream` yields.
StreamEvent: TypeAlias = (Started | Token | Reasoning | Refusal | ToolCallChunk | ToolCallComplete
                          | Finish)

#: ``RelayClient.state``: ``idle`` (not connected yet), ``open``, ``reconnecting`` (the
#: connection dropped; a new one is being made) or ``closed`` (for good).
ConnectionState: TypeAlias = Literal["idle", "open", "reconnecting", "closed"]

#: ``RelayClient(token=...)``: a token, or a zero-argument function (plain or async) that
#: returns a fresh one; it is called before every connect, so a reconnect is not refused
#: for a token that expired meanwhile.
TokenSource: TypeAlias = str | Callable[[], str | None | Awaitable[str | None]] | None



def _close_text(code: int | None, reason: str | None) -> str:
    if code is None:
        return reason or "connection closed"
    text = f"{code} ({close_meaning(code)})"
    if reason:
        text += f": {reason}"
    return text


class RelayClientError(Exception):
    """Base class of every error this client raises."""


class HandshakeFailed(RelayClientError):
    """The relay answered ``hello`` with something other than ``welcome``: an ``error`` frame
    (``code`` set) or a close (``close_code`` set, e.g. 4401 for a refused token)."""

    def __init__(self, code: str | None, message: str, close_code: int | None = None) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.code = code
        self.message = message
        self.close_code = close_code


class StreamRejected(RelayClientError):
    """The relay refused a ``start`` with an ``error`` frame (e.g. ``unknown_model``)."""

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after


class ConnectionLost(RelayClientError):
    """The connection ended and the stream could not be resumed (or the client is closed).

    ``partial_text``, ``reasoning`` and ``tool_calls`` hold what the stream delivered before
    (for a call that is not a stream: empty). ``close_code`` is the WebSocket close code that
    ended the connection (1006 for a network drop; ``None`` when the client itself closed or
    the relay could not be reached); ``code`` is the relay's error code when it refused the
    resume (``unknown_stream``, ``stream_lost``, ...); ``stream_id`` names the stream."""

    def __init__(
        self,
        message: str,
        partial_text: str = "",
        *,
        reasoning: str = "",
        tool_calls: Sequence[ToolCallComplete] = (),
        close_code: int | None = None,
        code: str | None = None,
        stream_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.partial_text = partial_text
        self.reasoning = reasoning
        self.tool_calls = list(tool_calls)
        self.close_code = close_code
        self.code = code
        self.stream_id = stream_id


class StreamTakenOver(ConnectionLost):
    """Another connection resumed this stream (``error`` ``stream_taken_over``): it goes on
    there, not here. ``code`` is ``"stream_taken_over"``; ``partial_text`` & co. hold what
    this client received before; ``close_code`` is None (the connection is still open)."""


@dataclass(frozen=True)
class CompletionResult:
    """The outcome of :meth:`RelayClient.complete`: a stream folded into one value."""

    text: str
    reasoning: str
    tool_calls: list[ToolCallComplete]
    usage: Usage
    status: str
    reason: str | None
    error: Any = None  # llm_relay_protocol.ErrorInfo for failed streams
    refusal: str = ""  # the model's refusal to answer (``refusal`` frames), not part of text


@dataclass(frozen=True)
class _Lost:
    """Queue item: the stream's connection is gone for good (becomes ConnectionLost)."""

    message: str
    close_code: int | None = None
    code: str | None = None


@dataclass
class _Route:
    """The I/O side of one stream: its queue. Its policy state (phase, stream_key, last seq)
    lives in the client's ClientStreamTracker; the two copies below outlive the stream."""

    id: str
    start_frame: dict[str, Any]
    queue: asyncio.Queue[StreamEvent | Error | _Lost] = field(default_factory=asyncio.Queue)
    abandoned: bool = False  # iteration left early (an aclose() may still read the queue)
    stream_key: str | None = None
    resumes: int = 0         # resumed frames received


class RelayStream:
    """One stream on a :class:`RelayClient`. Create it with :meth:`RelayClient.stream`.

    Iterate it once (``async for``) to receive its events; accumulated state is exposed as
    ``text``, ``reasoning``, ``refusal``, ``tool_calls``, ``usage`` and ``finish`` (``None``
    until the ``Finish`` was received). A reconnect in the middle is invisible to the iteration
    (``resumes`` counts them)."""

    def __init__(self, client: RelayClient, id: str, start_frame: dict[str, Any],
                 watch: dict[str, Any] | None = None) -> None:
        self._client = client
        self.id = id
        self._start_frame = start_frame
        #: For a watched stream (RelayClient.watch): its ``stream_key``, ``after_seq`` and
        #: ``takeover``, sent as a ``resume`` instead of a ``start``.
        self._watch = watch
        self._route: _Route | None = None
        self._started = False
        self._done = False
        self._cancel_sent = False
        self._local_finish: Finish | None = None  # cancelled before start: yielded once
        self.text = ""
        self.reasoning = ""
        self.refusal = ""
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

    @property
    def stream_key(self) -> str | None:
        """The relay's name of the stream (from ``started``), used to resume it."""
        return self._route.stream_key if self._route else None

    @property
    def resumes(self) -> int:
        """How many times the stream was resumed on a new connection."""
        return self._route.resumes if self._route else 0

    async def start(self) -> None:
        """Send ``start`` now (idempotent). Iteration calls this itself. While the client is
        reconnecting this waits for the new connection."""
        if self._started:
            return
        self._started = True
        if self._watch is not None:
            self._route = await self._client._send_watch(self.id, **self._watch)
            return
        self._route = self._client._register(self.id, self._start_frame)
        try:
            await self._client._send_start(self._route, self._start_frame)
        except BaseException:
            self._client._unregister(self._route)
            self._done = True
            raise

    async def cancel(self) -> None:
        """Ask the relay to stop this stream (idempotent). Iteration then ends with the
        cancelled ``Finish``. Before the ``start`` was sent nothing is sent: iteration yields
        ``llm_relay_protocol.client_policy.local_cancel_finish`` (a valid cancelled ``Finish`` with
        zero usage flagged estimated). While the stream is being resumed the cancel is sent
        right after its ``resumed``."""
        if not self._started:
            self._started = True
            self._local_finish = Finish.model_validate(local_cancel_finish(self.id))
            return
        if self._done or self._cancel_sent or self._local_finish is not None:
            return
        self._cancel_sent = True
        await self._client._cancel(self._route)

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
        if self._client._routes.get(self.id) is not self._route:
            return  # already over (finish, rejection or loss queued)
        if not self._cancel_sent:
            self._cancel_sent = True
            try:
                await self._client._cancel(self._route)
            except ConnectionClosed:
                pass

    async def _next(self) -> StreamEvent:
        await self.start()
        if self._local_finish is not None and self._route is None:
            self._apply(self._local_finish)
            return self._local_finish
        assert self._route is not None
        item = await self._route.queue.get()
        if isinstance(item, _Lost):
            self._done = True
            lost = (StreamTakenOver if item.code == ErrorCode.STREAM_TAKEN_OVER
                    else ConnectionLost)
            raise lost(item.message, self.text, reasoning=self.reasoning,
                       tool_calls=self.tool_calls, close_code=item.close_code,
                       code=item.code, stream_id=self.id)
        if isinstance(item, Error):
            self._done = True
            raise StreamRejected(item.code, item.message, item.retry_after)
        self._apply(item)
        return item

    def _apply(self, event: StreamEvent) -> None:
        if isinstance(event, Token):
            self.text += event.text
        elif isinstance(event, Reasoning):
            self.reasoning += event.text
        elif isinstance(event, Refusal):
            self.refusal += event.text
        elif isinstance(event, ToolCallComplete):
            self.tool_calls.append(event)
        elif isinstance(event, Finish):
            self.finish = event
            self._done = True


class RelayClient:
    """A connection to an llm-relay server. Use as ``async with RelayClient(url) as c``.

    ``welcome`` and ``models`` are available once entered (``welcome`` is replaced by each
    reconnect's). All methods may be called concurrently from several tasks.

    Options:

    * ``url``: the relay's ``ws://``/``wss://`` URL, or a list of URLs of relays that share
      streams (``--redis``): each reconnect tries the next one, so a stream resumes on
      another relay when its relay restarts (1012) or vanishes.
    * ``token``: a token, or a function (plain or async) returning a fresh one, called before
      every connect and reconnect.
    * ``reconnect`` (default ``True``): reconnect and resume after a retryable close (see the
      module docstring). ``False``: any connection loss ends the client.
    * ``max_reconnect_attempts`` (default ``llm_relay_protocol.client_policy.MAX_RECONNECT_ATTEMPTS``
      = 8, as relay-client.js; ``None`` = unlimited): connection attempts after one loss
      before giving up. The count starts again after each successful reconnect.
    * ``backoff`` (default 0.5 s) and ``backoff_max`` (default 15 s), from
      ``llm_relay_protocol.client_policy.BACKOFF``: attempt ``n`` (from 0) waits
      ``min(backoff_max, backoff * 2**n) * uniform(0.5, 1)`` seconds first.
    * other keyword arguments go to ``websockets.asyncio.client.connect`` (e.g.
      ``additional_headers``, ``open_timeout``).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        token: TokenSource = None,
        client_name: str = "llm-relay-python",
        client_version: str = "1",
        *,
        reconnect: bool = True,
        max_reconnect_attempts: int | None = MAX_RECONNECT_ATTEMPTS,
        backoff: float = BACKOFF.base,
        backoff_max: float = BACKOFF.cap,
        **connect_kwargs: Any,
    ) -> None:
        if max_reconnect_attempts is not None and max_reconnect_attempts < 0:
            raise ValueError("max_reconnect_attempts must be >= 0 or None")
        if backoff < 0 or backoff_max < 0:
            raise ValueError("backoff and backoff_max must be >= 0")
        self.urls: list[str] = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise ValueError("at least one relay URL is needed")
        self._url_index = 0
        self.token = token
        self.client_name = client_name
        self.client_version = client_version
        self.reconnect = reconnect
        self.max_reconnect_attempts = max_reconnect_attempts
        self.backoff = backoff
        self.backoff_max = backoff_max
        self._connect_kwargs = connect_kwargs
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._routes: dict[str, _Route] = {}
        self._tracker = ClientStreamTracker()  # the policy's view of the same streams
        self._pings: dict[int, asyncio.Future[float]] = {}
        self._ping_ids = itertools.count(1)
        self._state: ConnectionState = "idle"
        self._changed = asyncio.Event()   # replaced (after being set) on every state change
        self._lost: str | None = None
        self._closing = False
        #: ``(code, reason)`` of the last connection end (code 1006: no close frame).
        self.last_close: tuple[int | None, str] | None = None
        #: Successful reconnects so far.
        self.reconnects = 0
        self.welcome: Welcome | None = None
        self.errors: list[Error] = []  # connection-level errors (error frames without id)

    @property
    def url(self) -> str:
        """The relay URL of the current (or next) connection."""
        return self.urls[self._url_index]

    @property
    def models(self) -> list[str]:
        """Model names from ``welcome``."""
        return list(self.welcome.models) if self.welcome else []

    @property
    def state(self) -> ConnectionState:
        """``idle``, ``open``, ``reconnecting`` or ``closed``."""
        return self._state

    @property
    def connected(self) -> bool:
        """True while a connection is open (False while reconnecting)."""
        return self._state == "open"

    # ---------------------------------------------------------------- lifecycle

    async def connect(self) -> RelayClient:
        """Open the socket, do the hello/welcome handshake and start the connection task.
        Raises :class:`HandshakeFailed` if the relay does not welcome us (and whatever
        ``websockets`` raises if it cannot be reached); this first connect is not retried."""
        if self._state != "idle":
            raise RuntimeError(f"RelayClient.connect() called in state {self._state!r}")
        ws, self.welcome = await self._open()
        self._ws = ws
        self._set_state("open")
        self._task = asyncio.create_task(self._run(ws), name="llm-relay client connection")
        return self

    async def _open(self) -> tuple[ClientConnection, Welcome]:
        """One connection: upgrade, hello (with a fresh token), welcome."""
        kwargs = {"subprotocols": [PROTOCOL_VERSION], **self._connect_kwargs}
        token = await self._fresh_token()
        ws = await connect(self.url, **kwargs)
        try:
            hello = frames.hello(token, frames.client_info(self.client_name,
                                                           self.client_version))
            await ws.send(encode_frame(hello).decode())
            welcome = await self._await_welcome(ws)
        except BaseException:
            await ws.close()
            raise
        return ws, welcome

    async def _fresh_token(self) -> str | None:
        """The token for ``hello``: ``token`` itself, or what its function returns now."""
        source = self.token
        if source is None or isinstance(source, str):
            return source
        token = source()
        if inspect.isawaitable(token):
            token = await token
        return token

    @staticmethod
    async def _await_welcome(ws: ClientConnection) -> Welcome:
        while True:
            try:
                frame = decode_server_frame(await ws.recv())
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else ABNORMAL_CLOSURE
                reason = exc.rcvd.reason if exc.rcvd is not None else ""
                raise HandshakeFailed(None, "connection closed during handshake: "
                                      + _close_text(code, reason), close_code=code) from exc
            if isinstance(frame, Welcome):
                return frame
            if isinstance(frame, Error):
                raise HandshakeFailed(frame.code, frame.message)
            # unknown frame types are ignored

    async def close(self) -> None:
        """Stop the connection task (also a reconnect in progress) and close the socket.
        Idempotent. Streams still running raise :class:`ConnectionLost` from their
        iteration."""
        self._closing = True
        if self._task is not None:
            # Our own cancel of the connection task is absorbed; a cancel of the caller
            # while it waits here propagates (llm_relay_client.aio).
            await cancel_and_wait(self._task)
            self._task = None
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        self._close_for_good(None, "client closed")

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
        frame = frames.start(sid, model, list(messages),
                             tools=None if tools is None else list(tools),
                             tool_choice=tool_choice, params=params or None)
        return RelayStream(self, sid, frame)

    def watch(self, stream_key: str, *, after_seq: int = 0, id: str | None = None,
              takeover: bool = False) -> RelayStream:
        """Follow a stream started elsewhere by its ``stream_key`` (module docstring,
        "Watching"): every frame after ``after_seq`` (0: from its first one), then the live
        ones and its ``Finish``. The ``resume`` is sent on first iteration (or ``await
        stream.start()``). ``takeover``: become the stream's only attachment (every other
        one, e.g. the starter's, ends ``stream_taken_over``); reconnects never take over.
        ``id`` defaults to a random unique id."""
        sid = id or uuid.uuid4().hex
        return RelayStream(self, sid, {}, watch={"stream_key": stream_key,
                                                 "after_seq": after_seq, "takeover": takeover})

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
                                reason=finish.reason, error=finish.error, refusal=s.refusal)

    async def ping(self, timeout: float | None = 10.0) -> float:
        """Application-level ping; returns the round-trip time in seconds. While reconnecting
        it waits for the new connection (within ``timeout``). Raises :class:`ConnectionLost`
        if the connection drops before the ``pong``, ``TimeoutError`` after ``timeout``."""
        ping_id = next(self._ping_ids)
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        sent = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                ws = await self._wait_open()
                sent = time.monotonic()
                self._pings[ping_id] = future
                try:
                    await ws.send(encode_frame(frames.ping(ping_id)).decode())
                except ConnectionClosed as exc:
                    raise ConnectionLost(f"connection closed: {exc}") from exc
                await future
        finally:
            self._pings.pop(ping_id, None)
        return time.monotonic() - sent

    # ---------------------------------------------------------------- internals: state

    def _set_state(self, state: ConnectionState) -> None:
        self._state = state
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _wait_open(self) -> ClientConnection:
        """The open connection; waits while reconnecting. Raises ConnectionLost when the
        client is (or becomes) closed for good, or was never connected."""
        while True:
            if self._state == "open" and self._ws is not None:
                return self._ws
            if self._state == "closed":
                code = self.last_close[0] if self.last_close else None
                raise ConnectionLost(f"not connected ({self._lost})", close_code=code)
            if self._state == "idle":
                raise ConnectionLost("not connected (never connected)")
            await self._changed.wait()

    async def _send(self, frame: dict[str, Any]) -> None:
        """Send a frame on the open connection, waiting through a reconnect; if the socket
        turns out to be dead, wait for the next connection and send it there."""
        data = encode_frame(frame).decode()
        while True:
            ws = await self._wait_open()
            try:
                await ws.send(data)
                return
            except ConnectionClosed as exc:
                if not self.reconnect:
                    raise ConnectionLost(f"connection closed: {exc}") from exc
                while self._ws is ws and self._state == "open":
                    await self._changed.wait()   # the connection task handles the loss

    async def _send_start(self, route: _Route, frame: dict[str, Any]) -> None:
        """Send a ``start``. Once handed to a connection the stream belongs to it: if that
        connection dies, the connection task resumes the stream or fails it (never a second
        ``start``, which could run the prompt twice; the policy's one exception, a token
        refresh, is sent by the connection task). A start still queued when a reconnect
        welcomes is sent by the connection task after the resumes; then nothing is left."""
        await self._wait_open()
        if self._tracker.phase(route.id) is not StreamPhase.QUEUED:
            return  # sent by the reconnect, or cancelled locally meanwhile
        await self._send_start_now(route)

    async def _send_start_now(self, route: _Route) -> None:
        ws = self._ws
        assert ws is not None
        self._tracker.start_sent(route.id)
        try:
            await ws.send(encode_frame(route.start_frame).decode())
        except ConnectionClosed:
            pass  # the loss reaches the stream through its queue

    async def _cancel(self, route: _Route | None) -> None:
        """Carry out the policy's answer to a local cancel of a started stream."""
        if route is None:
            return
        action = self._tracker.cancel(route.id)
        if action is CancelAction.LOCAL_FINISH:  # its start never left: end it here
            self._unregister(route)
            route.queue.put_nowait(Finish.model_validate(local_cancel_finish(route.id)))
        elif action is CancelAction.SEND:
            try:
                await self._send(frames.cancel(route.id))
            except ConnectionLost:
                pass  # the stream's iteration reports the loss
        # AFTER_RESUME: _dispatch sends it when `resumed` arrives; NONE: nothing to do

    async def _send_watch(self, sid: str, stream_key: str, after_seq: int,
                          takeover: bool) -> _Route:
        """Register a watched stream and send its ``resume`` on the open connection (the
        policy's rule 6), waiting for it while reconnecting; a loss before ``resumed`` is
        handled like any stream's."""
        if self._state in ("closed", "idle"):
            raise ConnectionLost(f"not connected ({self._lost or 'never connected'})")
        if sid in self._routes:
            raise ValueError(f"stream id {sid!r} is already in use on this connection")
        route = self._routes[sid] = _Route(sid, {}, stream_key=stream_key)
        try:
            ws = await self._wait_open()
        except BaseException:
            if self._routes.get(sid) is route:
                del self._routes[sid]
            raise
        # No await between the tracker's entry and the send: a reconnect's welcome cannot
        # resume it in between (it would be sent twice).
        frame = self._tracker.watch(sid, stream_key, after_seq, takeover=takeover)
        try:
            await ws.send(encode_frame(frame).decode())
        except ConnectionClosed:
            pass  # the loss reaches the stream through the policy (resumed on the next one)
        return route

    def _register(self, sid: str, start_frame: dict[str, Any]) -> _Route:
        if self._state in ("closed", "idle"):
            raise ConnectionLost(f"not connected ({self._lost or 'never connected'})")
        if sid in self._routes:
            raise ValueError(f"stream id {sid!r} is already in use on this connection")
        self._tracker.add(sid)
        route = self._routes[sid] = _Route(sid, start_frame)
        return route

    def _unregister(self, route: _Route | None) -> None:
        if route is not None and self._routes.get(route.id) is route:
            del self._routes[route.id]
            self._tracker.forget(route.id)

    def _fail(self, route: _Route, lost: _Lost) -> None:
        self._unregister(route)
        route.queue.put_nowait(lost)

    def _apply_failures(self, failures: Sequence[StreamFailure]) -> None:
        """Streams the policy ended without a finish: each gets its exception."""
        for failure in failures:
            route = self._routes.get(failure.id)
            if route is None:
                continue
            if failure.kind == "rejected":     # the start was refused: StreamRejected
                self._unregister(route)
                assert isinstance(failure.frame, Error)   # (the relay's error, as decoded)
                route.queue.put_nowait(failure.frame)
                continue
            code = None if failure.kind == "connection_lost" else failure.code
            self._fail(route, _Lost(failure.message, close_code=failure.close_code,
                                    code=code))

    def _fail_pings(self, message: str) -> None:
        for future in self._pings.values():
            if not future.done():
                future.set_exception(ConnectionLost(message))

    # ---------------------------------------------------------------- internals: connection

    async def _run(self, ws: ClientConnection) -> None:
        """The connection task: read until the connection ends, then reconnect and resume
        (or give up), and read the new connection; until closed for good."""
        try:
            while True:
                code, reason = await self._read(ws)
                if self._closing:
                    return
                self.last_close = (code, reason)
                decision = close_decision(code, reason, welcomed=True,
                                          token_refreshable=callable(self.token))
                if not self.reconnect:
                    decision = dataclasses.replace(decision, retry=False,
                                                   resend_unanswered_starts=False)
                self._on_drop(decision)
                if not decision.retry:
                    self._close_for_good(code, _close_text(code, reason))
                    return
                new_ws = await self._reconnect(code, reason)
                if new_ws is None:
                    return
                ws = new_ws
        except Exception as exc:  # a bug here must not leave streams waiting forever
            logger.exception("llm-relay client connection task failed")
            if self._ws is not None:
                self._ws.transport.abort()
            self._close_for_good(None, f"client connection task failed: {exc!r}")

    async def _read(self, ws: ClientConnection) -> tuple[int, str]:
        """Dispatch frames until the connection ends; its close code and reason."""
        try:
            while True:
                raw = await ws.recv()
                try:
                    frame = decode_server_frame(raw)
                except ValueError:
                    logger.warning("ignoring undecodable frame from relay: %.200r", raw)
                    continue
                if frame is not None:
                    await self._dispatch(ws, frame)
        except ConnectionClosed as exc:
            if exc.rcvd is None:
                return ABNORMAL_CLOSURE, ""
            return exc.rcvd.code, exc.rcvd.reason

    def _on_drop(self, decision: CloseDecision) -> None:
        """The connection is gone: keep the streams the policy resumes (or starts again),
        fail the others."""
        self._ws = None
        grace = self.welcome.limits.detach_grace if self.welcome else 0
        outcome = self._tracker.connection_lost(decision, grace)
        self._apply_failures(outcome.failed)
        self._fail_pings(f"connection lost ({_close_text(decision.code, decision.reason)})")
        if decision.retry:
            self._set_state("reconnecting")

    def _schedule(self) -> ReconnectSchedule:
        """The policy's attempt schedule with this client's options (a new one per loss:
        the count starts again after each welcome)."""
        backoff = dataclasses.replace(BACKOFF, base=self.backoff, cap=self.backoff_max)
        return ReconnectSchedule(backoff, self.max_reconnect_attempts)

    async def _reconnect(self, code: int, reason: str) -> ClientConnection | None:
        """Connect again with backoff; on welcome send the resumes and return the connection.
        None when the client gave up (it is then closed for good)."""
        last_code: int | None = code
        last_text = _close_text(code, reason)
        schedule = self._schedule()
        while (delay := schedule.next_delay(random.random())) is not None:
            await asyncio.sleep(delay)
            attempt = schedule.attempt
            # With several relay URLs (relays sharing streams through Redis), try the next
            # one: the relay just lost may be restarting.
            self._url_index = (self._url_index + 1) % len(self.urls)
            try:
                ws, welcome = await self._open()
            except HandshakeFailed as exc:
                last_text = f"reconnect refused: {exc}"
                # Refused before any welcome: a 4401 here is final even for "token expired"
                # (a fresh token was refused), so the policy cannot loop.
                if exc.close_code is None or not close_decision(
                        exc.close_code, "", welcomed=False,
                        token_refreshable=callable(self.token)).retry:
                    self._close_for_good(exc.close_code, last_text)
                    return None
                last_code = exc.close_code
                continue
            except InvalidStatus as exc:
                status = exc.response.status_code
                last_text = f"reconnect refused: HTTP {status}"
                if status not in RETRYABLE_UPGRADE_STATUSES:
                    self._close_for_good(last_code, last_text)
                    return None
                continue
            except InvalidMessage as exc:  # e.g. the socket closed during the upgrade
                last_text = f"reconnect failed: {exc}"
                continue
            except InvalidHandshake as exc:
                self._close_for_good(last_code, f"reconnect failed: {exc}")
                return None
            except (OSError, TimeoutError) as exc:
                last_text = f"reconnect failed: {exc!r}"
                continue
            except Exception as exc:  # e.g. the token function raised: retrying won't help
                self._close_for_good(last_code, f"reconnect failed: {exc!r}")
                return None
            logger.info("reconnected to the relay (attempt %d)", attempt)
            self.welcome = welcome
            self.reconnects += 1
            self._ws = ws
            await self._resume_all(ws)
            self._set_state("open")
            return ws
        self._close_for_good(last_code, f"gave up after {schedule.attempt} reconnect attempts "
                                        f"({last_text})")
        return None

    async def _resume_all(self, ws: ClientConnection) -> None:
        """On the new connection, before anything else: a ``resume`` for every stream that
        waits for one, then the starts the policy sends now (queued ones, and after a token
        refresh the unanswered ones)."""
        grace = self.welcome.limits.detach_grace if self.welcome else 0
        outcome = self._tracker.welcomed(grace)
        self._apply_failures(outcome.failed)
        try:
            for frame in outcome.resumes:
                await ws.send(encode_frame(frame).decode())
            for sid in outcome.starts:
                route = self._routes.get(sid)
                if route is not None and self._tracker.phase(sid) is StreamPhase.QUEUED:
                    self._tracker.start_sent(sid)
                    await ws.send(encode_frame(route.start_frame).decode())
        except ConnectionClosed:
            return  # the read loop sees the loss and applies the policy again

    def _close_for_good(self, code: int | None, text: str) -> None:
        """No connection any more and none coming: fail every stream and every waiter."""
        if self._state == "closed":
            return
        self._lost = text
        self._ws = None
        if code is not None and (self.last_close is None or self.last_close[0] != code):
            self.last_close = (code, text)
        for route in list(self._routes.values()):
            self._fail(route, _Lost(f"connection lost during stream {route.id!r} ({text})",
                                    close_code=code))
        self._routes.clear()
        self._tracker.streams.clear()
        self._fail_pings(text)
        self._set_state("closed")

    # ---------------------------------------------------------------- internals: frames

    async def _dispatch(self, ws: ClientConnection, frame: Any) -> None:
        """Route one server frame by the policy's decision (llm_relay_protocol.client_policy)."""
        if isinstance(frame, Pong):
            future = self._pings.get(frame.data) if isinstance(frame.data, int) else None
            if future is not None and not future.done():
                future.set_result(0.0)
            return
        decision = self._tracker.frame(frame)
        action = decision.action
        if action is FrameAction.CONNECTION_ERROR:
            logger.warning("relay error: %s: %s", frame.code, frame.message)
            self.errors.append(frame)
            return
        if action is FrameAction.FAIL:
            self._apply_failures(decision.failures)
            return
        route = self._routes.get(decision.id) if decision.id is not None else None
        if route is None or action in (FrameAction.IGNORE, FrameAction.DUPLICATE):
            return
        if action is FrameAction.RESUMED:
            route.resumes += 1
            if decision.send_cancel:  # cancelled while it was being resumed
                try:
                    await ws.send(encode_frame(frames.cancel(route.id)).decode())
                except ConnectionClosed:
                    pass  # the read loop sees the loss
            return
        if isinstance(frame, Started):
            route.stream_key = frame.stream_key
        if action is FrameAction.END:
            self._unregister(route)  # over: nothing to resume any more
        route.queue.put_nowait(frame)
