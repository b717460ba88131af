"""Streams beyond their connection: the relay-wide table of running and resumable streams.

Each stream is a ``HubStream`` driven by one supervised task of the hub's, which awaits its
``StreamSource`` (``relay.core.ports``): for an accepted ``start`` the local upstream call
(``relay.upstream.source.UpstreamSource``: ``EventStreamer`` events become frames), for a
``resume`` of a stream running on another relay its follower in Redis
(``relay.cluster.replication.RedisFollower``). The source logs every frame in the stream's
``FrameLog`` through the hub's ``FrameSink`` (``_Sink``). A connection *attaches* to a stream
(``Session`` holds an ``Attachment``: the id it uses and a cursor into the log) and its
writer sends what the log holds past the cursor.

A stream has at most one *owner* attachment (``HubStream.attachment``: its start's, or the
one that took it over) and up to ``max_viewers_per_stream`` *viewers*
(``HubStream.viewers``). Each is a cursor into the one log, read by its own connection's
writer at that connection's pace, so a slow viewer only
ever slows (and gets closed 4008 by) its own connection. A stream followed from another
relay is one record per attachment here (``_followed``): each remote viewer reads Redis on
its own, as a single attachment did.

Lifecycle rules (PROTOCOL.md, "Resume"; as a transition table in ``relay.core.lifecycle``, whose
effects the hub carries out in ``_apply``, the only place that changes a stream's state):

* a connection that closes *detaches* its streams. With ``detach_grace == 0`` a detached
  stream is cancelled upstream at once (reason ``client_disconnect``). Otherwise it keeps
  running and logging for ``detach_grace`` seconds; a ``resume`` of its ``stream_key`` by the
  same principal re-attaches it; nobody resuming means cancel upstream and drop the log;
* a finished stream's log stays resumable for ``detach_grace`` seconds after its finish;
* a ``resume`` of an attached stream joins it as a viewer (a stream without an owner gets
  the resuming attachment as its owner); ``"takeover": true`` makes it the only attachment
  instead: every other one (owner and viewers) stops and ends with ``error``
  ``stream_taken_over`` (``Subscriber.taken_over``), also when it is on this same
  connection under another id, or on another relay (through Redis:
  ``taken_over_elsewhere``);
* the stream counts as detached (grace, cancel on disconnect) only once its last
  attachment, owner or viewer, is gone;
* ``cancel`` from any attachment always stops the upstream at once, attached or not (also
  when it reached another relay: ``cancelled_elsewhere``);
* memory: each log is capped (``max_stream_log_bytes``); past ``max_log_bytes`` in total, the
  oldest detached streams are dropped (cancelled upstream; a resume gets ``stream_lost``).
  Each viewer is charged ``VIEWER_BYTES`` to its stream's count while it watches.

Ports: the hub imports neither the connections, nor the replication, nor the upstream
adapters. ``Subscriber`` (below) is what it needs of a connection (``relay.runtime.session``);
``relay.core.ports`` holds what it needs of its adapters (``StreamSource``,
``ReplicationHook``) and what they may ask of it (``FrameSink``, ``PeerControl``).

Everything here runs on the event loop thread; no locks.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from llm_relay_protocol import ErrorCode, FinishReason, FinishStatus

from relay.config import RelaySettings
from relay.core.errors import (
    RELAY_BUG_MESSAGE, BadRequest, RelayError, StreamLost, TooManyStreams, UnknownStream,
)
from relay.core.lifecycle import TERMINAL, ByteBudget, Effect, Event, State, Timer, transition
from relay.core.limits import PrincipalState
from relay.core.outcome import StreamOutcome
from relay.core.ports import FollowedSource, ReplicationHook, SourceFailed, StreamSource
from relay.core.streamlog import FrameLog
from relay.metrics import RelayMetrics

if TYPE_CHECKING:
    from relay.cluster.shared_limits import SharedLimits, SharedStream

__all__ = ["Attachment", "HubStream", "StreamHub", "Subscriber", "VIEWER_BYTES"]

logger = logging.getLogger("relay.runtime.hub")

# Time a stream task gets to end by itself after cancel() before it is cancelled hard.
_STOP_GRACE = 5.0

#: What one viewer costs its stream in the hub's byte budget while it watches: its
#: ``Attachment`` (~100 B), its slot in the viewers list and its writer's listener entry,
#: rounded up. Its backlog is the shared log itself, already counted once.
VIEWER_BYTES = 256


class Subscriber(Protocol):
    """A connection that holds attachments of the hub's streams (``relay.runtime.session.Session``).
    The hub tells it when one of them ends without its ``finish`` reaching it; each method
    also detaches ``att`` from the hub (``StreamHub.detach``, a no-op once the stream is
    attached elsewhere)."""

    def taken_over(self, att: Attachment) -> None:
        """A ``resume`` with ``takeover`` made another attachment the only one of ``att``'s
        stream: stop sending it here and end ``att`` with ``error`` ``stream_taken_over``."""

    def failed(self, att: Attachment, code: str, message: str) -> None:
        """``att``'s stream cannot go on (followed from another relay that stopped, or
        Redis failed): end ``att`` with ``error`` ``code``. Every attachment of the stream
        is told."""


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
    #: The owner attachment (the start's connection, or whoever took it over); None once it
    #: left, also while viewers still watch.
    attachment: Attachment | None = None
    #: The other attachments, in the order they joined (``StreamHub.attach``).
    viewers: list[Attachment] = field(default_factory=list)
    #: How it ended, once its source logged its finish (None while running, and for a
    #: follower that started reading after the finish; a local stream whose task died
    #: without one gets the hub's fallback finish, a relay bug, and keeps None here).
    end: StreamOutcome | None = None
    state: State = State.RUNNING_DETACHED
    started_at: float = field(default_factory=time.monotonic)
    detached_at: float | None = None
    timer: asyncio.TimerHandle | None = None
    timer_kind: Timer | None = None
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

    @property
    def attached(self) -> bool:
        """Whether any attachment (owner or viewer) holds the stream."""
        return self.attachment is not None or bool(self.viewers)

    def attachments(self) -> list[Attachment]:
        """The owner (if any), then the viewers."""
        owner = self.attachment
        return [owner, *self.viewers] if owner is not None else list(self.viewers)

    def charge(self, delta: int) -> None:
        """Charge ``delta`` bytes that are not the log's (a viewer) to the budget."""
        if self.budget is not None:
            self.charged += delta
            self.budget.charge(delta, check=delta > 0)

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


class _Sink:
    """The ``FrameSink`` a stream's source logs into: ``append`` is the stream's own (each
    frame charged to the hub's budget); ``finish`` logs the outcome's ``finish`` frame (the
    one place an outcome becomes a frame), and it and ``finished_earlier`` move the stream
    by ``Event.FINISH``."""

    __slots__ = ("append", "id", "_finished", "_stream")

    def __init__(self, stream: HubStream,
                 finished: Callable[[HubStream, StreamOutcome | None], None]) -> None:
        self.id = stream.id
        self.append = stream.append
        self._stream = stream
        self._finished = finished

    def finish(self, seq: int, outcome: StreamOutcome, received: float | None = None,
               data: bytes | None = None) -> None:
        self._stream.append(outcome.frame(self.id, seq), received, data)
        self._finished(self._stream, outcome)

    def finished_earlier(self) -> None:
        self._finished(self._stream, None)


class StreamHub:
    """The relay's streams (module docstring); the ``PeerControl`` of relays on Redis."""

    def __init__(self, settings: RelaySettings, metrics: RelayMetrics,
                 on_stream_end: Callable[[HubStream], None] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.grace = settings.detach_grace
        #: The local streams (running or retained), by key.
        self._streams: dict[str, HubStream] = {}
        #: Streams running on other relays, followed here: one record per attachment.
        self._followed: dict[str, list[HubStream]] = {}
        self.max_viewers = settings.max_viewers_per_stream
        self._lost: dict[str, tuple[str, float]] = {}   # key -> (principal, until)
        #: Every stream task until it is done (-> its stream), also once its stream left the
        #: table (dropped or evicted while its source winds down), so close() awaits them all.
        self._tasks: dict[asyncio.Task, HubStream] = {}
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
        return len(self._streams) + sum(map(len, self._followed.values()))

    def get(self, key: str) -> HubStream | None:
        """The local stream ``key``, else the first record following it from another
        relay, else None."""
        stream = self._streams.get(key)
        if stream is None:
            followed = self._followed.get(key)
            if followed:
                return followed[0]
        return stream

    def streams(self) -> list[HubStream]:
        return [*self._streams.values(), *(s for f in self._followed.values() for s in f)]

    def viewers_of(self, key: str) -> int:
        """How many viewers watch stream ``key`` on this relay (local, or followed here)."""
        stream = self._streams.get(key)
        if stream is not None:
            return len(stream.viewers)
        return sum(len(s.viewers) for s in self._followed.get(key, ()))

    def room_for_viewer(self, key: str, *, takeover: bool,
                        id: str | None = None) -> RelayError | None:
        """Why a ``resume`` of stream ``key`` cannot join it as one more viewer here
        (``max_viewers_per_stream`` reached), or None. A takeover never joins as a viewer
        (it ends the others), nor does a resume of a local stream whose owner slot is free.
        ``id``: the id the refusal names (the resume's on its connection)."""
        if takeover:
            return None
        stream = self._streams.get(key)
        if stream is not None and stream.attachment is None:
            return None
        if self.viewers_of(key) >= self.max_viewers:
            return TooManyStreams(f"at most {self.max_viewers} viewers per stream "
                                  "(max_viewers_per_stream); this stream has them all", id=id)
        return None

    def tasks(self) -> list[asyncio.Task]:
        """Tasks of the upstream calls running in this process (also those of streams that
        already left the table and are winding down); not the followers of remote streams."""
        return [t for t, s in self._tasks.items() if not s.remote and not t.done()]

    def _start(self, stream: HubStream, coro: Coroutine[Any, Any, None],
               name: str) -> asyncio.Task[None]:
        """Run ``coro`` as ``stream``'s one task (awaited by ``close``)."""
        task = stream.task = asyncio.create_task(coro, name=name)
        self._tasks[task] = stream
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.pop(task, None)
        # Every stream ends with a finish (or its follower's failure) without raising; an
        # exception escaping the task is a relay bug: retrieve and log it rather than leave
        # it to the garbage collector.
        if not task.cancelled() and task.exception() is not None:
            logger.error("stream task failed", exc_info=task.exception(),
                         extra={"task": task.get_name()})

    # ------------------------------------------------------------------ start

    def launch(self, *, id: str, alias: str, principal: str, session_id: str,
               principal_state: PrincipalState, source: StreamSource,
               shared: SharedStream | None = None) -> HubStream:
        """Create a local stream and its task, which runs ``source`` (the upstream call);
        ``shared``: its admission to the group's limits (released when it ends). The caller
        attaches a connection before yielding to the loop."""
        stream = HubStream(
            key=secrets.token_urlsafe(24), id=id, alias=alias, principal=principal,
            session_id=session_id, source=source, principal_state=principal_state,
            log=FrameLog(max_bytes=self.settings.max_stream_log_bytes, keep=self.grace > 0),
            shared=shared)
        self._streams[stream.key] = stream
        stream.enter(self.budget)
        principal_state.streams += 1
        task = self._start(stream, self._produce(stream), f"stream {session_id}/{id}")
        if shared is not None:
            # Released when the stream ends (_finished); this catches a task that never ran.
            task.add_done_callback(lambda _: shared.release(None))
        if self.replicator is not None and self.grace > 0:
            self.replicator.mirror(stream)
        return stream

    def follow(self, source: FollowedSource, *, principal: str,
               session_id: str) -> HubStream:
        """The record of a stream running on another relay, read by ``source``
        (``ReplicationHook.resume_remote``). Not in the table yet: ``adopt`` enters it and
        starts its task, once the resume is sure to succeed."""
        return HubStream(
            key=source.key, id=source.id, alias=source.alias, principal=principal,
            session_id=session_id, source=source, principal_state=PrincipalState(),
            log=FrameLog(max_bytes=self.settings.max_stream_log_bytes, keep=False,
                         after=source.after_seq),
            remote=True)

    def adopt(self, stream: HubStream, *, takeover: bool = False) -> None:
        """Enter a followed stream (``follow``) in the table and start its task; each
        record of a remote stream holds one attachment and reads Redis on its own.
        ``takeover``: the other records following the same stream here are taken over
        (their attachments end ``stream_taken_over``)."""
        if takeover:
            for old in list(self._followed.get(stream.key, ())):
                self._take_over(old)        # (drops it: it leaves _followed)
        self._followed.setdefault(stream.key, []).append(stream)
        stream.enter(self.budget)
        self._start(stream, self._follow(stream), f"follow {stream.key[:8]}")

    # ------------------------------------------------------------------ attach / detach

    def attach(self, stream: HubStream, attachment: Attachment, *, resume: bool = False,
               takeover: bool = False) -> None:
        """Attach ``attachment`` to ``stream``: with ``takeover`` as its only attachment
        (every other one is told ``taken_over``); else as its owner when the owner slot is
        free (a ``start``; a resume of a local stream its owner left), or as one more viewer
        (the caller checked ``room_for_viewer``). A remote record's one attachment is its
        owner only for a takeover. ``resume``: a resume, which the other relays of a group
        learn of (``ReplicationHook.attached``; with ``takeover`` their attachments end)."""
        first = not stream.attached
        previous: tuple[Attachment, ...] = ()
        if takeover:
            previous = tuple(stream.attachments())
            stream.charge(-VIEWER_BYTES * len(stream.viewers))
            stream.viewers.clear()
            stream.attachment = attachment
            event = Event.ATTACH
        elif stream.attachment is None and not stream.remote:
            stream.attachment = attachment
            event = Event.ATTACH if first else Event.JOIN
        else:
            stream.viewers.append(attachment)
            stream.charge(VIEWER_BYTES)
            event = Event.ATTACH if first else Event.JOIN
        stream.detached_at = None
        self._apply(stream, event, previous=previous)
        if resume and self.replicator is not None:
            self.replicator.attached(stream, takeover=takeover)

    def detach(self, attachment: Attachment) -> asyncio.Task | None:
        """The connection holding ``attachment`` is gone. Returns the stream's task when the
        stream was cancelled because of it (so the caller can await its end)."""
        stream = attachment.stream
        if stream.attachment is attachment:
            stream.attachment = None
        elif attachment in stream.viewers:
            stream.viewers.remove(attachment)
            stream.charge(-VIEWER_BYTES)
        else:
            return None
        if stream.attached:
            self._apply(stream, Event.LEAVE)
            return None
        stream.detached_at = time.monotonic()
        self._apply(stream, Event.DETACH, reason=FinishReason.CLIENT_DISCONNECT)
        if self.budget.over:
            self._evict()               # now that it is detached, it may be dropped too
        if stream.state is State.RUNNING_DETACHED and self.grace <= 0:
            return stream.task                  # cancelled just now
        return None

    def _take_over(self, stream: HubStream) -> None:
        """``stream``'s attachments here were replaced by one the hub does not see attach
        to this record (a takeover on another relay, or a taking-over follower here):
        ``Event.TAKEN_OVER`` detaches them and tells their connections."""
        previous = tuple(stream.attachments())
        if not previous:
            return
        stream.attachment = None
        stream.charge(-VIEWER_BYTES * len(stream.viewers))
        stream.viewers.clear()
        stream.detached_at = time.monotonic()
        self._apply(stream, Event.TAKEN_OVER, previous=previous,
                    reason=FinishReason.CLIENT_DISCONNECT)
        if self.budget.over:
            self._evict()

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

    # ------------------------------------------------------------------ other relays (PeerControl)

    def cancelled_elsewhere(self, key: str) -> None:
        """A client's ``cancel`` of stream ``key`` reached another relay: cancel its upstream
        call if it runs here (a stream followed here is the owner's to cancel)."""
        stream = self._streams.get(key)
        if stream is not None and not stream.remote:
            self.cancel(stream, FinishReason.CLIENT_CANCEL)

    def taken_over_elsewhere(self, key: str) -> None:
        """A connection on another relay took stream ``key`` over: every attachment of it
        here (of the local stream, or of the records following it) ends with ``error``
        ``stream_taken_over``."""
        stream = self._streams.get(key)
        if stream is not None:
            self._take_over(stream)
        for followed in list(self._followed.get(key, ())):
            self._take_over(followed)

    # ------------------------------------------------------------------ cancel / close

    def cancel(self, stream: HubStream, reason: str) -> None:
        self._apply(stream, Event.CANCEL, reason=reason)

    async def close(self, reason: str) -> None:
        """Cancel every running stream upstream with ``reason``, stop the followers, and
        await every stream task."""
        for stream in [s for f in self._followed.values() for s in f]:
            if stream.state not in TERMINAL:
                self._apply(stream, Event.CLOSE)
        running = [s for s in self._streams.values() if s.running]
        for stream in running:
            self._apply(stream, Event.CLOSE, reason=reason)
        # The tasks of streams already dropped from the table (cancelled upstream, winding
        # down) are awaited too: no stream task outlives the hub.
        await _await_stopped([t for t in self._tasks if not t.done()])
        for stream in list(self._streams.values()):
            self._apply(stream, Event.CLOSE, reason=reason)   # disarms retention timers
        self._lost.clear()

    # ------------------------------------------------------------------ lifecycle

    def _apply(self, stream: HubStream, event: Event, *, reason: str = FinishReason.CLIENT_CANCEL,
               previous: tuple[Attachment, ...] = (), code: str = "",
               message: str = "") -> None:
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
                for att in previous:
                    if att is not stream.attachment and att not in stream.viewers:
                        att.subscriber.taken_over(att)
            elif effect is Effect.NOTIFY_FAILED:
                for att in stream.attachments():
                    att.subscriber.failed(att, code, message)
            elif effect is Effect.RELEASE:
                if self._streams.get(stream.key) is stream:
                    del self._streams[stream.key]
                followed = self._followed.get(stream.key)
                if followed is not None and stream in followed:
                    followed.remove(stream)
                    if not followed:
                        del self._followed[stream.key]
                stream.release()
            elif effect is Effect.MARK_LOST:
                self._lost[stream.key] = (stream.principal,
                                          time.monotonic() + max(self.grace, 1.0))
                stream.log.clear()
            elif effect is Effect.STOP_FOLLOWER:
                task = stream.task
                if task is not None and task is not asyncio.current_task():
                    task.cancel()           # (its own failure ends it anyway)
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
        elif self.replicator is not None and self.replicator.is_mirrored(stream.key):
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
                           if not s.attached and s.state in _EVICTABLE),
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

    # ------------------------------------------------------------------ the stream tasks

    def _finish_logged(self, stream: HubStream, outcome: StreamOutcome | None) -> None:
        """The source logged ``stream``'s finish (``_Sink.finish``; None: a follower that
        started reading after it)."""
        if outcome is not None:
            stream.end = outcome
        self._apply(stream, Event.FINISH)

    async def _produce(self, stream: HubStream) -> None:
        """The task of a local stream: run its source (the upstream call), then settle."""
        metrics = self.metrics
        metrics.active_streams.inc()
        try:
            await stream.source.run(_Sink(stream, self._finish_logged))
        finally:
            metrics.active_streams.dec()
            end = stream.end
            if end is not None:
                metrics.streams.labels(end.status.value).inc()
                if end.status is FinishStatus.CANCELLED:
                    metrics.upstream_closed_on_cancel.inc()
            else:
                # Only a hard cancel or a bug gets here; the stream still ends with a finish
                # (logged and charged like any other frame; not ``end``: no upstream said it).
                stream.append(_FALLBACK_END.frame(stream.id, stream.log.last_seq + 1))
                self._apply(stream, Event.FINISH)
            _log_stream_end(stream, end)
            self._finished(stream)

    async def _follow(self, stream: HubStream) -> None:
        """The task of a stream followed from another relay: run its source (the follower)
        until the finish, or until it fails (``Event.FAIL``: the attachment is told). Any
        other exception is a relay bug: the attachment ends with ``internal_error`` and the
        exception escapes the task (logged by ``_task_done``)."""
        try:
            await stream.source.run(_Sink(stream, self._finish_logged))
        except SourceFailed as exc:
            self._apply(stream, Event.FAIL, code=exc.code, message=exc.message)
        except Exception:
            if stream.state is State.REMOTE_FOLLOWED:
                self._apply(stream, Event.FAIL, code=ErrorCode.INTERNAL_ERROR,
                            message=RELAY_BUG_MESSAGE)
            raise

    def _finished(self, stream: HubStream) -> None:
        """A local stream's task ended (its finish is logged): settle its limits."""
        stream.principal_state.streams -= 1
        end = stream.end
        completion_tokens = end.usage.completion_tokens if end is not None else None
        budget = stream.principal_state.budget
        if budget is not None and completion_tokens is not None:
            budget.charge(completion_tokens)
        if stream.shared is not None:
            stream.shared.release(completion_tokens)
        if self._on_stream_end is not None:
            self._on_stream_end(stream)


_EVICTABLE = frozenset({State.RUNNING_DETACHED, State.FINISHED_RETAINED})


#: The finish of a local stream whose task ended without one (a relay bug).
_FALLBACK_END = StreamOutcome.relay_bug(RELAY_BUG_MESSAGE)


async def _await_stopped(tasks: list[asyncio.Task]) -> None:
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=_STOP_GRACE)
    for task in pending:
        task.cancel()
    if pending:
        logger.error("%d stream task(s) ignored cancel; cancelled hard", len(pending))
        await asyncio.gather(*pending, return_exceptions=True)


def _log_stream_end(stream: HubStream, end: StreamOutcome | None) -> None:
    duration = time.monotonic() - stream.started_at
    base = {"session_id": stream.session_id, "stream_id": stream.id, "model": stream.alias,
            "principal": stream.principal, "duration_s": round(duration, 3)}
    if end is None:
        logger.warning("stream ended without finish", extra=base)
        return
    usage = end.usage
    logger.info("stream finished", extra={
        **base, "status": end.status.value, "reason": end.reason,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "usage_estimated": usage.estimated})
