"""Several relay processes acting as one, through Redis (``--redis``).

The node that runs a stream's upstream call (its *owner*) mirrors the stream's frame log into
a Redis Stream (``RedisStore.append``, trimmed to ``redis_max_frames``) and keeps an owner key
alive with a heartbeat. Any node can then serve a ``resume`` of that stream: it builds a
*remote* stream in its hub whose source is a ``RedisFollower`` (the hub's ``StreamSource``
port, ``relay.core.ports``: the hub's task for the stream runs it, and it logs what it reads
from Redis, ``XREAD BLOCK``), and its connection's writer sends it like any local stream.
Control travels by pub/sub:

* ``{"op": "cancel", "key": K}`` (``llm_relay_protocol.RelayCancel``): the owner cancels the upstream
  call through its hub (``PeerControl.cancelled_elsewhere``: ``Event.CANCEL``, as a local
  ``cancel``), so a ``cancel`` sent to any node stops the request running on another;
* ``{"op": "takeover", "key": K, "node": N}`` (``llm_relay_protocol.RelayTakeover``): a connection on
  node N took the stream over (a ``resume`` with ``"takeover": true``); every other node
  detaches its own *owner* attachment of it through its hub
  (``PeerControl.taken_over_elsewhere``: ``Event.TAKEN_OVER``; the old one stops receiving
  frames and ends with ``error`` ``stream_taken_over``, as on a single relay). Viewers
  stay: a plain ``resume`` (a viewer) is announced to nobody.

Both are built by ``llm_relay_protocol.frames`` and parsed by ``llm_relay_protocol.decode_relay_message``; a
message the models refuse (an unknown ``op`` from a newer relay, a missing field) is logged
and dropped.

Mirroring is a group commit (``_GroupCommit``): one writer reads every mirrored log, woken
by the logs' listeners, and sends all the new frames in one pipeline
(``RedisStore.append_many``); what arrives while that write is in flight goes in the next.
With 1,000 streams at 10 tokens/s that is one Redis round trip per loop turn instead of a
MULTI/EXEC per token per stream, and no task wake-up per token per stream; an idle relay
adds no delay (the first frame is written at once).

A node that serves remote attachments (one follower each) refreshes one *attached* marker per
stream while any of them lasts, which keeps the owner from cancelling the (locally detached)
stream when its grace runs out.

The replicator reaches the hub only through the ports of ``relay.core.ports``: it implements
``ReplicationHook`` and ``FollowedSource``, reads streams as ``StreamView`` and asks the hub
by key (``PeerControl``); it never changes a stream's state itself. What it owns is which
logs it mirrors (``is_mirrored``) and its attached markers.

Failure policy: Redis is an add-on, never a dependency of local streams. If Redis fails, a
local stream keeps running and finishing for its own connection (it just cannot be resumed
elsewhere: the mirror stops and logs one warning); a remote attachment ends with an ``error``
``store_unavailable``; a resume that needs Redis gets that error. Nothing crashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Coroutine
from typing import Any, Literal

import orjson

from llm_relay_protocol import (
    ErrorCode, FinishReason, RelayCancel, RelayTakeover, decode_relay_message, frames,
)

from relay.aio import cancel_and_wait
from relay.cluster.redis_store import ChatRecord, RedisStore, StoreUnavailable
from relay.config import RelaySettings
from relay.core.errors import BadRequest, RelayError, StreamLost, UnknownStream
from relay.core.lifecycle import SharedState
from relay.core.outcome import StreamOutcome
from relay.core.ports import FrameSink, PeerControl, SourceFailed, StreamView
from relay.core.streamlog import FrameLog

__all__ = ["RedisFollower", "Replicator", "StoreUnavailableError"]

logger = logging.getLogger("relay.cluster.replication")

# A stream's owner key lives ``redis_owner_ttl`` seconds (6 by default) and the owner's
# heartbeat refreshes it three times per TTL. Its meta and log live ``max(owner_ttl,
# detach_grace)``: a resume shortly after the owner died still finds the record and gets
# ``stream_lost``. A follower looks at the owner key after every empty read, so a dead
# owner is noticed within owner_ttl + _FOLLOW_BLOCK seconds of its death.
_FOLLOW_BLOCK = 1.0
_RECORD_WAIT = 0.25


def _beyond_last_seq(after_seq: int, last_seq: int) -> str:
    """The ``bad_request`` message of a resume past the stream's end (the owner's words)."""
    return f"after_seq {after_seq} is beyond the stream's last seq {last_seq}"


class StoreUnavailableError(RelayError):
    code = ErrorCode.STORE_UNAVAILABLE


class RedisFollower:
    """The ``StreamSource`` (a ``FollowedSource``) of a stream that runs on another node:
    ``run`` logs its frames as they land in Redis, after ``after_seq``; ``cancel`` forwards a
    client's cancel to its owner (whose finish then arrives through Redis)."""

    def __init__(self, replicator: Replicator, key: str, *, id: str, alias: str,
                 after_seq: int) -> None:
        self._replicator = replicator
        self.key = key
        self.id = id
        self.alias = alias
        self.after_seq = after_seq
        self.cancelled = False

    def cancel(self, reason: str = FinishReason.CLIENT_CANCEL) -> None:
        if reason != FinishReason.CLIENT_CANCEL:
            return              # disconnects and shutdowns of *this* node are not cancels
        self.cancelled = True
        self._replicator.spawn(self._replicator.publish_cancel(self.key))

    async def run(self, sink: FrameSink) -> None:
        """Follow the stream in Redis: ``sink`` gets each frame, then its finish; raises
        ``SourceFailed`` when Redis fails (``store_unavailable``), the owner stopped before
        the finish (``stream_lost``), or the resume asked for a seq the stream never
        reached (``bad_request``)."""
        store = self._replicator.store
        key = self.key
        after_seq = cursor = self.after_seq
        failures = 0
        owner_done = False      # an empty read saw the stream finished in Redis
        while True:
            try:
                items = await store.read(key, cursor, block=0 if owner_done else _FOLLOW_BLOCK)
                failures = 0
            except StoreUnavailable:
                failures += 1
                if failures >= 3:
                    raise SourceFailed(ErrorCode.STORE_UNAVAILABLE,
                                       "the relay's stream store became unavailable; "
                                       "resume again later") from None
                continue
            for seq, data in items:
                frame = orjson.loads(data)
                cursor = seq
                if frame["type"] == "finish":
                    sink.finish(seq, StreamOutcome.of_frame(frame), data=data)
                    return
                sink.append(frame, data=data)       # charged to the hub's budget
            if not items:
                try:
                    meta = await store.meta(key)
                    gone = meta is None or meta.state is SharedState.LOST or (
                        meta.state is SharedState.RUNNING
                        and not await store.owner_alive(key))
                except StoreUnavailable:
                    continue
                if gone:
                    raise SourceFailed(ErrorCode.STREAM_LOST,
                                       "the relay running this stream stopped before it "
                                       "finished")
                if meta is not None and meta.state is SharedState.FINISHED:
                    if owner_done:
                        # Finished, its log complete, nothing after the cursor: either the
                        # client already has the finish (after_seq is its seq), or the
                        # resume asked for an after_seq the stream never reached. (For a
                        # stream still running at resume time that could not be told then:
                        # the owner's mirror may lag what its client saw.)
                        try:
                            last = await store.last_seq(key) or 0
                        except StoreUnavailable:
                            continue
                        if last < after_seq:
                            raise SourceFailed(ErrorCode.BAD_REQUEST,
                                               _beyond_last_seq(after_seq, last))
                        sink.finished_earlier()
                        return
                    owner_done = True   # read once more: the last frames may have landed
                                        # between the read and the meta


#: How the mirror of a log ended (``_GroupCommit.follow``).
MirrorEnd = Literal["finished", "trimmed"]


class _Followed:
    """One mirrored log: how far Redis has it, and the outcome its mirror waits for."""

    __slots__ = ("log", "cursor", "done")

    def __init__(self, log: FrameLog, done: asyncio.Future[MirrorEnd]) -> None:
        self.log = log
        self.cursor = 0
        self.done = done


class _GroupCommit:
    """Copies the logs of every mirrored stream to Redis together (module docstring).

    ``follow(key, log)`` returns ``"finished"`` once the log is finished and all of it is in
    Redis, or ``"trimmed"`` when the log dropped frames Redis never got; it raises
    ``StoreUnavailable`` when Redis failed or refused the stream's frames. One writer task
    reads every followed log, woken by the logs' listeners: a token costs its stream no
    task wake-up of its own, and all the frames that arrived while a write was in flight go
    in the next one (``RedisStore.append_many``)."""

    def __init__(self, store: RedisStore, ttl: float) -> None:
        self.store = store
        self.ttl = ttl
        self._followed: dict[str, _Followed] = {}
        self._dirty: dict[str, None] = {}        # keys with news, in order (a set)
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    async def follow(self, key: str, log: FrameLog) -> MirrorEnd:
        followed = _Followed(log, asyncio.get_running_loop().create_future())
        self._followed[key] = followed

        def listener() -> None:
            self._mark(key)

        log.listeners.add(listener)
        self._mark(key)                          # what the log holds already
        try:
            return await followed.done
        finally:
            log.listeners.discard(listener)
            if self._followed.get(key) is followed:
                del self._followed[key]
            self._dirty.pop(key, None)

    def _mark(self, key: str) -> None:
        self._dirty[key] = None
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_loop(), name="redis mirror writer")
        self._wake.set()

    async def close(self) -> None:
        if self._writer is not None:
            await cancel_and_wait(self._writer)
        for followed in self._followed.values():
            if not followed.done.done():
                followed.done.set_exception(StoreUnavailable("relay closing: mirror stopped"))

    async def _write_loop(self) -> None:
        while True:
            if not self._dirty:
                self._wake.clear()
                await self._wake.wait()
                continue
            keys = list(self._dirty)
            self._dirty.clear()
            batches: list[tuple[str, list[tuple[int, bytes]]]] = []
            for key in keys:
                followed = self._followed.get(key)
                if followed is None or followed.done.done():
                    continue
                log = followed.log
                if log.trimmed_through > followed.cursor:
                    followed.done.set_result("trimmed")
                    continue
                entries = log.after(followed.cursor, 512)
                if entries:
                    batches.append((key, [(e.seq, e.data) for e in entries]))
                elif log.finished:
                    followed.done.set_result("finished")
            if not batches:
                continue
            try:
                refused = await self.store.append_many(batches, ttl=self.ttl)
            except StoreUnavailable as exc:
                refused = {key: exc for key, _ in batches}
            except Exception as exc:
                # A bug of ours or redis-py's: logged with its traceback; these mirrors end
                # (their streams keep running here) and the writer goes on for the others.
                logger.exception("redis mirror writer: append failed")
                failure = StoreUnavailable(f"mirror write failed ({type(exc).__name__})")
                refused = {key: failure for key, _ in batches}
            for key, written in batches:
                followed = self._followed.get(key)
                if followed is None or followed.done.done():
                    continue                     # its mirror ended meanwhile
                if key in refused:
                    followed.done.set_exception(refused[key])
                    continue
                followed.cursor = written[-1][0]
                log = followed.log
                if log.last_seq > followed.cursor or log.finished:
                    self._dirty[key] = None      # more to write, or the end to report


class Replicator:
    """The hub's ``ReplicationHook``: mirrors local streams to Redis, follows remote ones,
    and carries cancel/takeover between relays (module docstring)."""

    def __init__(self, settings: RelaySettings, hub: PeerControl,
                 store: RedisStore | None = None) -> None:
        assert settings.redis_url is not None
        self.settings = settings
        self.hub = hub
        self.store = store or RedisStore(settings.redis_url, prefix=settings.redis_prefix,
                                         max_frames=settings.redis_max_frames)
        self.node = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.grace = settings.detach_grace
        self.owner_ttl = settings.redis_owner_ttl
        self.record_ttl = max(self.owner_ttl, self.grace)
        self._tasks: set[asyncio.Task] = set()
        self._heartbeat: asyncio.Task | None = None
        self._attach_tokens: dict[str, str] = {}   # remote key -> our attached token
        #: Remote key -> how many records follow it here (its marker lives while any does).
        self._attach_counts: dict[str, int] = {}
        #: Keys of the local streams whose log is being copied to Redis: from the moment
        #: Redis holds the stream's record until its mirror ends (finish written, log lost,
        #: or Redis failed). Only ``_mirror`` changes it.
        self._mirrored: set[str] = set()
        #: The AI SDK chats (owner, chat id) whose latest response is each local stream
        #: being mirrored (relay.runtime.aisdk): their records in Redis expire with the
        #: stream's own (``record_chat``). From ``mirror`` until the mirror ends.
        self._chats: dict[str, list[tuple[str, str]]] = {}
        self._commit = _GroupCommit(self.store, self.record_ttl)
        self._warned = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.store.start(self._on_control)
        self._heartbeat = asyncio.create_task(self._beat(), name="replication heartbeat")

    async def close(self) -> None:
        """After the hub closed: let mirrors write their last frames, then stop."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *(t for t in [self._heartbeat] if t),
                             return_exceptions=True)
        await self._commit.close()
        await self.store.close()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ owner side

    def mirror(self, stream: StreamView) -> None:
        """Start copying ``stream``'s log to Redis (called at launch)."""
        self._chats[stream.key] = []
        self.spawn(self._mirror(stream), name=f"mirror {stream.key[:8]}")

    async def record_chat(self, principal: str, chat_id: str, record: ChatRecord) -> None:
        """Record in Redis that the latest response of AI SDK chat ``(principal, chat_id)``
        is ``record`` (its stream: ``record.stream_key``). The record
        lives as long as the stream's own: ``record_ttl``, refreshed by the heartbeat while
        the stream is mirrored, then the resume window (``detach_grace``) from its finish;
        a stream not mirrored (any more) gets that window at once. Raises
        ``StoreUnavailable``."""
        chats = self._chats.get(record.stream_key)
        if chats is not None:
            chats.append((principal, chat_id))
        ttl = self.record_ttl if chats is not None else max(self.grace, 1.0)
        await self.store.set_chat(principal, chat_id, record, ttl=ttl)

    def is_mirrored(self, key: str) -> bool:
        return key in self._mirrored

    async def _mirror(self, stream: StreamView) -> None:
        store = self.store
        log = stream.log
        key = stream.key
        ttl, owner_ttl = self.record_ttl, self.owner_ttl
        try:
            await store.create(key, principal=stream.principal, alias=stream.alias,
                               node=self.node, ttl=ttl, stream_id=stream.id,
                               owner_ttl=owner_ttl)
            self._mirrored.add(key)
            if await self._commit.follow(key, log) == "trimmed":
                # The local cap dropped frames Redis never got: a remote replay would have
                # a hole, so say so instead.
                await store.mark_lost(key, ttl=max(self.grace, 1.0))
            else:
                await store.finish(key, ttl=max(self.grace, 1.0))
            # Its chats' records now expire with its record (a later record_chat too).
            chats = self._chats.pop(key, [])
            await store.expire_chats([(principal, chat_id, key) for principal, chat_id in chats],
                                     ttl=max(self.grace, 1.0))
        except StoreUnavailable as exc:
            self._warn(f"stream store unavailable ({exc}); streams keep running here but "
                       "cannot be resumed on another relay")
        finally:
            self._mirrored.discard(key)
            self._chats.pop(key, None)

    async def publish_cancel(self, key: str) -> None:
        try:
            await self.store.publish(frames.relay_cancel(key))
        except StoreUnavailable as exc:
            self._warn(f"could not forward a cancel: {exc}")

    async def attached_elsewhere(self, key: str) -> bool:
        try:
            return await self.store.get_attached(key) is not None
        except StoreUnavailable:
            return False

    # ------------------------------------------------------------------ resumer side

    async def remote_last_seq(self, key: str) -> int | None:
        return await self.store.last_seq(key)

    async def resume_remote(self, key: str, principal: str, after_seq: int) -> RedisFollower:
        """The source of stream ``key`` running on another node, read from Redis after
        ``after_seq`` (the hub builds its record: ``StreamHub.follow``). Raises the resume's
        refusal."""
        store = self.store
        try:
            meta = await store.meta(key)
            if meta is None:
                # A stream started a moment ago may not have its record in Redis yet (its
                # relay writes it as the stream starts); look once more before saying no.
                await asyncio.sleep(_RECORD_WAIT)
                meta = await store.meta(key)
            if meta is None or meta.principal != principal:
                raise UnknownStream("no resumable stream with that stream_key")
            if meta.state is SharedState.LOST or (meta.state is SharedState.RUNNING
                                                  and not await store.owner_alive(key)):
                raise StreamLost("this stream's log is gone (its relay stopped or dropped "
                                 "it); its frames cannot be replayed")
            first = await store.first_seq(key)
            # A finished stream's log in Redis is complete (its owner marks it finished
            # after the last append), so its last seq is the stream's, as on the owner.
            last = (await store.last_seq(key) if meta.state is SharedState.FINISHED
                    else None)
        except StoreUnavailable as exc:
            raise StoreUnavailableError(
                "the relay's stream store is unavailable; resume again later") from exc
        if last is not None and after_seq > last:
            raise BadRequest(_beyond_last_seq(after_seq, last))
        if first is not None and first > after_seq + 1:
            raise StreamLost(f"frames after seq {after_seq} were trimmed from this stream's "
                             "log; they cannot be replayed")
        return RedisFollower(self, key, id=meta.stream_id or "resumed", alias=meta.alias,
                             after_seq=after_seq)

    def attached(self, stream: StreamView, *, takeover: bool = False) -> None:
        """A resume here attached ``stream`` (local or remote). A remote one is marked
        attached here (the owner keeps it running past its grace); ``takeover``: the other
        nodes end their owner attachments of it."""
        token = None
        if stream.remote:
            key = stream.key
            self._attach_counts[key] = self._attach_counts.get(key, 0) + 1
            token = self._attach_tokens.get(key)
            if token is None:
                token = self._attach_tokens[key] = secrets.token_hex(8)
        if token is not None or takeover:
            self.spawn(self._announce(stream.key, token, takeover))

    async def _announce(self, key: str, token: str | None, takeover: bool) -> None:
        try:
            if token is not None:
                await self.store.set_attached(key, token, ttl=self.owner_ttl)
            if takeover:
                await self.store.publish(frames.relay_takeover(key, self.node))
        except StoreUnavailable as exc:
            self._warn(f"could not announce an attachment: {exc}")

    def released(self, stream: StreamView) -> None:
        """A record following ``stream`` here stopped (the hub stopped its follower): once
        none is left, clear our attached marker."""
        key = stream.key
        count = self._attach_counts.get(key, 0) - 1
        if count > 0:
            self._attach_counts[key] = count
            return
        self._attach_counts.pop(key, None)
        token = self._attach_tokens.pop(key, None)
        if token is not None:
            self.spawn(self._clear_attached(key, token))

    async def _clear_attached(self, key: str, token: str) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.store.clear_attached(key, token)

    # ------------------------------------------------------------------ control

    def _on_control(self, message: dict) -> None:
        """One control-channel message (a JSON object; ``RedisStore`` drops anything else)."""
        try:
            op = decode_relay_message(message)
        except ValueError as exc:
            logger.warning("control channel: ignoring a relay message: %s", exc)
            return
        if isinstance(op, RelayCancel):
            self.hub.cancelled_elsewhere(op.key)
        elif isinstance(op, RelayTakeover) and op.node != self.node:
            self.hub.taken_over_elsewhere(op.key)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.owner_ttl / 3)  # a heartbeat period, not a wait for work
            owned = list(self._mirrored)
            try:
                if owned:
                    await self.store.refresh(owned, ttl=self.record_ttl,
                                             owner_ttl=self.owner_ttl)
                chats = [(principal, chat_id, key) for key, of_stream in self._chats.items()
                         for principal, chat_id in of_stream]
                if chats:
                    await self.store.expire_chats(chats, ttl=self.record_ttl)
                for key, token in list(self._attach_tokens.items()):
                    await self.store.set_attached(key, token, ttl=self.owner_ttl)
                if owned or self._attach_tokens:
                    self._warned = False         # Redis answers again: warn on the next outage
            except StoreUnavailable as exc:
                self._warn(f"stream store heartbeat failed: {exc}")

    def _warn(self, text: str) -> None:
        # One warning per outage is enough; details go to debug.
        if not self._warned:
            self._warned = True
            logger.warning(text)
        else:
            logger.debug(text)
