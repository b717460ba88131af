"""The OpenAI Responses API's WebSocket mode (``/v1/responses``), sans I/O.

The relay speaks this third dialect so the official SDKs plug in with nothing but a base URL
(``AsyncOpenAI(base_url="http://HOST:PORT/v1").responses.connect()``). This module owns what
the dialect means and nothing that does I/O (the mapping and the choices are written out in
``RESPONSES.md`` beside it):

* ``decode_event``: one client event (``response.create``, or the relay's ``response.cancel``
  extension), parsed within the v1 decode limits and validated into frozen models; every
  refusal is a ``ResponsesError`` carrying OpenAI's error ``type``, ``code`` and ``param``;
* ``to_turn``: a ``response.create`` plus the stored conversation it continues -> a ``Turn``:
  the OpenAI-format chat messages, tools, ``tool_choice`` and ``params`` of the v1 ``start``
  it becomes (``Start`` validates them again), and the conversation to store for it;
* ``ResponseEncoder``: the frames of one v1 stream (``token``, ``reasoning``, ``refusal``,
  ``tool_call_chunk``, ``tool_call_complete``, ``finish``) -> the Responses server events of
  one response, numbered by ``sequence_number`` from 0, ids stable for the response, each
  valid for the SDK's own ``ResponsesServerEvent`` models (a test checks every one);
* ``error_event``: a refusal as the dialect's ``error`` event;
* ``ResponsesCodec``: all of it as a dialect of the relay's one connection core
  (``llm_relay_protocol.dialect.Codec``), served at ``/v1/responses`` (relay.runtime.routes).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt,
                      StrictStr, ValidationError)

from . import frames
from .codec import (DecodeLimits, FrameError, check_request_shape, parse_json_within,
                    validate_start)
from .dialect import Begin, Handshake, Malformed, Reattach, Request, Stop
from .frames import Frame
from .messages import StreamId

__all__ = [
    "CANCEL_EVENT",
    "CREATE_EVENT",
    "CancelRequest",
    "CreateContext",
    "CreateRequest",
    "ResponsesCodec",
    "ResponseEncoder",
    "ResponsesError",
    "Turn",
    "decode_event",
    "error_event",
    "new_response_id",
    "to_turn",
]

#: A JSON object of a request as the client sent it (an input item, a content part, a tool,
#: ``text.format``) or built from one for the provider (a chat message, its parts, the
#: sampling parameters): its values' types depend on its keys, read one by one where
#: used, hence ``Any`` (also for the parsed values the helpers below read). Events built
#: here are ``llm_relay_protocol.frames.Frame``s.
JSONObject: TypeAlias = dict[str, Any]

CREATE_EVENT = "response.create"
#: The relay's extension (as in OpenAI's Realtime API): stop one running response.
CANCEL_EVENT = "response.cancel"


class ResponsesError(ValueError):
    """A client event the relay refuses, as OpenAI's ``error`` event describes it:
    ``type`` (``invalid_request_error``, ...), ``code``, ``param`` (the offending field's
    path, OpenAI's spelling: ``input[2].call_id``), an HTTP-like ``status``. ``stream_id``
    names the lane when the refused event named one."""

    def __init__(self, message: str, *, code: str | None = "invalid_value",
                 param: str | None = None, type: str = "invalid_request_error",
                 status: int = 400, stream_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.type = type
        self.status = status
        self.stream_id = stream_id

    def event(self) -> Frame:
        return error_event(self.message, code=self.code, param=self.param, type=self.type,
                           status=self.status, stream_id=self.stream_id)

    def frame_error(self) -> FrameError:
        """This refusal as the core's ``FrameError`` (its v1 ``error`` reply carries the
        code, the ``param`` as ``ref`` and the lane as ``id``: ``ResponsesCodec.encode_reply``
        turns it back into this error event)."""
        return FrameError(self.message, code=self.code or "invalid_value", ref=self.param,
                          id=lane_tag(self.stream_id))


#: Prefix of the ``id`` of a v1 ``error`` reply that names a lane rather than a response.
_LANE = "lane:"


def lane_tag(stream_id: str | None) -> str | None:
    return None if stream_id is None else _LANE + stream_id


#: The ``ref`` of a create on a lane (``Begin.ref``): the core's refusals of it (admission:
#: stream caps, start rate, draining) carry it back, so their ``error`` event names the lane.
_LANE_REF = "response.create (lane "


def create_ref(stream_id: str | None) -> str:
    return "response.create" if stream_id is None else f"{_LANE_REF}{stream_id})"


def error_event(message: str, *, code: str | None, param: str | None = None,
                type: str = "invalid_request_error", status: int | None = 400,
                stream_id: str | None = None) -> Frame:
    """The dialect's ``error`` event (``ResponseWsError``): not part of a response, so no
    ``sequence_number``; ``stream_id`` when the event it answers named a lane."""
    event: Frame = {"type": "error",
                             "error": {"type": type, "code": code, "message": message,
                                       "param": param}}
    if status is not None:
        event["status"] = status
    if stream_id is not None:
        event["stream_id"] = stream_id
    return event


# ---------------------------------------------------------------- client events


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class ReasoningOptions(_Event):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None


class TextOptions(_Event):
    format: JSONObject | None = None


Metadata = Annotated[dict[Annotated[str, Field(max_length=64)],
                          Annotated[StrictStr, Field(max_length=512)]],
                     Field(max_length=16)]


class CreateRequest(_Event):
    """``response.create``: the body of ``POST /v1/responses`` plus ``stream_id``. Fields the
    relay does not use (``store``, ``include``, ``truncation``, ``user``, ...) are ignored as
    OpenAI ignores unknown ones. ``input`` items stay plain objects here: ``to_turn`` reads
    them one by one, naming the offending one (``input[3].call_id``)."""

    type: Literal["response.create"]
    model: Annotated[StrictStr, Field(min_length=1, max_length=256)] | None = None
    input: StrictStr | list[Any] | None = None
    instructions: StrictStr | None = None
    previous_response_id: Annotated[StrictStr, Field(min_length=1, max_length=256)] | None = None
    tools: list[Any] | None = None
    tool_choice: StrictStr | JSONObject | None = None
    max_output_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[StrictFloat, Field(ge=0, le=2)] | None = None
    top_p: Annotated[StrictFloat, Field(ge=0, le=1)] | None = None
    reasoning: ReasoningOptions | None = None
    parallel_tool_calls: StrictBool | None = None
    metadata: Metadata | None = None
    text: TextOptions | None = None
    #: False: record the input as a chain entry (a new response id) without calling a model.
    generate: StrictBool = True
    stream_id: StreamId | None = None
    stream: StrictBool | None = None
    background: StrictBool | None = None
    #: False: the conversation stays in this relay's memory for this connection only
    #: (never written to Redis), as OpenAI keeps a ``store=false`` chain on its socket.
    store: StrictBool | None = None


class CancelRequest(_Event):
    """``response.cancel`` {response_id}: the relay's extension; the response ends
    ``response.incomplete`` (status ``cancelled``) with the usage so far."""

    type: Literal["response.cancel"]
    response_id: Annotated[StrictStr, Field(min_length=1, max_length=256)]


def _param_of(loc: Iterable[int | str]) -> str:
    """A pydantic error location in OpenAI's spelling: ``input[2].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def decode_event(data: str | bytes, limits: DecodeLimits | None = None
                 ) -> CreateRequest | CancelRequest:
    """Parse and validate one client event; raises ``ResponsesError``.

    The v1 frame limits apply, each before the work it bounds: the count of ``[``/``{`` and
    the nesting depth while parsing; the counts of input items and tools before validation
    (``max_messages``, ``max_tools``); the size and key counts of the chat request the
    event becomes are checked by ``to_turn`` (``check_request_shape``)."""
    limits = limits or DecodeLimits()
    if not isinstance(data, str):
        raise ResponsesError("binary frames are not accepted; send JSON text events",
                             code="invalid_json")
    try:
        obj = parse_json_within(data, limits)
    except FrameError as exc:
        raise ResponsesError(exc.message, code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ResponsesError("an event must be a JSON object", code="invalid_json")
    stream_id = obj.get("stream_id")
    lane = stream_id if isinstance(stream_id, str) and 0 < len(stream_id) <= 128 else None
    kind = obj.get("type")
    if kind == CANCEL_EVENT:
        model: type[_Event] = CancelRequest
    elif kind == CREATE_EVENT:
        model = CreateRequest
        for name, cap, limit in (("input", limits.max_messages, "max_messages"),
                                 ("tools", limits.max_tools, "max_tools")):
            value = obj.get(name)
            if type(value) is list and len(value) > cap:
                raise ResponsesError(f"{len(value)} {name}; the relay accepts at most {cap} "
                                     f"({limit})", param=name, stream_id=lane)
        if obj.get("background") is True:
            raise ResponsesError("background is not supported in WebSocket mode",
                                 code="unsupported_parameter", param="background",
                                 stream_id=lane)
    elif kind == "response.steer":
        raise ResponsesError("response.steer is not supported by this relay; send a "
                             "response.create with previous_response_id instead",
                             code="unsupported_event", param="type", stream_id=lane)
    else:
        raise ResponsesError(f"unknown event type {str(kind)[:64]!r}; the relay accepts "
                             f"{CREATE_EVENT} and {CANCEL_EVENT}", code="unknown_event",
                             param="type", stream_id=lane)
    try:
        return model.model_validate(obj)  # type: ignore[return-value]
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = _param_of(err["loc"]) or None
        raise ResponsesError(f"invalid {param or 'event'}: {err['msg']}", param=param,
                             stream_id=lane) from None


# ---------------------------------------------------------------- create -> chat request


class Turn(BaseModel):
    """What one ``response.create`` becomes. ``messages`` / ``tools`` / ``tool_choice`` /
    ``params``: the v1 ``start`` (instructions first, then the continued conversation, then
    the new input). ``history``: the conversation this response continues from plus its new
    input, without instructions (OpenAI does not carry ``instructions`` over a
    ``previous_response_id``); the response's output is appended to it when stored."""

    model_config = ConfigDict(frozen=True)

    model: str
    messages: list[JSONObject]
    history: list[JSONObject]
    tools: list[JSONObject] | None
    tool_choice: str | JSONObject | None
    params: JSONObject
    #: The Responses-format echo of the request (tools, tool_choice, ...) for the response
    #: object of ``response.created`` and the events after it.
    echo: JSONObject


def _refuse(message: str, param: str, code: str = "invalid_value") -> ResponsesError:
    return ResponsesError(message, code=code, param=param)


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise _refuse(f"{param} must be a string", param)
    return value


def _content_part(part: Any, param: str) -> JSONObject:
    """One input content part -> an OpenAI chat content part."""
    if not isinstance(part, dict):
        raise _refuse(f"{param} must be an object", param)
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": _text(part.get("text"), f"{param}.text")}
    if kind == "refusal":
        return {"type": "text", "text": _text(part.get("refusal"), f"{param}.refusal")}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            raise _refuse("input_image needs image_url (a URL or a data: URL); file_id is "
                          "not supported by this relay", f"{param}.image_url")
        image: JSONObject = {"url": url}
        if part.get("detail") in ("low", "high", "auto"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        file: JSONObject = {}
        if isinstance(part.get("file_data"), str):
            file["file_data"] = part["file_data"]
        elif isinstance(part.get("file_id"), str):
            file["file_id"] = part["file_id"]
        elif isinstance(part.get("file_url"), str):
            file["file_data"] = part["file_url"]
        else:
            raise _refuse("input_file needs file_data, file_id or file_url", param)
        if isinstance(part.get("filename"), str):
            file["filename"] = part["filename"]
        return {"type": "file", "file": file}
    raise _refuse(f"unsupported content part type {str(kind)[:64]!r}", f"{param}.type")


def _message_content(content: Any, param: str) -> str | list[JSONObject]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _refuse(f"{param} must be a string or a list of content parts", param)
    parts = [_content_part(p, f"{param}[{i}]") for i, p in enumerate(content)]
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _output_text(output: Any, param: str) -> str | list[JSONObject]:
    """A ``function_call_output``'s ``output``: a string, or content parts."""
    if isinstance(output, str):
        return output
    return _message_content(output, param)


def input_messages(items: str | list[Any] | None) -> list[JSONObject]:
    """Responses input -> OpenAI chat messages. Consecutive ``function_call`` items join
    the assistant message before them (one assistant turn with its text and calls), each
    ``function_call_output`` becomes a ``tool`` message tied to its call; ``reasoning`` items
    are accepted and not sent on (providers take back only their own signed reasoning)."""
    if items is None:
        return []
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[JSONObject] = []
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise _refuse(f"{param} must be an object", param)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _refuse(f"{param}.role must be user, system, developer or assistant",
                              f"{param}.role")
            content = _message_content(item.get("content"), f"{param}.content")
            if role == "assistant":
                if not isinstance(content, str):
                    raise _refuse("assistant content must be text", f"{param}.content")
                last = out[-1] if out else None
                if last is not None and last["role"] == "assistant" \
                        and "tool_calls" not in last and isinstance(last["content"], str):
                    last["content"] += content          # several output_text messages
                    continue
            out.append({"role": role, "content": content})
        elif kind == "function_call":
            call_id = _text(item.get("call_id"), f"{param}.call_id")
            call = {"id": call_id, "type": "function", "function": {
                "name": _text(item.get("name"), f"{param}.name"),
                "arguments": _text(item.get("arguments", ""), f"{param}.arguments")}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool",
                        "tool_call_id": _text(item.get("call_id"), f"{param}.call_id"),
                        "content": _output_text(item.get("output"), f"{param}.output")})
        elif kind == "reasoning":
            continue
        else:
            raise _refuse(f"unsupported input item type {str(kind)[:64]!r} (the relay takes "
                          "message, function_call, function_call_output and reasoning items)",
                          f"{param}.type", code="unsupported_input_item")
    return out


def _tools(tools: list[Any] | None) -> tuple[list[JSONObject] | None, list[Any]]:
    """Responses function tools -> chat tools; any other tool type is ``unsupported_tool``."""
    if not tools:
        return None, []
    out: list[JSONObject] = []
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _refuse(f"{param} must be an object", param)
        if tool.get("type") != "function":
            raise ResponsesError(
                f"tool type {str(tool.get('type'))[:64]!r} is not supported by this relay; "
                "only function tools are (the client runs them)", code="unsupported_tool",
                param=f"{param}.type")
        name = tool.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= 256:
            raise _refuse("a function tool needs a name (1-256 characters)", f"{param}.name")
        function: JSONObject = {"name": name}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        parameters = tool.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise _refuse("parameters must be a JSON Schema object", f"{param}.parameters")
        function["parameters"] = parameters or {"type": "object", "properties": {}}
        if isinstance(tool.get("strict"), bool):
            function["strict"] = tool["strict"]
        out.append({"type": "function", "function": function})
    return out, list(tools)


def _tool_choice(choice: str | JSONObject | None) -> str | JSONObject | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise _refuse("tool_choice must be auto, none, required or a function",
                          "tool_choice")
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise ResponsesError("only auto, none, required and {type: function, name} are supported "
                         "as tool_choice", code="unsupported_tool", param="tool_choice")


def _response_format(text: TextOptions | None) -> JSONObject | None:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        name = fmt.get("name")
        if not isinstance(schema, dict) or not isinstance(name, str):
            raise _refuse("text.format json_schema needs name and schema", "text.format")
        json_schema: JSONObject = {"name": name, "schema": schema}
        if isinstance(fmt.get("strict"), bool):
            json_schema["strict"] = fmt["strict"]
        if isinstance(fmt.get("description"), str):
            json_schema["description"] = fmt["description"]
        return {"type": "json_schema", "json_schema": json_schema}
    raise _refuse("text.format type must be text, json_object or json_schema",
                  "text.format.type")


def to_turn(request: CreateRequest, *, previous: list[JSONObject] | None,
            previous_model: str | None = None, limits: DecodeLimits | None = None) -> Turn:
    """The v1 request of ``request`` continuing the stored conversation ``previous`` (None:
    no ``previous_response_id``). Raises ``ResponsesError`` naming the offending ``param``;
    the chat request's size and key counts are held to the v1 ``start`` limits."""
    limits = limits or DecodeLimits()
    model = request.model or previous_model
    if model is None:
        raise ResponsesError("model is required", code="missing_required_parameter",
                             param="model")
    history = [*(previous or []), *input_messages(request.input)]
    messages = list(history)
    if request.instructions:
        messages.insert(0, {"role": "system", "content": request.instructions})
    tools, tools_echo = _tools(request.tools)
    tool_choice = _tool_choice(request.tool_choice)
    params: JSONObject = {}
    if request.max_output_tokens is not None:
        params["max_tokens"] = request.max_output_tokens
    if request.temperature is not None:
        params["temperature"] = request.temperature
    if request.top_p is not None:
        params["top_p"] = request.top_p
    if request.reasoning is not None and request.reasoning.effort is not None:
        params["reasoning_effort"] = request.reasoning.effort
    if request.parallel_tool_calls is not None and tools:
        params["parallel_tool_calls"] = request.parallel_tool_calls
    response_format = _response_format(request.text)
    if response_format is not None:
        params["response_format"] = response_format
    if request.generate and not messages:
        raise ResponsesError("input is required (there is nothing to answer)",
                             code="missing_required_parameter", param="input")

    def refuse(message: str) -> ResponsesError:
        return ResponsesError(f"request too large: {message}", param="input")

    check_request_shape(messages, tools, limits, parts_key="content",
                        options=[tool_choice, response_format], refuse=refuse)
    echo = {
        "model": model,
        "instructions": request.instructions,
        "tools": tools_echo,
        "tool_choice": request.tool_choice if request.tool_choice is not None else "auto",
        "parallel_tool_calls": (request.parallel_tool_calls
                                if request.parallel_tool_calls is not None else True),
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_output_tokens": request.max_output_tokens,
        "metadata": request.metadata or {},
        "previous_response_id": request.previous_response_id,
        "reasoning": ({"effort": request.reasoning.effort}
                      if request.reasoning is not None else None),
        "text": {"format": request.text.format if request.text is not None
                 and request.text.format is not None else {"type": "text"}},
    }
    return Turn(model=model, messages=messages, history=history, tools=tools,
                tool_choice=tool_choice, params=params, echo=echo)


def new_response_id() -> str:
    """A fresh response id (``resp_`` + 192 random bits): unguessable, since it names a
    stored conversation another connection of the principal may continue."""
    return "resp_" + secrets.token_hex(24)


# ---------------------------------------------------------------- stream -> events

#: v1 failure codes -> OpenAI's ``response.failed`` error codes (``ResponseError.code``),
#: with a safe message: never a provider's own words.
_FAILURES: dict[str, tuple[str, str]] = {
    "upstream_rate_limited": ("rate_limit_exceeded",
                              "The model provider is rate limiting requests; retry later."),
    "rate_limited": ("rate_limit_exceeded", "Too many requests; retry later."),
    "upstream_overloaded": ("server_error", "The model provider is overloaded; retry later."),
    "upstream_timeout": ("server_error", "The model provider did not answer in time."),
    "upstream_error": ("server_error", "The model provider returned an error."),
    "first_token_timeout": ("server_error", "The model did not start answering in time."),
    "idle_timeout": ("server_error", "The model stopped answering partway through."),
    "total_timeout": ("server_error", "The answer took too long and was stopped."),
    "bad_request": ("invalid_prompt", "The model provider refused the request."),
    "stream_lost": ("server_error", "The response was lost."),
    "draining": ("server_error", "The relay is restarting; retry in a moment."),
}
_GENERIC_FAILURE = ("server_error", "The response failed.")


def _usage(usage: JSONObject) -> JSONObject:
    prompt = int(usage.get("prompt_tokens", 0))
    completion = int(usage.get("completion_tokens", 0))
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": int(usage.get("cached_tokens", 0)),
                                 "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": int(usage.get("reasoning_tokens", 0))},
        "total_tokens": int(usage.get("total_tokens", prompt + completion)),
    }


class _Item:
    """One output item being built: a message (text and refusal parts), a reasoning item,
    or a function call."""

    __slots__ = ("kind", "id", "output_index", "parts", "call_id", "name", "arguments",
                 "done")

    def __init__(self, kind: str, id: str, output_index: int) -> None:
        self.kind = kind
        self.id = id
        self.output_index = output_index
        self.parts: list[list[str]] = []      # message: [kind, text...]; reasoning: [text]
        self.call_id = ""
        self.name = ""
        self.arguments: list[str] = []
        self.done = False


class ResponseEncoder:
    """The Responses server events of one response, for the frames of one v1 stream.

    ``opening()`` gives ``response.created`` and ``response.in_progress`` (the first
    ``frames(f)`` does, when it was not called); ``frames(f)`` the events for one v1
    frame, in order; after ``finish`` (``done``) nothing more. Every
    event carries ``sequence_number`` (0, 1, 2, ... for this response) and ``stream_id``
    when the create named a lane. Ids: the response's ``resp_...``; each output item's id is
    that id's random part with the item's kind and position (``msg_<r>_0``), so they are
    stable for the response and unique across responses.

    Output items open in the order the model produces them: reasoning (``reasoning``
    item, ``reasoning_text`` part), then text and refusal (one ``message`` item whose
    content parts are ``output_text`` and ``refusal``, a new part when the kind changes),
    then function calls (one ``function_call`` item each); a new kind closes the open item
    (``.done`` events, then ``output_item.done``). ``output_messages()`` is the assistant
    turn in chat form, stored for a later ``previous_response_id``."""

    def __init__(self, response_id: str, echo: Frame, *, created_at: float,
                 stream_id: str | None = None) -> None:
        self.response_id = response_id
        self.echo = echo
        self.created_at = created_at
        self.stream_id = stream_id
        self.done = False
        self.status = "in_progress"
        self._suffix = response_id.removeprefix("resp_")
        self._sequence = 0
        self._items: list[_Item] = []
        self._open: _Item | None = None
        self._calls: dict[int, _Item] = {}     # v1 tool index -> its item
        self._usage: Frame | None = None
        self._incomplete: str | None = None
        self._error: Frame | None = None
        #: Called once, with this encoder, as the terminal event is built (before it is
        #: sent): the runtime stores the response for ``previous_response_id`` then.
        self.on_done: Callable[[ResponseEncoder], None] | None = None
        self._opened = False

    # -- building blocks

    def _event(self, out: list[Frame], kind: str, **fields: Any) -> None:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        if self.stream_id is not None:
            event["stream_id"] = self.stream_id
        self._sequence += 1
        out.append(event)

    def response(self) -> Frame:
        """The response object as it stands (status, output items so far, usage at the end)."""
        echo = self.echo
        return {
            "id": self.response_id, "object": "response", "created_at": self.created_at,
            "status": self.status, "model": echo["model"],
            "output": [self._item_object(item) for item in self._items if item.done],
            "instructions": echo.get("instructions"), "tools": echo.get("tools", []),
            "tool_choice": echo.get("tool_choice", "auto"),
            "parallel_tool_calls": echo.get("parallel_tool_calls", True),
            "temperature": echo.get("temperature"), "top_p": echo.get("top_p"),
            "max_output_tokens": echo.get("max_output_tokens"),
            "metadata": echo.get("metadata") or {},
            "previous_response_id": echo.get("previous_response_id"),
            "reasoning": echo.get("reasoning"), "text": echo.get("text"),
            "usage": self._usage, "error": self._error,
            "incomplete_details": ({"reason": self._incomplete}
                                   if self._incomplete is not None else None),
        }

    def _item_status(self, item: _Item) -> str:
        if not item.done:
            return "in_progress"
        return "incomplete" if self.status in ("incomplete", "cancelled", "failed") \
            else "completed"

    def _item_object(self, item: _Item) -> Frame:
        status = self._item_status(item)
        if item.kind == "message":
            content = [self._part_object(part) for part in item.parts]
            return {"type": "message", "id": item.id, "role": "assistant", "status": status,
                    "content": content}
        if item.kind == "reasoning":
            return {"type": "reasoning", "id": item.id, "summary": [], "status": status,
                    "content": [{"type": "reasoning_text", "text": "".join(p[1:])}
                                for p in item.parts]}
        return {"type": "function_call", "id": item.id, "call_id": item.call_id,
                "name": item.name, "arguments": "".join(item.arguments), "status": status}

    @staticmethod
    def _part_object(part: list[str]) -> Frame:
        text = "".join(part[1:])
        if part[0] == "refusal":
            return {"type": "refusal", "refusal": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _open_item(self, out: list[Frame], kind: str) -> _Item:
        prefix = {"message": "msg", "reasoning": "rs", "function_call": "fc"}[kind]
        item = _Item(kind, f"{prefix}_{self._suffix}_{len(self._items)}", len(self._items))
        self._items.append(item)
        self._event(out, "response.output_item.added", output_index=item.output_index,
                    item=self._item_object(item))
        return item

    def _close_part(self, out: list[Frame], item: _Item) -> None:
        if not item.parts:
            return
        index = len(item.parts) - 1
        part = item.parts[index]
        text = "".join(part[1:])
        where = {"item_id": item.id, "output_index": item.output_index,
                 "content_index": index}
        if part[0] == "text":
            self._event(out, "response.output_text.done", text=text, logprobs=[], **where)
        elif part[0] == "refusal":
            self._event(out, "response.refusal.done", refusal=text, **where)
        else:
            self._event(out, "response.reasoning_text.done", text=text, **where)
        self._event(out, "response.content_part.done", part=self._part_event(part[0], text),
                    **where)

    @staticmethod
    def _part_event(kind: str, text: str) -> Frame:
        if kind == "refusal":
            return {"type": "refusal", "refusal": text}
        if kind == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _close_item(self, out: list[Frame]) -> None:
        item = self._open
        if item is None:
            return
        self._open = None
        if item.kind == "function_call":
            return            # closed by its tool_call_complete (or at the finish)
        self._close_part(out, item)
        item.done = True
        self._event(out, "response.output_item.done", output_index=item.output_index,
                    item=self._item_object(item))

    def _text(self, out: list[Frame], item_kind: str, part_kind: str,
              text: str) -> None:
        item = self._open
        if item is None or item.kind != item_kind:
            self._close_item(out)
            item = self._open = self._open_item(out, item_kind)
        if not item.parts or item.parts[-1][0] != part_kind:
            self._close_part(out, item)
            item.parts.append([part_kind])
            self._event(out, "response.content_part.added", item_id=item.id,
                        output_index=item.output_index, content_index=len(item.parts) - 1,
                        part=self._part_event(part_kind, ""))
        item.parts[-1].append(text)
        where = {"item_id": item.id, "output_index": item.output_index,
                 "content_index": len(item.parts) - 1, "delta": text}
        if part_kind == "text":
            self._event(out, "response.output_text.delta", logprobs=[], **where)
        elif part_kind == "refusal":
            self._event(out, "response.refusal.delta", **where)
        else:
            self._event(out, "response.reasoning_text.delta", **where)

    def _call(self, out: list[Frame], index: int, call_id: str,
              name: str | None) -> _Item:
        item = self._calls.get(index)
        if item is None:
            # The first chunk's call_id is the one the client keys the call by.
            self._close_item(out)
            item = _Item("function_call", f"fc_{self._suffix}_{len(self._items)}",
                         len(self._items))
            item.call_id = call_id
            item.name = name or ""
            self._items.append(item)
            self._calls[index] = item
            self._open = item
            self._event(out, "response.output_item.added", output_index=item.output_index,
                        item=self._item_object(item))
        elif name and not item.name:
            item.name = name
        return item

    def _call_done(self, out: list[Frame], item: _Item,
                   arguments: str | None = None) -> None:
        if item.done:
            return
        if arguments is not None:
            item.arguments = [arguments]
        item.done = True
        if self._open is item:
            self._open = None
        where = {"item_id": item.id, "output_index": item.output_index}
        self._event(out, "response.function_call_arguments.done",
                    arguments="".join(item.arguments), name=item.name, **where)
        self._event(out, "response.output_item.done", output_index=item.output_index,
                    item=self._item_object(item))

    # -- public

    def opening(self) -> list[Frame]:
        """``response.created`` and ``response.in_progress``; also emitted by the first
        ``frames`` call when not called explicitly (nothing the second time)."""
        out: list[Frame] = []
        if self._opened:
            return out
        self._opened = True
        self._event(out, "response.created", response=self.response())
        self._event(out, "response.in_progress", response=self.response())
        return out

    def feed(self, v1_frames: Iterable[Frame], *,
             more: bool = False) -> list[Frame]:
        """The events for consecutive v1 frames (``more`` is accepted for the core's
        ``ResponseEncoder`` protocol; nothing is held back)."""
        out: list[Frame] = []
        for frame in v1_frames:
            out.extend(self.frames(frame))
        return out

    def frames(self, frame: Frame) -> list[Frame]:
        """The events for one v1 stream frame (``started`` and unknown types: none)."""
        if self.done:
            return []
        out = self.opening()
        kind = frame.get("type")
        if kind == "token":
            if frame["text"]:
                self._text(out, "message", "text", frame["text"])
        elif kind == "refusal":
            if frame["text"]:
                self._text(out, "message", "refusal", frame["text"])
        elif kind == "reasoning":
            if frame["text"]:
                self._text(out, "reasoning", "reasoning", frame["text"])
        elif kind == "tool_call_chunk":
            item = self._call(out, frame["index"], frame["call_id"], frame.get("name"))
            delta = frame.get("arguments_delta") or ""
            if delta and not item.done:
                item.arguments.append(delta)
                self._event(out, "response.function_call_arguments.delta", item_id=item.id,
                            output_index=item.output_index, delta=delta)
        elif kind == "tool_call_complete":
            item = self._call(out, frame["index"], frame["call_id"], frame["name"])
            item.name = frame["name"] or item.name
            self._call_done(out, item, frame["arguments"])
        elif kind == "finish":
            self._finish(out, frame)
        return out

    def _finish(self, out: list[Frame], frame: Frame) -> None:
        self.done = True
        status = frame.get("status")
        reason = frame.get("reason")
        if status == "completed" and reason not in ("length", "content_filter"):
            self.status = "completed"
        elif status == "completed":
            self.status = "incomplete"
            self._incomplete = "max_output_tokens" if reason == "length" else "content_filter"
        elif status == "cancelled":
            self.status = "cancelled"
        else:
            self.status = "failed"
            error = frame.get("error") or {}
            code = error.get("code") if status == "failed" else reason
            openai_code, message = _FAILURES.get(str(code), _GENERIC_FAILURE)
            self._error = {"code": openai_code, "message": message}
        self._close_item(out)
        for item in self._calls.values():
            self._call_done(out, item)
        self._usage = _usage(frame.get("usage") or {})
        if self.on_done is not None:
            self.on_done(self)
        if self.status == "completed":
            self._event(out, "response.completed", response=self.response())
        elif self.status == "failed":
            self._event(out, "response.failed", response=self.response())
        else:
            self._event(out, "response.incomplete", response=self.response())

    def output_messages(self) -> list[JSONObject]:
        """This response's output as chat messages (one assistant message with its text and
        tool calls; reasoning is not sent back to providers), for the chain."""
        text = "".join("".join(part[1:]) for item in self._items if item.kind == "message"
                       for part in item.parts)
        calls = [{"id": item.call_id, "type": "function",
                  "function": {"name": item.name, "arguments": "".join(item.arguments)}}
                 for item in self._items if item.kind == "function_call"]
        if not text and not calls:
            return []
        message: JSONObject = {"role": "assistant", "content": text or None}
        if calls:
            message["tool_calls"] = calls
        return [message]


# ---------------------------------------------------------------- the dialect's codec

#: Stands for the stored conversation in the ``start`` a continuation is admitted with
#: (its messages are only known once the chain is looked up: ``CreateContext``).
_CONTINUED = {"role": "user", "content": "(continued conversation)"}

#: Error codes of the relay's replies -> (OpenAI error type, code, HTTP-like status, param).
_REPLY_ERRORS: dict[str, tuple[str, str, int, str | None]] = {
    "bad_request": ("invalid_request_error", "invalid_value", 400, None),
    "unknown_model": ("invalid_request_error", "model_not_found", 404, "model"),
    "model_not_found": ("invalid_request_error", "model_not_found", 404, "model"),
    "unknown_stream": ("invalid_request_error", "response_not_found", 404, "response_id"),
    "previous_response_not_found": ("invalid_request_error", "previous_response_not_found",
                                    400, "previous_response_id"),
    "too_many_streams": ("rate_limit_error", "too_many_streams", 429, None),
    "too_many_requests": ("rate_limit_error", "too_many_requests", 429, None),
    "rate_limited": ("rate_limit_error", "rate_limit_exceeded", 429, None),
    "draining": ("server_error", "server_unavailable", 503, None),
    "store_unavailable": ("server_error", "server_unavailable", 503, None),
    "server_unavailable": ("server_error", "server_unavailable", 503, None),
    "internal_error": ("server_error", "server_error", 500, None),
    "stream_lost": ("server_error", "server_error", 500, None),
    "stream_taken_over": ("server_error", "server_error", 500, None),
}
_OWN_REFS = frozenset({CREATE_EVENT, CANCEL_EVENT, "malformed", None})


@dataclass(frozen=True, slots=True)
class CreateContext:
    """What a ``Begin`` of this dialect carries for the runtime: the create, and (once the
    runtime has looked its chain up and built it) the ``Turn`` the stream runs."""

    request: CreateRequest
    turn: Turn | None = None


class ResponsesCodec:
    """The Responses WebSocket mode as a dialect of the relay (``llm_relay_protocol.dialect.Codec``).

    * ``response.create`` -> ``Begin`` with a fresh response id as the stream's id and the
      v1 ``start`` it means (a continuation is admitted with a stand-in for the stored
      conversation; the runtime looks the chain up, checks the full request and builds the
      real ``start``: ``CreateContext``);
    * ``response.cancel`` -> ``Stop`` of that response (an unknown one: ``error``
      ``response_not_found``);
    * a refusal -> ``Malformed`` (always answerable: an ``error`` event, the socket stays);
    * replies: a v1 ``error`` -> the dialect's ``error`` event (OpenAI's type, code, status
      and param; the lane when the refusal named one); ``started``, ``pong`` and the rest:
      nothing (``response.created`` comes from the stream). Events the runtime built itself
      (their ``type`` starts with ``response.``: a ``generate: false`` response) pass as
      they are;
    * stream frames -> a ``ResponseEncoder`` per response.

    Credentials: the upgrade's ``Authorization: Bearer`` only (the SDKs send their
    ``api_key`` there); requests carry none."""

    name = "openai-responses"
    log_prefix = "responses "
    handshake = Handshake.NONE
    subprotocol: str | None = None
    per_request_credentials = False

    def decode(self, raw: str | bytes, limits: DecodeLimits, default_model: str) -> Request:
        try:
            event = decode_event(raw, limits)
            if isinstance(event, CancelRequest):
                return Stop(event.response_id, ref=CANCEL_EVENT, strict=True)
            response_id = new_response_id()
            continued = event.previous_response_id is not None
            try:
                turn = to_turn(event, previous=[_CONTINUED] if continued else None,
                               previous_model=default_model if continued else None,
                               limits=limits)
            except ResponsesError as exc:
                exc.stream_id = event.stream_id
                raise
            try:
                start = validate_start(frames.start(
                    response_id, turn.model, turn.messages or [_CONTINUED],
                    tools=turn.tools, tool_choice=turn.tool_choice,
                    params=turn.params or None), limits)
            except FrameError as exc:
                raise ResponsesError(exc.message, stream_id=event.stream_id) from None
        except ResponsesError as exc:
            return Malformed(exc.frame_error(), answerable=True)
        return Begin(response_id, start, ref=create_ref(event.stream_id),
                     context=CreateContext(event, None if continued else turn))

    def encode_reply(self, frame: Frame) -> Frame | None:
        kind = frame.get("type")
        if isinstance(kind, str) and kind.startswith("response."):
            return frame
        if kind != "error":
            return None
        code = str(frame.get("code"))
        err_type, openai_code, status, param = _REPLY_ERRORS.get(
            code, ("invalid_request_error", code, 400, None))
        ref = frame.get("ref")
        id = frame.get("id")
        lane = id[len(_LANE):] if isinstance(id, str) and id.startswith(_LANE) else None
        if isinstance(ref, str) and ref.startswith(_LANE_REF):
            lane = ref[len(_LANE_REF):-1]           # a refusal of a create on a lane
        elif ref not in _OWN_REFS:
            param = str(ref)
        message = (str(frame.get("message")) if code not in ("internal_error", "stream_lost",
                                                              "stream_taken_over")
                   else "The relay failed to handle this request.")
        return error_event(message, code=openai_code, param=param, type=err_type,
                           status=status, stream_id=lane)

    def response_encoder(self, id: str, stream_key: str,
                         request: Begin | Reattach) -> ResponseEncoder | None:
        context = request.context
        if not isinstance(context, CreateContext) or context.turn is None:
            return None
        return ResponseEncoder(id, context.turn.echo, created_at=time.time(),
                               stream_id=context.request.stream_id)
