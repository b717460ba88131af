"""``/ai-sdk``: the AI SDK's ``WebSocketChatTransport`` protocol, the runtime half of its dialect.

The dialect itself is the sans-I/O codec ``llm_relay_protocol.aisdk.AiSdkCodec`` (frames -> the core's
requests, replies and stream frames -> AI SDK frames), and the connection machine
(``relay.core.connection``) decides its door, authentication (the upgrade's
``Authorization`` header, else each ``send``/``resume``'s ``headers.authorization``), limits,
errors and closes exactly as for /ws. What needs the runtime is here, in
``AiSdkAdapter`` (a ``relay.runtime.session.DialectAdapter``):

* a ``send`` is refused while its chat's latest response still runs (one active response
  per chat: ``refusal``, which the machine asks after the request's credentials and before
  its admission; with ``--redis`` ``begin`` also asks the group: the chat's record in Redis
  names the response, whose owner relay must still be alive; a check at the send, so two
  sends racing on two relays within one Redis round trip may both start), else, admitted,
  launched like a v1 ``start`` and recorded in ``ChatIndex`` ((owner, chat id) -> the
  stream of its latest response);
* a ``resume`` looks the chat up in ``ChatIndex`` and joins the stream as a *viewer* (v1
  resume without ``takeover``: PROTOCOL.md "Viewers") from its first frame, so every tab
  that resumes a chat follows its answer live while the tab that sent it keeps streaming;
  an ``abort`` from any of them (its own ``requestId``) stops the response for all. The
  whole response is replayed (with the same ``messageId``; merged, and paid from
  the connection's frame budget and from the principal's replay budget, which outlives the
  connection: when that is spent the request gets an ``error`` saying when to resume again)
  and the live rest follows. A chat with no resumable response is ``unknown_stream``, which
  the codec says as ``no-active``.

Whose chat it is (the *owner*): with ``--auth`` the principal. Without, the client's address
*and* the browser's owner cookie (``CHAT_OWNER_COOKIE``: 192 random bits, HttpOnly, set by the
relay on the upgrade of a client that sent none), so another client behind the same NAT that
knows or guesses a chat id (``my-chat``) finds nothing: a chat id is not a secret, the
cookie is. A client that keeps no cookies gets a new owner on each connection: its chats
resume only with ``--auth``, or when it sends the cookie back itself.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers

from llm_relay_protocol import Resume
from llm_relay_protocol.aisdk import ResumeRequest, SendRequest, message_id, safe_error_text
from llm_relay_protocol.dialect import Begin, Reattach

from relay.core.errors import BadRequest, RelayError, StreamLost, UnknownStream
from relay.core.lifecycle import SharedState
from relay.cluster.redis_store import ChatRecord, StoreUnavailable
from relay.cluster.replication import Replicator, StoreUnavailableError
from relay.runtime.session import DialectAdapter, Session

__all__ = ["AI_SDK_EXAMPLE_PATH", "AI_SDK_EXAMPLE_ROOT", "AI_SDK_PATH", "CHAT_OWNER_COOKIE",
           "AiSdkAdapter", "ChatIndex", "chat_owner_cookie", "issue_chat_owner"]

logger = logging.getLogger("relay.runtime.aisdk")

AI_SDK_PATH = "/ai-sdk"
#: Where the relay serves the useChat example page (client_demo/ai-sdk/, once built).
AI_SDK_EXAMPLE_PATH = "/examples/ai-sdk/"
AI_SDK_EXAMPLE_ROOT = Path(__file__).resolve().parents[2] / "client_demo" / "ai-sdk"

_FIRST_PRUNE = 1024

#: A resume is charged one inbound frame per this many events it replays (half a writer
#: pass of merged replay: ~0.5 ms, a few small frames' handling), at most what a full bucket
#: holds besides the resume frame itself (``AiSdkAdapter._pay_for_replay``).
REPLAY_EVENTS_PER_FRAME = 128


#: Without ``--auth``, a chat belongs to the address *and* this cookie's value (module
#: docstring). The relay sets it, HttpOnly and SameSite=Strict, on the ``/ai-sdk`` upgrade
#: response of a client that sent no valid one.
CHAT_OWNER_COOKIE = "llm-relay-chat-owner"
#: The value the relay issues (``secrets.token_urlsafe(24)``: 192 bits, as a v1 stream key);
#: anything else is ignored and replaced, so a client cannot pick a guessable owner.
_OWNER_VALUE = re.compile(r"[A-Za-z0-9_-]{32}\Z")


def chat_owner_cookie(headers: Headers) -> str | None:
    """The valid owner cookie among the request ``headers``' ``Cookie`` lines, else None."""
    for line in headers.get_all("Cookie"):
        for pair in line.split(";"):
            name, _, value = pair.strip().partition("=")
            if name == CHAT_OWNER_COOKIE and _OWNER_VALUE.match(value):
                return value
    return None


def issue_chat_owner(request_headers: Headers, response_headers: Headers, *,
                     secure: bool) -> None:
    """The upgrade of an ``/ai-sdk`` connection without ``--auth``: when the request carries
    no valid owner cookie, add a ``Set-Cookie`` with a new one to the 101 response (read
    back by the adapter: ``AiSdkAdapter``). ``secure``: the relay is reached over TLS."""
    if chat_owner_cookie(request_headers) is not None:
        return
    response_headers["Set-Cookie"] = (
        f"{CHAT_OWNER_COOKIE}={secrets.token_urlsafe(24)}; Path={AI_SDK_PATH}; HttpOnly; "
        f"SameSite=Strict{'; Secure' if secure else ''}")


def _owner_of_connection(ws: ServerConnection) -> str:
    """The owner cookie the connection's client sent, else the one the relay issued on its
    upgrade (``issue_chat_owner``), else (no HTTP request: an in-process socket) a fresh
    one of this connection alone."""
    request = getattr(ws, "request", None)
    if request is not None:
        owner = chat_owner_cookie(request.headers)
        if owner is not None:
            return owner
    response = getattr(ws, "response", None)
    if response is not None:
        for line in response.headers.get_all("Set-Cookie"):
            name, _, rest = line.partition("=")
            value = rest.split(";", 1)[0]
            if name == CHAT_OWNER_COOKIE and _OWNER_VALUE.match(value):
                return value
    return secrets.token_urlsafe(24)


class ChatIndex:
    """The latest response of each (owner, chat id): what ``resume`` and the
    one-active-response rule look up (the owner: ``AiSdkAdapter.chat_owner``). Kept in
    this process and, with ``--redis``, in Redis too, so a resume that lands on another
    relay finds the chat (and follows its stream through the replication of v1 resume).
    The hub's retention decides how long a response stays resumable, and the Redis record
    expires with it; an entry whose stream is gone answers ``no-active``."""

    def __init__(self, is_live: Callable[[str], bool] = lambda stream_key: True) -> None:
        self._chats: dict[tuple[str, str], ChatRecord] = {}
        #: Whether a stream is still in the hub (running or retained); entries of streams
        #: that are gone are pruned, so the index stays as small as the hub.
        self._is_live = is_live
        self._prune_at = _FIRST_PRUNE
        #: Set by the server when relays share Redis.
        self.replicator: Replicator | None = None

    async def get(self, principal: str, chat_id: str, *,
                  running_here: Callable[[str], bool] = lambda stream_key: False,
                  ) -> ChatRecord | None:
        """The chat's latest response: this relay's entry while its stream runs here
        (``running_here``; Redis may not have it yet), else, relays on Redis, the group's
        record (a newer response may have started on another relay), else this relay's
        entry. Raises ``StoreUnavailableError`` when only Redis could know and cannot
        answer."""
        local = self._chats.get((principal, chat_id))
        if self.replicator is None or (local is not None and running_here(local.stream_key)):
            return local
        try:
            record = await self.replicator.store.get_chat(principal, chat_id)
        except StoreUnavailable:
            if local is not None:
                return local
            raise StoreUnavailableError("cannot look the chat up: the shared store is "
                                        "unavailable; try again") from None
        return record if record is not None else local

    def local(self, principal: str, chat_id: str) -> ChatRecord | None:
        return self._chats.get((principal, chat_id))

    def set(self, principal: str, chat_id: str, response: ChatRecord) -> None:
        self._chats[(principal, chat_id)] = response
        if len(self._chats) >= self._prune_at:
            # Amortised O(1) per set: a full pass only each time the index has doubled
            # since the last one left it.
            self._chats = {k: v for k, v in self._chats.items() if self._is_live(v.stream_key)}
            self._prune_at = max(_FIRST_PRUNE, 2 * len(self._chats))
        replicator = self.replicator
        if replicator is not None:
            replicator.spawn(self._publish(replicator, principal, chat_id, response),
                             name="aisdk chat index")

    async def _publish(self, replicator: Replicator, principal: str, chat_id: str,
                       response: ChatRecord) -> None:
        try:
            # It expires with the response's own record in Redis (Replicator.record_chat).
            await replicator.record_chat(principal, chat_id, response)
        except StoreUnavailable:
            logger.warning("ai-sdk: could not record a chat in Redis; it resumes on this "
                           "relay only")

    def forget(self, principal: str, chat_id: str, response: ChatRecord) -> None:
        if self._chats.get((principal, chat_id)) == response:
            del self._chats[(principal, chat_id)]

    def __len__(self) -> int:
        return len(self._chats)


class AiSdkAdapter(DialectAdapter):
    """The runtime half of one ``/ai-sdk`` connection (module docstring)."""

    def __init__(self, session: Session, *, chats: ChatIndex) -> None:
        super().__init__(session)
        self.chats = chats
        #: The browser's owner cookie (module docstring); it scopes chats without --auth.
        self._owner_cookie = _owner_of_connection(session.ws)

    @property
    def chat_owner(self) -> str:
        """Whose chats this connection sees: the principal with --auth; without, the
        address and the owner cookie (knowing a chat id is not enough)."""
        session = self.session
        if session.conn.auth is not None:
            return session.principal
        return f"{session.principal} {self._owner_cookie}"

    def refusal(self, request: Begin) -> RelayError | None:
        """One active response per chat: a ``send`` while its chat's latest response runs."""
        send = request.context
        assert isinstance(send, SendRequest)
        current = self.chats.local(self.chat_owner, send.id)
        if current is not None:
            stream = self.session.hub.get(current.stream_key)
            if stream is not None and stream.running:
                return BadRequest("A response is already active for this chat.")
        return None

    async def begin(self, request: Begin) -> None:
        send = request.context
        assert isinstance(send, SendRequest)
        owner = self.chat_owner
        if self.chats.replicator is not None:
            # The rule across relays: the chat's record in Redis may name a response that
            # runs on another relay. (A question to Redis: asked here, since ``refusal``
            # cannot wait; such a refusal comes after the send's admission.)
            try:
                current = await self.chats.get(owner, send.id, running_here=self._running_here)
            except StoreUnavailableError:
                current = None                  # Redis is down: this relay's rule only
            if current is not None and await self._running(current.stream_key):
                raise BadRequest("A response is already active for this chat.")
        att = await self.session.launch(request)
        self.chats.set(self.chat_owner, send.id, ChatRecord(att.stream.key,
                                                             message_id(att.stream.key)))

    def _running_here(self, stream_key: str) -> bool:
        stream = self.session.hub.get(stream_key)
        return stream is not None and not stream.remote and stream.running

    async def _running(self, stream_key: str) -> bool:
        """Whether the response ``stream_key`` still runs: here, or (relays on Redis) on
        the relay that owns it, whose heartbeat must still be alive. False when Redis
        cannot say."""
        hub = self.session.hub
        stream = hub.get(stream_key)
        if stream is not None and not stream.remote:
            return stream.running
        replicator = self.chats.replicator
        if replicator is None:
            return stream is not None and stream.running
        store = replicator.store
        try:
            meta = await store.meta(stream_key)
            return (meta is not None and meta.state is SharedState.RUNNING
                    and await store.owner_alive(stream_key))
        except StoreUnavailable:
            return False

    async def reattach(self, request: Reattach) -> None:
        """v1 resume of the chat's latest stream from its first frame (local, or followed
        from Redis when it runs on another relay): ``resumed`` becomes ``start``, the whole
        response is replayed through a fresh mapper (merged, unless ``lastSequence`` asks
        for the live numbering), the live rest follows. The replay is paid from the
        connection's frame budget first (``_pay_for_replay``)."""
        resume = request.context
        assert isinstance(resume, ResumeRequest)
        owner = self.chat_owner
        response = await self.chats.get(owner, resume.id, running_here=self._running_here)
        if response is None:
            raise UnknownStream("no active response for this chat")
        if not await self._pay_for_replay(response.stream_key):
            return
        try:
            await self.session.resume(request, Resume(
                type="resume", stream_key=response.stream_key, after_seq=0, id=request.id))
        except UnknownStream:
            self.chats.forget(owner, resume.id, response)
            raise
        except StreamLost:
            raise StreamLost(safe_error_text("stream_lost")) from None

    async def _pay_for_replay(self, stream_key: str) -> bool:
        """Charge a resume's replay to the connection's inbound frame budget
        (``--frames-per-second`` / ``--frame-burst``, the bucket every frame is paid from):
        one frame per ``REPLAY_EVENTS_PER_FRAME`` events of the retained response, at most
        what a full bucket holds after paying for the ``resume`` frame itself, so a
        connection that has been quiet can always resume once. One that cannot pay is
        closed 4429 like any frame flood; False then."""
        session = self.session
        events = await session.streams.replay_events(stream_key)
        cost = min(math.ceil(events / REPLAY_EVENTS_PER_FRAME),
                   max(0, math.floor(session.frames_budget.burst) - 1))
        if session.pay_frames(cost):
            return True
        logger.info("ai-sdk: closing a connection whose resumes exceed its frame budget",
                    extra={"session_id": session.session_id, "principal": session.principal})
        return False
