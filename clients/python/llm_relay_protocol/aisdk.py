"""The AI SDK's WebSocket chat protocol (``ai`` 7, ``WebSocketChatTransport``), sans I/O.

The relay speaks this second protocol on ``/ai-sdk`` so ``useChat`` apps plug in with
``new WebSocketChatTransport({url})``. This module owns everything that protocol means and
nothing that does I/O:

* the client frames, validated strictly (``decode_request``): ``send`` {requestId, id (chat
  id), trigger, messageId, messages: UIMessage[], headers, body, metadata}, ``resume``
  {requestId, id, lastSequence?, headers, body, metadata} and ``abort`` {requestId};
* ``to_chat_messages``: UIMessages -> the OpenAI-format messages a v1 ``start`` carries
  (text; images and files; assistant tool parts with an output become ``tool_calls`` plus
  ``tool`` results, so client-side tools round-trip; reasoning is not sent back);
* ``ResponseMapper``: the frames of one v1 stream (``token``, ``reasoning``,
  ``tool_call_chunk``, ``tool_call_complete``, ``finish``) -> the server frames of one
  response (``chunk`` {requestId, sequence 0, 1, 2, ..., chunk: UIMessageChunk}, then ``end``
  or ``error``). Every chunk is valid for the package's ``uiMessageChunkSchema``: the
  transport closes the whole connection on an invalid one.

Rules of the mapping (the AI SDK's UI message stream):

* a response opens with ``start`` {messageId} and ``start-step``; ``messageId`` is derived
  from the stream, so a replay (resume) gives the same id and Chat replaces the partial
  message instead of appending one;
* text and reasoning come as ``*-start`` / ``*-delta`` / ``*-end`` blocks; a block is closed
  when the other kind starts, and before the step finishes;
* a merging mapper (``merge=True``: a full replay) joins consecutive deltas of one block that
  are fed together into one ``*-delta`` (at most ``MAX_MERGED_DELTA_CHARS``), as v1 merges
  token frames for a lagging reader: the assembled message is the same, in far fewer chunks;
* a tool call is ``tool-input-start`` {toolCallId, toolName}, ``tool-input-delta``s, then
  ``tool-input-available`` {input: the parsed JSON arguments} or ``tool-input-error`` when the
  arguments are not valid JSON (or not an object);
* a completed stream ends ``finish-step``, ``finish`` {finishReason, messageMetadata.usage},
  then the ``end`` frame; a cancelled one ends ``abort`` then ``end``; a failed or timed-out
  one ends with the ``error`` response frame (a safe text, never provider detail) and nothing
  after it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Annotated, Any, Literal, TypeAlias

import orjson
from pydantic import (BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter,
                      ValidationError)

from . import frames
from .codec import (DecodeLimits, FrameError, check_request_shape, parse_json_within,
                    validate_start)
from .dialect import Begin, Handshake, Malformed, Reattach, Request, Stop
from .frames import Frame
from .messages import StreamId

__all__ = [
    "MAX_MERGED_DELTA_CHARS",
    "AbortRequest",
    "AiSdkCodec",
    "AiSdkFrameError",
    "ResponseMapper",
    "ResumeRequest",
    "SendRequest",
    "UIMessage",
    "decode_request",
    "end_frame",
    "error_frame",
    "message_id",
    "no_active_frame",
    "start_frame",
    "to_chat_messages",
]

#: A JSON object as the AI SDK sends it (a ``UIMessage`` part, the transport's ``body``) or
#: as built from one for the provider (a chat message, a content part): what its values
#: are depends on its keys, read one by one where used, hence ``Any``. (AI SDK frames built
#: here are ``llm_relay_protocol.frames.Frame``s.)
JSONObject: TypeAlias = dict[str, Any]

#: ``requestId`` doubles as the v1 stream id inside the relay (at most 128 characters).
RequestId = StreamId
_REQUEST_ID: TypeAdapter[str] = TypeAdapter(RequestId)
ChatId = Annotated[StrictStr, Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]


class _Frame(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class UIMessage(BaseModel):
    """One AI SDK ``UIMessage``. Parts stay plain dicts: ``to_chat_messages`` reads the kinds
    it knows and ignores the rest (data parts, sources, step markers)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: StrictStr
    role: Literal["system", "user", "assistant"]
    parts: list[JSONObject]
    metadata: Any = None            # Any: the application's JSON, unused here


class _ChatRequest(_Frame):
    """What ``send`` and ``resume`` share: the request, its chat, and the transport's
    ``headers`` / ``body`` / ``metadata`` options."""

    requestId: RequestId
    id: ChatId
    headers: dict[str, StrictStr] = {}
    body: JSONObject = {}
    metadata: Any = None            # Any: the application's JSON, unused here


class SendRequest(_ChatRequest):
    type: Literal["send"]
    trigger: Literal["submit-message", "regenerate-message"]
    messageId: StrictStr | None = None
    messages: Annotated[list[UIMessage], Field(min_length=1)]


class ResumeRequest(_ChatRequest):
    type: Literal["resume"]
    lastSequence: Annotated[StrictInt, Field(ge=0)] | None = None


class AbortRequest(_Frame):
    type: Literal["abort"]
    requestId: RequestId


_MODELS: dict[str, type[_Frame]] = {
    "send": SendRequest, "resume": ResumeRequest, "abort": AbortRequest}


class AiSdkFrameError(ValueError):
    """A client frame that cannot be honoured. ``request_id`` is set when the frame named
    one (the answer is then an ``error`` response frame for it); without one the frame
    cannot be answered and the connection is closed 1008, as the AI SDK's own server
    example does."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


def decode_request(data: str | bytes, limits: DecodeLimits | None = None
                   ) -> SendRequest | ResumeRequest | AbortRequest:
    """Parse and validate one client frame; raises ``AiSdkFrameError``.

    The same limits as a v1 frame apply, each before the work it bounds, by the same code:
    the count of ``[``/``{`` and the nesting depth while parsing (``parse_json_within``), then
    on the parsed but unvalidated request the checks of a v1 ``start``
    (``check_request_shape``: the JSON size of ``messages`` + ``body.tools``, the counts of
    messages, tools and parts, the keys validated one by one, ``headers`` and ``body``
    included), and only then the models. So a heavy frame is refused for the price of a
    parse and a scan; the v1 ``start`` a ``send`` becomes is checked again by the relay.
    """
    limits = limits or DecodeLimits()
    if not isinstance(data, str):
        raise AiSdkFrameError("binary frames are not accepted; send JSON text frames")
    try:
        obj = parse_json_within(data, limits)
    except FrameError as exc:
        raise AiSdkFrameError(exc.message) from None
    if not isinstance(obj, dict):
        raise AiSdkFrameError("frame must be a JSON object")
    request_id = _usable_request_id(obj.get("requestId"))
    frame_type = obj.get("type")
    model = _MODELS.get(frame_type) if isinstance(frame_type, str) else None
    if model is None:
        raise AiSdkFrameError("unknown frame type (expected send, resume or abort)",
                              request_id)
    if model is not AbortRequest:
        _check_shape(obj, limits, request_id)
    try:
        return model.model_validate(obj)  # type: ignore[return-value]
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "frame"
        raise AiSdkFrameError(f"invalid {frame_type} frame: field {where!r}: {err['msg']}",
                              request_id) from None


def _usable_request_id(value: object) -> str | None:
    """``value`` when it is a valid ``requestId`` (the rule of a v1 stream id, which it
    becomes), so that an answer can name it; else None."""
    if not isinstance(value, str) or len(value) > 128:
        return None
    try:
        return _REQUEST_ID.validate_python(value)
    except ValidationError:
        return None


def _check_shape(obj: JSONObject, limits: DecodeLimits, request_id: str | None) -> None:
    """A ``send``'s or ``resume``'s size and counts before validation, by v1's own check:
    UIMessage ``parts`` count as a start's content parts; ``body.tools`` as its tools;
    ``headers``, ``body``, ``body.toolChoice``, ``body.params`` (and its
    ``response_format``) are validated key by key."""
    body = obj.get("body")
    body = body if type(body) is dict else {}
    params = body.get("params")
    options = [obj.get("headers"), body, body.get("toolChoice", body.get("tool_choice")),
               params]
    if type(params) is dict:
        options.append(params.get("response_format"))

    def refuse(message: str) -> AiSdkFrameError:
        return AiSdkFrameError(f"Invalid request: {message}", request_id)

    check_request_shape(obj.get("messages"), body.get("tools"), limits, parts_key="parts",
                        options=options, refuse=refuse)


# ---------------------------------------------------------------- UIMessage -> messages

def _text_of(parts: list[JSONObject]) -> str:
    return "".join(p["text"] for p in parts
                   if p.get("type") == "text" and isinstance(p.get("text"), str))


def _is_tool_part(part: JSONObject) -> bool:
    kind = part.get("type")
    return isinstance(kind, str) and (kind.startswith("tool-") or kind == "dynamic-tool")


def _tool_name(part: JSONObject) -> str:
    if part["type"] == "dynamic-tool":
        return str(part.get("toolName", ""))
    return str(part["type"])[len("tool-"):]


def _file_content(part: JSONObject) -> JSONObject | None:
    url = part.get("url")
    media_type = part.get("mediaType")
    if not isinstance(url, str) or not isinstance(media_type, str):
        raise ValueError("a file part needs string 'url' and 'mediaType'")
    if media_type.startswith("image/"):
        return {"type": "image_url", "image_url": {"url": url}}
    file: JSONObject = {"file_data": url} if url.startswith("data:") else {"file_id": url}
    if isinstance(part.get("filename"), str):
        file["filename"] = part["filename"]
    return {"type": "file", "file": file}


def _user_message(parts: list[JSONObject]) -> JSONObject:
    content: list[JSONObject] = []
    for part in parts:
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            content.append({"type": "text", "text": part["text"]})
        elif kind == "file":
            item = _file_content(part)
            if item is not None:
                content.append(item)
    if all(c["type"] == "text" for c in content):
        return {"role": "user", "content": "".join(c["text"] for c in content)}
    return {"role": "user", "content": content}


def _assistant_messages(parts: list[JSONObject]) -> list[JSONObject]:
    """One assistant message per step (a ``step-start`` after tool calls opens a new one),
    each followed by the ``tool`` results of its calls."""
    out: list[JSONObject] = []
    text: list[str] = []
    calls: list[JSONObject] = []
    results: list[JSONObject] = []

    def flush() -> None:
        if not text and not calls:
            return
        message: JSONObject = {"role": "assistant", "content": "".join(text) or None}
        if calls:
            message["tool_calls"] = list(calls)
        out.append(message)
        out.extend(results)
        text.clear()
        calls.clear()
        results.clear()

    for part in parts:
        kind = part.get("type")
        if kind == "step-start":
            if calls:
                flush()
        elif kind == "text" and isinstance(part.get("text"), str):
            text.append(part["text"])
        elif _is_tool_part(part):
            state = part.get("state")
            if state not in ("output-available", "output-error"):
                continue  # a call with no result yet cannot be sent to a provider
            call_id = part.get("toolCallId")
            if not isinstance(call_id, str):
                raise ValueError("a tool part needs a string 'toolCallId'")
            calls.append({"id": call_id, "type": "function", "function": {
                "name": _tool_name(part),
                "arguments": orjson.dumps(part.get("input", {})).decode()}})
            if state == "output-available":
                output = part.get("output")
                content = output if isinstance(output, str) else orjson.dumps(output).decode()
            else:
                content = f"Error: {part.get('errorText', 'the tool failed')}"
            results.append({"role": "tool", "tool_call_id": call_id, "content": content})
        # reasoning, sources, files, data-* parts: not sent back to the provider
    flush()
    return out


def to_chat_messages(messages: list[UIMessage]) -> list[JSONObject]:
    """OpenAI-format chat messages for ``messages``; raises ``ValueError`` on a part that
    cannot be converted (the relay answers it with an ``error`` response frame)."""
    out: list[JSONObject] = []
    for message in messages:
        if message.role == "system":
            out.append({"role": "system", "content": _text_of(message.parts)})
        elif message.role == "user":
            out.append(_user_message(message.parts))
        else:
            out.extend(_assistant_messages(message.parts))
    if not out:
        raise ValueError("the messages hold nothing to send to a model")
    return out


# ---------------------------------------------------------------- server frames

def start_frame(request_id: str) -> Frame:
    """A resume found an active or retained response; its replay follows."""
    return {"type": "start", "requestId": request_id}


def end_frame(request_id: str) -> Frame:
    return {"type": "end", "requestId": request_id}


def error_frame(request_id: str, error_text: str) -> Frame:
    return {"type": "error", "requestId": request_id, "errorText": error_text}


def no_active_frame(request_id: str) -> Frame:
    return {"type": "no-active", "requestId": request_id}


#: v1 error codes -> the text an end user sees. Never the provider's own words.
SAFE_ERROR_TEXTS: dict[str, str] = {
    "bad_request": "The relay could not accept this request.",
    "unknown_model": "This model is not available on the relay.",
    "duplicate_id": "A response with this request id is already running.",
    "too_many_streams": "Too many answers are running at once. Wait for one to finish.",
    "unknown_stream": "This response is not running.",
    "stream_lost": "This response can no longer be replayed.",
    "store_unavailable": "The response cannot be resumed right now. Try again shortly.",
    "stream_taken_over": "This response is now being shown in another window.",
    "upstream_error": "The model provider returned an error. Please try again.",
    "upstream_timeout": "The model provider did not answer in time. Please try again.",
    "upstream_rate_limited": "The model provider is busy. Please wait a moment and retry.",
    "upstream_overloaded": "The model provider is overloaded. Please wait a moment and retry.",
    "rate_limited": "Too many requests. Please wait a moment and try again.",
    "draining": "The relay is restarting. Please try again in a moment.",
    "first_token_timeout": "The model did not start answering in time.",
    "idle_timeout": "The model stopped answering partway through.",
    "total_timeout": "The answer took too long and was stopped.",
}
_GENERIC_ERROR = "Something went wrong while generating the answer."

_FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "tool-calls",
                   "content_filter": "content-filter"}


def safe_error_text(code: str | None) -> str:
    return SAFE_ERROR_TEXTS.get(code or "", _GENERIC_ERROR)


#: A merged ``*-delta`` carries at most about this many characters (at most ~200 KiB of
#: JSON even when every character is escaped): far below any client's frame limit.
MAX_MERGED_DELTA_CHARS = 32 * 1024


class ResponseMapper:
    """The server frames of one response (one ``requestId``) for the frames of one v1
    stream, in order. Stateful: feed it every frame of the stream from the first one (a
    replay feeds the whole log again, with a fresh mapper).

    ``sequence`` numbers the chunks this mapper emits 0, 1, 2, ... without gaps (the
    transport requires exactly the next one). Two numberings exist, so a mapper is one of:

    * not merging (the default; a live response): one chunk per mapped event, so the
      numbering depends only on the stream. ``last_sequence`` (from a ``resume``)
      suppresses the chunks through it, which a client that had those chunks of this
      numbering already has;
    * merging (``merge=True``; a full replay, which is what the transport's ``resume``
      asks for): consecutive text/reasoning deltas fed together become one chunk, so its
      numbering is its own. ``last_sequence`` cannot be combined with it.

    ``frames(v1_frame)`` returns the response frames for one v1 frame; ``feed(frames,
    more=...)`` for several. A merging mapper may hold the open block's latest text back
    to join it with what comes next: ``feed`` keeps it only while ``more`` says more frames
    follow at once, and ``flush()`` emits it. After the terminal frame (``end`` or
    ``error``) nothing more is returned (``done``)."""

    def __init__(self, request_id: str, message_id: str, *,
                 last_sequence: int | None = None, merge: bool = False) -> None:
        if merge and last_sequence is not None:
            raise ValueError("a merging mapper numbers its own chunks: no last_sequence")
        self.request_id = request_id
        self.message_id = message_id
        self.done = False
        self._skip_through = -1 if last_sequence is None else last_sequence
        self._sequence = 0
        self._started = False
        self._open: tuple[str, str] | None = None      # ("text" | "reasoning", part id)
        self._parts = 0
        self._tools: dict[int, tuple[str, str]] = {}    # index -> (toolCallId, toolName)
        self._merge = merge
        self._held: list[str] = []      # text of the open block not emitted yet (merging)
        self._held_chars = 0

    # -- helpers

    def _chunk(self, out: list[Frame], chunk: Frame) -> None:
        sequence = self._sequence
        self._sequence += 1
        if sequence > self._skip_through:
            out.append({"type": "chunk", "requestId": self.request_id,
                        "sequence": sequence, "chunk": chunk})

    def _emit_held(self, out: list[Frame]) -> None:
        if self._held:
            assert self._open is not None
            kind, part_id = self._open
            text = self._held[0] if len(self._held) == 1 else "".join(self._held)
            self._held.clear()
            self._held_chars = 0
            self._chunk(out, {"type": f"{kind}-delta", "id": part_id, "delta": text})

    def _close_open(self, out: list[Frame]) -> None:
        if self._open is not None:
            self._emit_held(out)
            kind, part_id = self._open
            self._chunk(out, {"type": f"{kind}-end", "id": part_id})
            self._open = None

    def _delta(self, out: list[Frame], kind: str, text: str) -> None:
        if self._open is None or self._open[0] != kind:
            self._close_open(out)
            self._parts += 1
            self._open = (kind, f"{kind[0]}{self._parts}")
            self._chunk(out, {"type": f"{kind}-start", "id": self._open[1]})
        if not self._merge:
            self._chunk(out, {"type": f"{kind}-delta", "id": self._open[1], "delta": text})
            return
        if self._held and self._held_chars + len(text) > MAX_MERGED_DELTA_CHARS:
            self._emit_held(out)
        self._held.append(text)
        self._held_chars += len(text)

    def flush(self) -> list[Frame]:
        """The held text of the open block, as one chunk (nothing when none is held)."""
        out: list[Frame] = []
        self._emit_held(out)
        return out

    def feed(self, v1_frames: Iterable[Frame], *,
             more: bool = False) -> list[Frame]:
        """The response frames for consecutive v1 frames of the stream. ``more``: further
        frames follow at once (a replay, or a reader that lags), so a merging mapper may
        keep the open block's text to join with them; otherwise it is emitted."""
        out: list[Frame] = []
        held = self._held
        for frame in v1_frames:
            # The bulk of a replay: more text for the open block of a merging mapper, held
            # with no chunk built (``frames`` does the same, at several times the cost).
            kind = frame.get("type")
            part = self._open
            if (self._merge and part is not None and (kind == "token" and part[0] == "text"
                                                      or kind == "reasoning"
                                                      and part[0] == "reasoning")):
                text = frame["text"]
                if held and self._held_chars + len(text) > MAX_MERGED_DELTA_CHARS:
                    self._emit_held(out)
                held.append(text)
                self._held_chars += len(text)
                continue
            out.extend(self.frames(frame))
        if not more:
            self._emit_held(out)
        return out

    def begin(self) -> list[Frame]:
        """The opening chunks (``start``, ``start-step``); also emitted by the first
        ``frames`` call when not called explicitly."""
        out: list[Frame] = []
        if not self._started:
            self._started = True
            self._chunk(out, {"type": "start", "messageId": self.message_id})
            self._chunk(out, {"type": "start-step"})
        return out

    def frames(self, frame: Frame) -> list[Frame]:
        """The response frames for one v1 frame (a merging mapper may hold its text back:
        see ``feed`` and ``flush``)."""
        if self.done:
            return []
        out = self.begin()
        kind = frame.get("type")
        if kind == "token" or kind == "refusal":
            # A refusal is text to the AI SDK (its UI message stream has no refusal part);
            # the finish says content-filter.
            if frame["text"]:
                self._delta(out, "text", frame["text"])
        elif kind == "reasoning":
            if frame["text"]:
                self._delta(out, "reasoning", frame["text"])
        elif kind == "tool_call_chunk":
            self._tool_start(out, frame["index"], frame["call_id"], frame.get("name"))
            if frame["arguments_delta"]:
                call_id = self._tools[frame["index"]][0]
                self._chunk(out, {"type": "tool-input-delta", "toolCallId": call_id,
                                  "inputTextDelta": frame["arguments_delta"]})
        elif kind == "tool_call_complete":
            self._tool_done(out, frame)
        elif kind == "finish":
            self._finish(out, frame)
        return out

    def _tool_start(self, out: list[Frame], index: int, call_id: str,
                    name: str | None) -> None:
        if index in self._tools:
            return
        self._close_open(out)
        # The first chunk's call_id is the one the client keys the part by; later frames
        # of the call (the relay may learn a better id) keep using it.
        self._tools[index] = (call_id, name or "")
        self._chunk(out, {"type": "tool-input-start", "toolCallId": call_id,
                          "toolName": name or ""})

    def _tool_done(self, out: list[Frame], frame: Frame) -> None:
        self._tool_start(out, frame["index"], frame["call_id"], frame["name"])
        call_id = self._tools[frame["index"]][0]
        arguments = frame["arguments"]
        try:
            parsed = orjson.loads(arguments or "{}")
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            self._chunk(out, {"type": "tool-input-available", "toolCallId": call_id,
                              "toolName": frame["name"], "input": parsed})
        else:
            self._chunk(out, {"type": "tool-input-error", "toolCallId": call_id,
                              "toolName": frame["name"], "input": arguments,
                              "errorText": "the model's tool arguments are not a JSON object"})

    def _finish(self, out: list[Frame], frame: Frame) -> None:
        self.done = True
        self._close_open(out)
        status = frame.get("status")
        if status == "completed":
            usage = frame.get("usage") or {}
            self._chunk(out, {"type": "finish-step"})
            self._chunk(out, {
                "type": "finish",
                "finishReason": _FINISH_REASONS.get(frame.get("reason") or "", "other"),
                "messageMetadata": {"usage": {
                    "inputTokens": usage.get("prompt_tokens", 0),
                    "outputTokens": usage.get("completion_tokens", 0),
                    "totalTokens": usage.get("total_tokens", 0),
                    "estimated": bool(usage.get("estimated", False))}}})
            out.append(end_frame(self.request_id))
        elif status == "cancelled":
            self._chunk(out, {"type": "abort", "reason": frame.get("reason") or "cancelled"})
            out.append(end_frame(self.request_id))
        else:
            error = frame.get("error") or {}
            code = error.get("code") if status == "failed" else frame.get("reason")
            out.append(error_frame(self.request_id, safe_error_text(code)))


# ---------------------------------------------------------------- the dialect


def message_id(stream_key: str) -> str:
    """The ``messageId`` of the response streamed by ``stream_key``: stable for the stream
    (a replay repeats it) but revealing nothing of its resume key."""
    return "msg_" + hashlib.sha256(stream_key.encode()).hexdigest()[:24]


def _authorization(headers: dict[str, str]) -> str | None:
    """A request's ``Authorization`` value (the transport's ``headers`` option; any case)."""
    return next((v for k, v in headers.items() if k.lower() == "authorization"), None)


#: v1 errors whose own message is not for an end user: a takeover (the chat was resumed
#: elsewhere) and a relay bug end the request with a plain-language text instead.
_SAFE_TEXT_CODES = frozenset({"stream_taken_over", "internal_error"})


class AiSdkCodec:
    """The AI SDK's chat transport as a dialect of the relay (``llm_relay_protocol.dialect.Codec``).

    * ``send`` -> ``Begin`` (its ``requestId`` is the stream's id on the connection; the v1
      ``start`` it becomes passes the same decode limits as one sent on /ws, with the first
      alias when ``body.model`` names none); a ``send`` whose messages cannot be converted
      is a ``Begin`` with ``invalid`` set (answered after its credentials are checked);
    * ``abort`` -> ``Stop`` (an unknown or finished request: nothing to stop, no answer);
    * ``resume`` -> ``Reattach`` with the chat id (the runtime adapter finds the chat's
      latest stream); its answer ``resumed`` becomes ``start``, a refusal ``unknown_stream``
      becomes ``no-active``;
    * a frame that cannot be decoded -> ``Malformed``, answerable only when it names a usable
      ``requestId`` (otherwise the connection closes 1008, as the AI SDK's own server
      example does);
    * a v1 ``error`` naming a request -> its ``error`` response frame (the relay's own
      refusals explain themselves; a takeover and a relay bug get a safe text); ``started``,
      ``pong`` and errors naming no request have no frame here;
    * stream frames -> a ``ResponseMapper`` per attached request (merging, for a full
      replay, unless the resume asks for the live numbering with ``lastSequence``).
    """

    name = "ai-sdk"
    log_prefix = "ai-sdk "
    handshake = Handshake.NONE
    subprotocol: str | None = None
    per_request_credentials = True

    def decode(self, raw: str | bytes, limits: DecodeLimits, default_model: str) -> Request:
        try:
            request = decode_request(raw, limits)
        except AiSdkFrameError as exc:
            return Malformed(FrameError(exc.message, id=exc.request_id),
                             answerable=exc.request_id is not None)
        rid = request.requestId
        if isinstance(request, AbortRequest):
            return Stop(rid, ref="abort", strict=False)
        authorization = _authorization(request.headers)
        if isinstance(request, ResumeRequest):
            return Reattach(rid, ref="resume", authorization=authorization, context=request)
        body = request.body
        try:
            messages = to_chat_messages(request.messages)
            # The v1 start it becomes passes the same checks as one sent on /ws: its size
            # and counts before validation (DecodeLimits), then the models.
            start = validate_start(frames.start(
                rid, body.get("model") or default_model, messages,
                tools=body.get("tools"),
                tool_choice=body.get("toolChoice", body.get("tool_choice")),
                params=body.get("params") or None), limits)
        except FrameError as exc:
            return Begin(rid, None, ref="send", authorization=authorization,
                         invalid=f"Invalid request: {exc.message}", context=request)
        except ValueError as exc:
            return Begin(rid, None, ref="send", authorization=authorization,
                         invalid=f"Invalid messages: {exc}", context=request)
        return Begin(rid, start, ref="send", authorization=authorization, context=request)

    def encode_reply(self, frame: Frame) -> Frame | None:
        kind = frame.get("type")
        id = frame.get("id")
        if kind == "resumed":
            return start_frame(frame["id"])
        if kind == "error" and id is not None:
            code = frame["code"]
            if code == "unknown_stream" and frame.get("ref") == "resume":
                return no_active_frame(id)
            text = safe_error_text(code) if code in _SAFE_TEXT_CODES else frame["message"]
            return error_frame(id, text)
        return None

    def response_encoder(self, id: str, stream_key: str,
                         request: Begin | Reattach) -> ResponseMapper:
        resume = request.context if isinstance(request, Reattach) else None
        if isinstance(resume, ResumeRequest):
            return ResponseMapper(id, message_id(stream_key),
                                  last_sequence=resume.lastSequence,
                                  merge=resume.lastSequence is None)
        return ResponseMapper(id, message_id(stream_key))
