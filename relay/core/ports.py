"""The interfaces between the stream hub and its adapters (issue 12, "Ports, not cycles").

The hub (``relay.runtime.hub.StreamHub``) drives every stream the same way, whatever
produces it; the adapters implement these ports without importing the hub, and the hub
imports none of them:

* ``StreamSource``: what produces one stream's frames. The hub runs one task per stream,
  which awaits ``source.run(sink)``; the source logs every frame through the ``FrameSink``
  the hub gives it, and stops early when the hub calls ``cancel``. Two implementations:
  ``relay.upstream.source.UpstreamSource`` (a local upstream call: ``EventStreamer`` events
  become frames) and ``relay.cluster.replication.RedisFollower`` (a stream running on
  another relay, read from Redis; a ``FollowedSource``);
* ``ReplicationHook``: the Redis side of a group of relays
  (``relay.cluster.replication.Replicator``), which in turn reaches this relay's streams
  only through ``PeerControl`` (the hub's methods for what other relays ask) and reads
  them only as ``StreamView``.

Protocols only: nothing here does I/O or imports the event loop (a source's ``run`` is a
coroutine the hub's task awaits).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Protocol

from llm_relay_protocol import FinishReason
from llm_relay_protocol.frames import Frame

from relay.core.outcome import StreamOutcome
from relay.core.streamlog import FrameLog

__all__ = ["FollowedSource", "FrameSink", "PeerControl", "ReplicationHook", "SourceFailed",
           "StreamSource", "StreamView"]


class FrameSink(Protocol):
    """Where a source logs its stream's frames (the hub gives one to ``run``). Frames are
    protocol frames (``llm_relay_protocol.frames``), their ``seq`` increasing; ``received``: when the
    event that became the frame arrived (``time.perf_counter``); ``data``: the frame's
    encoding, when the source has it already (a follower reads encoded frames)."""

    #: The id the stream's frames carry (the id of the ``start`` that created it).
    id: str

    def append(self, frame: Frame, received: float | None = None,
               data: bytes | None = None) -> None:
        """Log one frame that is not the finish."""

    def finish(self, seq: int, outcome: StreamOutcome, received: float | None = None,
               data: bytes | None = None) -> None:
        """The stream ended with ``outcome``: log its ``finish`` frame as frame ``seq``
        (``outcome.frame``; ``data``: that frame's encoding, when the source has it). The
        last call, exactly once (or ``finished_earlier`` instead)."""

    def finished_earlier(self) -> None:
        """The stream has finished, but its finish lies at or before where this source
        started reading (a resume after the stream's last seq): nothing more to log. The
        last call, exactly once (or ``finish`` instead)."""


class SourceFailed(Exception):
    """Raised by ``StreamSource.run`` when the stream cannot go on and no ``finish`` will
    come (a followed stream whose relay stopped, Redis gone): the attachment ends with
    ``error`` ``code``. A local upstream call never raises it (its failures end in a
    ``finish``); any other exception escaping ``run`` is a bug of the relay's."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class StreamSource(Protocol):
    """What produces one stream's frames. The hub's one task for the stream awaits ``run``
    once; ``cancel`` may be called at any time from the same event loop."""

    async def run(self, sink: FrameSink) -> None:
        """Produce the stream: ``sink.append`` each frame, then ``sink.finish`` its outcome
        and return (or raise ``SourceFailed``). Any other exception is a relay bug: the hub
        logs it with its traceback and ends the stream with ``internal_error`` (a local
        stream with its fallback ``finish``, ``failed``; a followed one with an ``error``
        to its attachment). A local source returning without its finish gets that fallback
        finish too. Cancelling the task is a hard stop."""

    def cancel(self, reason: str = FinishReason.CLIENT_CANCEL) -> None:
        """Stop producing soon: nothing but the finish follows, which says ``reason``
        (``client_cancel``, ``client_disconnect`` or ``server_shutdown``). Idempotent."""


class FollowedSource(StreamSource, Protocol):
    """A ``StreamSource`` reading a stream that runs on another relay: it names the stream
    and where the reading starts (the hub builds its record from these)."""

    #: The stream's key, the id of the ``start`` that created it, and its model alias.
    key: str
    id: str
    alias: str
    #: Frames with ``seq`` up to this are not read (the resume's ``after_seq``).
    after_seq: int


class StreamView(Protocol):
    """What the adapters may read of a hub stream (``relay.runtime.hub.HubStream``); they
    never change it."""

    key: str
    id: str
    alias: str
    principal: str
    #: A stream running on another relay, followed here.
    remote: bool
    log: FrameLog


class PeerControl(Protocol):
    """What the other relays of a group may ask of this relay's streams, by key (the hub's
    side; each call goes through the hub's lifecycle table)."""

    def cancelled_elsewhere(self, key: str) -> None:
        """A client's ``cancel`` of stream ``key`` reached another relay: if its upstream
        call runs here, cancel it (``client_cancel``), as a local ``cancel`` would."""

    def taken_over_elsewhere(self, key: str) -> None:
        """A connection on another relay took stream ``key`` over: the owner attachment of
        it here, if any, ends with ``error`` ``stream_taken_over`` (viewers stay)."""


class ReplicationHook(Protocol):
    """The hub's side of relays sharing Redis (``relay.cluster.replication.Replicator``)."""

    def mirror(self, stream: StreamView) -> None:
        """Start copying a local stream's log to Redis (at launch)."""

    def is_mirrored(self, key: str) -> bool:
        """Whether stream ``key``'s log is being copied to Redis (so a connection on another
        relay may be following it)."""

    def attached(self, stream: StreamView, *, takeover: bool = False) -> None:
        """A connection here attached ``stream`` by a resume (a followed one is marked
        attached); ``takeover``: the other relays end their owner attachments of it."""

    def released(self, stream: StreamView) -> None:
        """A followed stream is no longer attached here (the hub stopped its task): stop
        announcing that a connection here follows it."""

    async def attached_elsewhere(self, key: str) -> bool:
        """Whether a connection on another relay follows stream ``key``."""

    async def remote_last_seq(self, key: str) -> int | None:
        """The last seq of stream ``key``'s log in Redis (None: empty or absent); raises
        ``relay.cluster.redis_store.StoreUnavailable`` when Redis cannot answer."""

    async def resume_remote(self, key: str, principal: str, after_seq: int) -> FollowedSource:
        """The source of stream ``key`` running on another relay, read after ``after_seq``
        (raises the resume's refusal: ``unknown_stream``, ``stream_lost``, ...)."""

    # Any: a coroutine of any kind; its result is not used.
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> object:
        """Run ``coro`` as a task the replication awaits on close."""
