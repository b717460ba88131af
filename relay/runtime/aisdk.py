"""``/ai-sdk``: the AI SDK's ``WebSocketChatTransport`` protocol on the relay's own streams.

A thin adapter: ``AiSdkSession`` is a ``Session`` (same writer, backlog and slow-consumer
rules, limits, metrics, drain) whose inbound frames are AI SDK requests and whose outbound
frames are AI SDK responses. The mapping itself is sans-I/O in ``protocol.aisdk``.

* ``send`` becomes a v1 ``start`` (``requestId`` is the stream's id on this connection)
  and goes through exactly the same admission as one (``Session._start``);
* ``abort`` is a v1 ``cancel`` of that stream: the upstream request is closed at once;
* ``resume`` looks the chat up in ``ChatIndex`` ((principal, chat id) -> the stream of its
  latest response) and attaches the stream from its first frame: the whole response is
  replayed (with the same ``messageId``) and the live rest follows.

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

__all__ = ["AI_SDK_EXAMPLE_PATH", "AI_SDK_EXAMPLE_ROOT", "AI_SDK_PATH", "AiSdkSession", "ChatIndex"]

logger = logging.getLogger("relay.runtime.aisdk")

AI_SDK_PATH = "/ai-sdk"
#: Where the relay serves the useChat example page (client_demo/ai-sdk/, once built).
AI_SDK_EXAMPLE_PATH = "/examples/ai-sdk/"
AI_SDK_EXAMPLE_ROOT = Path(__file__).resolve().parents[2] / "client_demo" / "ai-sdk"

_FIRST_PRUNE = 1024


@dataclass(frozen=True, slots=True)
class ChatResponse:
    stream_key: str
    message_id: str


class ChatIndex:
    """The latest response of each (principal, chat id): what ``resume`` and the
    one-active-response rule look up. Kept in this process and, with ``--redis``, in Redis
    too, so a resume that lands on another relay finds the chat (and follows its stream
    through the replication of v1 resume). The hub's retention decides how long a response
    stays resumable; an entry whose stream is gone answers ``no-active``."""

    def __init__(self, is_live: Callable[[str], bool] = lambda stream_key: True) -> None:
        self._chats: dict[tuple[str, str], ChatResponse] = {}
        #: Whether a stream is still in the hub (running or retained); entries of streams
        #: that are gone are pruned, so the index stays as small as the hub.
        self._is_live = is_live
        self._prune_at = _FIRST_PRUNE
        #: Set by the server when relays share Redis.
        self.replicator: Replicator | None = None
        self.ttl = 3600.0

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
            await replicator.store.set_chat(
                principal, chat_id, f"{response.stream_key} {response.message_id}",
                ttl=self.ttl)
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
        current = self._chats.local(self.principal, request.id)
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
        self._chats.set(self.principal, request.id, response)
        self._mappers[att] = ResponseMapper(rid, response.message_id)

    async def _on_resume(self, request: ResumeRequest) -> None:
        """v1 resume of the chat's latest stream from its first frame (local, or followed
        from Redis when it runs on another relay): ``resumed`` becomes ``start``, the whole
        response is replayed through a fresh mapper, the live rest follows."""
        rid = request.requestId
        response = await self._chats.get(self.principal, request.id)
        if response is None:
            self._respond(no_active_frame(rid))
            return
        try:
            await self._resume(Resume(type="resume", stream_key=response.stream_key,
                                      after_seq=0, id=rid))
        except UnknownStream:
            self._chats.forget(self.principal, request.id, response)
            self._respond(no_active_frame(rid))
            return
        except StreamLost:
            self._respond(error_frame(rid, safe_error_text("stream_lost")))
            return
        att = self._attachments[rid]
        # Registered just now and no await since: the writer has not read it yet.
        self._mappers[att] = ResponseMapper(rid, response.message_id,
                                            last_sequence=request.lastSequence)

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
        mapper = self._mappers.get(att)
        if mapper is None:
            return []
        out: list[bytes] = []
        for entry in entries:
            for frame in mapper.frames(entry.frame):
                out.append(orjson.dumps(frame))
        return out

    def _unregister(self, att: Attachment) -> None:
        super()._unregister(att)
        self._mappers.pop(att, None)
