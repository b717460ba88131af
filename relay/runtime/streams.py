"""Launching and resuming streams for connections: the runtime service behind the session's
``StartStream`` and ``ResumeStream`` actions, whatever the connection's dialect.

``StreamService`` holds what a connection does not need to know: the model registry and the
streamer factory (an admitted ``start`` -> an ``UpstreamSource``), the group's limits on
Redis (``relay.cluster.shared_limits``: the last check of a ``start`` when relays share
Redis), the replay budget of a resume (``Principals.charge_replay``, then the group's), and
where a resumed stream runs (this relay's hub, or another relay's, followed through Redis).
It raises the relay's refusals (``RelayError``); the session hands them to the connection
machine (``ActionFailed``), which answers them. It never attaches a stream to a connection:
the session does (it owns the attachment, its writer and its cursor).

Call order: one per relay (``RelayServer``), or one per session when a session is built
alone (tests). ``launch`` and ``resume`` take the connection's machine
(``relay.core.connection.Connection``) for who it acts for (``principal``,
``principal_state``, ``credentials``, ``session_id``) and for the room it has
(``room_for``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from llm_relay_protocol import FinishReason, Resume, Start

from relay.config import RelaySettings
from relay.core.connection import Connection
from relay.core.errors import RateLimited, UnknownStream
from relay.core.limits import Principals
from relay.metrics import RelayMetrics
from relay.runtime.hub import HubStream, StreamHub
from relay.upstream.providers import ModelRegistry, ModelSpec
from relay.cluster.redis_store import StoreUnavailable
from relay.cluster.shared_limits import SharedStream
from relay.upstream.source import UpstreamSource
from relay.upstream.event_streamer import EventStreamer

__all__ = ["StreamService", "StreamerFactory"]

logger = logging.getLogger("relay.runtime.streams")

#: Builds the streamer for a start; tests inject scripted ones.
StreamerFactory = Callable[[ModelSpec], EventStreamer]


class StreamService:
    """Starts, resumes and cancels the streams of connections (module docstring)."""

    def __init__(self, hub: StreamHub, registry: ModelRegistry, settings: RelaySettings,
                 metrics: RelayMetrics, streamer_factory: StreamerFactory | None = None) -> None:
        self.hub = hub
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self._streamer_factory = streamer_factory or (lambda spec: spec.streamer())

    # ------------------------------------------------------------------ start

    async def launch(self, msg: Start, conn: Connection) -> HubStream:
        """An admitted ``start``: resolve its alias, pass the group's limits (Redis) and
        start it in the hub. Raises ``RelayError`` for the checks only this can make
        (unknown alias, ``max_tokens`` ceiling, group limits)."""
        # Their size and counts were checked by the codec's decode (DecodeLimits).
        messages = [m.model_dump(exclude_unset=True) for m in msg.messages]
        tools = [t.model_dump(exclude_unset=True) for t in msg.tools] if msg.tools else None
        spec = self.registry.resolve(msg.model)
        params = spec.request_params(msg.params.model_dump(exclude_none=True))
        streamer = self._streamer_factory(spec)
        shared = await self._admit_shared(conn)
        source = UpstreamSource(
            streamer, {"messages": messages, "tools": tools, "tool_choice": msg.tool_choice,
                       **params},
            metrics=self.metrics, on_chunk=shared.charge if shared is not None else None,
            alias=spec.alias)
        return self.hub.launch(
            id=msg.id, alias=msg.model, principal=conn.principal,
            session_id=conn.session_id, principal_state=conn.principal_state, source=source,
            shared=shared)

    async def _admit_shared(self, conn: Connection) -> SharedStream | None:
        """With relays on Redis, the last check of a ``start``: the principal's stream cap
        (the setting, lowered by a token's ``max_streams``), start rate and token budget
        across every relay of the group (relay.cluster.shared_limits; raises its refusal).
        None without Redis."""
        shared = self.hub.shared_limits
        if shared is None:
            return None
        cap, scope = self.settings.max_streams_per_principal, "per principal"
        claim = conn.credentials.max_streams if conn.credentials is not None else None
        if claim is not None and claim <= cap:
            cap, scope = claim, "for this token"
        state = conn.principal_state
        return await shared.admit(conn.principal, stream_cap=cap, scope=scope,
                                  starts=state.starts, budget=state.budget)

    def cancel(self, stream: HubStream) -> None:
        """The client cancels ``stream`` (``cancel``, ``abort``)."""
        self.hub.cancel(stream, FinishReason.CLIENT_CANCEL)

    # ------------------------------------------------------------------ resume

    async def resume(self, msg: Resume, conn: Connection,
                     open_ids: Collection[str]) -> tuple[str, HubStream]:
        """Find the stream ``msg`` names (here, or running on another relay: followed
        through Redis and entered in the hub), check the connection's room for it
        (``open_ids``: its attached ids) and charge its replay. Returns the id it gets on
        the connection and the stream, for the caller to attach; raises the refusal."""
        hub = self.hub
        principal = conn.principal
        try:
            stream: HubStream | None = hub.find_for_resume(msg.stream_key, principal,
                                                           msg.after_seq)
        except UnknownStream:
            if hub.replicator is None:
                raise
            stream = None                      # maybe it runs on another relay
        if stream is None or stream.remote:
            assert hub.replicator is not None
            source = await hub.replicator.resume_remote(msg.stream_key, principal,
                                                        msg.after_seq)
            id = msg.id if msg.id is not None else source.id
            _check_room(conn, id, open_ids)    # (refused: nothing started, nothing to stop)
            self._check_viewer_room(msg, id)
            await self._pay_for_resume(
                conn, id, await self._remote_replay_events(msg.stream_key, msg.after_seq))
            stream = hub.follow(source, principal=principal, session_id=conn.session_id)
            # Only now, once the resume is sure to succeed: the hub enters it and starts its
            # follower (each attachment of a remote stream reads it from Redis on its own; a
            # takeover ends the records following it here).
            hub.adopt(stream, takeover=msg.takeover)
            return id, stream
        id = msg.id if msg.id is not None else stream.id
        _check_room(conn, id, open_ids)
        self._check_viewer_room(msg, id)
        log = stream.log
        if await self._pay_for_resume(conn, id, min(len(log),
                                                    max(0, log.last_seq - msg.after_seq))):
            # Redis was asked: the stream may have ended its grace or been dropped
            # meanwhile (raises), or be another record now.
            if hub.find_for_resume(msg.stream_key, principal, msg.after_seq) is not stream:
                raise UnknownStream("no resumable stream with that stream_key")
            _check_room(conn, id, open_ids)
            self._check_viewer_room(msg, id)
        return id, stream

    def _check_viewer_room(self, msg: Resume, id: str) -> None:
        """Raise the refusal of a resume that would be one viewer too many
        (``max_viewers_per_stream``; a takeover is never a viewer)."""
        refusal = self.hub.room_for_viewer(msg.stream_key, takeover=msg.takeover, id=id)
        if refusal is not None:
            raise refusal

    async def _pay_for_resume(self, conn: Connection, id: str, replayed: int) -> bool:
        """Charge the ``replayed`` events a resume sends again to the principal's replay
        budget (``--replay-events-per-second`` / ``--replay-event-burst``), which outlives
        the connection: a client reconnecting to resume again pays from the same bucket.
        With relays on Redis, then from the group's bucket of the principal too
        (``SharedLimits.take_replay``). Raises ``rate_limited`` with ``retry_after`` for
        this resume when it cannot pay (the connection stays). True when it awaited Redis."""
        state = conn.principal_state
        wait = Principals.charge_replay(state, replayed)
        shared = self.hub.shared_limits
        asked = False
        if wait is None and shared is not None and state.replays is not None and replayed > 0:
            asked = True
            wait = await shared.take_replay(conn.principal, state.replays,
                                            min(replayed, state.replays.burst))
        if wait is not None:
            logger.debug("refused a resume: the principal's replay budget is spent",
                         extra={"session_id": conn.session_id, "principal": conn.principal})
            raise RateLimited(f"too many replayed events for this principal; resume again in "
                              f"{wait:g} s", retry_after=wait, id=id)
        return asked

    async def _remote_replay_events(self, stream_key: str, after_seq: int) -> int:
        """How many events a resume of ``stream_key`` (running on another relay) after
        ``after_seq`` reads from Redis now; 0 when the store cannot say."""
        assert self.hub.replicator is not None
        try:
            last = await self.hub.replicator.remote_last_seq(stream_key)
        except StoreUnavailable:
            return 0
        return max(0, (last or 0) - after_seq)

    async def replay_events(self, stream_key: str) -> int:
        """How many events a replay of stream ``stream_key`` from its start reads: its log
        here, or (running on another relay) its log in Redis; 0 when unknown (a resume of
        it then fails anyway)."""
        stream = self.hub.get(stream_key)
        if stream is not None and not stream.remote:
            return len(stream.log)
        if self.hub.replicator is None:
            return 0
        return await self._remote_replay_events(stream_key, 0)


def _check_room(conn: Connection, id: str, open_ids: Collection[str]) -> None:
    refusal = conn.room_for(id, open_ids)
    if refusal is not None:
        raise refusal
