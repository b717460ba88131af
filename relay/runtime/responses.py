"""``/v1/responses``: the OpenAI Responses API's WebSocket mode on the relay's own streams.

A thin adapter, as ``/ai-sdk`` is: ``ResponsesSession`` is a ``Session`` (same writer,
backlog and slow-consumer rules, frame rate, limits, metrics, drain, connection machine)
whose inbound frames are Responses client events and whose outbound frames are Responses
server events. The mapping is sans-I/O in ``protocol.responses``; the rules are in
``protocol/RESPONSES.md``.

* ``response.create`` becomes a v1 ``start`` (the response id is the stream's id on this
  connection) and goes through exactly the same admission as one (``Session._start``);
  its events are the stream's frames through a ``ResponseEncoder``;
* lanes: each ``stream_id`` (none: the default lane) runs its creates one after another
  in order (a ``_Lane`` task per lane); lanes run in parallel, each response a stream
  within the connection's stream cap; at most ``MAX_QUEUED_PER_CONNECTION`` creates wait;
* ``previous_response_id`` continues a conversation kept in ``ChainStore``: per connection,
  and with ``--redis`` across the principal's connections and relays for
  ``responses_chain_ttl`` seconds; bounded per principal in count and bytes;
* ``response.cancel`` {response_id} (the relay's extension) cancels one response: it ends
  ``response.incomplete`` with status ``cancelled`` and its usage;
* a closed socket cancels every running response at once (``detach_grace`` does not apply:
  this dialect has no resume), and the connection's end waits for their upstream requests.

Authentication: the SDK sends ``Authorization: Bearer <api_key>`` on the upgrade; with
``--auth`` that is the relay token (API key or JWT), checked by the connection machine as
the /ai-sdk upgrade header is (an upgrade without one is refused 401 by the server). Until
the one-connection core lands, the session runs the machine's no-hello dialect
(``Dialect.AI_SDK``: credentials from the upgrade header, the same caps and closes).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.exceptions import ConnectionClosed

from protocol import FinishReason, FrameError, frames
from protocol.codec import validate_client_object
from protocol.responses import (CancelRequest, CreateRequest, ResponseEncoder, ResponsesError,
                                Turn, decode_event, error_event, new_response_id, to_turn)
from relay.cluster.redis_store import RedisStore, StoreUnavailable
from relay.cluster.replication import Replicator
from relay.core.connection import ActionFailed, Dialect, Opened, Phase, RequestReceived
from relay.core.errors import RelayError
from relay.core.streamlog import LogEntry
from relay.runtime.hub import Attachment
from relay.runtime.session import Session
from relay.aio import cancel_and_wait

__all__ = ["MAX_QUEUED_PER_CONNECTION", "RESPONSES_PATH", "ChainEntry", "ChainStore",
           "ResponsesSession"]

logger = logging.getLogger("relay.runtime.responses")

RESPONSES_PATH = "/v1/responses"
#: Creates that may wait for their lane on one connection, all lanes together; one more is
#: refused (``error`` ``too_many_requests``) and the socket stays usable.
MAX_QUEUED_PER_CONNECTION = 64


# ---------------------------------------------------------------- chains


@dataclass(slots=True)
class ChainEntry:
    """One stored response: its model alias and the conversation through its output
    (compact JSON: its ``len`` is what it costs)."""

    owner: object
    model: str
    data: bytes

    def messages(self) -> list[dict[str, Any]]:
        loaded: list[dict[str, Any]] = orjson.loads(self.data)
        return loaded


def _entry_bytes(model: str, messages: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"model": model, "messages": messages})


_PUT_SCRIPT = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if extra > 0 then
  local old = redis.call('ZRANGE', KEYS[2], 0, extra - 1)
  for _, key in ipairs(old) do redis.call('DEL', key) end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, extra - 1)
end
return 1
"""
_GET_SCRIPT = "return redis.call('GET', KEYS[1])"


class ChainStore:
    """Stored responses for ``previous_response_id``, bounded per principal.

    In this process: per principal at most ``max_entries`` responses and ``max_bytes`` of
    their conversations (each entry holds its whole conversation, so a continuation is one
    lookup); past either bound the oldest entries go first, and an entry larger than
    ``max_bytes`` alone is not kept. Without Redis an entry is visible only to the
    connection that created it (OpenAI's rule) and is dropped with it; with Redis
    (``attach_redis``) it is also written to Redis for ``ttl`` seconds, keyed by the
    principal, where any connection of that principal on any relay finds it; Redis keeps at
    most ``max_entries`` per principal too (and each entry at most ``max_bytes``)."""

    def __init__(self, *, max_entries: int, max_bytes: int, ttl: float) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._by_principal: dict[str, OrderedDict[str, ChainEntry]] = {}
        self._bytes: dict[str, int] = {}
        self._replicator: Replicator | None = None
        self._store: RedisStore | None = None
        self._writes: set[asyncio.Task[None]] = set()

    def attach_redis(self, replicator: Replicator) -> None:
        self._replicator = replicator
        self._store = replicator.store
        self._put_script = replicator.store.script("responses_chain_put", _PUT_SCRIPT)
        self._get_script = replicator.store.script("responses_chain_get", _GET_SCRIPT)

    @property
    def shared(self) -> bool:
        return self._store is not None

    def _keys(self, principal: str, response_id: str) -> tuple[str, str]:
        assert self._store is not None
        digest = hashlib.sha256(principal.encode()).hexdigest()[:32]
        return (self._store.key(f"resp:{digest}:{response_id}"),
                self._store.key(f"resp-index:{digest}"))

    def put(self, principal: str, owner: object, response_id: str, model: str,
            messages: list[dict[str, Any]]) -> None:
        """Store a response (synchronously here, so a continuation sent the moment the
        client sees ``response.completed`` finds it; the Redis copy follows)."""
        data = _entry_bytes(model, messages)
        if len(data) <= self.max_bytes:
            entries = self._by_principal.setdefault(principal, OrderedDict())
            entries[response_id] = ChainEntry(owner, model, data)
            total = self._bytes.get(principal, 0) + len(data)
            while entries and (len(entries) > self.max_entries or total > self.max_bytes):
                _, dropped = entries.popitem(last=False)
                total -= len(dropped.data)
            self._bytes[principal] = total
        else:
            logger.info("responses: a conversation of %d bytes exceeds "
                        "responses_chain_bytes; it cannot be continued", len(data))
            return
        if self._replicator is not None:
            task = self._replicator.spawn(self._publish(principal, response_id, data),
                                          name="responses chain")
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def flush(self) -> None:
        """Wait for the Redis copies of the responses stored so far."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def _publish(self, principal: str, response_id: str, data: bytes) -> None:
        key, index = self._keys(principal, response_id)
        try:
            await self._put_script([key, index], [data, max(1, int(self.ttl * 1000)),
                                                  time.time(), self.max_entries])
        except StoreUnavailable:
            logger.warning("responses: could not store a response in Redis; it can be "
                           "continued on this relay only")

    async def get(self, principal: str, owner: object, response_id: str
                  ) -> tuple[str, list[dict[str, Any]]] | None:
        """(model, conversation) of ``response_id`` for ``owner`` (a connection) of
        ``principal``; None when unknown, evicted, expired or not visible to it. Raises
        ``StoreUnavailable`` when only Redis could know and cannot answer."""
        entries = self._by_principal.get(principal)
        entry = entries.get(response_id) if entries is not None else None
        if entry is not None and (entry.owner is owner or self.shared):
            return entry.model, orjson.loads(entry.data)["messages"]
        if self._store is None:
            return None
        key, _ = self._keys(principal, response_id)
        raw = await self._get_script([key], [])
        if raw is None:
            return None
        loaded = orjson.loads(raw)
        return loaded["model"], loaded["messages"]

    def drop_owner(self, principal: str, owner: object) -> None:
        """``owner``'s connection closed: without Redis its responses cannot be continued
        any more (OpenAI's per-connection rule), so they are freed."""
        if self.shared:
            return
        entries = self._by_principal.get(principal)
        if not entries:
            return
        for response_id in [k for k, v in entries.items() if v.owner is owner]:
            self._bytes[principal] -= len(entries.pop(response_id).data)
        if not entries:
            del self._by_principal[principal]
            del self._bytes[principal]

    def bytes_held(self) -> int:
        return sum(self._bytes.values())


# ---------------------------------------------------------------- session


@dataclass(slots=True)
class _Running:
    """A response running on this connection."""

    response_id: str
    lane: str | None
    turn: Turn
    encoder: ResponseEncoder
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    opened: bool = False


@dataclass(frozen=True, slots=True)
class _Request:
    """What the machine's error answer names (``ActionFailed.msg``)."""

    type: str
    id: str


#: v1 refusals -> (OpenAI error type, code, status).
_REFUSALS: dict[str, tuple[str, str, int]] = {
    "unknown_model": ("invalid_request_error", "model_not_found", 404),
    "too_many_streams": ("rate_limit_error", "too_many_streams", 429),
    "rate_limited": ("rate_limit_error", "rate_limit_exceeded", 429),
    "draining": ("server_error", "server_unavailable", 503),
    "store_unavailable": ("server_error", "server_unavailable", 503),
    "not_authenticated": ("authentication_error", "invalid_api_key", 401),
    "internal_error": ("server_error", "server_error", 500),
}


class ResponsesSession(Session):
    """One ``/v1/responses`` connection (module docstring)."""

    dialect = Dialect.AI_SDK        # the machine's no-hello dialect (module docstring)

    def __init__(self, *args: Any, chains: ChainStore, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._chains = chains
        self._running: dict[Attachment, _Running] = {}
        self._by_id: dict[str, _Running] = {}
        self._lanes: dict[str | None, deque[CreateRequest]] = {}
        self._lane_tasks: dict[str | None, asyncio.Task[None]] = {}
        self._queued = 0
        self._lane_of: dict[str, str | None] = {}     # response id -> lane (error answers)

    # ------------------------------------------------------------------ handshake

    async def _handshake(self) -> bool:
        """No hello: the upgrade's ``Authorization`` header authenticates (the server
        refuses an upgrade without one when auth is on)."""
        request = getattr(self.ws, "request", None)
        opened = self.conn.handle(Opened(self.ws.subprotocol,
                                         request.headers if request is not None else None))
        if not await self._perform_handshake(opened):
            return False
        return self.conn.phase is Phase.WELCOMED

    # ------------------------------------------------------------------ inbound

    async def _handle(self, raw: str | bytes) -> None:
        """Decode one client event; a create joins its lane's queue, a cancel stops its
        response. A bad event is answered with an ``error`` event; the socket stays."""
        if self.conn.phase is not Phase.WELCOMED:
            return                     # closing: nothing more is answered
        try:
            event = decode_event(raw, self._decode_limits)
        except ResponsesError as exc:
            self.metrics.errors.labels("bad_request").inc()
            self._respond(exc.event())
            return
        if isinstance(event, CancelRequest):
            self._cancel(event)
            return
        if self._queued >= MAX_QUEUED_PER_CONNECTION:
            self._respond(error_event(
                f"more than {MAX_QUEUED_PER_CONNECTION} responses are waiting on this "
                "connection; wait for some to finish", code="too_many_requests",
                type="rate_limit_error", status=429, stream_id=event.stream_id))
            return
        lane = event.stream_id
        self._lanes.setdefault(lane, deque()).append(event)
        self._queued += 1
        task = self._lane_tasks.get(lane)
        if task is None or task.done():
            self._lane_tasks[lane] = asyncio.create_task(
                self._run_lane(lane), name=f"responses lane {self.session_id}")

    async def _run_lane(self, lane: str | None) -> None:
        """Run the lane's creates one after another, each to its end."""
        queue = self._lanes[lane]
        while queue:
            request = queue.popleft()
            self._queued -= 1
            try:
                running = await self._create(request)
            except ConnectionClosed:
                return
            if running is not None:
                await running.finished.wait()
        del self._lanes[lane]
        self._lane_tasks.pop(lane, None)

    async def _create(self, request: CreateRequest) -> _Running | None:
        """Admit and launch one create; None when it was answered without a stream (an
        ``error`` event, or ``generate: false``)."""
        response_id = new_response_id()
        lane = request.stream_id
        self._lane_of[response_id] = lane
        try:
            for action in self.conn.handle(RequestReceived(response_id, None)):
                await self._perform(action)          # a refusal, or a close (token expired)
            if self.conn.phase is not Phase.WELCOMED:
                return None
            return await self._launch_response(request, response_id)
        except ResponsesError as exc:
            exc.stream_id = lane
            self._respond(exc.event())
        except ConnectionClosed:
            raise
        except StoreUnavailable:
            self._respond(error_event(
                "previous_response_id cannot be looked up: the shared store is unavailable; "
                "retry shortly", code="server_unavailable", type="server_error", status=503,
                stream_id=lane))
        except Exception as exc:
            if not isinstance(exc, (RelayError, FrameError)):
                logger.exception("session %s: internal error handling response.create",
                                 self.session_id)
            self._perform_now(self.conn.handle(
                ActionFailed(_Request("response.create", response_id), exc)))
        finally:
            if response_id not in self._by_id:
                self._lane_of.pop(response_id, None)
        return None

    async def _launch_response(self, request: CreateRequest,
                               response_id: str) -> _Running | None:
        previous: list[dict[str, Any]] | None = None
        previous_model: str | None = None
        if request.previous_response_id is not None:
            found = await self._chains.get(self.principal, self, request.previous_response_id)
            if found is None:
                raise ResponsesError(
                    f"Previous response with id '{request.previous_response_id[:64]}' not "
                    "found: unknown, from another connection"
                    f"{'' if self._chains.shared else ' (this relay keeps chains per connection without --redis)'}"
                    ", expired or evicted.", code="previous_response_not_found",
                    param="previous_response_id")
            previous_model, previous = found
        turn = to_turn(request, previous=previous, previous_model=previous_model,
                       limits=self._decode_limits)
        if turn.model not in self.registry.aliases:
            raise ResponsesError(
                f"The model '{turn.model[:64]}' is not served by this relay; it serves: "
                f"{', '.join(self.registry.aliases)}", code="model_not_found", param="model",
                status=404)
        encoder = ResponseEncoder(response_id, turn.echo, created_at=time.time(),
                                  stream_id=request.stream_id)
        if not request.generate:
            # A chain entry without a model call: created, then completed with no output.
            self._chains.put(self.principal, self, response_id, turn.model, turn.history)
            events = encoder.opening()
            events += encoder.frames(frames.finish(response_id, 1, "completed", "stop",
                                                   frames.usage(0, 0, False)))
            for event in events:
                self._respond(event)
            return None
        try:
            start = validate_client_object(frames.start(
                response_id, turn.model, turn.messages, tools=turn.tools,
                tool_choice=turn.tool_choice, params=turn.params or None),
                self._decode_limits)
        except FrameError as exc:
            raise ResponsesError(exc.message) from None
        await self._start(start)         # v1 admission; raises RelayError on refusal
        att = self._attachments.get(response_id)
        if att is None:
            return None                  # refused without an error (token expired)
        running = _Running(response_id, request.stream_id, turn, encoder)
        self._running[att] = running
        self._by_id[response_id] = running
        return running

    def _cancel(self, request: CancelRequest) -> None:
        running = self._by_id.get(request.response_id)
        att = self._attachments.get(request.response_id)
        if running is None or att is None:
            self._respond(error_event(
                f"No running response with id '{request.response_id[:64]}' on this "
                "connection.", code="response_not_found", param="response_id", status=404))
            return
        self.hub.cancel(att.stream, FinishReason.CLIENT_CANCEL)

    # ------------------------------------------------------------------ outbound

    def _respond(self, event: dict[str, Any]) -> None:
        super()._send(event)

    def _send(self, frame: dict) -> bool:
        """v1 control frames raised by the shared ``Session`` code, in Responses terms: an
        ``error`` for a create -> an ``error`` event (OpenAI's type and code, the relay's
        own safe message; its lane); ``started`` needs no answer (``response.created``
        follows from the stream); the rest does not exist here."""
        if frame.get("type") != "error":
            return True
        code = str(frame.get("code"))
        kind, openai_code, status = _REFUSALS.get(
            code, ("invalid_request_error", code, 400))
        message = ("The relay failed to handle this request." if code == "internal_error"
                   else str(frame.get("message")))
        rid = frame.get("id")
        return super()._send(error_event(
            message, code=openai_code, type=kind, status=status,
            param="model" if code == "unknown_model" else None,
            stream_id=self._lane_of.get(rid) if isinstance(rid, str) else None))

    def _encode_entries(self, att: Attachment, entries: list[LogEntry]) -> Iterable[bytes]:
        running = self._running.get(att)
        if running is None:
            return []
        encoder = running.encoder
        events = [] if running.opened else encoder.opening()
        running.opened = True
        events += encoder.feed(entry.frame for entry in entries)
        if encoder.done and not running.finished.is_set():
            self._finished(running)
        return [orjson.dumps(event) for event in events]

    def _finished(self, running: _Running) -> None:
        """The response's last event is being sent: store it for a continuation (before
        the client can see it end), then free its lane for the next create."""
        encoder = running.encoder
        if encoder.status != "failed":
            self._chains.put(self.principal, self, running.response_id,
                             running.turn.model,
                             running.turn.history + encoder.output_messages())
        running.finished.set()

    def _unregister(self, att: Attachment) -> None:
        super()._unregister(att)
        running = self._running.pop(att, None)
        if running is not None:
            self._by_id.pop(running.response_id, None)
            self._lane_of.pop(running.response_id, None)
            running.finished.set()         # (ended without its finish sent: detached)

    # ------------------------------------------------------------------ end

    async def _detach_all(self) -> None:
        """The socket is gone: no lane starts another response, and every running one is
        cancelled at once (this dialect has no resume, so ``detach_grace`` does not apply);
        the connection's end waits for their upstream requests to close."""
        for task in list(self._lane_tasks.values()):
            await cancel_and_wait(task)
        self._lane_tasks.clear()
        tasks = self.stream_tasks()
        for att in list(self._attachments.values()):
            if att.stream.running and not att.stream.remote:
                self.hub.cancel(att.stream, FinishReason.CLIENT_DISCONNECT)
        await super()._detach_all()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._chains.drop_owner(self.principal, self)
