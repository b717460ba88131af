"""``/ai-sdk``: the AI SDK's ``WebSocketChatTransport`` protocol on the relay's own streams.

A thin adapter: ``AiSdkSession`` is a ``Session`` (same writer, backlog and slow-consumer
rules, limits, metrics, drain) whose inbound frames are AI SDK requests and whose outbound
frames are AI SDK responses. The mapping itself is sans-I/O in ``protocol.aisdk``.

* ``send`` becomes a v1 ``start`` (``requestId`` is the stream's id on this connection)
  and goes through exactly the same admission as one (``Session._start``);
* ``abort`` is a v1 ``cancel`` of that stream: the upstream request is closed at once;
* ``resume`` looks the chat up in ``ChatIndex`` ((owner, chat id) -> the stream of its
  latest response) and attaches the stream from its first frame: the whole response is
  replayed (with the same ``messageId``; merged, and paid from the connection's frame
  budget and from the principal's replay budget, which outlives the connection: when that
  is spent the request gets an ``error`` saying when to resume again) and the live rest
  follows.

Whose chat it is (the *owner*): with ``--auth`` the principal. Without, the client's address
*and* the browser's owner cookie (``CHAT_OWNER_COOKIE``: 192 random bits, HttpOnly, set by the
relay on the upgrade of a client that sent none), so another client behind the same NAT that
knows or guesses a chat id (``my-chat``) finds nothing: a chat id is not a secret, the
cookie is. A client that keeps no cookies gets a new owner on each connection: its chats
resume only with ``--auth``, or when it sends the cookie back itself.

The door is the connection machine's (``relay.core.connection``, ``Dialect.AI_SDK``): this
adapter decodes frames (``protocol.aisdk``) and feeds the machine what they carry, and the
machine decides, with the same code as for /ws, the authentication (the upgrade's
``Authorization`` header, else each ``send``/``resume``'s ``headers.authorization``), the
per-principal connection cap, the time a connection may stay unauthenticated
(``hello_timeout``), the pending slot it holds meanwhile, and every close: wrong
credentials close the connection as a wrong hello does on /ws; a frame that cannot be parsed
or names no ``requestId`` cannot be answered (the transport ignores responses it cannot
correlate) and closes it too, as the AI SDK's own server example does. Any other bad frame
gets an ``error`` response frame for its request. A connection acts for one principal.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from websockets.exceptions import ConnectionClosed

from protocol import FinishReason, FrameError, Resume, frames
from protocol.codec import validate_client_object
from protocol.aisdk import (
    AbortRequest,
    AiSdkFrameError,
    ResponseMapper,
    ResumeRequest,
    SendRequest,
    decode_request,
    error_frame,
    no_active_frame,
    safe_error_text,
    start_frame,
    to_chat_messages,
)

from relay.core.errors import RelayError, StreamLost, UnknownStream
from relay.cluster.redis_store import StoreUnavailable
from relay.cluster.replication import Replicator, StoreUnavailableError
from relay.core.connection import (ActionFailed, Dialect, HelloTimedOut, Opened, Phase,
                                   RequestReceived, UnanswerableFrame)
from relay.runtime.hub import Attachment
from relay.runtime.session import Session
from relay.core.streamlog import LogEntry

__all__ = ["AI_SDK_EXAMPLE_PATH", "AI_SDK_EXAMPLE_ROOT", "AI_SDK_PATH", "CHAT_OWNER_COOKIE",
           "AiSdkSession", "ChatIndex", "chat_owner_cookie", "issue_chat_owner"]

logger = logging.getLogger("relay.runtime.aisdk")

AI_SDK_PATH = "/ai-sdk"
#: Where the relay serves the useChat example page (client_demo/ai-sdk/, once built).
AI_SDK_EXAMPLE_PATH = "/examples/ai-sdk/"
AI_SDK_EXAMPLE_ROOT = Path(__file__).resolve().parents[2] / "client_demo" / "ai-sdk"

_FIRST_PRUNE = 1024

#: A resume is charged one inbound frame per this many events it replays (half a writer
#: pass of merged replay: ~0.5 ms, a few small frames' handling), at most what a full bucket
#: holds besides the resume frame itself (``AiSdkSession._pay_for_replay``).
REPLAY_EVENTS_PER_FRAME = 128


#: Without ``--auth``, a chat belongs to the address *and* this cookie's value (module
#: docstring). The relay sets it, HttpOnly and SameSite=Strict, on the ``/ai-sdk`` upgrade
#: response of a client that sent no valid one.
CHAT_OWNER_COOKIE = "llm-relay-chat-owner"
#: The value the relay issues (``secrets.token_urlsafe(24)``: 192 bits, as a v1 stream key);
#: anything else is ignored and replaced, so a client cannot pick a guessable owner.
_OWNER_VALUE = re.compile(r"[A-Za-z0-9_-]{32}\Z")


def chat_owner_cookie(headers: Any) -> str | None:
    """The valid owner cookie among the request ``headers``' ``Cookie`` lines, else None."""
    for line in headers.get_all("Cookie"):
        for pair in line.split(";"):
            name, _, value = pair.strip().partition("=")
            if name == CHAT_OWNER_COOKIE and _OWNER_VALUE.match(value):
                return value
    return None


def issue_chat_owner(request_headers: Any, response_headers: Any, *, secure: bool) -> None:
    """The upgrade of an ``/ai-sdk`` connection without ``--auth``: when the request carries
    no valid owner cookie, add a ``Set-Cookie`` with a new one to the 101 response (read
    back by the session: ``AiSdkSession``). ``secure``: the relay is reached over TLS."""
    if chat_owner_cookie(request_headers) is not None:
        return
    response_headers["Set-Cookie"] = (
        f"{CHAT_OWNER_COOKIE}={secrets.token_urlsafe(24)}; Path={AI_SDK_PATH}; HttpOnly; "
        f"SameSite=Strict{'; Secure' if secure else ''}")


def _owner_of_connection(ws: Any) -> str:
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


@dataclass(frozen=True, slots=True)
class ChatResponse:
    stream_key: str
    message_id: str


class ChatIndex:
    """The latest response of each (owner, chat id): what ``resume`` and the
    one-active-response rule look up (the owner: ``AiSdkSession._chat_owner``). Kept in
    this process and, with ``--redis``, in Redis too, so a resume that lands on another
    relay finds the chat (and follows its stream through the replication of v1 resume).
    The hub's retention decides how long a response stays resumable, and the Redis record
    expires with it; an entry whose stream is gone answers ``no-active``."""

    def __init__(self, is_live: Callable[[str], bool] = lambda stream_key: True) -> None:
        self._chats: dict[tuple[str, str], ChatResponse] = {}
        #: Whether a stream is still in the hub (running or retained); entries of streams
        #: that are gone are pruned, so the index stays as small as the hub.
        self._is_live = is_live
        self._prune_at = _FIRST_PRUNE
        #: Set by the server when relays share Redis.
        self.replicator: Replicator | None = None

    async def get(self, principal: str, chat_id: str) -> ChatResponse | None:
        """Raises ``StoreUnavailableError`` when only Redis could know and cannot answer."""
        local = self._chats.get((principal, chat_id))
        if local is not None or self.replicator is None:
            return local
        try:
            raw = await self.replicator.store.get_chat(principal, chat_id)
        except StoreUnavailable:
            raise StoreUnavailableError("cannot look the chat up: the shared store is "
                                        "unavailable; try again") from None
        if raw is None:
            return None
        stream_key, _, message_id = raw.partition(" ")
        return ChatResponse(stream_key, message_id)

    def local(self, principal: str, chat_id: str) -> ChatResponse | None:
        return self._chats.get((principal, chat_id))

    def set(self, principal: str, chat_id: str, response: ChatResponse) -> None:
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
                       response: ChatResponse) -> None:
        try:
            # It expires with the response's own record in Redis (Replicator.record_chat).
            await replicator.record_chat(response.stream_key, principal, chat_id,
                                         f"{response.stream_key} {response.message_id}")
        except StoreUnavailable:
            logger.warning("ai-sdk: could not record a chat in Redis; it resumes on this "
                           "relay only")

    def forget(self, principal: str, chat_id: str, response: ChatResponse) -> None:
        if self._chats.get((principal, chat_id)) == response:
            del self._chats[(principal, chat_id)]

    def __len__(self) -> int:
        return len(self._chats)


@dataclass(frozen=True, slots=True)
class _Request:
    """What the machine's error answer to a request names (``ActionFailed.msg``): its type
    and its id (an AI SDK request's ``id`` is its chat's; its ``requestId`` names it)."""

    type: str
    id: str


def _authorization(headers: dict[str, str]) -> str | None:
    """A request's ``Authorization`` value (the transport's ``headers`` option; any case)."""
    return next((v for k, v in headers.items() if k.lower() == "authorization"), None)


def _message_id(stream_key: str) -> str:
    # Stable for the stream (a replay repeats it) but reveals nothing of its resume key.
    return "msg_" + hashlib.sha256(stream_key.encode()).hexdigest()[:24]


class AiSdkSession(Session):
    """One ``/ai-sdk`` connection. See the module docstring for the rules."""

    dialect = Dialect.AI_SDK

    def __init__(self, *args: Any, chats: ChatIndex, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._chats = chats
        self._mappers: dict[Attachment, ResponseMapper] = {}
        self._credentials_timer: asyncio.TimerHandle | None = None
        #: The browser's owner cookie (module docstring); it scopes chats without --auth.
        self._owner_cookie = _owner_of_connection(self.ws)

    @property
    def _chat_owner(self) -> str:
        """Whose chats this connection sees: the principal with --auth; without, the
        address and the owner cookie (knowing a chat id is not enough)."""
        if self._auth is not None:
            return self.principal
        return f"{self.principal} {self._owner_cookie}"

    # ------------------------------------------------------------------ handshake

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            if self._credentials_timer is not None:
                self._credentials_timer.cancel()

    async def _handshake(self) -> bool:
        """No hello: the transport starts with its first request. The machine decides at
        once when auth is off or the upgrade carried an ``Authorization`` header; otherwise
        the connection awaits credentials in its requests for ``hello_timeout``, as a /ws
        connection awaits its hello."""
        request = getattr(self.ws, "request", None)
        opened = self.conn.handle(Opened(self.ws.subprotocol,
                                         request.headers if request is not None else None))
        if not await self._perform_handshake(opened):
            return False
        if self.conn.phase is Phase.AWAITING_CREDENTIALS:
            self._credentials_timer = asyncio.get_running_loop().call_later(
                self.settings.hello_timeout, self._credentials_timed_out)
        return True

    def _credentials_timed_out(self) -> None:
        self._credentials_timer = None
        if self.conn.phase is Phase.AWAITING_CREDENTIALS:
            self._perform_now(self.conn.handle(HelloTimedOut()))

    # ------------------------------------------------------------------ inbound

    async def _handle(self, raw: str | bytes) -> None:
        """Answer one AI SDK frame: decode it, let the machine decide on its credentials
        (a close, a refusal, or go on), then carry the request out."""
        if self.conn.phase not in (Phase.AWAITING_CREDENTIALS, Phase.WELCOMED):
            return                     # closing: nothing more is answered
        try:
            request = decode_request(raw, self._decode_limits)
        except AiSdkFrameError as exc:
            self.metrics.errors.labels("bad_request").inc()
            if exc.request_id is None:
                logger.info("ai-sdk: closing a connection that sent an unanswerable frame",
                            extra={"session_id": self.session_id})
                self._perform_now(self.conn.handle(UnanswerableFrame(exc.message)))
                return
            self._respond(error_frame(exc.request_id, exc.message))
            return
        try:
            if isinstance(request, AbortRequest):
                self._abort(request)
                return
            for action in self.conn.handle(RequestReceived(
                    request.requestId, _authorization(request.headers))):
                await self._perform(action)     # a close, credentials adopted, or Refuse
            if self.conn.phase is not Phase.WELCOMED:
                return                          # closed (or closing) instead
            if isinstance(request, SendRequest):
                await self._on_send(request)
            else:
                await self._on_resume(request)
        except ConnectionClosed:
            raise
        except Exception as exc:
            # As on /ws, the machine turns the exception into the error answering the
            # request (``_send`` says it in AI SDK terms); anything but the relay's own
            # refusals is a bug, logged here with its traceback.
            if not isinstance(exc, RelayError):
                logger.exception("session %s: internal error handling an ai-sdk %s frame",
                                 self.session_id, request.type)
            self._perform_now(self.conn.handle(
                ActionFailed(_Request(request.type, request.requestId), exc)))

    async def _on_send(self, request: SendRequest) -> None:
        rid = request.requestId
        current = self._chats.local(self._chat_owner, request.id)
        if current is not None:
            stream = self.hub.get(current.stream_key)
            if stream is not None and stream.running:
                self._respond(error_frame(rid, "A response is already active for this chat."))
                return
        body = request.body
        try:
            messages = to_chat_messages(request.messages)
            # The v1 start it becomes passes the same checks as one sent on /ws: its size
            # and counts before validation (DecodeLimits), then the models.
            start = validate_client_object(frames.start(
                rid, body.get("model") or self.registry.aliases[0], messages,
                tools=body.get("tools"),
                tool_choice=body.get("toolChoice", body.get("tool_choice")),
                params=body.get("params") or None), self._decode_limits)
        except FrameError as exc:
            self._respond(error_frame(rid, f"Invalid request: {exc.message}"))
            return
        except ValueError as exc:
            self._respond(error_frame(rid, f"Invalid messages: {exc}"))
            return
        await self._start(start)              # v1 admission; raises RelayError on refusal
        att = self._attachments.get(rid)
        if att is None:                      # refused without an error (token expired)
            self._respond(error_frame(rid, "Not authenticated: token expired."))
            return
        response = ChatResponse(att.stream.key, _message_id(att.stream.key))
        self._chats.set(self._chat_owner, request.id, response)
        self._mappers[att] = ResponseMapper(rid, response.message_id)

    async def _on_resume(self, request: ResumeRequest) -> None:
        """v1 resume of the chat's latest stream from its first frame (local, or followed
        from Redis when it runs on another relay): ``resumed`` becomes ``start``, the whole
        response is replayed through a fresh mapper (merged, unless ``lastSequence`` asks
        for the live numbering), the live rest follows. The replay is paid from the
        connection's frame budget first (``_pay_for_replay``)."""
        rid = request.requestId
        response = await self._chats.get(self._chat_owner, request.id)
        if response is None:
            self._respond(no_active_frame(rid))
            return
        if not await self._pay_for_replay(response.stream_key):
            return
        try:
            await self._resume(Resume(type="resume", stream_key=response.stream_key,
                                      after_seq=0, id=rid))
        except UnknownStream:
            self._chats.forget(self._chat_owner, request.id, response)
            self._respond(no_active_frame(rid))
            return
        except StreamLost:
            self._respond(error_frame(rid, safe_error_text("stream_lost")))
            return
        att = self._attachments[rid]
        # Registered just now and no await since: the writer has not read it yet.
        self._mappers[att] = ResponseMapper(
            rid, response.message_id, last_sequence=request.lastSequence,
            merge=request.lastSequence is None)

    async def _pay_for_replay(self, stream_key: str) -> bool:
        """Charge a resume's replay to the connection's inbound frame budget
        (``--frames-per-second`` / ``--frame-burst``, the bucket every frame is paid from):
        one frame per ``REPLAY_EVENTS_PER_FRAME`` events of the retained response, at most
        what a full bucket holds after paying for the ``resume`` frame itself, so a
        connection that has been quiet can always resume once. One that cannot pay is
        closed 4429 like any frame flood; False then."""
        cost = min(math.ceil(await self._replay_events(stream_key) / REPLAY_EVENTS_PER_FRAME),
                   max(0, math.floor(self._frames.burst) - 1))
        if cost <= 0 or self._frames.take(cost):
            return True
        logger.info("ai-sdk: closing a connection whose resumes exceed its frame budget",
                    extra={"session_id": self.session_id, "principal": self.principal})
        await self._close_flooded()
        return False

    async def _replay_events(self, stream_key: str) -> int:
        """How many events a replay of stream ``stream_key`` from its start reads: its log
        here, or (running on another relay) its log in Redis; 0 when unknown (the resume
        then fails anyway)."""
        stream = self.hub.get(stream_key)
        if stream is not None and not stream.remote:
            return len(stream.log)
        replicator = self.hub.replicator
        if replicator is None:
            return 0
        try:
            return await replicator.store.last_seq(stream_key) or 0
        except StoreUnavailable:
            return 0

    def _abort(self, request: AbortRequest) -> None:
        att = self._attachments.get(request.requestId)
        if att is not None:      # an unknown or finished request: nothing left to stop
            self.hub.cancel(att.stream, FinishReason.CLIENT_CANCEL)

    # ------------------------------------------------------------------ outbound

    def _respond(self, frame: dict[str, Any]) -> None:
        super()._send(frame)

    def _send(self, frame: dict) -> bool:
        """v1 control frames raised by the shared ``Session`` code, in AI SDK terms:
        ``error`` for a request -> its ``error`` response; ``started`` needs no answer (the
        response's own ``start`` chunk follows); the rest does not exist here."""
        if "requestId" in frame:
            return super()._send(frame)
        if frame.get("type") == "resumed":
            return super()._send(start_frame(frame["id"]))
        if frame.get("type") == "error" and frame.get("id") is not None:
            # The relay's own refusals explain themselves; a takeover (the chat was resumed
            # elsewhere) and a relay bug end this request with a plain-language text.
            text = (safe_error_text(frame["code"]) if frame["code"] == "stream_taken_over"
                    else safe_error_text(None) if frame["code"] == "internal_error"
                    else frame["message"])
            return super()._send(error_frame(frame["id"], text))
        return True

    def _encode_entries(self, att: Attachment, entries: list[LogEntry]) -> Iterable[bytes]:
        """The response frames for ``entries``; a merging mapper (a replay) keeps the open
        block's text while the log already holds more (the writer's next pass reads it)."""
        mapper = self._mappers.get(att)
        if mapper is None:
            return []
        more = entries[-1].seq < att.stream.log.last_seq
        return [orjson.dumps(frame)
                for frame in mapper.feed([entry.frame for entry in entries], more=more)]

    def _unregister(self, att: Attachment) -> None:
        super()._unregister(att)
        self._mappers.pop(att, None)
