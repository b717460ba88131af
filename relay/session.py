"""One WebSocket connection speaking llm-relay.v1.

Call order: ``Session(...).run()`` once per accepted connection. ``run`` performs the
``hello``/``welcome`` handshake, starts the connection's writer task, then reads frames until
the connection closes. Each ``start`` launches a stream in the relay-wide ``StreamHub`` and
*attaches* it here; ``resume`` attaches an existing one. Whatever ends ``run`` (client gone,
error, slow consumer, server shutdown), its ``finally`` stops the writer and detaches every
stream: with ``detach_grace == 0`` that cancels them upstream and awaits their tasks;
otherwise the hub keeps them resumable for the grace.

Outbound: every frame goes through the writer. Frames that belong to no stream (``pong``,
``error``, ``started``, ``resumed``) wait in a control queue, sent first; stream frames
are read from each stream's ``FrameLog`` past the attachment's cursor, so a client that lags
costs no copy, and its pending ``token`` frames are merged (losslessly) when sent.

Backlog rule (4008): every byte queued for the client counts, control frames included,
whatever produced it. Each change of the backlog is checked (a control frame queued, a
stream frame logged, a writer pass), not only stream appends, so a connection with no
stream is checked too. Above ``slow_consumer_bytes`` for ``slow_consumer_grace`` seconds:
close 4008. Two cases close 4008 at once: a log had to drop frames this client has not been
sent, or the control queue alone grew past twice ``slow_consumer_bytes`` (only a client that
keeps sending frames and never reads their answers gets there; the stream backlog is
bounded by the logs' caps, the control queue only by this).

Every inbound frame gets a defined answer; exceptions become ``error`` frames in exactly one
place, ``_handle``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
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
    Resume,
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
from .hub import Attachment, HubStream, StreamHub
from .limits import PrincipalState, TokenBucket
from .metrics import RelayMetrics
from .providers import ModelRegistry, ModelSpec
from .shared_limits import SharedStream
from .streamer import TokenStreamer
from .streamlog import LogEntry, coalesce

__all__ = ["Attachment", "Session", "StreamerFactory"]

logger = logging.getLogger("relay.session")

#: Builds the streamer for a start; tests inject scripted ones.
StreamerFactory = Callable[[ModelSpec], TokenStreamer]

# How long a close we initiate may take before the socket is dropped.
_CLOSE_TIMEOUT = 2.0

# Frames read from one log per writer pass: keeps streams of one connection fair.
_BATCH = 256

# What a queued control frame costs besides its bytes: the ``bytes`` object's header (33)
# and its deque slot (8), rounded up to the allocator's 16-byte granularity. Counted in the
# backlog so that many tiny frames count what they really hold.
_CONTROL_FRAME_OVERHEAD = 48


class Session:
    """One connection; the hub's ``Subscriber`` for the streams attached to it."""

    def __init__(
        self,
        ws: Any,
        settings: RelaySettings,
        registry: ModelRegistry,
        *,
        hub: StreamHub | None = None,
        streamer_factory: StreamerFactory | None = None,
        draining: Callable[[], bool] = lambda: False,
        principal: str = "anonymous",
        principal_state: PrincipalState | None = None,
        metrics: RelayMetrics | None = None,
        auth: Authenticator | None = None,
        on_hello: Callable[[], None] | None = None,
    ) -> None:
        self.metrics = metrics or RelayMetrics()
        self._on_hello = on_hello  # called once hello is accepted (pending-connection caps)
        self._auth = auth if auth is not None and auth.enabled else None
        self.credentials: Credentials | None = None  # set by _admit when auth is on
        self._expiry_close: asyncio.Task | None = None
        self.ws = ws
        self.principal = principal
        self._principal_state = principal_state or PrincipalState()
        self._frames = TokenBucket(settings.frames_per_second, settings.frame_burst)
        self._decode_limits = settings.decode_limits()
        self.settings = settings
        self.registry = registry
        self.hub = hub if hub is not None else StreamHub(settings, self.metrics)
        self.session_id = "s_" + secrets.token_urlsafe(12)
        self._streamer_factory = streamer_factory or (lambda spec: spec.streamer())
        self._draining = draining
        self._attachments: dict[str, Attachment] = {}
        self._greeted = False
        # outbound
        self._control: deque[bytes] = deque()
        self._control_bytes = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer: asyncio.Task | None = None
        self._closing: asyncio.Task | None = None
        self._lagging_since: float | None = None
        self._slow_timer: asyncio.TimerHandle | None = None
        self._cancelled_on_detach: list[asyncio.Task] = []

    @property
    def active_streams(self) -> int:
        return len(self._attachments)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        if not await self._handshake():
            return
        self._writer = asyncio.create_task(self._write_loop(),
                                           name=f"writer {self.session_id}")
        try:
            async for raw in self.ws:
                if not self._frames.take():
                    await self._close_flooded()
                    break
                await self._handle(raw)
        except ConnectionClosed:
            pass
        finally:
            await self._stop_writer()
            await self._detach_all()
            for task in (self._closing, self._expiry_close):
                if task is not None:
                    if not task.done():
                        task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

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
            hello = decode_client_frame(raw, self._decode_limits)
            if not isinstance(hello, Hello):
                raise FrameError(f"expected hello, got {type(hello).__name__.lower()}")
        except FrameError as exc:
            await ws.close(CloseCode.NOT_AUTHENTICATED,
                           close_reason(f"first frame must be hello: {exc}"))
            return False
        if not await self._admit(hello):
            return False
        self._greeted = True
        if self._on_hello is not None:
            self._on_hello()
        limits = {"max_streams": self._stream_cap(),
                  "max_frame_bytes": self.settings.max_frame_bytes,
                  "detach_grace": self.settings.detach_grace}
        welcome = frames.welcome(self.session_id, self._visible_models(), limits,
                                 PROTOCOL_VERSION)
        try:
            await ws.send(encode_frame(welcome), text=True)
        except ConnectionClosed:
            return False
        return True

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
        """Tasks of the running streams attached to this connection."""
        return [a.stream.task for a in self._attachments.values()
                if a.stream.task is not None and a.stream.running]

    async def flush(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until the writer has sent everything queued."""
        if self._writer is None or self._writer.done():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()

    def _detach_now(self) -> None:
        for att in list(self._attachments.values()):
            task = self._release(att)
            if task is not None:
                self._cancelled_on_detach.append(task)

    async def _detach_all(self) -> None:
        self._detach_now()
        cancelled, self._cancelled_on_detach = self._cancelled_on_detach, []
        if cancelled:
            # detach_grace 0: the disconnect cancelled them; the connection's end waits for
            # their upstream requests to close, so none outlives it.
            await asyncio.gather(*cancelled, return_exceptions=True)

    # ------------------------------------------------------------------ inbound

    async def _handle(self, raw: str | bytes) -> None:
        """Answer one frame. The single place where exceptions become ``error`` frames."""
        msg: Any = None
        try:
            msg = decode_client_frame(raw, self._decode_limits)
            if isinstance(msg, Start):
                await self._start(msg)
            elif isinstance(msg, Cancel):
                self._cancel(msg)
            elif isinstance(msg, Resume):
                await self._resume(msg)
            elif isinstance(msg, Ping):
                self._send(frames.pong(msg.data))
            elif isinstance(msg, Hello):
                raise BadRequest("hello was already received on this connection")
        except FrameError as exc:
            self.metrics.errors.labels(exc.code).inc()
            self._send(exc.frame())
        except RelayError as exc:
            self.metrics.errors.labels(exc.code).inc()
            self._send(frames.error(
                exc.code, exc.message, ref=getattr(msg, "type", None),
                id=exc.id or getattr(msg, "id", None), retry_after=exc.retry_after))
        except ConnectionClosed:
            raise
        except Exception:
            logger.exception("session %s: internal error handling a %s frame", self.session_id,
                             getattr(msg, "type", "?"))
            self.metrics.errors.labels(ErrorCode.INTERNAL_ERROR).inc()
            self._send(frames.error(ErrorCode.INTERNAL_ERROR, "internal error",
                                    ref=getattr(msg, "type", None),
                                    id=getattr(msg, "id", None)))

    def _check_room(self, id: str) -> None:
        if id in self._attachments:
            raise DuplicateId(f"a stream with id {id!r} is already running", id=id)
        cap = self._stream_cap()
        if len(self._attachments) >= cap:
            raise TooManyStreams(f"at most {cap} concurrent streams per connection", id=id)

    async def _start(self, msg: Start) -> None:
        if not await self._authorize_start(msg):
            return
        if self._draining():
            raise Draining("the relay is shutting down; start the stream on a new connection")
        principal = self._principal_state
        if principal.starts is not None and not principal.starts.take():
            raise RateLimited("too many starts; slow down",
                              retry_after=principal.starts.retry_after())
        self._check_room(msg.id)
        if principal.streams >= self.settings.max_streams_per_principal:
            raise TooManyStreams(f"at most {self.settings.max_streams_per_principal} "
                                 "concurrent streams per principal")
        # Their size and counts were checked by decode_client_frame (DecodeLimits).
        messages = [m.model_dump(exclude_unset=True) for m in msg.messages]
        tools = [t.model_dump(exclude_unset=True) for t in msg.tools] if msg.tools else None
        spec = self.registry.resolve(msg.model)
        params = spec.request_params(msg.params.model_dump(exclude_none=True))
        streamer = self._streamer_factory(spec)
        shared = await self._admit_shared()
        stream = self.hub.launch(
            id=msg.id, alias=msg.model, principal=self.principal,
            session_id=self.session_id, principal_state=principal, streamer=streamer,
            request={"messages": messages, "tools": tools, "tool_choice": msg.tool_choice,
                     **params}, shared=shared)
        # started is queued before the stream's task first runs, and the writer sends the
        # control queue first, so started precedes every frame of the stream.
        self._send(frames.started(msg.id, msg.model, stream.key))
        self._register(Attachment(self, stream, msg.id))

    def _cancel(self, msg: Cancel) -> None:
        att = self._attachments.get(msg.id)
        if att is None:
            raise UnknownStream(f"no running stream with id {msg.id!r}")
        self.hub.cancel(att.stream, FinishReason.CLIENT_CANCEL)

    async def _resume(self, msg: Resume) -> None:
        hub = self.hub
        try:
            stream: HubStream | None = hub.find_for_resume(msg.stream_key, self.principal,
                                                           msg.after_seq)
        except UnknownStream:
            if hub.replicator is None:
                raise
            stream = None                      # maybe it runs on another relay
        if stream is None or stream.remote:
            assert hub.replicator is not None
            stream = await hub.replicator.resume_remote(msg.stream_key, self.principal,
                                                        msg.after_seq, self.session_id)
            id = msg.id if msg.id is not None else stream.id
            try:
                self._check_room(id)
            except RelayError:
                # Never attached nor announced: only its follower task is to stop (an
                # attached marker for this key belongs to another attachment here, if any).
                if stream.task is not None:
                    stream.task.cancel()
                raise
            following = hub.get(msg.stream_key)
            if following is not None and following.remote and following.attachment is not None:
                # Followed from Redis by another attachment here: this resume takes it over
                # and follows it afresh (that log only holds what the other one had not been
                # sent yet). Only now, once the resume is sure to succeed.
                old = following.attachment
                old.subscriber.taken_over(old)
            hub.adopt(stream)
        else:
            id = msg.id if msg.id is not None else stream.id
            self._check_room(id)
        self._send(frames.resumed(id, stream.key, msg.after_seq))
        # Registering attaches it in the hub, taking it over from any other connection.
        self._register(Attachment(self, stream, id, cursor=msg.after_seq,
                                  offset=stream.log.offset_at(msg.after_seq)), announce=True)

    def failed(self, att: Attachment, code: str, message: str) -> None:
        """``Subscriber``: a stream followed from another relay cannot go on: say so, with
        its id."""
        if self._attachments.get(att.id) is not att:
            return
        self._release(att)
        self.metrics.errors.labels(code).inc()
        self._send(frames.error(code, message, ref="resume", id=att.id))

    def close_soon(self, code: int, reason: str) -> None:
        """Close the connection (e.g. 1012 on a rolling restart); its streams detach."""
        self._close_soon(code, reason)

    def _register(self, att: Attachment, *, announce: bool = False) -> None:
        self.hub.attach(att.stream, att, announce=announce)
        self._attachments[att.id] = att
        att.stream.log.listeners.add(self._on_append)
        self._notify()

    def _unregister(self, att: Attachment) -> None:
        if self._attachments.get(att.id) is att:
            del self._attachments[att.id]
        att.stream.log.listeners.discard(self._on_append)

    def _release(self, att: Attachment) -> asyncio.Task | None:
        """``att`` ends on this connection: stop sending it and detach it from the hub.
        Returns the stream's task when the detach cancelled the stream (``detach_grace``
        0), for the caller to await."""
        self._unregister(att)
        return self.hub.detach(att)

    def taken_over(self, att: Attachment) -> None:
        """``Subscriber``: a ``resume`` took ``att``'s stream over (on another connection, on
        another relay, or on this connection under another id): stop sending its frames here
        and end the attachment with ``error`` ``stream_taken_over`` naming the id it had
        here, so that a client waiting on it learns that its frames now go elsewhere (it gets
        no ``finish`` here)."""
        attached = self._attachments.get(att.id) is att
        self._release(att)
        if attached:
            self.metrics.errors.labels(ErrorCode.STREAM_TAKEN_OVER).inc()
            self._send(frames.error(
                ErrorCode.STREAM_TAKEN_OVER, f"stream {att.id!r} was taken over by a resume "
                "of its stream_key; its frames go to that attachment from now on",
                ref="resume", id=att.id))
        self._notify()

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
            if cap is not None and (len(self._attachments) >= cap
                                    or self._principal_state.streams >= cap):
                raise TooManyStreams(f"at most {cap} concurrent streams for this token")
        budget = self._principal_state.budget
        if budget is not None:
            wait = budget.retry_after()
            if wait > 0:
                raise RateLimited(f"completion token budget of {budget.limit} per hour used up",
                                  retry_after=wait)
        return True

    async def _admit_shared(self) -> SharedStream | None:
        """With relays on Redis, the last check of a ``start``: the principal's stream cap
        (the setting, lowered by a token's ``max_streams``), start rate and token budget
        across every relay of the group (relay.shared_limits; raises its refusal). None
        without Redis."""
        shared = self.hub.shared_limits
        if shared is None:
            return None
        cap, scope = self.settings.max_streams_per_principal, "per principal"
        claim = self.credentials.max_streams if self.credentials is not None else None
        if claim is not None and claim <= cap:
            cap, scope = claim, "for this token"
        state = self._principal_state
        return await shared.admit(self.principal, stream_cap=cap, scope=scope,
                                  starts=state.starts, budget=state.budget)

    def _close_when_expired(self) -> None:
        if self._expiry_close is not None:
            return
        logger.info("token expired; closing after running streams", extra={
            "session_id": self.session_id, "principal": self.principal})

        async def finish_then_close() -> None:
            tasks = self.stream_tasks()
            if tasks:
                await asyncio.wait(tasks)
            await self.flush(timeout=5.0)        # their finish frames go out first
            await self.ws.close(CloseCode.NOT_AUTHENTICATED, "token expired")

        self._expiry_close = asyncio.create_task(
            finish_then_close(), name=f"token expiry {self.session_id}")


    # ------------------------------------------------------------------ outbound

    def _send(self, frame: dict) -> bool:
        """Queue one frame that belongs to no stream's log; False once the writer is gone
        (or is being stopped). The frame counts toward the backlog (4008 rule) at once."""
        writer = self._writer
        if writer is not None and (writer.done() or writer.cancelling()):
            return False
        # A copy: orjson's result keeps a ~4 KiB allocation whatever the JSON's length.
        data = bytes(memoryview(encode_frame(frame)))
        self._control.append(data)
        self._control_bytes += len(data) + _CONTROL_FRAME_OVERHEAD
        self._notify()
        self._check_lag()
        return True

    def _notify(self) -> None:
        self._idle.clear()
        self._wake.set()

    def _on_append(self) -> None:
        # A writer that was idle sends this frame at its next turn (and checks the lag
        # then); only a busy one can be falling behind.
        if self._idle.is_set():
            self._notify()
        else:
            self._wake.set()          # (a busy writer's _idle is already clear)
            self._check_lag()

    def _pending(self) -> bool:
        if self._control:
            return True
        for att in self._attachments.values():
            log = att.stream.log
            if log.last_seq > att.cursor or (log.finished and att.cursor >= log.last_seq):
                return True
        return False

    async def _write_loop(self) -> None:
        ws = self.ws
        metrics = self.metrics
        clock = time.perf_counter
        try:
            while True:
                if not self._pending():
                    # (the lag was checked at the end of the last pass)
                    self._idle.set()
                    await self._wake.wait()
                    self._wake.clear()
                    continue
                while self._control:
                    data = self._control.popleft()
                    self._control_bytes -= len(data) + _CONTROL_FRAME_OVERHEAD
                    await ws.send(data, text=True)
                for att in list(self._attachments.values()):
                    if self._attachments.get(att.id) is not att:
                        continue                       # taken over meanwhile
                    log = att.stream.log
                    if att.cursor < log.trimmed_through:
                        self._close_slow("the stream's log dropped frames this client had "
                                         "not read; reconnect and resume")
                        return
                    entries = log.after(att.cursor, _BATCH)
                    if entries:
                        for data in self._encode_entries(att, entries):
                            await ws.send(data, text=True)
                        sent = clock()
                        for entry in entries:
                            if entry.is_token:
                                metrics.relay_latency.observe(sent - entry.received)
                        att.cursor = entries[-1].seq
                        att.offset = entries[-1].end
                        self.hub.delivered(att.stream, att.cursor)
                    if log.finished and att.cursor >= log.last_seq:
                        self._release(att)             # its finish is sent: done here
                self._check_lag()
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("session %s: writer failed", self.session_id)
            self._close_soon(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self._idle.set()

    def _encode_entries(self, att: Attachment, entries: list[LogEntry]) -> Iterable[bytes]:
        """The bytes to send for ``entries`` of ``att``'s stream (v1: merged tokens,
        re-addressed to the attachment's id). Other protocols on the same streams override
        it (relay.aisdk)."""
        stream = att.stream
        # A local stream's frames all carry its id; a followed one's come from elsewhere.
        return coalesce(entries, att.id, None if stream.remote else stream.id)

    async def _stop_writer(self) -> None:
        if self._slow_timer is not None:
            self._slow_timer.cancel()
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer

    def backlog_bytes(self) -> int:
        """Bytes queued for this client and not yet handed to the socket: control frames
        (with their per-frame overhead) and every attached stream's unsent log frames."""
        total = self._control_bytes
        for att in self._attachments.values():     # (once per frame: no generator)
            total += att.stream.log.end_offset - att.offset
        return total

    def _check_lag(self) -> None:
        """Apply the backlog rule (module docstring) after any change of the backlog."""
        if self._closing is not None:
            return
        limit = self.settings.slow_consumer_bytes
        if self._control_bytes > 2 * limit:
            self._close_slow(f"slow consumer: more than {2 * limit} bytes of replies unread")
            return
        if self.backlog_bytes() > limit:
            if self._lagging_since is None:
                self._lagging_since = time.monotonic()
                self._slow_timer = asyncio.get_running_loop().call_later(
                    self.settings.slow_consumer_grace, self._lag_timeout)
        elif self._lagging_since is not None:
            self._lagging_since = None
            if self._slow_timer is not None:
                self._slow_timer.cancel()
                self._slow_timer = None

    def _lag_timeout(self) -> None:
        self._slow_timer = None
        if self._closing is not None:
            return
        if self._lagging_since is not None and \
                self.backlog_bytes() > self.settings.slow_consumer_bytes:
            self._close_slow(f"slow consumer: more than {self.settings.slow_consumer_bytes} "
                             f"bytes unread for {self.settings.slow_consumer_grace:g} s")
        else:
            self._lagging_since = None

    def _close_slow(self, reason: str) -> None:
        self.metrics.errors.labels("slow_consumer").inc()
        logger.warning("session %s: closing a slow consumer", self.session_id,
                       extra={"session_id": self.session_id, "principal": self.principal})
        if self._writer is not None and self._writer is not asyncio.current_task():
            self._writer.cancel()
        if self._slow_timer is not None:
            self._slow_timer.cancel()
            self._slow_timer = None
        # Nothing queued will be sent any more: free it now, not when the session ends.
        self._control.clear()
        self._control_bytes = 0
        # Its streams are detached now, like on any disconnect, not once the close
        # handshake (which a client that does not read may never answer) is over.
        self._detach_now()
        self._close_soon(CloseCode.SLOW_CONSUMER, reason)

    def _close_soon(self, code: int, reason: str) -> None:
        if self._closing is None:
            self._closing = asyncio.create_task(self._close_or_abort(code, reason),
                                                name=f"close {self.session_id}")

    async def _close_or_abort(self, code: int, reason: str) -> None:
        # websockets' close() first waits for the send buffer to drain, with no deadline;
        # a client that does not read never drains it, so give up and drop the socket.
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self.ws.close(code, close_reason(reason))
        except TimeoutError:
            self.ws.transport.abort()


def close_reason(text: str) -> str:
    """A close reason fits in 123 UTF-8 bytes (RFC 6455); longer ones would fail the close."""
    data = text.encode("utf-8")
    if len(data) <= 123:
        return text
    return data[:120].decode("utf-8", errors="ignore") + "..."
