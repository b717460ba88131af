"""Streams beyond their connection: the relay-wide table of running and resumable streams.

Each accepted ``start`` becomes a ``HubStream``: one supervised task (``_produce``) that
drives the ``TokenStreamer`` and appends every frame to the stream's ``FrameLog``. A
connection *attaches* to a stream (``Session`` holds an ``Attachment``: the id it uses and a
cursor into the log) and its writer sends what the log holds past the cursor.

Lifecycle rules (PROTOCOL.md, "Resume"):

* a connection that closes *detaches* its streams. With ``detach_grace == 0`` a detached
  stream is cancelled upstream at once (reason ``client_disconnect``). Otherwise it keeps
  running and logging for ``detach_grace`` seconds; a ``resume`` of its ``stream_key`` by the
  same principal re-attaches it; nobody resuming means cancel upstream and drop the log;
* a finished stream's log stays resumable for ``detach_grace`` seconds after its finish;
* a ``resume`` of a stream attached elsewhere takes it over: the old attachment stops and
  ends with ``error`` ``stream_taken_over`` (``Subscriber.taken_over``), also when the old
  one is on this same connection under another id, or on another relay (through Redis);
* ``cancel`` always stops the upstream at once, attached or not;
* memory: each log is capped (``max_stream_log_bytes``); past ``max_log_bytes`` in total, the
  oldest detached streams are dropped (cancelled upstream; a resume gets ``stream_lost``).

Ports: the hub imports neither the connections nor the replication; it defines what it needs
from them (``Subscriber``: a connection it notifies about its attachments; ``StreamSource``:
what produces a stream's frames, a local upstream call or a follower of a stream running on
another relay; ``ReplicationHook``: the Redis side, ``relay.replication.Replicator``) and they
implement it.

Everything here runs on the event loop thread; no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from protocol import FinishReason, frames

from .config import RelaySettings
from .errors import BadRequest, StreamLost, UnknownStream
from .limits import PrincipalState
from .metrics import RelayMetrics
from .streamer import (
    ReasoningDelta,
    StreamEnd,
    TextDelta,
    TokenStreamer,
    ToolCallDelta,
    ToolCallDone,
)
from .streamlog import FrameLog

if TYPE_CHECKING:
    from .shared_limits import SharedLimits, SharedStream

__all__ = ["Attachment", "HubStream", "ReplicationHook", "StreamHub", "StreamSource",
           "Subscriber", "finish_frame"]

logger = logging.getLogger("relay.hub")

# Time a stream task gets to end by itself after cancel() before it is cancelled hard.
_STOP_GRACE = 5.0


class StreamSource(Protocol):
    """What produces a stream's frames, as far as the hub is concerned: something it can
    stop. A local stream's source is its ``TokenStreamer`` (the upstream call, driven by the
    hub's ``_produce`` task); a remote one's is ``relay.replication``'s handle on the stream
    running on another relay (its task follows it in Redis)."""

    #: Set once ``cancel`` took effect (nothing but the finish follows).
    cancelled: bool

    def cancel(self, reason: str = FinishReason.CLIENT_CANCEL) -> None:
        """Stop producing: the stream ends with a ``finish`` saying ``reason``."""


class Subscriber(Protocol):
    """A connection that holds attachments of the hub's streams (``relay.session.Session``).
    The hub tells it when one of them ends without its ``finish`` reaching it; each method
    also detaches ``att`` from the hub (``StreamHub.detach``, a no-op once the stream is
    attached elsewhere)."""

    def taken_over(self, att: Attachment) -> None:
        """A ``resume`` attached ``att``'s stream elsewhere: stop sending it here and end
        ``att`` with ``error`` ``stream_taken_over``."""

    def failed(self, att: Attachment, code: str, message: str) -> None:
        """``att``'s stream cannot go on (followed from another relay that stopped, or
        Redis failed): end ``att`` with ``error`` ``code``."""


class ReplicationHook(Protocol):
    """The hub's side of relays sharing Redis (``relay.replication.Replicator``)."""

    def mirror(self, stream: HubStream) -> None:
        """Start copying a local stream's log to Redis (at launch)."""

    def attached(self, stream: HubStream) -> None:
        """A connection here attached ``stream`` by a resume: the other relays detach theirs."""

    def released(self, stream: HubStream) -> None:
        """A remote stream is no longer attached here: stop following it."""

    async def attached_elsewhere(self, key: str) -> bool:
        """Whether a connection on another relay follows stream ``key``."""

    async def resume_remote(self, key: str, principal: str, after_seq: int,
                            session_id: str) -> HubStream:
        """A remote ``HubStream`` for stream ``key`` running on another relay."""

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task:
        """Run ``coro`` as a task the replication awaits on close."""


@dataclass(eq=False)
class Attachment:
    """Stream ``stream`` as seen by one connection (``subscriber``): the ``id`` it uses there
    and the last ``seq`` sent (``cursor``; ``offset`` is the log's byte count through it)."""

    subscriber: Subscriber
    stream: HubStream
    id: str
    cursor: int = 0
    offset: int = 0


@dataclass(eq=False)
class HubStream:
    key: str
    id: str                     # the id of the start that created it (frames carry it)
    alias: str
    principal: str
    session_id: str
    source: StreamSource
    log: FrameLog
    principal_state: PrincipalState
    task: asyncio.Task | None = None
    attachment: Attachment | None = None
    end: StreamEnd | None = None
    started_at: float = field(default_factory=time.monotonic)
    detached_at: float | None = None
    timer: asyncio.TimerHandle | None = None
    #: A stream running on another relay, followed from Redis (see relay.replication).
    remote: bool = False
    #: Its log is being mirrored to Redis (resumable on other relays).
    replicated: bool = False
    mirror: asyncio.Task | None = None
    #: Its share of the group's per-principal limits (relays on Redis; relay.shared_limits).
    shared: SharedStream | None = None

    @property
    def running(self) -> bool:
        return self.end is None


class StreamHub:
    def __init__(self, settings: RelaySettings, metrics: RelayMetrics,
                 on_stream_end: Callable[[HubStream], None] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.grace = settings.detach_grace
        self._streams: dict[str, HubStream] = {}
        self._lost: dict[str, tuple[str, float]] = {}   # key -> (principal, until)
        self.log_bytes = 0
        self.peak_log_bytes = 0
        self._on_stream_end = on_stream_end
        self.replicator: ReplicationHook | None = None
        #: Set by the server with ``--redis``; ``Session`` admits starts through it.
        self.shared_limits: SharedLimits | None = None

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._streams)

    def get(self, key: str) -> HubStream | None:
        return self._streams.get(key)

    def streams(self) -> list[HubStream]:
        return list(self._streams.values())

    def tasks(self) -> list[asyncio.Task]:
        """Tasks of the upstream calls running in this process."""
        return [s.task for s in self._streams.values()
                if s.task is not None and s.running and not s.remote]

    def adopt(self, stream: HubStream) -> None:
        """Add a remote stream (followed from Redis) so control messages can find it."""
        old = self._streams.get(stream.key)
        if old is not None and old is not stream and old.remote:
            self._release_remote(old)
        self._streams[stream.key] = stream

    # ------------------------------------------------------------------ start

    def launch(self, *, id: str, alias: str, principal: str, session_id: str,
               principal_state: PrincipalState, streamer: TokenStreamer,
               request: dict[str, Any], shared: SharedStream | None = None) -> HubStream:
        """Create the stream and its task. ``request`` holds the streamer's ``events()``
        arguments; ``shared``: its admission to the group's limits (charged per streamed
        chunk, released when it ends). The caller attaches a connection before yielding to
        the loop."""
        stream = HubStream(
            key=secrets.token_urlsafe(24), id=id, alias=alias, principal=principal,
            session_id=session_id, source=streamer, principal_state=principal_state,
            log=FrameLog(max_bytes=self.settings.max_stream_log_bytes, keep=self.grace > 0),
            shared=shared)
        self._streams[stream.key] = stream
        principal_state.streams += 1
        stream.task = asyncio.create_task(self._produce(stream, streamer, request),
                                          name=f"stream {session_id}/{id}")
        if shared is not None:
            # Released when the stream ends (_finished); this catches a task that never ran.
            stream.task.add_done_callback(lambda _: shared.release(None))
        if self.replicator is not None and self.grace > 0:
            self.replicator.mirror(stream)
        return stream

    # ------------------------------------------------------------------ attach / detach

    def attach(self, stream: HubStream, attachment: Attachment, *, announce: bool = False) -> None:
        """``announce``: a resume, which takes the stream over on every relay of a group."""
        old = stream.attachment
        stream.attachment = attachment
        stream.detached_at = None
        if old is not None and old is not attachment:
            old.subscriber.taken_over(old)      # takeover: the old one stops receiving
        if stream.timer is not None and stream.running:
            stream.timer.cancel()
            stream.timer = None
        if announce and self.replicator is not None:
            self.replicator.attached(stream)

    def detach(self, attachment: Attachment) -> asyncio.Task | None:
        """The connection holding ``attachment`` is gone. Returns the stream's task when the
        stream was cancelled because of it (so the caller can await its end)."""
        stream = attachment.stream
        if stream.attachment is not attachment:
            return None
        stream.attachment = None
        stream.detached_at = time.monotonic()
        if stream.remote:
            self._release_remote(stream)
            return None
        if self.log_bytes > self.settings.max_log_bytes:
            self._evict()
            if self._streams.get(stream.key) is not stream:
                return None
        if not stream.running:
            if not stream.log.keep:
                self._drop(stream)
            return None
        if self.grace <= 0:
            stream.source.cancel(FinishReason.CLIENT_DISCONNECT)
            return stream.task
        stream.timer = asyncio.get_running_loop().call_later(
            self.grace, self._grace_over, stream)
        return None

    def find_for_resume(self, key: str, principal: str, after_seq: int) -> HubStream:
        """The stream ``key`` for ``principal`` to resume after ``after_seq``. Unknown,
        expired and other principals' keys look the same (``unknown_stream``)."""
        stream = self._streams.get(key)
        if stream is None or stream.principal != principal or not stream.log.keep:
            lost = self._lost.get(key)
            if lost is not None and lost[0] == principal and lost[1] > time.monotonic():
                raise StreamLost("this stream's log was dropped (memory budget); "
                                 "its frames cannot be replayed")
            raise UnknownStream("no resumable stream with that stream_key")
        if after_seq < stream.log.trimmed_through:
            raise StreamLost(f"frames after seq {after_seq} were dropped from this stream's "
                             "log (max_stream_log_bytes); they cannot be replayed")
        if after_seq > stream.log.last_seq:
            raise BadRequest(f"after_seq {after_seq} is beyond the stream's last seq "
                             f"{stream.log.last_seq}")
        return stream

    def delivered(self, stream: HubStream, seq: int) -> None:
        """An attachment sent everything through ``seq``; an unresumable log drops it."""
        if not stream.log.keep:
            freed = stream.log.trim_through(seq)
            if self._streams.get(stream.key) is stream:
                self.log_bytes -= freed

    # ------------------------------------------------------------------ cancel / close

    def cancel(self, stream: HubStream, reason: str) -> None:
        stream.source.cancel(reason)

    async def close(self, reason: str) -> None:
        """Cancel every running stream upstream with ``reason`` and await their tasks."""
        for stream in [s for s in self._streams.values() if s.remote]:
            self._release_remote(stream)
        running = [s for s in self._streams.values() if s.running]
        for stream in running:
            stream.source.cancel(reason)
        await _await_stopped([s.task for s in running if s.task is not None])
        for stream in list(self._streams.values()):
            if stream.timer is not None:
                stream.timer.cancel()
        self._lost.clear()

    # ------------------------------------------------------------------ internals

    def _release_remote(self, stream: HubStream) -> None:
        if self._streams.get(stream.key) is stream:
            del self._streams[stream.key]
        if self.replicator is not None:
            self.replicator.released(stream)

    def _grace_over(self, stream: HubStream) -> None:
        stream.timer = None
        if stream.attachment is not None:
            return
        if stream.running and stream.replicated and self.replicator is not None:
            self.replicator.spawn(self._grace_over_replicated(stream))
            return
        self._expire(stream)

    async def _grace_over_replicated(self, stream: HubStream) -> None:
        # A connection on another relay may be following it from Redis.
        assert self.replicator is not None
        if await self.replicator.attached_elsewhere(stream.key):
            if stream.attachment is None and stream.running and stream.timer is None:
                stream.timer = asyncio.get_running_loop().call_later(
                    self.grace, self._grace_over, stream)
            return
        if stream.attachment is None:
            self._expire(stream)

    def _expire(self, stream: HubStream) -> None:
        if stream.running:
            logger.info("stream not resumed within %g s; cancelling upstream", self.grace,
                        extra={"stream_id": stream.id, "session_id": stream.session_id})
            stream.source.cancel(FinishReason.CLIENT_DISCONNECT)
        self._drop(stream)

    def _drop(self, stream: HubStream) -> None:
        if self._streams.get(stream.key) is stream:
            del self._streams[stream.key]
            self.log_bytes -= stream.log.bytes
            if stream.timer is not None:
                stream.timer.cancel()
                stream.timer = None

    def _account(self, stream: HubStream, delta: int) -> None:
        # log_bytes counts the logs of the streams in the table; a dropped stream's log was
        # subtracted when it was dropped (its task may still append its finish).
        if self._streams.get(stream.key) is not stream:
            return
        self.log_bytes += delta
        if self.log_bytes > self.peak_log_bytes:
            self.peak_log_bytes = self.log_bytes
        if self.log_bytes > self.settings.max_log_bytes:
            self._evict()

    def _evict(self) -> None:
        """Drop the oldest detached streams until the logs fit the budget again."""
        detached = sorted((s for s in self._streams.values() if s.attachment is None),
                          key=lambda s: s.detached_at or 0.0)
        until = time.monotonic() + max(self.grace, 1.0)
        for stream in detached:
            if self.log_bytes <= self.settings.max_log_bytes:
                break
            logger.warning("log budget exceeded; dropping a detached stream",
                           extra={"stream_id": stream.id, "session_id": stream.session_id})
            if stream.running:
                stream.source.cancel(FinishReason.CLIENT_DISCONNECT)
            self._drop(stream)
            stream.log.clear()
            self._lost[stream.key] = (stream.principal, until)
        now = time.monotonic()
        for key in [k for k, (_, t) in self._lost.items() if t <= now]:
            del self._lost[key]

    def _finished(self, stream: HubStream) -> None:
        stream.principal_state.streams -= 1
        budget = stream.principal_state.budget
        if budget is not None and stream.end is not _NO_END:
            budget.charge(stream.end.usage.completion_tokens)
        if stream.shared is not None:
            stream.shared.release(stream.end.usage.completion_tokens
                                  if stream.end is not _NO_END else None)
        if self._on_stream_end is not None:
            self._on_stream_end(stream)
        if not stream.log.keep:
            if stream.attachment is None:
                self._drop(stream)
            return
        if stream.timer is not None:
            stream.timer.cancel()
        # A finished stream's log stays resumable for the grace (the client may have lost
        # its connection just before the finish reached it).
        stream.timer = asyncio.get_running_loop().call_later(self.grace, self._drop, stream)

    async def _produce(self, stream: HubStream, streamer: TokenStreamer,
                       request: dict[str, Any]) -> None:
        sid = stream.id
        log = stream.log
        metrics = self.metrics
        clock = time.perf_counter
        first_token = True
        seq = 0
        end: StreamEnd | None = None
        metrics.active_streams.inc()
        try:
            events = streamer.events(**request)
            async with contextlib.aclosing(events):
                async for event in events:
                    received = clock()
                    if isinstance(event, StreamEnd):
                        end = event
                        stream.end = end
                        seq += 1
                        self._account(stream, log.append(finish_frame(sid, seq, event),
                                                         received))
                        break
                    if streamer.cancelled and not isinstance(event, ToolCallDone):
                        # Nothing but the finish follows a cancel. (ToolCallDone only comes
                        # after the provider completed, and then the finish says completed.)
                        continue
                    seq += 1
                    if isinstance(event, TextDelta):
                        frame = frames.token(sid, seq, event.text)
                        metrics.tokens.inc()
                        if first_token:
                            first_token = False
                            metrics.time_to_first_token.observe(
                                time.monotonic() - stream.started_at)
                    elif isinstance(event, ToolCallDelta):
                        frame = frames.tool_call_chunk(sid, seq, event.index, event.call_id,
                                                       event.name, event.arguments_delta)
                    elif isinstance(event, ToolCallDone):
                        frame = frames.tool_call_complete(sid, seq, event.index, event.call_id,
                                                          event.name, event.arguments)
                    elif isinstance(event, ReasoningDelta):
                        frame = frames.reasoning(sid, seq, event.text)
                    else:
                        seq -= 1
                        continue
                    if stream.shared is not None and not isinstance(event, ToolCallDone):
                        stream.shared.charge(1)    # one per streamed chunk; topped up at the end
                    self._account(stream, log.append(frame, received))
        finally:
            metrics.active_streams.dec()
            if end is not None:
                metrics.streams.labels(str(end.status)).inc()
                if end.status == "cancelled":
                    metrics.upstream_closed_on_cancel.inc()
            else:
                # Only a hard cancel or a bug gets here; the stream still ends with a finish.
                stream.end = _NO_END
                log.append(frames.finish(
                    sid, seq + 1, "failed", None, frames.usage(0, 0, True),
                    {"code": "internal_error", "message": "the stream ended unexpectedly"}))
            _log_stream_end(stream, end)
            self._finished(stream)


_NO_END: Any = object()   # marks a stream whose task died without a StreamEnd (a bug)


def finish_frame(sid: str, seq: int, end: StreamEnd) -> dict:
    usage = end.usage
    return frames.finish(
        sid, seq, str(end.status), end.reason,
        frames.usage(usage.prompt_tokens, usage.completion_tokens, usage.estimated),
        end.error.as_error() if end.error is not None else None,
    )


async def _await_stopped(tasks: list[asyncio.Task]) -> None:
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=_STOP_GRACE)
    for task in pending:
        task.cancel()
    if pending:
        logger.error("%d stream task(s) ignored cancel; cancelled hard", len(pending))
        await asyncio.gather(*pending, return_exceptions=True)


def _log_stream_end(stream: HubStream, end: StreamEnd | None) -> None:
    duration = time.monotonic() - stream.started_at
    base = {"session_id": stream.session_id, "stream_id": stream.id, "model": stream.alias,
            "principal": stream.principal, "duration_s": round(duration, 3)}
    if end is None:
        logger.warning("stream ended without finish", extra=base)
        return
    logger.info("stream finished", extra={
        **base, "status": str(end.status), "reason": end.reason,
        "prompt_tokens": end.usage.prompt_tokens,
        "completion_tokens": end.usage.completion_tokens,
        "usage_estimated": end.usage.estimated})
