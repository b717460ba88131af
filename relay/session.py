"""One WebSocket connection speaking llm-relay.v1.

Call order: ``Session(...).run()`` once per accepted connection. ``run`` performs the
``hello``/``welcome`` handshake, then reads frames until the connection closes; each
``start`` becomes one supervised task (``_run_stream``). Whatever ends ``run`` (client gone,
error, server shutdown), its ``finally`` cancels every stream upstream and awaits its task,
so no task outlives its connection.

Every inbound frame gets a defined answer; exceptions become ``error`` frames in exactly one
place, ``_handle``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed

from protocol import (
    PROTOCOL_VERSION,
    Cancel,
    CloseCode,
    ErrorCode,
    FinishReason,
    FrameError,
    Hello,
    Ping,
    Start,
    decode_client_frame,
    encode_frame,
    frames,
)

from .auth import Authenticator, Credentials
from .config import RelaySettings
from .errors import (
    BadRequest, Draining, DuplicateId, RateLimited, RelayError, TooManyStreams, UnknownModel,
    UnknownStream,
)
from .limits import PrincipalState, TokenBucket
from .metrics import RelayMetrics
from .providers import ModelRegistry, ModelSpec
from .streamer import (
    ReasoningDelta,
    StreamEnd,
    TextDelta,
    TokenStreamer,
    ToolCallDelta,
    ToolCallDone,
)

__all__ = ["Session", "StreamerFactory"]

logger = logging.getLogger("relay.session")

#: Builds the streamer for a start; tests inject scripted ones.
StreamerFactory = Callable[[ModelSpec], TokenStreamer]

# Time a stream task gets to end by itself after cancel() before it is cancelled hard.
_STOP_GRACE = 5.0


@dataclass(eq=False)
class _RunningStream:
    id: str
    alias: str
    streamer: TokenStreamer
    task: asyncio.Task | None = None
    started_at: float = field(default_factory=time.monotonic)


class Session:
    def __init__(
        self,
        ws: Any,
        settings: RelaySettings,
        registry: ModelRegistry,
        *,
        streamer_factory: StreamerFactory | None = None,
        draining: Callable[[], bool] = lambda: False,
        principal: str = "anonymous",
        principal_state: PrincipalState | None = None,
        metrics: RelayMetrics | None = None,
        auth: Authenticator | None = None,
    ) -> None:
        self.metrics = metrics or RelayMetrics()
        self._auth = auth if auth is not None and auth.enabled else None
        self.credentials: Credentials | None = None  # set by _admit when auth is on
        self._expiry_close: asyncio.Task | None = None
        self.ws = ws
        self.principal = principal
        self._principal_state = principal_state or PrincipalState()
        self._frames = TokenBucket(settings.frames_per_second, settings.frame_burst)
        self.settings = settings
        self.registry = registry
        self.session_id = "s_" + secrets.token_urlsafe(12)
        self._streamer_factory = streamer_factory or (lambda spec: spec.streamer())
        self._draining = draining
        self._streams: dict[str, _RunningStream] = {}
        self._greeted = False

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        if not await self._handshake():
            return
        reason = FinishReason.CLIENT_DISCONNECT
        try:
            async for raw in self.ws:
                if not self._frames.take():
                    await self._close_flooded()
                    break
                await self._handle(raw)
        except ConnectionClosed:
            pass
        finally:
            await self.stop_streams(reason)

    async def _handshake(self) -> bool:
        ws = self.ws
        if ws.subprotocol != PROTOCOL_VERSION:
            await ws.close(CloseCode.UNSUPPORTED_VERSION,
                           f"unsupported protocol version; supported: {PROTOCOL_VERSION}")
            return False
        try:
            async with asyncio.timeout(self.settings.hello_timeout):
                raw = await ws.recv()
        except TimeoutError:
            await ws.close(CloseCode.HELLO_TIMEOUT,
                           f"no hello within {self.settings.hello_timeout:g} s")
            return False
        except ConnectionClosed:
            return False
        try:
            hello = decode_client_frame(raw)
            if not isinstance(hello, Hello):
                raise FrameError(f"expected hello, got {type(hello).__name__.lower()}")
        except FrameError as exc:
            await ws.close(CloseCode.NOT_AUTHENTICATED,
                           close_reason(f"first frame must be hello: {exc}"))
            return False
        if not await self._admit(hello):
            return False
        self._greeted = True
        limits = {"max_streams": self._stream_cap(),
                  "max_frame_bytes": self.settings.max_frame_bytes}
        return await self._send(frames.welcome(self.session_id, self._visible_models(), limits,
                                               PROTOCOL_VERSION))

    async def _close_flooded(self) -> None:
        """Close 4429 and discard what the flooder already queued: its close reply sits
        behind those frames, and the handshake cannot finish until they are read."""
        closing = asyncio.ensure_future(
            self.ws.close(CloseCode.TOO_MANY, "too many frames; slow down and reconnect"))
        with contextlib.suppress(ConnectionClosed):
            async for _ in self.ws:
                pass
        await closing

    def stream_tasks(self) -> list[asyncio.Task]:
        return [s.task for s in self._streams.values() if s.task is not None]

    async def stop_streams(self, reason: str) -> None:
        """Cancel every running stream upstream with ``reason`` and await their tasks."""
        running = list(self._streams.values())
        for stream in running:
            stream.streamer.cancel(reason)
        tasks = [s.task for s in running if s.task is not None]
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=_STOP_GRACE)
        for task in pending:
            task.cancel()
        if pending:
            logger.error("session %s: %d stream task(s) ignored cancel; cancelled hard",
                         self.session_id, len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    # ------------------------------------------------------------------ inbound

    async def _handle(self, raw: str | bytes) -> None:
        """Answer one frame. The single place where exceptions become ``error`` frames."""
        msg: Any = None
        try:
            msg = decode_client_frame(raw)
            if isinstance(msg, Start):
                await self._start(msg)
            elif isinstance(msg, Cancel):
                self._cancel(msg)
            elif isinstance(msg, Ping):
                await self._send(frames.pong(msg.data))
            elif isinstance(msg, Hello):
                raise BadRequest("hello was already received on this connection")
        except FrameError as exc:
            self.metrics.errors.labels(exc.code).inc()
            await self._send(exc.frame())
        except RelayError as exc:
            self.metrics.errors.labels(exc.code).inc()
            await self._send(frames.error(
                exc.code, exc.message, ref=getattr(msg, "type", None),
                id=getattr(msg, "id", None), retry_after=exc.retry_after))
        except ConnectionClosed:
            raise
        except Exception:
            logger.exception("session %s: internal error handling a %s frame", self.session_id,
                             getattr(msg, "type", "?"))
            self.metrics.errors.labels(ErrorCode.INTERNAL_ERROR).inc()
            await self._send(frames.error(ErrorCode.INTERNAL_ERROR, "internal error",
                                          ref=getattr(msg, "type", None),
                                          id=getattr(msg, "id", None)))

    async def _start(self, msg: Start) -> None:
        if not await self._authorize_start(msg):
            return
        if self._draining():
            raise Draining("the relay is shutting down; start the stream on a new connection")
        principal = self._principal_state
        if principal.starts is not None and not principal.starts.take():
            raise RateLimited("too many starts; slow down",
                              retry_after=principal.starts.retry_after())
        if msg.id in self._streams:
            raise DuplicateId(f"a stream with id {msg.id!r} is already running")
        if len(self._streams) >= self.settings.max_streams:
            raise TooManyStreams(
                f"at most {self.settings.max_streams} concurrent streams per connection")
        if principal.streams >= self.settings.max_streams_per_principal:
            raise TooManyStreams(f"at most {self.settings.max_streams_per_principal} "
                                 "concurrent streams per principal")
        messages = [m.model_dump(exclude_unset=True) for m in msg.messages]
        tools = [t.model_dump(exclude_unset=True) for t in msg.tools] if msg.tools else None
        self._check_payload_size(messages, tools)
        spec = self.registry.resolve(msg.model)
        params = spec.request_params(msg.params.model_dump(exclude_none=True))
        streamer = self._streamer_factory(spec)
        # started goes out before the upstream is contacted (and before anything else for
        # this id), so every upstream failure is reported by finish.
        if not await self._send(frames.started(msg.id, msg.model)):
            return
        stream = _RunningStream(msg.id, msg.model, streamer)
        self._streams[msg.id] = stream
        principal.streams += 1
        stream.task = asyncio.create_task(self._run_stream(stream, msg, messages, tools, params),
                                          name=f"stream {self.session_id}/{msg.id}")

    def _check_payload_size(self, messages: list[dict], tools: list[dict] | None) -> None:
        limit = self.settings.max_messages_bytes
        size = len(encode_frame({"m": messages, "t": tools}))
        if size > limit:
            raise BadRequest(f"messages and tools are {size} bytes; the limit is {limit} "
                             "(max_messages_bytes)")

    def _cancel(self, msg: Cancel) -> None:
        stream = self._streams.get(msg.id)
        if stream is None:
            raise UnknownStream(f"no running stream with id {msg.id!r}")
        stream.streamer.cancel(FinishReason.CLIENT_CANCEL)

    # ------------------------------------------------------------------ one stream

    async def _run_stream(self, stream: _RunningStream, msg: Start, messages: list[dict],
                          tools: list[dict] | None, params: dict) -> None:
        sid = stream.id
        streamer = stream.streamer
        send = self._send
        metrics = self.metrics
        clock = time.perf_counter
        first_token_at: float | None = None
        seq = 0
        end: StreamEnd | None = None
        metrics.active_streams.inc()
        try:
            events = streamer.events(messages, tools=tools, tool_choice=msg.tool_choice,
                                     **params)
            async with contextlib.aclosing(events):
                async for event in events:
                    received = clock()
                    if isinstance(event, StreamEnd):
                        end = event
                        seq += 1
                        await send(_finish_frame(sid, seq, event))
                        break
                    if streamer.cancelled and not isinstance(event, ToolCallDone):
                        # Nothing but the finish follows a cancel. (ToolCallDone only comes
                        # after the provider completed, and then the finish says completed.)
                        continue
                    seq += 1
                    if isinstance(event, TextDelta):
                        frame = frames.token(sid, seq, event.text)
                    elif isinstance(event, ToolCallDelta):
                        frame = frames.tool_call_chunk(sid, seq, event.index, event.call_id,
                                                       event.name, event.arguments_delta)
                    elif isinstance(event, ToolCallDone):
                        frame = frames.tool_call_complete(sid, seq, event.index, event.call_id,
                                                          event.name, event.arguments)
                    elif isinstance(event, ReasoningDelta):
                        frame = frames.reasoning(sid, seq, event.text)
                    else:
                        continue
                    if not await send(frame):
                        streamer.cancel(FinishReason.CLIENT_DISCONNECT)
                        continue
                    sent = clock()
                    metrics.relay_latency.observe(sent - received)
                    if frame["type"] == "token":
                        metrics.tokens.inc()
                        if first_token_at is None:
                            first_token_at = sent
                            metrics.time_to_first_token.observe(
                                time.monotonic() - stream.started_at)
        finally:
            metrics.active_streams.dec()
            if end is not None:
                metrics.streams.labels(str(end.status)).inc()
                if end.status == "cancelled":
                    metrics.upstream_closed_on_cancel.inc()
            if self._streams.pop(sid, None) is not None:
                self._principal_state.streams -= 1
            self._charge_usage(end)
            _log_stream_end(self.session_id, stream, end)

    # ------------------------------------------------------------------ auth and budget

    async def _admit(self, hello: Hello) -> bool:
        """Handshake hook, after ``hello``: with auth on, authenticate (relay.auth) and act
        for the authenticated principal from now on; False when the connection was closed
        (4401 missing/invalid/expired credentials, 4429 principal's connection limit)."""
        if self._auth is None:
            return True
        admitted = await self._auth.admit(self.ws, hello, self.principal, self.session_id)
        if admitted is None:
            return False
        self.credentials, self._principal_state = admitted
        self.principal = self.credentials.principal
        return True

    def _visible_models(self) -> list[str]:
        """``welcome.models``: the aliases, filtered by the token's ``models`` claim."""
        allowed = self.credentials.models if self.credentials is not None else None
        aliases = self.registry.aliases
        return aliases if allowed is None else [a for a in aliases if a in allowed]

    def _stream_cap(self) -> int:
        """Concurrent streams on this connection: the setting, lowered by a token's
        ``max_streams`` claim."""
        claim = self.credentials.max_streams if self.credentials is not None else None
        cap = self.settings.max_streams
        return cap if claim is None else min(cap, claim)

    async def _authorize_start(self, msg: Start) -> bool:
        """``start`` hook, before anything else: token expiry (False: no ``started``; the
        connection closes 4401 once its running streams have finished), the token's
        ``models`` and ``max_streams`` claims, the principal's completion token budget."""
        creds = self.credentials
        if creds is not None:
            if self._auth is not None and self._auth.expired(creds):
                self._close_when_expired()
                return False
            if creds.models is not None and msg.model not in creds.models:
                # Exactly what an alias that does not exist gets (no hint that it does).
                visible = self._visible_models()
                raise UnknownModel(f"unknown model {msg.model[:128]!r}; this relay serves: "
                                   f"{', '.join(visible) or 'nothing'}")
            cap = creds.max_streams
            if cap is not None and (len(self._streams) >= cap
                                    or self._principal_state.streams >= cap):
                raise TooManyStreams(f"at most {cap} concurrent streams for this token")
        budget = self._principal_state.budget
        if budget is not None:
            wait = budget.retry_after()
            if wait > 0:
                raise RateLimited(f"completion token budget of {budget.limit} per hour used up",
                                  retry_after=wait)
        return True

    def _close_when_expired(self) -> None:
        if self._expiry_close is not None:
            return
        logger.info("token expired; closing after running streams", extra={
            "session_id": self.session_id, "principal": self.principal})

        async def finish_then_close() -> None:
            tasks = self.stream_tasks()
            if tasks:
                await asyncio.wait(tasks)
            await self.ws.close(CloseCode.NOT_AUTHENTICATED, "token expired")

        self._expiry_close = asyncio.create_task(
            finish_then_close(), name=f"token expiry {self.session_id}")

    def _charge_usage(self, end: StreamEnd | None) -> None:
        """Charge a finished stream's completion tokens to its principal's budget."""
        budget = self._principal_state.budget
        if budget is not None and end is not None:
            budget.charge(end.usage.completion_tokens)

    # ------------------------------------------------------------------ outbound

    async def _send(self, frame: dict) -> bool:
        """Send one frame as a text message; False when the connection is gone."""
        try:
            await self.ws.send(encode_frame(frame), text=True)
        except ConnectionClosed:
            return False
        return True


def close_reason(text: str) -> str:
    """A close reason fits in 123 UTF-8 bytes (RFC 6455); longer ones would fail the close."""
    data = text.encode("utf-8")
    if len(data) <= 123:
        return text
    return data[:120].decode("utf-8", errors="ignore") + "..."


def _finish_frame(sid: str, seq: int, end: StreamEnd) -> dict:
    usage = end.usage
    return frames.finish(
        sid, seq, str(end.status), end.reason,
        frames.usage(usage.prompt_tokens, usage.completion_tokens, usage.estimated),
        end.error.as_error() if end.error is not None else None,
    )


def _log_stream_end(session_id: str, stream: _RunningStream, end: StreamEnd | None) -> None:
    duration = time.monotonic() - stream.started_at
    if end is None:
        logger.warning("stream ended without finish", extra={
            "session_id": session_id, "stream_id": stream.id, "model": stream.alias,
            "duration_s": round(duration, 3)})
        return
    logger.info("stream finished", extra={
        "session_id": session_id, "stream_id": stream.id, "model": stream.alias,
        "status": str(end.status), "reason": end.reason,
        "prompt_tokens": end.usage.prompt_tokens,
        "completion_tokens": end.usage.completion_tokens,
        "usage_estimated": end.usage.estimated, "duration_s": round(duration, 3)})
