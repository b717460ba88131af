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

Decisions are not made here: every close code and reason, the handshake, the admission of a
``start`` and every ``error`` frame come from the connection's sans-I/O machine
(``relay.core.connection.Connection``), fed with what happened (a frame, a timer, a flood, a slow
client, a bug) and answered with actions this glue carries out (``_perform``). Exceptions
raised while carrying one out go back to the machine (``ActionFailed``), which turns them
into the ``error`` frame; anything but the relay's own refusals is logged here first, with
its traceback, as a relay bug.
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

from protocol import FinishReason, FrameError, Resume, Start, encode_frame, frames

from relay.core.auth import Authenticator, Credentials
from relay.config import RelaySettings
from relay.core.connection import (
    Action, ActionFailed, AdoptCredentials, CancelStream, Close, CloseWhenStreamsEnd,
    Connection, ConnectionLimits, Dialect, FrameReceived, HelloAccepted, HelloTimedOut,
    InternalFailure, Opened, Phase, Refuse, ResumeStream, SendFrame, ServerRestart,
    SlowConsumer, Slowness, SocketClosed, StartRequested, StartStream, StreamFailed,
    StreamTakenOver, TokenExpiredStreamsDone, TooManyFrames,
)
from relay.core.errors import RateLimited, RelayError, UnknownStream
from relay.runtime.hub import Attachment, HubStream, StreamHub
from relay.core.limits import Principals, PrincipalState, TokenBucket
from relay.metrics import RelayMetrics
from relay.upstream.providers import ModelRegistry, ModelSpec
from relay.cluster.redis_store import StoreUnavailable
from relay.cluster.shared_limits import SharedStream
from relay.upstream.source import UpstreamSource
from relay.upstream.streamer import EventStreamer
from relay.core.streamlog import LogEntry, coalesce
from relay.aio import cancel_and_wait

__all__ = ["Attachment", "Session", "StreamerFactory"]

logger = logging.getLogger("relay.runtime.session")

#: Builds the streamer for a start; tests inject scripted ones.
StreamerFactory = Callable[[ModelSpec], EventStreamer]

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
        self._expiry_close: asyncio.Task | None = None
        self.ws = ws
        self._frames = TokenBucket(settings.frames_per_second, settings.frame_burst)
        self._decode_limits = settings.decode_limits()
        self.settings = settings
        self.registry = registry
        self.hub = hub if hub is not None else StreamHub(settings, self.metrics)
        self.session_id = "s_" + secrets.token_urlsafe(12)
        #: Every decision of this connection (relay.core.connection); this class carries them out.
        self.conn = Connection(
            ConnectionLimits.from_settings(settings), session_id=self.session_id,
            models=registry.aliases, principal=principal, principal_state=principal_state,
            auth=self._auth, principals=self._auth.principals if self._auth else None,
            dialect=self.dialect)
        self._streamer_factory = streamer_factory or (lambda spec: spec.streamer())
        self._draining = draining
        self._attachments: dict[str, Attachment] = {}
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

    #: The wire protocol; another one (relay.runtime.aisdk) overrides it, and the machine
    #: applies its rules for it.
    dialect = Dialect.V1

    @property
    def active_streams(self) -> int:
        return len(self._attachments)

    @property
    def principal(self) -> str:
        """Who the connection acts for: its address, or once authenticated the principal."""
        return self.conn.principal

    @principal.setter
    def principal(self, value: str) -> None:
        self.conn.principal = value

    @property
    def credentials(self) -> Credentials | None:
        return self.conn.credentials

    @credentials.setter
    def credentials(self, value: Credentials | None) -> None:
        self.conn.credentials = value

    @property
    def _principal_state(self) -> PrincipalState:
        return self.conn.principal_state

    @_principal_state.setter
    def _principal_state(self, value: PrincipalState) -> None:
        self.conn.principal_state = value

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        try:
            if not await self._handshake():
                return                # (a restart's close may be running: awaited below)
            self._writer = asyncio.create_task(self._write_loop(),
                                               name=f"writer {self.session_id}")
            async for raw in self.ws:
                if not self._frames.take():
                    await self._close_flooded()
                    break
                await self._handle(raw)
        except ConnectionClosed:
            pass
        finally:
            self.conn.handle(SocketClosed())
            await self._stop_writer()
            await self._detach_all()
            for task in (self._closing, self._expiry_close):
                if task is not None:
                    if not task.done():
                        task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

    async def _handshake(self) -> bool:
        """``hello``/``welcome``; False when the connection was closed instead. Until
        ``welcome`` the writer does not run: frames go straight to the socket."""
        ws, conn = self.ws, self.conn
        request = getattr(ws, "request", None)
        opened = conn.handle(Opened(ws.subprotocol,
                                    request.headers if request is not None else None))
        if not await self._perform_handshake(opened):
            return False
        try:
            async with asyncio.timeout(self.settings.hello_timeout):
                raw = await ws.recv()
        except TimeoutError:
            await self._perform_handshake(conn.handle(HelloTimedOut()))
            return False
        except ConnectionClosed:
            return False
        # (A restart may have closed it meanwhile: then the hello gets no answer.)
        return (await self._perform_handshake(conn.handle(FrameReceived(raw)))
                and conn.phase is Phase.WELCOMED)

    async def _perform_handshake(self, actions: list[Action]) -> bool:
        """Carry out the handshake's actions; False once the connection is closed."""
        for action in actions:
            if isinstance(action, Close):
                self._log_close(action)
                await self.ws.close(action.code, action.reason)
                return False
            if isinstance(action, (AdoptCredentials, HelloAccepted)):
                self._admitted(action)
            elif isinstance(action, SendFrame):
                try:
                    await self.ws.send(encode_frame(action.frame), text=True)
                except ConnectionClosed:
                    return False
            else:
                raise AssertionError(f"unexpected handshake action {action!r}")
        return True

    def _admitted(self, action: AdoptCredentials | HelloAccepted) -> None:
        """Authenticated (the machine has moved the accounting), or past what ``hello``
        proves: the connection no longer holds a pending slot of its address."""
        if isinstance(action, AdoptCredentials):
            logger.info("authenticated", extra={
                "session_id": self.session_id, "principal": action.credentials.principal,
                "auth": action.credentials.method})
        elif self._on_hello is not None:
            on_hello, self._on_hello = self._on_hello, None
            on_hello()

    def _log_close(self, close: Close) -> None:
        if close.note is not None:
            logger.info(close.note, extra={"session_id": self.session_id,
                                           "address": self.principal, "reason": close.reason})

    async def _close_flooded(self) -> None:
        """Close 4429 and discard what the flooder already queued: its close reply sits
        behind those frames, and the handshake cannot finish until they are read."""
        closes = [a for a in self.conn.handle(TooManyFrames()) if isinstance(a, Close)]
        if not closes:
            return                    # already closing for another reason
        closing = asyncio.create_task(self.ws.close(closes[0].code, closes[0].reason),
                                      name=f"close {self.session_id}")
        try:
            with contextlib.suppress(ConnectionClosed):
                async for _ in self.ws:
                    pass
        except BaseException:
            # Cancelled (or failed) while draining: the close is ours, stop it too.
            await cancel_and_wait(closing)
            raise
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
        """Answer one frame: the machine decides, this carries it out."""
        actions = self.conn.handle(FrameReceived(raw, self._attachments.keys(),
                                                 self._draining()))
        for action in actions:
            await self._perform(action)

    async def _perform(self, action: Action) -> None:
        """Carry out one action of the machine. An exception raised by a stream operation
        goes back to the machine as ``ActionFailed`` (its answer is the ``error`` frame);
        one that is not a refusal of the relay's is a bug, logged here with its traceback."""
        if isinstance(action, (SendFrame, Close)):
            self._perform_now([action])
            return
        if isinstance(action, CloseWhenStreamsEnd):
            self._close_when_expired()
            return
        if isinstance(action, (AdoptCredentials, HelloAccepted)):
            self._admitted(action)
            return
        if isinstance(action, Refuse):
            raise action.error
        msg: Any = getattr(action, "msg", None)
        try:
            if isinstance(action, StartStream):
                await self._launch(action.msg)
            elif isinstance(action, CancelStream):
                self.hub.cancel(self._attachments[action.msg.id].stream,
                                FinishReason.CLIENT_CANCEL)
            elif isinstance(action, ResumeStream):
                await self._resume(action.msg)
            else:
                raise AssertionError(f"unexpected action {action!r}")
        except (RelayError, FrameError) as exc:
            failed = exc
        except ConnectionClosed:
            raise
        except Exception as exc:
            logger.exception("session %s: internal error handling a %s frame", self.session_id,
                             getattr(msg, "type", "?"))
            failed = exc
        else:
            return
        for answer in self.conn.handle(ActionFailed(msg, failed)):
            await self._perform(answer)

    async def _start(self, msg: Start) -> None:
        """The v1 admission of a ``start`` built by another protocol (relay.runtime.aisdk), then its
        launch. Raises the refusal (``RelayError``); returns without a stream when the
        token has expired (no answer; the connection closes 4401 once its streams end)."""
        actions = self.conn.handle(StartRequested(msg, self._attachments.keys(),
                                                  self._draining()))
        for action in actions:
            if isinstance(action, StartStream):
                await self._launch(action.msg)
            else:
                await self._perform(action)

    async def _launch(self, msg: Start) -> None:
        """An admitted ``start``: resolve its alias, pass the group's limits (Redis), start
        it in the hub, queue ``started`` and attach it. Raises ``RelayError`` for the
        checks only this can make (unknown alias, ``max_tokens`` ceiling, group limits)."""
        principal = self._principal_state
        # Their size and counts were checked by decode_client_frame (DecodeLimits).
        messages = [m.model_dump(exclude_unset=True) for m in msg.messages]
        tools = [t.model_dump(exclude_unset=True) for t in msg.tools] if msg.tools else None
        spec = self.registry.resolve(msg.model)
        params = spec.request_params(msg.params.model_dump(exclude_none=True))
        streamer = self._streamer_factory(spec)
        shared = await self._admit_shared()
        source = UpstreamSource(
            streamer, {"messages": messages, "tools": tools, "tool_choice": msg.tool_choice,
                       **params},
            metrics=self.metrics, on_chunk=shared.charge if shared is not None else None,
            alias=spec.alias)
        stream = self.hub.launch(
            id=msg.id, alias=msg.model, principal=self.principal,
            session_id=self.session_id, principal_state=principal, source=source,
            shared=shared)
        # started is queued before the stream's task first runs, and the writer sends the
        # control queue first, so started precedes every frame of the stream.
        self._send(frames.started(msg.id, msg.model, stream.key))
        self._register(Attachment(self, stream, msg.id))

    def _check_room(self, id: str) -> None:
        refusal = self.conn.room_for(id, self._attachments.keys())
        if refusal is not None:
            raise refusal

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
            source = await hub.replicator.resume_remote(msg.stream_key, self.principal,
                                                        msg.after_seq)
            id = msg.id if msg.id is not None else source.id
            self._check_room(id)        # (refused: nothing started, nothing to stop)
            self._check_viewer_room(msg, id)
            await self._pay_for_resume(
                id, await self._remote_replay_events(msg.stream_key, msg.after_seq))
            stream = hub.follow(source, principal=self.principal, session_id=self.session_id)
            # Only now, once the resume is sure to succeed: the hub enters it and starts its
            # follower (each attachment of a remote stream reads it from Redis on its own;
            # a takeover ends the records following it here for an owner).
            hub.adopt(stream, takeover=msg.takeover)
        else:
            id = msg.id if msg.id is not None else stream.id
            self._check_room(id)
            self._check_viewer_room(msg, id)
            log = stream.log
            if await self._pay_for_resume(id, min(len(log),
                                                  max(0, log.last_seq - msg.after_seq))):
                # Redis was asked: the stream may have ended its grace or been dropped
                # meanwhile (raises), or be another record now.
                if hub.find_for_resume(msg.stream_key, self.principal,
                                       msg.after_seq) is not stream:
                    raise UnknownStream("no resumable stream with that stream_key")
                self._check_room(id)
                self._check_viewer_room(msg, id)
        self._send(frames.resumed(id, stream.key, msg.after_seq))
        # Registering attaches it in the hub: as a viewer beside the other attachments, or
        # (takeover) as its owner, ending the old owner's attachment wherever it is.
        self._register(Attachment(self, stream, id, cursor=msg.after_seq,
                                  offset=stream.log.offset_at(msg.after_seq)),
                       resume=True, takeover=msg.takeover)

    def _check_viewer_room(self, msg: Resume, id: str) -> None:
        """Raise the refusal of a resume that would be one viewer too many."""
        refusal = self.hub.room_for_viewer(msg.stream_key, takeover=msg.takeover)
        if refusal is not None:
            refusal.id = id
            raise refusal

    async def _pay_for_resume(self, id: str, replayed: int) -> bool:
        """Charge the ``replayed`` events a resume sends again to the principal's replay
        budget (``--replay-events-per-second`` / ``--replay-event-burst``), which outlives
        the connection: a client reconnecting to resume again pays from the same bucket.
        With relays on Redis, then from the group's bucket of the principal too
        (``SharedLimits.take_replay``). Raises ``rate_limited`` with ``retry_after`` for
        this resume when it cannot pay (the connection stays). True when it awaited Redis."""
        state = self._principal_state
        wait = Principals.charge_replay(state, replayed)
        shared = self.hub.shared_limits
        asked = False
        if wait is None and shared is not None and state.replays is not None and replayed > 0:
            asked = True
            wait = await shared.take_replay(self.principal, state.replays,
                                            min(replayed, state.replays.burst))
        if wait is not None:
            logger.debug("refused a resume: the principal's replay budget is spent",
                        extra={"session_id": self.session_id, "principal": self.principal})
            raise RateLimited(f"too many replayed events for this principal; resume again in "
                              f"{wait:g} s", retry_after=wait, id=id)
        return asked

    async def _remote_replay_events(self, stream_key: str, after_seq: int) -> int:
        """How many events a resume of ``stream_key`` (running on another relay) after
        ``after_seq`` reads from Redis now; 0 when the store cannot say."""
        assert self.hub.replicator is not None
        try:
            last = await self.hub.replicator.store.last_seq(stream_key)
        except StoreUnavailable:
            return 0
        return max(0, (last or 0) - after_seq)

    def failed(self, att: Attachment, code: str, message: str) -> None:
        """``Subscriber``: a stream followed from another relay cannot go on: say so, with
        its id."""
        if self._attachments.get(att.id) is not att:
            return
        self._release(att)
        self._perform_now(self.conn.handle(StreamFailed(att.id, code, message)))

    def close_for_restart(self) -> None:
        """The relay restarts while its group carries on (1012); the streams detach."""
        self._perform_now(self.conn.handle(ServerRestart()))

    def _perform_now(self, actions: list[Action]) -> None:
        """Carry out actions that need no await (frames to queue, a close to start)."""
        for action in actions:
            if not isinstance(action, (SendFrame, Close)):
                raise AssertionError(f"unexpected action {action!r}")
            if isinstance(action, SendFrame):
                if action.frame.get("type") == "error":
                    self.metrics.errors.labels(action.frame["code"]).inc()
                self._send(action.frame)
            else:
                self._log_close(action)
                self._close_soon(action)

    def _register(self, att: Attachment, *, resume: bool = False,
                  takeover: bool = False) -> None:
        self.hub.attach(att.stream, att, resume=resume, takeover=takeover)
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
        """``Subscriber``: a ``resume`` with ``takeover`` took ``att``'s stream over (on
        another connection, on another relay, or on this connection under another id; ``att``
        was its owner): stop sending its frames here
        and end the attachment with ``error`` ``stream_taken_over`` naming the id it had
        here, so that a client waiting on it learns that its frames now go elsewhere (it gets
        no ``finish`` here)."""
        attached = self._attachments.get(att.id) is att
        self._release(att)
        if attached:
            self._perform_now(self.conn.handle(StreamTakenOver(att.id)))
        self._notify()

    # ------------------------------------------------------------------ auth and budget

    async def _admit_shared(self) -> SharedStream | None:
        """With relays on Redis, the last check of a ``start``: the principal's stream cap
        (the setting, lowered by a token's ``max_streams``), start rate and token budget
        across every relay of the group (relay.cluster.shared_limits; raises its refusal). None
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
            for action in self.conn.handle(TokenExpiredStreamsDone()):
                if isinstance(action, Close):
                    await self.ws.close(action.code, action.reason)

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
            self._perform_now(self.conn.handle(InternalFailure()))
        finally:
            self._idle.set()

    def _encode_entries(self, att: Attachment, entries: list[LogEntry]) -> Iterable[bytes]:
        """The bytes to send for ``entries`` of ``att``'s stream (v1: merged tokens,
        re-addressed to the attachment's id). Other protocols on the same streams override
        it (relay.runtime.aisdk)."""
        stream = att.stream
        # A local stream's frames all carry its id; a followed one's come from elsewhere.
        return coalesce(entries, att.id, None if stream.remote else stream.id)

    async def _stop_writer(self) -> None:
        if self._slow_timer is not None:
            self._slow_timer.cancel()
        if self._writer is not None and not self._writer.done():
            await cancel_and_wait(self._writer)

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
        self._perform_now(self.conn.handle(SlowConsumer(kind)))

    def _close_soon(self, close: Close) -> None:
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
            self.ws.transport.abort()
