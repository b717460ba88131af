"""Streams beyond their connection: the relay-wide table of running and resumable streams.

Each accepted ``start`` becomes a ``HubStream``: one supervised task (``_produce``) that
drives the ``EventStreamer`` and appends every frame to the stream's ``FrameLog``. A
connection *attaches* to a stream (``Session`` holds an ``Attachment``: the id it uses and a
cursor into the log) and its writer sends what the log holds past the cursor.

Lifecycle rules (PROTOCOL.md, "Resume"; as a transition table in ``relay.core.lifecycle``, whose
effects the hub carries out in ``_apply``):

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
another relay; ``ReplicationHook``: the Redis side, ``relay.cluster.replication.Replicator``) and they
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

from protocol import ErrorCode, FinishReason, frames

from relay.config import RelaySettings
from relay.core.errors import BadRequest, StreamLost, UnknownStream
from relay.core.lifecycle import ByteBudget, Effect, Event, State, Timer, transition
from relay.core.limits import PrincipalState
from relay.metrics import RelayMetrics
from relay.upstream.streamer import (
    EventStreamer,
    ReasoningDelta,
    StreamEnd,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
)
from relay.core.streamlog import FrameLog

if TYPE_CHECKING:
    from relay.cluster.shared_limits import SharedLimits, SharedStream

__all__ = ["Attachment", "HubStream", "ReplicationHook", "StreamHub", "StreamSource",
           "Subscriber", "finish_frame"]

logger = logging.getLogger("relay.runtime.hub")

# Time a stream task gets to end by itself after cancel() before it is cancelled hard.
_STOP_GRACE = 5.0


class StreamSource(Protocol):
    """What produces a stream's frames, as far as the hub is concerned: something it can
    stop. A local stream's source is its ``EventStreamer`` (the upstream call, driven by the
    hub's ``_produce`` task); a remote one's is ``relay.cluster.replication``'s handle on the stream
    running on another relay (its task follows it in Redis)."""

    #: Set once ``cancel`` took effect (nothing but the finish follows).
    cancelled: bool

    def cancel(self, reason: str = FinishReason.CLIENT_CANCEL) -> None:
        """Stop producing: the stream ends with a ``finish`` saying ``reason``."""


class Subscriber(Protocol):
    """A connection that holds attachments of the hub's streams (``relay.runtime.session.Session``).
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
    """The hub's side of relays sharing Redis (``relay.cluster.replication.Replicator``)."""

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
    """One stream in the hub: its identity, its source, its log, its lifecycle ``state``
    (``relay.core.lifecycle``; only ``StreamHub._apply`` changes it) and its one timer. The
    record owns its byte accounting: from the moment it enters the hub's table until it
    leaves it, every change of its log's bytes is charged to the hub's ``ByteBudget``
    through ``append``/``trim_through``, and ``release`` gives back exactly what it
    charged."""

    key: str
    id: str                     # the id of the start that created it (frames carry it)
    alias: str
    principal: str
    session_id: str
    source: StreamSource
    log: FrameLog
    principal_state: PrincipalState
    #: A stream running on another relay, followed from Redis (see relay.cluster.replication).
    remote: bool = False
    task: asyncio.Task | None = None
    attachment: Attachment | None = None
    #: How the upstream call ended (None while running, and for a task that died without
    #: one: a relay bug, logged with a fallback finish).
    end: StreamEnd | None = None
    state: State = State.RUNNING_DETACHED
    started_at: float = field(default_factory=time.monotonic)
    detached_at: float | None = None
    timer: asyncio.TimerHandle | None = None
    timer_kind: Timer | None = None
    #: Its log is being mirrored to Redis (resumable on other relays).
    replicated: bool = False
    #: Its share of the group's per-principal limits (relays on Redis; relay.cluster.shared_limits).
    shared: SharedStream | None = None
    #: The budget its log is charged to while it is in the hub's table, and how much.
    budget: ByteBudget | None = None
    charged: int = 0

    def __post_init__(self) -> None:
        if self.remote:
            self.state = State.REMOTE_FOLLOWED

    @property
    def running(self) -> bool:
        return self.state in _RUNNING

    def enter(self, budget: ByteBudget) -> None:
        """The stream joins the hub's table: from now on its log counts in ``budget``."""
        self.release()
        self.budget = budget
        self.charged = self.log.bytes
        budget.charge(self.charged, check=True)

    def append(self, frame: dict, received: float | None = None,
               data: bytes | None = None) -> None:
        """Log ``frame`` (see ``FrameLog.append``) and charge what it changed."""
        delta = self.log.append(frame, received, data)
        budget = self.budget
        if budget is not None:
            self.charged += delta
            budget.charge(delta, check=True)

    def trim_through(self, seq: int) -> None:
        """Drop logged frames through ``seq`` (sent, and nobody can resume them)."""
        freed = self.log.trim_through(seq)
        if self.budget is not None:
            self.charged -= freed
            self.budget.charge(-freed)

    def release(self) -> None:
        """The stream left the hub's table: give back what it charged, count no more."""
        if self.budget is not None:
            self.budget.charge(-self.charged)
        self.budget = None
        self.charged = 0


_RUNNING = frozenset({State.RUNNING_ATTACHED, State.RUNNING_DETACHED, State.REMOTE_FOLLOWED})


class StreamHub:
    def __init__(self, settings: RelaySettings, metrics: RelayMetrics,
                 on_stream_end: Callable[[HubStream], None] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.grace = settings.detach_grace
        self._streams: dict[str, HubStream] = {}
        self._lost: dict[str, tuple[str, float]] = {}   # key -> (principal, until)
        #: Every stream task until it is done, also once its stream left the table (dropped
        #: or evicted while its upstream call winds down), so close() awaits them all.
        self._tasks: set[asyncio.Task] = set()
        #: Bytes held by the logs of the streams in the table (``max_log_bytes``).
        self.budget = ByteBudget(settings.max_log_bytes, on_over=self._evict)
        self._on_stream_end = on_stream_end
        self.replicator: ReplicationHook | None = None
        #: Set by the server with ``--redis``; ``Session`` admits starts through it.
        self.shared_limits: SharedLimits | None = None

    @property
    def log_bytes(self) -> int:
        return self.budget.total

    @property
    def peak_log_bytes(self) -> int:
        return self.budget.peak

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._streams)

    def get(self, key: str) -> HubStream | None:
        return self._streams.get(key)

    def streams(self) -> list[HubStream]:
        return list(self._streams.values())

    def tasks(self) -> list[asyncio.Task]:
        """Tasks of the upstream calls running in this process (also those of streams that
        already left the table and are winding down)."""
        return [t for t in self._tasks if not t.done()]

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        # _produce ends every stream with a finish itself; an exception escaping it is a
        # relay bug: retrieve and log it rather than leave it to the garbage collector.
        if not task.cancelled() and task.exception() is not None:
            logger.error("stream task failed", exc_info=task.exception(),
                         extra={"task": task.get_name()})

    def adopt(self, stream: HubStream) -> None:
        """Add a remote stream (followed from Redis) so control messages can find it."""
        old = self._streams.get(stream.key)
        if old is not None and old is not stream and old.remote:
            self._apply(old, Event.CLOSE)
        self._streams[stream.key] = stream
        stream.enter(self.budget)

    # ------------------------------------------------------------------ start

    def launch(self, *, id: str, alias: str, principal: str, session_id: str,
               principal_state: PrincipalState, streamer: EventStreamer,
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
        stream.enter(self.budget)
        principal_state.streams += 1
        stream.task = asyncio.create_task(self._produce(stream, streamer, request),
                                          name=f"stream {session_id}/{id}")
        self._tasks.add(stream.task)
        stream.task.add_done_callback(self._task_done)
        if shared is not None:
            # Released when the stream ends (_finished); this catches a task that never ran.
            stream.task.add_done_callback(lambda _: shared.release(None))
        if self.replicator is not None and self.grace > 0:
            self.replicator.mirror(stream)
        return stream

    # ------------------------------------------------------------------ attach / detach

    def attach(self, stream: HubStream, attachment: Attachment, *, announce: bool = False) -> None:
        """``announce``: a resume, which takes the stream over on every relay of a group."""
        previous = stream.attachment
        stream.attachment = attachment
        stream.detached_at = None
        self._apply(stream, Event.ATTACH, previous=previous)
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
        self._apply(stream, Event.DETACH, reason=FinishReason.CLIENT_DISCONNECT)
        if self.budget.over:
            self._evict()               # now that it is detached, it may be dropped too
        if stream.state is State.RUNNING_DETACHED and self.grace <= 0:
            return stream.task                  # cancelled just now
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
            stream.trim_through(seq)

    # ------------------------------------------------------------------ remote streams

    def remote_finished(self, stream: HubStream) -> None:
        """The follower of a remote stream logged its finish."""
        self._apply(stream, Event.FINISH)

    def remote_failed(self, stream: HubStream, code: str, message: str) -> None:
        """The follower of a remote stream cannot go on: its attachment ends with ``error``
        ``code``."""
        self._apply(stream, Event.FAIL, code=code, message=message)

    # ------------------------------------------------------------------ cancel / close

    def cancel(self, stream: HubStream, reason: str) -> None:
        self._apply(stream, Event.CANCEL, reason=reason)

    async def close(self, reason: str) -> None:
        """Cancel every running stream upstream with ``reason`` and await their tasks."""
        for stream in [s for s in self._streams.values() if s.remote]:
            self._apply(stream, Event.CLOSE)
        running = [s for s in self._streams.values() if s.running]
        for stream in running:
            self._apply(stream, Event.CLOSE, reason=reason)
        # The tasks of streams already dropped from the table (cancelled upstream, winding
        # down) are awaited too: no stream task outlives the hub.
        await _await_stopped(self.tasks())
        for stream in list(self._streams.values()):
            self._apply(stream, Event.CLOSE, reason=reason)   # disarms retention timers
        self._lost.clear()

    # ------------------------------------------------------------------ lifecycle

    def _apply(self, stream: HubStream, event: Event, *, reason: str = FinishReason.CLIENT_CANCEL,
               previous: Attachment | None = None, code: str = "", message: str = "") -> None:
        """Move ``stream`` by ``event`` (relay.core.lifecycle) and carry out the effects."""
        outcome = transition(stream.state, event, self.grace > 0)
        stream.state = outcome.state
        for effect in outcome.effects:
            if effect is Effect.CANCEL_UPSTREAM:
                stream.source.cancel(reason)
            elif effect is Effect.DISARM_TIMER:
                self._disarm(stream)
            elif effect is Effect.ARM_GRACE:
                self._arm(stream, Timer.GRACE)
            elif effect is Effect.ARM_RETENTION:
                self._arm(stream, Timer.RETENTION)
            elif effect is Effect.NOTIFY_TAKEN_OVER:
                if previous is not None and previous is not stream.attachment:
                    previous.subscriber.taken_over(previous)
            elif effect is Effect.NOTIFY_FAILED:
                att = stream.attachment
                if att is not None:
                    att.subscriber.failed(att, code, message)
            elif effect is Effect.RELEASE:
                if self._streams.get(stream.key) is stream:
                    del self._streams[stream.key]
                stream.release()
            elif effect is Effect.MARK_LOST:
                self._lost[stream.key] = (stream.principal,
                                          time.monotonic() + max(self.grace, 1.0))
                stream.log.clear()
            elif effect is Effect.STOP_FOLLOWER:
                if self.replicator is not None:
                    self.replicator.released(stream)
            else:  # pragma: no cover - every effect is handled above
                raise AssertionError(effect)

    def _arm(self, stream: HubStream, kind: Timer) -> None:
        self._disarm(stream)
        stream.timer_kind = kind
        stream.timer = asyncio.get_running_loop().call_later(
            self.grace, self._timer_fired, stream, kind)

    @staticmethod
    def _disarm(stream: HubStream) -> None:
        if stream.timer is not None:
            stream.timer.cancel()
        stream.timer = None
        stream.timer_kind = None

    def _timer_fired(self, stream: HubStream, kind: Timer) -> None:
        stream.timer = None
        stream.timer_kind = None
        if kind is Timer.RETENTION:
            self._apply(stream, Event.RETENTION_OVER)
        elif stream.replicated and self.replicator is not None:
            self.replicator.spawn(self._grace_over_replicated(stream))
        else:
            self._expire(stream)

    async def _grace_over_replicated(self, stream: HubStream) -> None:
        # A connection on another relay may be following it from Redis.
        assert self.replicator is not None
        held = await self.replicator.attached_elsewhere(stream.key)
        if stream.state is not State.RUNNING_DETACHED or stream.timer is not None:
            return                      # resumed, finished or re-armed meanwhile
        if held:
            self._apply(stream, Event.HELD_ELSEWHERE)
        else:
            self._expire(stream)

    def _expire(self, stream: HubStream) -> None:
        logger.info("stream not resumed within %g s; cancelling upstream", self.grace,
                    extra={"stream_id": stream.id, "session_id": stream.session_id})
        self._apply(stream, Event.GRACE_OVER, reason=FinishReason.CLIENT_DISCONNECT)

    def _evict(self) -> None:
        """Drop the oldest detached streams until the logs fit the budget again."""
        detached = sorted((s for s in self._streams.values()
                           if s.attachment is None and s.state in _EVICTABLE),
                          key=lambda s: s.detached_at or 0.0)
        for stream in detached:
            if not self.budget.over:
                break
            logger.warning("log budget exceeded; dropping a detached stream",
                           extra={"stream_id": stream.id, "session_id": stream.session_id})
            self._apply(stream, Event.EVICT, reason=FinishReason.CLIENT_DISCONNECT)
        now = time.monotonic()
        for key in [k for k, (_, t) in self._lost.items() if t <= now]:
            del self._lost[key]

    def _finished(self, stream: HubStream) -> None:
        """The stream's task ended (its finish is logged): settle its limits."""
        stream.principal_state.streams -= 1
        end = stream.end
        budget = stream.principal_state.budget
        if budget is not None and end is not None:
            budget.charge(end.usage.completion_tokens)
        if stream.shared is not None:
            stream.shared.release(end.usage.completion_tokens if end is not None else None)
        if self._on_stream_end is not None:
            self._on_stream_end(stream)

    async def _produce(self, stream: HubStream, streamer: EventStreamer,
                       request: dict[str, Any]) -> None:
        sid = stream.id
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
                        stream.append(finish_frame(sid, seq, event), received)
                        self._apply(stream, Event.FINISH)
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
                    stream.append(frame, received)
        finally:
            metrics.active_streams.dec()
            if end is not None:
                metrics.streams.labels(str(end.status)).inc()
                if end.status == "cancelled":
                    metrics.upstream_closed_on_cancel.inc()
            else:
                # Only a hard cancel or a bug gets here; the stream still ends with a finish
                # (logged and charged like any other frame).
                stream.append(frames.finish(
                    sid, seq + 1, "failed", ErrorCode.INTERNAL_ERROR, frames.usage(0, 0, True),
                    frames.error_info(ErrorCode.INTERNAL_ERROR,
                                      "the stream ended unexpectedly")))
                self._apply(stream, Event.FINISH)
            _log_stream_end(stream, end)
            self._finished(stream)


_EVICTABLE = frozenset({State.RUNNING_DETACHED, State.FINISHED_RETAINED})


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
