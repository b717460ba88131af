"""Loopback fake LLM providers speaking the real OpenAI / Anthropic streaming wire formats.

One :class:`FakeUpstream` (an aiohttp server on ``127.0.0.1``, ephemeral port) serves

* ``POST /v1/chat/completions`` -- OpenAI Chat Completions SSE (``data: {...}`` ... ``data: [DONE]``)
* ``POST /v1/messages``         -- Anthropic Messages SSE (``event: X`` + ``data: {...}``)
* ``POST /openai/deployments/{deployment}/chat/completions`` -- Azure OpenAI (OpenAI SSE)

and the OpenAI-format providers' dialects (``stream("groq" | "openrouter" | "azure", ...)``:
Groq's ``x_groq``, OpenRouter's comments and ``reasoning``, Azure's filter-results chunk;
see :func:`openai_stream`) and error bodies (:func:`http_error`),

so LiteLLM's real ``openai/``, ``anthropic/``, ``azure/``, ``groq/`` and ``openrouter/`` provider
code can be pointed at it::

    async with FakeUpstream() as up:
        script = up.enqueue(openai_stream(["Hel", "lo"], usage=Usage(13, 42)))
        resp = await litellm.acompletion(model="openai/gpt-x", api_base=up.openai_base, ...)
        ...
        assert text == script.text

Scripts are immutable :class:`Script` objects built by :func:`openai_stream`,
:func:`anthropic_stream`, :func:`stream` and :func:`http_error`; fault injection and pacing are
chainable methods returning a modified copy (:meth:`Script.cut_after`,
:meth:`Script.silent_after`, :meth:`Script.silent_before_headers`, :meth:`Script.malformed_at`,
:meth:`Script.with_delay`). Each script exposes the values a test asserts against
(``text``, ``reasoning``, ``tool_calls``, ``usage``, ``finish_reason``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "Format",
    "Dialect",
    "DIALECTS",
    "Flavour",
    "wire_format",
    "SSEEvent",
    "ToolCall",
    "Usage",
    "Script",
    "RecordedRequest",
    "FakeUpstream",
    "tool_call",
    "openai_stream",
    "anthropic_stream",
    "stream",
    "http_error",
    "DEFAULT_USAGE",
]

Format = Literal["openai", "anthropic"]
#: OpenAI-format providers whose real wire adds fields of its own (``openai_stream(dialect=)``).
Dialect = Literal["openai", "groq", "openrouter", "azure"]
#: What ``stream()`` / ``http_error()`` take: a format, or an OpenAI-format provider dialect.
Flavour = Literal["openai", "anthropic", "groq", "openrouter", "azure"]
DIALECTS = ("groq", "openrouter", "azure")

OPENAI_PATH = "/v1/chat/completions"
AZURE_PATH = "/openai/deployments/{deployment}/chat/completions"
ANTHROPIC_PATH = "/v1/messages"
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_ids = itertools.count(1)


# --------------------------------------------------------------------------------------------
# Script values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SSEEvent:
    """One server-sent event exactly as written on the wire.

    ``data`` is the raw text after ``data: `` (normally JSON, possibly deliberately invalid),
    ``event`` the optional ``event:`` field (Anthropic names every event; OpenAI never does).
    ``usage_chunk`` marks the OpenAI ``choices: []`` usage chunk, which is only sent when the
    request carried ``stream_options.include_usage: true`` (as api.openai.com does).
    ``comment`` makes it an SSE comment line (``: data``), as OpenRouter's
    ``: OPENROUTER PROCESSING`` keep-alives.
    """

    data: str
    event: str | None = None
    usage_chunk: bool = False
    comment: bool = False

    def encode(self) -> bytes:
        if self.comment:
            return f": {self.data}\n\n".encode()
        head = f"event: {self.event}\n" if self.event is not None else ""
        return f"{head}data: {self.data}\n\n".encode()


@dataclass(frozen=True)
class Usage:
    """Token usage a script puts on the wire.

    OpenAI: ``prompt_tokens=input_tokens``, ``completion_tokens=output_tokens``,
    ``completion_tokens_details.reasoning_tokens=reasoning_tokens``.
    Anthropic: ``message_start.message.usage.input_tokens=input_tokens`` and
    ``message_delta.usage.output_tokens=output_tokens`` (reasoning_tokens is not on Anthropic's
    wire; it is counted inside output_tokens).
    """

    input_tokens: int
    output_tokens: int
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


#: Deliberately odd numbers so they can never be confused with LiteLLM's own token estimates.
DEFAULT_USAGE = Usage(input_tokens=1013, output_tokens=2042)


@dataclass(frozen=True)
class ToolCall:
    """An expected tool call: ``arguments`` is the exact JSON string the client must reassemble
    from ``pieces`` (the per-delta fragments, split mid-token)."""

    id: str
    name: str
    arguments: str
    pieces: tuple[str, ...]

    def __post_init__(self) -> None:
        if "".join(self.pieces) != self.arguments:
            raise ValueError("pieces must join to arguments")

    @property
    def parsed_arguments(self) -> Any:
        return json.loads(self.arguments)


def tool_call(
    name: str,
    arguments: str | Mapping[str, Any],
    *,
    id: str | None = None,  # noqa: A002 - mirrors the wire field
    pieces: Sequence[str] | None = None,
    piece_size: int = 5,
) -> ToolCall:
    """Build a :class:`ToolCall`. ``arguments`` may be a mapping (serialised compactly with
    ``json.dumps``). Unless ``pieces`` is given, the string is cut every ``piece_size``
    characters, which splits keys/values/punctuation mid-token."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, separators=(",", ":"))
    if pieces is None:
        pieces = [args[i : i + piece_size] for i in range(0, len(args), piece_size)] or [""]
    return ToolCall(id=id or f"call_fake{next(_ids):04d}", name=name, arguments=args, pieces=tuple(pieces))


@dataclass(frozen=True)
class Script:
    """What the fake answers to ONE request.

    Expected values (what a correct client reconstructs):
      ``text``, ``reasoning``, ``tool_calls`` (wire order), ``usage`` (``None`` = the wire carries
      no usage even if the request asked for it), ``finish_reason`` (provider-native:
      stop/length/tool_calls or end_turn/max_tokens/tool_use; ``None`` for error responses).

    Wire behaviour:
      ``status != 200`` -> a plain JSON error response (``body``, ``headers``), no stream.
      Otherwise an SSE stream of ``events`` (OpenAI usage chunk filtered per request), with
      ``delay`` seconds before every event but the first, modified by at most one fault:
      ``cut_after`` (close TCP after N events, chunked encoding never terminated),
      ``silent_after`` (send N events, then nothing until the client disconnects; 0 = headers
      only), ``silent_before_headers`` (never even send the status line).

    ``dialect``: the OpenAI-format provider whose wire this imitates; ``lead``: how many
    provider events (Azure's filter-results chunk, OpenRouter's comments) precede the first
    ``chat.completion.chunk`` of plain OpenAI (event indices of fault modifiers count them).
    """

    format: Format
    events: tuple[SSEEvent, ...] = ()
    dialect: Dialect | None = None
    lead: int = 0
    text: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    usage: Usage | None = None
    finish_reason: str | None = None
    model: str = ""
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0
    cut: int | None = None
    reset: bool = False
    silent: int | None = None
    silent_headers: bool = False

    # -- fault / pacing modifiers (each returns a new Script) --------------------------------
    def cut_after(self, n: int, *, reset: bool = False) -> Script:
        """Send the first ``n`` wire events, then close the TCP connection without the final
        ``0\\r\\n\\r\\n`` chunk. ``reset=True`` closes with an RST (SO_LINGER 0) instead of FIN."""
        return dataclasses.replace(self, cut=n, reset=reset)

    def silent_after(self, n: int) -> Script:
        """Send headers and the first ``n`` wire events, then nothing, forever (until the
        client disconnects or the server stops). ``n=0``: headers only."""
        return dataclasses.replace(self, silent=n)

    def silent_before_headers(self) -> Script:
        """Read the request, then never send a single byte back."""
        return dataclasses.replace(self, silent_headers=True)

    def malformed_at(self, n: int, data: str = '{"id": "broken", "choices": [{"delta": {"content": "x') -> Script:
        """Insert a ``data:`` line carrying invalid JSON as wire event number ``n`` (0-based,
        counted in ``events``; Anthropic gets a matching ``event:`` name)."""
        name = "content_block_delta" if self.format == "anthropic" else None
        evs = list(self.events)
        evs.insert(n, SSEEvent(data=data, event=name))
        return dataclasses.replace(self, events=tuple(evs))

    def with_delay(self, seconds: float) -> Script:
        """Pace the stream: sleep ``seconds`` before every event except the first."""
        return dataclasses.replace(self, delay=seconds)

    def wire_events(self, include_usage: bool) -> list[SSEEvent]:
        """The events actually sent for a request with the given ``include_usage`` flag."""
        return [e for e in self.events if include_usage or not e.usage_chunk]


# --------------------------------------------------------------------------------------------
# OpenAI Chat Completions builder
# --------------------------------------------------------------------------------------------


def _interleave(calls: Sequence[ToolCall]) -> list[tuple[int, int]]:
    """(call index, piece index) pairs, round-robin across calls: c0p0 c1p0 c0p1 c1p1 ..."""
    longest = max((len(c.pieces) for c in calls), default=0)
    return [(ci, pi) for pi in range(longest) for ci, c in enumerate(calls) if pi < len(c.pieces)]


def openai_stream(
    text: Sequence[str] = (),
    *,
    reasoning: Sequence[str] = (),
    tool_calls: Sequence[ToolCall] = (),
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"] | None = None,
    usage: Usage | None = DEFAULT_USAGE,
    model: str = "gpt-x",
    dialect: Dialect = "openai",
) -> Script:
    """An OpenAI ``chat.completion.chunk`` stream.

    Order: ``reasoning`` pieces as ``delta.reasoning_content`` (DeepSeek/vLLM style), ``text``
    pieces as ``delta.content``, then ``tool_calls`` -- the first delta of each call carries
    ``index``/``id``/``type``/``function.name`` (+ first arguments piece), later deltas only
    ``index`` and an ``arguments`` piece; several calls are INTERLEAVED piece by piece. Then the
    ``finish_reason`` chunk (default ``tool_calls`` if there are calls, else ``stop``), the usage
    chunk (``choices: []``; only sent if the request asked and ``usage`` is not None) and
    ``data: [DONE]``.

    ``dialect`` adds what the real provider puts on the wire besides:

    * ``groq``: reasoning as ``delta.reasoning``; an ``x_groq`` object with the request id in
      the first chunk and with the usage (plus Groq's timings) in the finish chunk;
    * ``openrouter``: two ``: OPENROUTER PROCESSING`` SSE comments before the first chunk;
      reasoning as ``delta.reasoning`` plus ``delta.reasoning_details``; ``provider`` and
      ``native_finish_reason`` fields; ``cost`` in the usage;
    * ``azure``: a first chunk with empty ``choices``, empty ``id``/``model`` and the
      ``prompt_filter_results``; ``content_filter_results`` in every choice with content;
      ``obfuscation`` padding fields.
    """
    cid = f"chatcmpl-fake{next(_ids):04d}"
    created = int(time.time())
    finish = finish_reason or ("tool_calls" if tool_calls else "stop")

    def chunk(delta: dict[str, Any], fin: str | None = None) -> SSEEvent:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": fin}
        body: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [choice],
        }
        if dialect == "groq" and not events:
            body["x_groq"] = {"id": f"req_groq{next(_ids):04d}"}
        elif dialect == "openrouter":
            body["provider"] = "FakeCloud"
            choice["native_finish_reason"] = fin
            if "reasoning" in delta:
                delta["reasoning_details"] = [{"type": "reasoning.text", "text": delta["reasoning"],
                                               "format": "unknown", "index": 0}]
        elif dialect == "azure":
            body["obfuscation"] = "pad"
            if fin is not None or delta.get("content") or delta.get("tool_calls"):
                choice["content_filter_results"] = {} if fin is not None else {
                    k: {"filtered": False, "severity": "safe"}
                    for k in ("hate", "self_harm", "sexual", "violence")}
        return SSEEvent(json.dumps(body, separators=(",", ":")))

    def reasoning_delta(piece: str) -> dict[str, Any]:
        if dialect in ("groq", "openrouter"):
            return {"content": None, "reasoning": piece}
        return {"content": None, "reasoning_content": piece}

    events: list[SSEEvent] = []
    first = True
    if dialect == "openrouter":
        events += [SSEEvent("OPENROUTER PROCESSING", comment=True)] * 2
    elif dialect == "azure":
        events.append(SSEEvent(json.dumps({
            "choices": [], "created": 0, "id": "", "model": "", "object": "",
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {
                k: {"filtered": False, "severity": "safe"}
                for k in ("hate", "self_harm", "sexual", "violence")}}]},
            separators=(",", ":"))))
    lead = len(events)

    def role(delta: dict[str, Any]) -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"role": "assistant", **delta}
        return delta

    for piece in reasoning:
        events.append(chunk(role(reasoning_delta(piece))))
    if not reasoning and not tool_calls or text:
        events.append(chunk(role({"content": "", "refusal": None})))
    for piece in text:
        events.append(chunk({"content": piece}))
    started: set[int] = set()
    for ci, pi in _interleave(tool_calls):
        call = tool_calls[ci]
        entry: dict[str, Any] = {"index": ci}
        if ci not in started:
            started.add(ci)
            entry.update(id=call.id, type="function", function={"name": call.name, "arguments": call.pieces[pi]})
            delta = role({"content": None, "tool_calls": [entry]})
        else:
            entry["function"] = {"arguments": call.pieces[pi]}
            delta = {"tool_calls": [entry]}
        events.append(chunk(delta))
    finish_event = chunk({}, finish)
    if dialect == "groq" and usage is not None:
        body = json.loads(finish_event.data)
        body["x_groq"] = {"id": f"req_groq{next(_ids):04d}", "usage": {
            "queue_time": 0.02, "prompt_tokens": usage.input_tokens, "prompt_time": 0.001,
            "completion_tokens": usage.output_tokens, "completion_time": 0.05,
            "total_tokens": usage.total_tokens, "total_time": 0.051}}
        finish_event = SSEEvent(json.dumps(body, separators=(",", ":")))
    events.append(finish_event)
    if usage is not None:
        usage_body = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [],
            "usage": {
                "prompt_tokens": usage.input_tokens,
                "completion_tokens": usage.output_tokens,
                "total_tokens": usage.total_tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": usage.reasoning_tokens,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
        }
        if dialect == "openrouter":
            usage_body["provider"] = "FakeCloud"
            usage_body["usage"]["cost"] = 0.000123
        events.append(SSEEvent(json.dumps(usage_body, separators=(",", ":")), usage_chunk=True))
    events.append(SSEEvent("[DONE]"))
    return Script(
        format="openai",
        dialect=dialect,
        lead=lead,
        events=tuple(events),
        text="".join(text),
        reasoning="".join(reasoning),
        tool_calls=tuple(tool_calls),
        usage=usage,
        finish_reason=finish,
        model=model,
        headers={"x-request-id": f"req_fake{next(_ids):04d}", "openai-processing-ms": "7"},
    )


# --------------------------------------------------------------------------------------------
# Anthropic Messages builder
# --------------------------------------------------------------------------------------------


def anthropic_stream(
    text: Sequence[str] = (),
    *,
    reasoning: Sequence[str] = (),
    signature: str = "EqQBCkYIARgCKkDfakeSignature==",
    tool_calls: Sequence[ToolCall] = (),
    stop_reason: Literal["end_turn", "max_tokens", "tool_use", "stop_sequence"] | None = None,
    usage: Usage | None = DEFAULT_USAGE,
    model: str = "claude-x",
    ping: bool = True,
) -> Script:
    """An Anthropic Messages stream: ``message_start`` (input usage), optional ``thinking``
    block (``thinking_delta`` pieces then one ``signature_delta``), a ``text``
    block (``text_delta`` pieces), then one ``tool_use`` block per call (``input_json_delta``
    pieces, after an initial empty ``partial_json`` as the real API sends -- blocks are
    sequential, never interleaved), ``message_delta`` (``stop_reason``, default ``tool_use`` if
    there are calls else ``end_turn``, + output usage) and ``message_stop``.
    An ``event: ping`` follows the first ``content_block_start`` (``ping=False`` drops it).
    ``usage=None`` omits the ``usage`` objects entirely (the real API always sends them).
    """
    mid = f"msg_fake{next(_ids):04d}"
    stop = stop_reason or ("tool_use" if tool_calls else "end_turn")

    def ev(name: str, body: dict[str, Any]) -> SSEEvent:
        return SSEEvent(json.dumps({"type": name, **body}, separators=(",", ":")), event=name)

    message: dict[str, Any] = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    if usage is not None:
        message["usage"] = {
            "input_tokens": usage.input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 1,
        }
    events = [ev("message_start", {"message": message})]
    index = 0
    if reasoning:
        events.append(ev("content_block_start", {"index": index, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}))
        for piece in reasoning:
            events.append(ev("content_block_delta", {"index": index, "delta": {"type": "thinking_delta", "thinking": piece}}))
        events.append(ev("content_block_delta", {"index": index, "delta": {"type": "signature_delta", "signature": signature}}))
        events.append(ev("content_block_stop", {"index": index}))
        index += 1
    if text or not tool_calls:
        events.append(ev("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}}))
        for piece in text:
            events.append(ev("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": piece}}))
        events.append(ev("content_block_stop", {"index": index}))
        index += 1
    for call in tool_calls:
        block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
        events.append(ev("content_block_start", {"index": index, "content_block": block}))
        for piece in ("", *call.pieces):
            events.append(ev("content_block_delta", {"index": index, "delta": {"type": "input_json_delta", "partial_json": piece}}))
        events.append(ev("content_block_stop", {"index": index}))
        index += 1
    if ping:  # where api.anthropic.com sends it: right after the first content_block_start
        events.insert(2, SSEEvent('{"type": "ping"}', event="ping"))
    delta_body: dict[str, Any] = {"delta": {"stop_reason": stop, "stop_sequence": None}}
    if usage is not None:
        delta_body["usage"] = {"output_tokens": usage.output_tokens}
    events.append(ev("message_delta", delta_body))
    events.append(ev("message_stop", {}))
    return Script(
        format="anthropic",
        events=tuple(events),
        text="".join(text),
        reasoning="".join(reasoning),
        tool_calls=tuple(tool_calls),
        usage=usage,
        finish_reason=stop,
        model=model,
        headers={"request-id": f"req_fake{next(_ids):04d}"},
    )


def wire_format(flavour: Flavour) -> Format:
    """The streaming format a flavour speaks (the dialects speak OpenAI's)."""
    return "openai" if flavour in DIALECTS else flavour  # type: ignore[return-value]


def stream(fmt: Flavour, text: Sequence[str] = (), **kwargs: Any) -> Script:
    """Dispatch to :func:`openai_stream` / :func:`anthropic_stream`; ``kwargs`` must suit ``fmt``
    (``finish_reason=`` for OpenAI, ``stop_reason=``/``signature=``/``ping=`` for Anthropic).
    ``groq``, ``openrouter``, ``azure``: an OpenAI stream in that provider's dialect."""
    if fmt in DIALECTS:
        return openai_stream(text, dialect=fmt, **kwargs)
    if fmt == "openai":
        return openai_stream(text, **kwargs)
    if fmt == "anthropic":
        return anthropic_stream(text, **kwargs)
    raise ValueError(f"unknown format {fmt!r}")


# --------------------------------------------------------------------------------------------
# HTTP errors
# --------------------------------------------------------------------------------------------

_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided: sk-test. You can find your API key at https://platform.openai.com/account/api-keys."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Country, region, or territory not supported"),
    404: ("invalid_request_error", "model_not_found", "The model `gpt-x` does not exist or you do not have access to it."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for gpt-x in organization org-fake on requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "model: claude-x"),
    429: ("rate_limit_error", "This request would exceed the rate limit for your organization. Please try again later."),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


_AZURE_ERRORS: dict[int, tuple[str, str]] = {
    401: ("401", "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."),
    404: ("DeploymentNotFound", "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again."),
    429: ("429", "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded token rate limit of your current tier. Please retry after 20 seconds."),
}


def http_error(fmt: Flavour, status: int, *, retry_after: int | None = None, message: str | None = None) -> Script:
    """A non-streaming error response with the provider's real JSON error body.

    OpenAI: ``{"error": {"message", "type", "param": null, "code"}}`` (+ ``x-request-id``).
    Anthropic: ``{"type": "error", "error": {"type", "message"}, "request_id"}`` (+ ``request-id``).
    Groq: OpenAI's shape. OpenRouter: ``{"error": {"message", "code": <status int>}}``.
    Azure: ``{"error": {"code": "<status or name>", "message"}}`` (+ ``apim-request-id``).
    ``retry_after`` adds a ``retry-after`` header (seconds); for 429 it defaults to 20.
    The script's ``body`` is exactly what goes on the wire (assert ``json.loads(script.body)``).
    """
    if status == 429 and retry_after is None:
        retry_after = 20
    rid = f"req_fake{next(_ids):04d}"
    headers: dict[str, str] = {"Content-Type": "application/json"}
    if fmt == "openrouter":
        _etype, _code, default = _OPENAI_ERRORS.get(status, ("server_error", None, f"HTTP {status}"))
        payload = {"error": {"message": message or default, "code": status}, "user_id": "user_fake"}
    elif fmt == "azure":
        code, default = _AZURE_ERRORS.get(status, (str(status), f"HTTP {status}"))
        payload = {"error": {"code": code, "message": message or default}}
        headers["apim-request-id"] = rid
    elif fmt in ("openai", "groq"):
        etype, code, default = _OPENAI_ERRORS.get(status, ("server_error", None, f"HTTP {status}"))
        payload: dict[str, Any] = {"error": {"message": message or default, "type": etype, "param": None, "code": code}}
        headers["x-request-id"] = rid
        if status == 429:
            headers.update({"x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": f"{retry_after}s"})
    elif fmt == "anthropic":
        etype, default = _ANTHROPIC_ERRORS.get(status, ("api_error", f"HTTP {status}"))
        payload = {"type": "error", "error": {"type": etype, "message": message or default}, "request_id": rid}
        headers["request-id"] = rid
        if status == 429:
            headers.update({"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "0"})
    else:
        raise ValueError(f"unknown format {fmt!r}")
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    return Script(format=wire_format(fmt), dialect=fmt if fmt in DIALECTS else None,  # type: ignore[arg-type]
                  status=status, headers=headers, body=json.dumps(payload).encode())


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class RecordedRequest:
    """One request received by the fake (appended to ``FakeUpstream.requests`` on arrival).

    ``disconnected_at`` is the ``time.monotonic()`` at which the CLIENT closed the connection
    before the scripted response was completely written (``None`` otherwise; a server-side cut
    or the fake shutting down is never reported as a disconnect). ``completed`` becomes True
    once the whole scripted response (including the end of the chunked body) was written.
    ``events_sent`` counts SSE events written so far.
    """

    path: str
    headers: CIMultiDictProxy[str]
    json: Any
    script: Script
    started_at: float
    query: str = ""
    disconnected_at: float | None = None
    completed: bool = False
    events_sent: int = 0
    _disconnected: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _server_closed: bool = field(default=False, repr=False)

    async def wait_disconnected(self, timeout: float = 5.0) -> float:
        """Wait until the client disconnected; return ``disconnected_at``.
        Raises ``TimeoutError`` if it did not happen within ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            await self._disconnected.wait()
        assert self.disconnected_at is not None
        return self.disconnected_at

    def _mark_disconnected(self) -> None:
        if self.disconnected_at is None and not self.completed and not self._server_closed:
            self.disconnected_at = time.monotonic()
            self._disconnected.set()


class FakeUpstream:
    """Async context manager running the fake on ``127.0.0.1:<ephemeral port>``.

    ``enqueue`` scripts; each incoming request (either path) pops the oldest one (FIFO), or gets
    a default ``"Hello from the fake upstream."`` stream in the request's format. A script of
    the wrong format for the path is served anyway (it is the test's mistake; the wire will
    show it). Client disconnects are detected even while the handler is silent, because the
    aiohttp runner cancels the handler on connection loss (``handler_cancellation=True``).
    Leaving the context aborts in-flight connections and stops the server; no tasks remain.
    """

    DEFAULT_TEXT = ("Hello", " from the fake", " upstream.")

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self._queue: list[Script] = []
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._closing = False
        self._arrived = asyncio.Condition()
        self._transports: set[asyncio.BaseTransport] = set()  # of requests being handled

    # -- lifecycle -----------------------------------------------------------------------------
    async def __aenter__(self) -> FakeUpstream:
        app = web.Application()
        app.router.add_post(OPENAI_PATH, self._handle)
        app.router.add_post(ANTHROPIC_PATH, self._handle)
        app.router.add_post(AZURE_PATH, self._handle)
        # Any other path too (a provider's default path, e.g. Groq's /openai/v1/...): the
        # request is recorded with its path, and answered in OpenAI format by default.
        app.router.add_post("/{any_path:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Abort in-flight responses (not reported as client disconnects) and stop the server."""
        if self._runner is None:
            return
        self._closing = True
        for transport in list(self._transports):
            transport.abort()  # -> connection_lost -> aiohttp cancels the handler
        runner, self._runner = self._runner, None
        await runner.cleanup()

    # -- public API ----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._port is not None, "FakeUpstream not started"
        return self._port

    @property
    def openai_base(self) -> str:
        """``api_base`` for litellm ``openai/<model>``: ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def azure_base(self) -> str:
        """``api_base`` for litellm ``azure/<deployment>``: ``http://127.0.0.1:PORT`` (the SDK
        appends ``/openai/deployments/<deployment>/chat/completions?api-version=...``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def anthropic_base(self) -> str:
        """``api_base`` for litellm ``anthropic/<model>``: ``http://127.0.0.1:PORT`` (litellm
        appends ``/v1/messages`` itself)."""
        return f"http://127.0.0.1:{self.port}"

    def enqueue(self, *scripts: Script) -> Script:
        """Queue scripts (FIFO, one consumed per request). Returns the last one, for asserts."""
        if not scripts:
            raise ValueError("enqueue() needs at least one script")
        self._queue.extend(scripts)
        return scripts[-1]

    async def wait_request(self, n: int = 1, timeout: float = 5.0) -> RecordedRequest:
        """Wait until at least ``n`` requests arrived; return the ``n``-th (1-based).
        Raises ``TimeoutError`` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            async with self._arrived:
                await self._arrived.wait_for(lambda: len(self.requests) >= n)
        return self.requests[n - 1]

    # -- request handling ----------------------------------------------------------------------
    def _default_script(self, path: str) -> Script:
        return stream("anthropic" if path == ANTHROPIC_PATH else "openai", self.DEFAULT_TEXT)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started_at = time.monotonic()
        transport = request.transport
        assert transport is not None
        self._transports.add(transport)
        try:
            raw = await request.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            script = self._queue.pop(0) if self._queue else self._default_script(request.path)
            headers = CIMultiDictProxy(CIMultiDict(request.headers))
            rec = RecordedRequest(path=request.path, headers=headers, json=body, script=script, started_at=started_at, query=request.query_string)
            self.requests.append(rec)
            async with self._arrived:
                self._arrived.notify_all()
            try:
                return await self._respond(request, rec, transport)
            except (asyncio.CancelledError, ConnectionError):
                # handler_cancellation: aiohttp cancels us when the connection is lost (also
                # while we are silent); writing to a closed peer raises ConnectionResetError.
                if self._closing:
                    rec._server_closed = True
                rec._mark_disconnected()
                raise
        finally:
            self._transports.discard(transport)

    async def _respond(self, request: web.Request, rec: RecordedRequest, transport: asyncio.BaseTransport) -> web.StreamResponse:
        script = rec.script
        if script.silent_headers:
            await asyncio.Future()  # until cancelled by a disconnect / server close
        if script.status != 200:
            err = web.Response(status=script.status, headers=script.headers, body=script.body)
            await err.prepare(request)
            await err.write_eof()
            rec.completed = True
            return err
        include_usage = bool(isinstance(rec.json, dict) and (rec.json.get("stream_options") or {}).get("include_usage"))
        events = script.wire_events(include_usage)
        resp = web.StreamResponse(status=200, headers={**_SSE_HEADERS, **script.headers})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i, event in enumerate(events):
            if script.cut is not None and i >= script.cut:
                await self._cut(rec, transport, script.reset)
            if script.silent is not None and i >= script.silent:
                await asyncio.Future()
            if i and script.delay:
                await asyncio.sleep(script.delay)
            await resp.write(event.encode())
            rec.events_sent += 1
        if script.cut is not None:
            await self._cut(rec, transport, script.reset)
        if script.silent is not None:
            await asyncio.Future()
        await resp.write_eof()
        rec.completed = True
        return resp

    async def _cut(self, rec: RecordedRequest, transport: asyncio.BaseTransport, reset: bool) -> None:
        """Close the connection mid-body (after flushing what was written); never returns."""
        rec._server_closed = True
        assert isinstance(transport, asyncio.WriteTransport)
        while transport.get_write_buffer_size():  # pragma: no cover - loopback flushes at once
            await asyncio.sleep(0.001)
        if reset:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()
        await asyncio.Future()  # cancelled by aiohttp once connection_lost fires
