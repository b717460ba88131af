"""One WebSocket connection, whatever its wire dialect: the glue around the connection machine.

Call order: ``Session(...).run()`` once per accepted connection. ``run`` starts the
connection's writer task, feeds the machine ``Opened`` (arming the hello timer when the
machine awaits a hello or credentials), then reads frames until the connection closes,
feeding each to the machine (``FrameReceived``; one paid from the connection's frame budget
first, ``TooManyFrames`` when it cannot be). Whatever ends ``run`` (client gone, error, slow
consumer, server shutdown), its ``finally`` stops the writer and detaches every stream: with
``detach_grace == 0`` that cancels them upstream and awaits their tasks; otherwise the hub
keeps them resumable for the grace.

Decisions are not made here: the handshake, authentication, every limit, every close code
and reason and every ``error`` come from the connection's sans-I/O machine
(``relay.core.connection.Connection``), which decodes frames with the connection's dialect
codec (``llm_relay_protocol.dialect.Codec``). This class carries out its actions, in ONE executor
(``_execute``; its synchronous half ``_execute_now`` is what callbacks use: the timers, the
hub's notifications and the writer only ever receive actions that need no await):

* ``SendFrame``: the reply, encoded by the codec (``Codec.encode_reply``), is queued;
* ``Close``: the ONE close path, ``_close``: the close handshake with a deadline
  (``_CLOSE_TIMEOUT``), then the socket is dropped. Every close goes through it: handshake,
  flood, slow consumer, token expiry, restart, bug. Frames that arrive meanwhile are read
  and dropped (a flooder's close reply sits behind what it queued);
* ``AdoptCredentials``: the connection's accounting moves to the principal
  (``Principals.move``); ``ChargeStart``: one start is taken from the principal's start
  rate; ``HelloAccepted``: the pending slot is given back;
* ``CloseWhenStreamsEnd``: a task waits for the running streams and their frames, then
  feeds ``TokenExpiredStreamsDone`` (whose ``Close`` takes the one path);
* ``StartStream``/``ResumeStream``/``CancelStream``: the dialect's runtime adapter
  (``DialectAdapter``; v1's launches and resumes by stream key, the AI SDK's adds its chat
  index: relay.runtime.aisdk) through the relay's ``StreamService``
  (relay.runtime.streams). Exceptions raised while carrying one out go back to the machine
  (``ActionFailed``), which turns them into the ``error``; anything but the relay's own
  refusals is logged here first, with its traceback, as a relay bug.

Outbound: every frame goes through the writer. Replies wait in a control queue, sent first;
stream frames are read from each stream's ``FrameLog`` past the attachment's cursor, so a
client that lags costs no copy. v1 sends the logged frames (its pending ``token`` frames
merged, losslessly); another dialect's ``ResponseEncoder`` turns them into its frames.

Backlog rule (4008): every byte queued for the client counts, control frames included,
whatever produced it. Each change of the backlog is checked (a control frame queued, a
stream frame logged, a writer pass), not only stream appends, so a connection with no
stream is checked too. Above ``slow_consumer_bytes`` for ``slow_consumer_grace`` seconds:
close 4008. Two cases close 4008 at once: a log had to drop frames this client has not been
sent, or the control queue alone grew past twice ``slow_consumer_bytes`` (only a client that
keeps sending frames and never reads their answers gets there; the stream backlog is
bounded by the logs' caps, the control queue only by this).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
import orjson
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from llm_relay_protocol import FrameError, Resume, encode_frame, frames
from llm_relay_protocol.dialect import Begin, Codec, Reattach, ResponseEncoder
from llm_relay_protocol.v1 import V1Codec

from relay.core.auth import Authenticator, Credentials
from relay.config import RelaySettings
from relay.core.connection import (
    Action, ActionFailed, AdoptCredentials, CancelStream, ChargeStart, Close,
    CloseWhenStreamsEnd, Connection, ConnectionLimits, FrameReceived, HelloAccepted, HelloTimedOut,
    InternalFailure, Opened, Phase, ResumeStream, SendFrame, ServerRestart,
    SlowConsumer, Slowness, SocketClosed, StartStream, StreamFailed,
    StreamTakenOver, TokenExpiredStreamsDone, TooManyFrames,
)
from relay.core.errors import RelayError
from relay.runtime.hub import Attachment, StreamHub
from relay.runtime.streams import StreamerFactory, StreamService
from relay.core.limits import PrincipalState, TokenBucket
from relay.metrics import RelayMetrics
from relay.upstream.providers import ModelRegistry
from relay.core.streamlog import LogEntry, coalesce

__all__ = ["Attachment", "DialectAdapter", "Session", "StreamerFactory"]

logger = logging.getLogger("relay.runtime.session")

# How long a close we initiate may take before the socket is dropped.
_CLOSE_TIMEOUT = 2.0

# Frames read from one log per writer pass: keeps streams of one connection fair.
_BATCH = 256

# What a queued control frame costs besides its bytes: the ``bytes`` object's header (33)
# and its deque slot (8), rounded up to the allocator's 16-byte granularity. Counted in the
# backlog so that many tiny frames count what they really hold.
_CONTROL_FRAME_OVERHEAD = 48


class DialectAdapter:
    """A dialect's request semantics that need the runtime, for one connection. v1 (this
    class) has none: a ``Begin`` launches its stream, a ``Reattach`` resumes the stream its
    ``resume`` names. A dialect whose requests mean more (the AI SDK's chat index and its
    one active response per chat: relay.runtime.aisdk) overrides these; it raises the
    relay's refusals (``RelayError``) and never answers or closes by itself."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def refusal(self, request: Begin) -> RelayError | None:
        """The dialect's own rule for a start, asked by the machine after the request's
        credentials and before its admission (read only; None: no objection)."""
        return None

    async def begin(self, request: Begin) -> None:
        await self.session.launch(request)

    async def reattach(self, request: Reattach) -> None:
        assert request.resume is not None, "a v1 resume names its stream"
        await self.session.resume(request, request.resume)

    def close(self) -> None:
        """The connection has ended."""


class Session:
    """One connection; the hub's ``Subscriber`` for the streams attached to it. ``codec``:
    its dialect (default llm-relay.v1); ``adapter``: builds its runtime adapter (default
    ``DialectAdapter``); ``streams``: the relay's ``StreamService`` (built here from
    ``hub``, ``registry`` and ``streamer_factory`` when not given)."""

    def __init__(
        self,
        ws: ServerConnection,
        settings: RelaySettings,
        registry: ModelRegistry,
        *,
        hub: StreamHub | None = None,
        streamer_factory: StreamerFactory | None = None,
        streams: StreamService | None = None,
        draining: Callable[[], bool] = lambda: False,
        principal: str = "anonymous",
        principal_state: PrincipalState | None = None,
        metrics: RelayMetrics | None = None,
        auth: Authenticator | None = None,
        on_hello: Callable[[], None] | None = None,
        codec: Codec | None = None,
        adapter: Callable[[Session], DialectAdapter] = DialectAdapter,
    ) -> None:
        self.metrics = metrics or RelayMetrics()
        self._on_hello = on_hello  # called once hello is accepted (pending-connection caps)
        self._auth = auth if auth is not None and auth.enabled else None
        self._principals = self._auth.principals if self._auth is not None else None
        self.ws = ws
        self.frames_budget = TokenBucket(settings.frames_per_second, settings.frame_burst)
        self.settings = settings
        self.registry = registry
        if streams is None:
            streams = StreamService(hub if hub is not None else StreamHub(settings, self.metrics),
                                    registry, settings, self.metrics, streamer_factory)
        self.streams = streams
        self.hub = streams.hub
        self.session_id = "s_" + secrets.token_urlsafe(12)
        self.codec: Codec = codec if codec is not None else V1Codec()
        #: Every decision of this connection (relay.core.connection); this class carries them out.
        self.conn = Connection(
            ConnectionLimits.from_settings(settings), session_id=self.session_id,
            models=registry.aliases, codec=self.codec, principal=principal,
            principal_state=principal_state, auth=self._auth, principals=self._principals)
        self._draining = draining
        self._attachments: dict[str, Attachment] = {}
        self._encoders: dict[Attachment, ResponseEncoder] = {}
        # outbound
        self._control: deque[bytes] = deque()
        self._control_bytes = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer: asyncio.Task | None = None
        self._closing: asyncio.Task | None = None
        self._expiry_close: asyncio.Task | None = None
        self._hello_timer: asyncio.TimerHandle | None = None
        self._lagging_since: float | None = None
        self._slow_timer: asyncio.TimerHandle | None = None
        self._cancelled_on_detach: list[asyncio.Task] = []
        self.adapter = adapter(self)

    @property
    def active_streams(self) -> int:
        return len(self._attachments)

    @property
    def principal(self) -> str:
        """Who the connection acts for: its address, or once authenticated the principal."""
        return self.conn.principal

    @property
    def credentials(self) -> Credentials | None:
        return self.conn.credentials

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        conn = self.conn
        try:
            self._writer = asyncio.create_task(self._write_loop(),
                                               name=f"writer {self.session_id}")
            request = getattr(self.ws, "request", None)
            self._execute_now(conn.handle(Opened(
                self.ws.subprotocol, request.headers if request is not None else None)))
            if conn.phase in (Phase.AWAITING_HELLO, Phase.AWAITING_CREDENTIALS):
                self._hello_timer = asyncio.get_running_loop().call_later(
                    self.settings.hello_timeout, self._hello_timed_out)
            async for raw in self.ws:
                if conn.phase is Phase.CLOSING:
                    continue          # read and dropped: the close handshake waits behind it
                if not self.frames_budget.take():
                    self._execute_now(conn.handle(TooManyFrames()))
                    continue
                await self._execute(conn.handle(FrameReceived(
                    raw, self._attachments.keys(), self._draining(), self.adapter.refusal)))
        except ConnectionClosed:
            pass
        finally:
            await self._end()

    async def _end(self) -> None:
        """The connection is gone (or its task cancelled): stop its timers and tasks (the
        writer, a close under way, the token-expiry wait), detach every stream, and await
        them all, even when cancelled meanwhile (none outlives the session)."""
        self.conn.handle(SocketClosed())
        for timer in (self._hello_timer, self._slow_timer):
            if timer is not None:
                timer.cancel()
        tasks = [task for task in (self._writer, self._closing, self._expiry_close)
                 if task is not None and not task.done()]
        for task in tasks:
            task.cancel()
        self._detach_now()
        self.adapter.close()
        cancelled, self._cancelled_on_detach = self._cancelled_on_detach, []
        # detach_grace 0: the disconnect cancelled the streams; the connection's end waits
        # for their upstream requests to close too.
        await asyncio.gather(*tasks, *cancelled, return_exceptions=True)

    def _hello_timed_out(self) -> None:
        self._hello_timer = None
        if self.conn.phase in (Phase.AWAITING_HELLO, Phase.AWAITING_CREDENTIALS):
            self._execute_now(self.conn.handle(HelloTimedOut()))

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

    # ------------------------------------------------------------------ the executor

    async def _execute(self, actions: list[Action]) -> None:
        """Carry out the machine's actions in order (module docstring). A stream operation
        that raises goes back to the machine as ``ActionFailed`` (its answer is the
        ``error``); one that is not a refusal of the relay's is a bug, logged here with its
        traceback."""
        for action in actions:
            if not isinstance(action, (StartStream, ResumeStream, CancelStream)):
                self._execute_now([action])
                continue
            request = action.request
            try:
                if isinstance(action, StartStream):
                    await self.adapter.begin(action.request)
                elif isinstance(action, ResumeStream):
                    await self.adapter.reattach(action.request)
                else:
                    self.streams.cancel(self._attachments[action.id].stream)
            except (RelayError, FrameError) as exc:
                failed: Exception = exc
            except ConnectionClosed:
                raise
            except Exception as exc:
                logger.exception("session %s: internal error handling %s frame",
                                 self.session_id, self._frame_words(request.ref))
                failed = exc
            else:
                continue
            self._execute_now(self.conn.handle(ActionFailed(request, failed)))

    def _execute_now(self, actions: list[Action]) -> None:
        """The executor's synchronous half: every action but a stream operation."""
        for action in actions:
            if isinstance(action, SendFrame):
                self._reply(action.frame)
            elif isinstance(action, Close):
                self._close(action)
            elif isinstance(action, AdoptCredentials):
                self._adopt(action)
            elif isinstance(action, HelloAccepted):
                if self._on_hello is not None:
                    on_hello, self._on_hello = self._on_hello, None
                    on_hello()
            elif isinstance(action, CloseWhenStreamsEnd):
                self._close_when_streams_end()
            elif isinstance(action, ChargeStart):
                starts = action.state.starts
                if starts is not None:
                    starts.take()
            else:
                raise AssertionError(f"{action!r} needs the executor's await (_execute)")

    def _frame_words(self, ref: str) -> str:
        words = f"{self.codec.log_prefix}{ref}"
        return f"{'an' if words[:1] in tuple('aeiou') else 'a'} {words}"

    def _adopt(self, action: AdoptCredentials) -> None:
        """Authenticated: the connection's accounting moves from its address to the
        principal (the machine checked the principal's cap)."""
        assert self._principals is not None
        state = self._principals.move(action.previous, action.credentials.principal)
        if state is not self.conn.principal_state:
            self.conn.principal_state = state    # (an idle entry was pruned meanwhile)
        logger.info("authenticated", extra={
            "session_id": self.session_id, "principal": action.credentials.principal,
            "auth": action.credentials.method})

    def _close_when_streams_end(self) -> None:
        if self._expiry_close is not None:
            return
        logger.info("token expired; closing after running streams", extra={
            "session_id": self.session_id, "principal": self.principal})

        async def finish_then_close() -> None:
            tasks = self.stream_tasks()
            if tasks:
                await asyncio.wait(tasks)
            await self.flush(timeout=5.0)        # their finish frames go out first
            self._execute_now(self.conn.handle(TokenExpiredStreamsDone()))

        self._expiry_close = asyncio.create_task(
            finish_then_close(), name=f"token expiry {self.session_id}")

    def _close(self, close: Close) -> None:
        """The one close path: the close handshake, with a deadline (``_close_or_abort``)."""
        if close.note is not None:
            logger.info(close.note, extra={"session_id": self.session_id,
                                           "address": self.principal, "reason": close.reason})
        if self._closing is None:
            self._closing = asyncio.create_task(self._close_or_abort(close),
                                                name=f"close {self.session_id}")

    async def _close_or_abort(self, close: Close) -> None:
        # websockets' close() first waits for the send buffer to drain, with no deadline;
        # a client that does not read never drains it, so give up and drop the socket.
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self.ws.close(close.code, close.reason)
        except TimeoutError:
            transport = getattr(self.ws, "transport", None)
            if transport is not None:
                transport.abort()

    # ------------------------------------------------------------------ streams

    def pay_frames(self, cost: float) -> bool:
        """Charge ``cost`` frames to the connection's inbound frame budget (a dialect's
        request that costs more than one frame: an AI SDK resume's replay). False, and the
        connection is closing 4429 as for any flood, when it cannot pay."""
        if cost <= 0 or self.frames_budget.take(cost):
            return True
        self._execute_now(self.conn.handle(TooManyFrames()))
        return False

    async def launch(self, request: Begin) -> Attachment:
        """An admitted ``Begin``: launch its stream (``StreamService``), queue ``started``
        and attach it. Raises the refusals only the launch can make."""
        msg = request.start
        assert msg is not None
        stream = await self.streams.launch(msg, self.conn)
        # started is queued before the stream's task first runs, and the writer sends the
        # control queue first, so started precedes every frame of the stream.
        self._send(frames.started(msg.id, msg.model, stream.key))
        att = Attachment(self, stream, msg.id)
        self._register(att, request)
        return att

    async def resume(self, request: Reattach, msg: Resume) -> Attachment:
        """Attach the stream ``msg`` names (``StreamService.resume`` finds it and charges
        its replay), after ``resumed``. Raises the refusal."""
        id, stream = await self.streams.resume(msg, self.conn, self._attachments.keys())
        self._send(frames.resumed(id, stream.key, msg.after_seq))
        # Registering attaches it in the hub: as a viewer beside its other attachments, or
        # (takeover) as its only one, ending the others wherever they are.
        att = Attachment(self, stream, id, cursor=msg.after_seq,
                         offset=stream.log.offset_at(msg.after_seq))
        self._register(att, request, resume=True, takeover=msg.takeover)
        return att

    def failed(self, att: Attachment, code: str, message: str) -> None:
        """``Subscriber``: a stream followed from another relay cannot go on: say so, with
        its id."""
        if self._attachments.get(att.id) is not att:
            return
        self._release(att)
        self._execute_now(self.conn.handle(StreamFailed(att.id, code, message)))

    def close_for_restart(self) -> None:
        """The relay restarts while its group carries on (1012); the streams detach."""
        self._execute_now(self.conn.handle(ServerRestart()))

    def _register(self, att: Attachment, request: Begin | Reattach, *,
                  resume: bool = False, takeover: bool = False) -> None:
        encoder = self.codec.response_encoder(att.id, att.stream.key, request)
        if encoder is not None:
            self._encoders[att] = encoder
        self.hub.attach(att.stream, att, resume=resume, takeover=takeover)
        self._attachments[att.id] = att
        att.stream.log.listeners.add(self._on_append)
        self._notify()

    def _unregister(self, att: Attachment) -> None:
        if self._attachments.get(att.id) is att:
            del self._attachments[att.id]
        self._encoders.pop(att, None)
        att.stream.log.listeners.discard(self._on_append)

    def _release(self, att: Attachment) -> asyncio.Task | None:
        """``att`` ends on this connection: stop sending it and detach it from the hub.
        Returns the stream's task when the detach cancelled the stream (``detach_grace``
        0), for the caller to await."""
        self._unregister(att)
        return self.hub.detach(att)

    def taken_over(self, att: Attachment) -> None:
        """``Subscriber``: a ``resume`` with ``takeover`` took ``att``'s stream over (on
        another connection, on another relay, or on this connection under another id; ``att``
        was its owner): stop sending its frames here
        and end the attachment with ``error`` ``stream_taken_over`` naming the id it had
        here, so that a client waiting on it learns that its frames now go elsewhere (it gets
        no ``finish`` here)."""
        attached = self._attachments.get(att.id) is att
        self._release(att)
        if attached:
            self._execute_now(self.conn.handle(StreamTakenOver(att.id)))
        self._notify()

    # ------------------------------------------------------------------ outbound

    def _reply(self, frame: dict) -> None:
        """Queue a reply of the machine (a v1 server frame), in the dialect's words."""
        if frame.get("type") == "error":
            self.metrics.errors.labels(frame["code"]).inc()
        self._send(frame)

    def _send(self, frame: dict) -> bool:
        """Queue one frame that belongs to no stream's log (a v1 server frame, encoded by
        the codec; one the dialect has no frame for is not sent); False once the writer is
        gone (or is being stopped). The frame counts toward the backlog (4008 rule) at once."""
        encoded = self.codec.encode_reply(frame)
        if encoded is None:
            return True
        frame = encoded
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
                full_batch = False
                for att in list(self._attachments.values()):
                    if self._attachments.get(att.id) is not att:
                        continue                       # taken over meanwhile
                    log = att.stream.log
                    if att.cursor < log.trimmed_through:
                        self._close_slow(Slowness.LOG_TRIMMED)
                        return
                    entries = log.after(att.cursor, _BATCH)
                    full_batch = full_batch or len(entries) == _BATCH
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
                if full_batch:
                    # A replay (or a reader far behind) is read pass after pass, and a send
                    # that finds room in the socket buffer does not yield: let the loop run
                    # other connections between passes instead of after the whole log.
                    await asyncio.sleep(0)
        except ConnectionClosed:
            pass
        except Exception:
            # The writer task's boundary: a bug, logged with its traceback; 1011.
            logger.exception("session %s: writer failed", self.session_id)
            self._execute_now(self.conn.handle(InternalFailure()))
        finally:
            self._idle.set()

    def _encode_entries(self, att: Attachment, entries: list[LogEntry]) -> Iterable[bytes]:
        """The bytes to send for ``entries`` of ``att``'s stream: the dialect's
        ``ResponseEncoder`` for it, else v1 (merged tokens, re-addressed to the attachment's
        id)."""
        encoder = self._encoders.get(att)
        stream = att.stream
        if encoder is not None:
            # A merging encoder (a replay) keeps the open block's text while the log
            # already holds more (the writer's next pass reads it).
            more = entries[-1].seq < stream.log.last_seq
            return [orjson.dumps(frame)
                    for frame in encoder.feed([entry.frame for entry in entries], more=more)]
        # A local stream's frames all carry its id; a followed one's come from elsewhere.
        return coalesce(entries, att.id, None if stream.remote else stream.id)

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
            self._close_slow(Slowness.CONTROL_QUEUE)
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
            self._close_slow(Slowness.BACKLOG)
        else:
            self._lagging_since = None

    def _close_slow(self, kind: Slowness) -> None:
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
        self._execute_now(self.conn.handle(SlowConsumer(kind)))
