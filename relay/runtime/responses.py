"""``/v1/responses``: the runtime half of the OpenAI Responses API's WebSocket mode.

The dialect is a codec over the one connection core, as every dialect is: the wire
(decoding events, encoding the stream's frames and the replies) is sans-I/O in
``llm_relay_protocol.responses.ResponsesCodec``; the connection machine decides the door,
authentication (the upgrade's ``Authorization: Bearer``, the relay token with ``--auth``),
limits, admission, every ``error`` and every close; the session carries them out. This
module holds only what the dialect's requests mean beyond a v1 ``start``
(``ResponsesAdapter``, the route's adapter) and the stored conversations (``ChainStore``).
The rules are in ``clients/python/llm_relay_protocol/RESPONSES.md``.

* lanes: each ``stream_id`` (none: the default lane) runs its creates one after another in
  order (a task per busy lane); lanes run in parallel, each response a stream within the
  connection's stream cap; at most ``MAX_QUEUED_PER_CONNECTION`` creates wait;
* ``previous_response_id`` continues a conversation kept in ``ChainStore``: per connection,
  and with ``--redis`` across the principal's connections and relays for
  ``responses_chain_ttl`` seconds; bounded per principal in count and bytes;
* ``response.cancel`` {response_id} (the relay's extension) is the core's ``Stop``: the
  response ends ``response.incomplete`` with status ``cancelled`` and its usage;
* a closed socket cancels every running response at once (``detach_grace`` does not apply:
  this dialect has no resume), and the session's end awaits their tasks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import orjson

from llm_relay_protocol import FinishReason, FrameError, frames
from llm_relay_protocol.codec import validate_start
from llm_relay_protocol.dialect import Begin
from llm_relay_protocol.responses import CreateContext, ResponseEncoder, ResponsesError, Turn, to_turn
from relay.cluster.redis_store import RedisStore, StoreUnavailable
from relay.cluster.replication import Replicator
from relay.core.connection import ActionFailed, Phase
from relay.core.errors import Draining, RelayError, UnknownModel
from relay.runtime.hub import Attachment
from relay.runtime.session import DialectAdapter, Session

__all__ = ["MAX_QUEUED_PER_CONNECTION", "RESPONSES_PATH", "ChainEntry", "ChainStore",
           "ResponsesAdapter"]

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
    #: Visible to its own connection only, even with Redis (``store: false``).
    private: bool = False

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
    """Stored responses for ``previous_response_id``, bounded per principal and in total.

    In this process: per principal at most ``max_entries`` responses and ``max_bytes`` of
    their conversations, and for every principal together at most ``max_total_bytes``
    (each entry holds its whole conversation, so a continuation is one lookup; its cost is
    the length of its compact JSON); past any bound the oldest entries go first, and an
    entry larger than ``max_bytes`` alone is not kept. Without Redis an entry is visible
    only to the connection that created it (OpenAI's rule) and is dropped with it; with
    Redis (``attach_redis``) it is also written to Redis for ``ttl`` seconds, keyed by the
    principal, where any connection of that principal on any relay finds it; Redis keeps at
    most ``max_entries`` per principal too (and each entry at most ``max_bytes``)."""

    def __init__(self, *, max_entries: int, max_bytes: int, ttl: float,
                 max_total_bytes: int | None = None) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_total_bytes = max_total_bytes if max_total_bytes is not None else 8 * max_bytes
        self.ttl = ttl
        self._by_principal: dict[str, OrderedDict[str, ChainEntry]] = {}
        self._bytes: dict[str, int] = {}
        #: Every entry, oldest first: (principal, response id) -> its size.
        self._order: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._total = 0
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
            messages: list[dict[str, Any]], *, private: bool = False) -> None:
        """Store a response (synchronously here, so a continuation sent the moment the
        client sees it end finds it; the Redis copy follows). ``private`` (a create with
        ``store: false``): for ``owner`` only, never written to Redis."""
        data = _entry_bytes(model, messages)
        if len(data) > self.max_bytes:
            logger.info("responses: a conversation of %d bytes exceeds "
                        "responses_chain_bytes; it cannot be continued", len(data))
            return
        self._remove(principal, response_id)
        entries = self._by_principal.setdefault(principal, OrderedDict())
        entries[response_id] = ChainEntry(owner, model, data, private)
        self._order[(principal, response_id)] = len(data)
        self._bytes[principal] = self._bytes.get(principal, 0) + len(data)
        self._total += len(data)
        while len(entries) > self.max_entries or self._bytes[principal] > self.max_bytes:
            self._remove(principal, next(iter(entries)))
        while self._total > self.max_total_bytes:
            self._remove(*next(iter(self._order)))
        if self._replicator is not None and not private:
            task = self._replicator.spawn(self._publish(principal, response_id, data),
                                          name="responses chain")
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    def _remove(self, principal: str, response_id: str) -> None:
        size = self._order.pop((principal, response_id), None)
        if size is None:
            return
        entries = self._by_principal[principal]
        del entries[response_id]
        self._total -= size
        self._bytes[principal] -= size
        if not entries:
            del self._by_principal[principal], self._bytes[principal]

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
        if entry is not None and (entry.owner is owner or self.shared and not entry.private):
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
        """``owner``'s connection closed: the responses only it can continue (all of them
        without Redis: OpenAI's per-connection rule; its ``store: false`` ones with Redis)
        are freed."""
        entries = self._by_principal.get(principal)
        for response_id in [k for k, v in (entries or {}).items()
                            if v.owner is owner and (v.private or not self.shared)]:
            self._remove(principal, response_id)

    def bytes_held(self) -> int:
        """Bytes of stored conversations in this process (the ``relay_responses_chain_bytes``
        gauge)."""
        return self._total


# ---------------------------------------------------------------- the adapter


class TooManyQueued(RelayError):
    """This dialect's refusal of a create while ``MAX_QUEUED_PER_CONNECTION`` wait (the
    ``error`` event ``too_many_requests``, 429)."""

    code = "too_many_requests"


class ResponsesAdapter(DialectAdapter):
    """The runtime half of one ``/v1/responses`` connection (module docstring): lanes and
    chains. It raises refusals (the machine answers them) and never closes."""

    def __init__(self, session: Session, *, chains: ChainStore) -> None:
        super().__init__(session)
        self.chains = chains
        self._lanes: dict[str | None, deque[Begin]] = {}
        self._lane_tasks: dict[str | None, asyncio.Task[None]] = {}
        self._queued = 0
        self._running: dict[str, Attachment] = {}      # response id -> its stream here

    def refusal(self, request: Begin) -> RelayError | None:
        """Before admission (so a refused create spends no start): more than
        ``MAX_QUEUED_PER_CONNECTION`` creates waiting for their lanes."""
        if self._queued >= MAX_QUEUED_PER_CONNECTION:
            return TooManyQueued(f"more than {MAX_QUEUED_PER_CONNECTION} responses are "
                                 "waiting on this connection; wait for some to finish")
        return None

    async def begin(self, request: Begin) -> None:
        """An admitted create joins its lane's queue; the lane runs its creates in order.
        Queueing never raises the connection's stream count: a lane runs one response at a
        time, and a create was admitted (stream caps, start rate) as it arrived."""
        context = request.context
        assert isinstance(context, CreateContext)
        lane = context.request.stream_id
        task = self._lane_tasks.get(lane)
        if task is None or task.done():          # a free lane: this create runs now
            self._lanes[lane] = deque()
            self._lane_tasks[lane] = asyncio.create_task(
                self._run_lane(lane, request), name=f"responses lane {self.session.session_id}")
        else:                                    # a busy one: it waits its turn
            self._lanes[lane].append(request)
            self._queued += 1

    async def _run_lane(self, lane: str | None, first: Begin) -> None:
        """Run ``first``, then the creates that queued behind it, one after another, each to
        its end. A refusal goes to the machine as the executor's would (``ActionFailed``:
        the ``error`` event)."""
        queue = self._lanes[lane]
        session = self.session
        request: Begin | None = first
        while request is not None:
            try:
                finished = await self._create(request)
            except (RelayError, FrameError) as exc:
                failed: Exception = exc
            except StoreUnavailable:
                failed = ResponsesError(
                    "previous_response_id cannot be looked up: the shared store is "
                    "unavailable; retry shortly", code="server_unavailable",
                    type="server_error", status=503, stream_id=lane).frame_error()
            except Exception as exc:
                logger.exception("session %s: internal error handling a responses "
                                 "response.create frame", session.session_id)
                failed = exc
            else:
                if finished is not None:
                    await finished.wait()
                request = self._next(queue)
                continue
            session._execute_now(session.conn.handle(ActionFailed(request, failed)))
            request = self._next(queue)
        del self._lanes[lane]
        self._lane_tasks.pop(lane, None)

    def _next(self, queue: deque[Begin]) -> Begin | None:
        if not queue:
            return None
        self._queued -= 1
        return queue.popleft()

    async def _create(self, request: Begin) -> asyncio.Event | None:
        """Look the chain up, build the real ``start`` and launch it; the event set when
        its response has ended (None when answered without a stream)."""
        context = request.context
        assert isinstance(context, CreateContext) and request.start is not None
        create = context.request
        session = self.session
        lane = create.stream_id
        if session.conn.phase is not Phase.WELCOMED:
            return None                          # closing: nothing more starts
        if session._draining():
            raise Draining("the relay is shutting down; start the response on a new "
                           "connection")
        turn = context.turn
        if turn is None:                         # a continuation: the stored conversation
            assert create.previous_response_id is not None
            found = await self.chains.get(session.principal, session,
                                          create.previous_response_id)
            if found is None:
                scope = "" if self.chains.shared else \
                    " (without --redis chains are kept per connection)"
                raise ResponsesError(
                    f"Previous response with id '{create.previous_response_id[:64]}' not "
                    f"found: unknown, expired, evicted, or from another connection{scope}.",
                    code="previous_response_not_found", param="previous_response_id",
                    stream_id=lane).frame_error()
            previous_model, previous = found
            try:
                turn = to_turn(create, previous=previous, previous_model=previous_model,
                               limits=session.conn._decode_limits)
            except ResponsesError as exc:
                exc.stream_id = lane
                raise exc.frame_error() from None
        if turn.model not in session.conn.visible_models():
            raise UnknownModel(f"The model '{turn.model[:64]}' is not served by this relay; "
                               f"it serves: {', '.join(session.conn.visible_models())}")
        if not create.generate:
            self._prepare(request.id, turn, lane, private=create.store is False)
            return None
        start = validate_start(frames.start(
            request.id, turn.model, turn.messages, tools=turn.tools,
            tool_choice=turn.tool_choice, params=turn.params or None),
            session.conn._decode_limits)
        att = await session.launch(dataclasses.replace(
            request, start=start, context=CreateContext(create, turn)))
        finished = asyncio.Event()
        encoder = session._encoders.get(att)
        assert isinstance(encoder, ResponseEncoder)
        history = turn.history
        model = turn.model
        principal = session.principal

        def done(encoder: ResponseEncoder) -> None:
            # Stored before its terminal event is sent: a continuation sent the moment the
            # client sees it finds it. A failed response is not continued.
            if encoder.status != "failed":
                self.chains.put(principal, session, encoder.response_id, model,
                                history + encoder.output_messages(),
                                private=create.store is False)
            self._running.pop(encoder.response_id, None)
            finished.set()

        encoder.on_done = done
        self._running[request.id] = att
        # response.created at once, as OpenAI sends it (not with the first token): queued
        # like the ``started`` reply it stands for, so it precedes every event of the stream.
        for event in encoder.opening():
            session._send(event)
        return finished

    def _prepare(self, response_id: str, turn: Turn, lane: str | None, *,
                 private: bool) -> None:
        """``generate: false``: a chain entry without a model call, answered as a
        completed response with no output (through the session's one send queue)."""
        session = self.session
        self.chains.put(session.principal, session, response_id, turn.model, turn.history,
                        private=private)
        encoder = ResponseEncoder(response_id, turn.echo, created_at=time.time(),
                                  stream_id=lane)
        events = encoder.opening() + encoder.feed([frames.finish(
            response_id, 1, "completed", "stop", frames.usage(0, 0, False))])
        for event in events:
            session._send(event)

    def close(self) -> None:
        """The connection has ended: no lane starts another response, and every running
        one is cancelled at once (this dialect has no resume, so ``detach_grace`` does not
        apply); the session's end awaits their tasks with the streams it cancelled."""
        session = self.session
        for task in self._lane_tasks.values():
            task.cancel()
            session._cancelled_on_detach.append(task)
        self._lane_tasks.clear()
        for att in self._running.values():
            stream = att.stream
            if stream.running and not stream.remote:
                session.hub.cancel(stream, FinishReason.CLIENT_DISCONNECT)
                if stream.task is not None:
                    session._cancelled_on_detach.append(stream.task)
        self._running.clear()
        self.chains.drop_owner(session.principal, session)
