"""The fast streaming path: the relay reads the provider's SSE itself.

LiteLLM turns every streamed chunk into OpenAI SDK and LiteLLM objects (~600-1,000 us of CPU per
token here); reading the same Server-Sent Events with httpx costs ~50 us. For aliases whose
provider speaks one of two streaming formats, the relay therefore reads the wire itself:

* ``openai``: OpenAI Chat Completions SSE (``data: {chat.completion.chunk}`` ... ``data: [DONE]``),
  for the LiteLLM providers in ``OPENAI_FORMAT_PROVIDERS`` (OpenAI and any OpenAI-compatible
  ``api_base`` via ``openai/``, Cerebras, Perplexity, Azure OpenAI, vLLM, Together, DeepSeek,
  Groq, OpenRouter, Fireworks, xAI, Mistral), each at its default endpoint when the alias
  has no ``api_base`` (``relay/upstream/fast_endpoints.py``);
* ``anthropic``: Anthropic Messages SSE (``event: X`` + ``data: {...}``), provider ``anthropic``.

Every other provider stays on LiteLLM's path. ``select_route()`` decides once per alias, at
startup (``fast = false`` in the alias's config opts out); the choice is logged and exported
in ``/metrics`` (``relay_model_path``).

What LiteLLM still does (its provider knowledge, once per stream, never per chunk):

* the request: ``get_llm_provider`` (provider, key and base URL), ``get_optional_params``
  (parameter mapping), the provider config's ``validate_environment`` (headers),
  ``get_complete_url`` and ``transform_request`` (body; for Anthropic the message and tool
  translation and beta-header filtering, exactly as LiteLLM's Anthropic handler calls them);
* the meaning of an HTTP error: status, headers and body become the provider's exception
  (``config.get_error_class``) and then LiteLLM's (``exception_type``), so
  ``classify_upstream_exception`` answers exactly as on the LiteLLM path (Retry-After too);
* finish reasons (``map_finish_reason``) and Anthropic usage arithmetic (``calculate_usage``).

What the relay does: one shared ``httpx.AsyncClient`` per event loop (on aiohttp's wire,
``relay/upstream/transport.py``), ``SSEParser`` (bytes in,
``(event, data)`` out; ``relay/upstream/sse.py``), ``orjson``, and a decoder per format that
yields the deltas
``EventStreamer.events()`` consumes: ``(reasoning, content, tool_calls, finish_reason)`` with
tool calls as ``(index, id, name, arguments)`` (``index`` ``None`` when the provider sent
none), and ``(..., 1, refusal)`` for a delta that carries refusal text. Timers, cancel
(``aclose`` of the response), usage decisions and estimates are the streamer's, shared with
the LiteLLM path.

Requests a route does not take (``FastRoute.refusal`` says why; the streamer logs it once
and ``relay_requests_total{alias,path="litellm"}`` counts it) go through LiteLLM: on Anthropic
a ``response_format`` (LiteLLM rewrites it into a tool and the tool call back into text);
the cases of Azure and Groq in ``relay/upstream/fast_formats.py`` (``dialect_accepts``);
OpenAI/Azure requests with tools that LiteLLM sends through its Responses API.

Azure OpenAI, Groq and OpenRouter speak dialects of the OpenAI format that LiteLLM reads
with code of its own (the Azure SDK client; a line reader with per-provider chunk parsers):
``relay/upstream/fast_formats.py`` builds their requests and reads their streams as LiteLLM does.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import weakref
from dataclasses import dataclass
from typing import Any

import orjson

from relay.upstream import caps, fast_endpoints, fast_formats
from relay.upstream.errors import ProviderStreamError
from relay.upstream.raw_tap import anthropic_tool_input_arguments
from relay.upstream.sse import SSEParser
from relay.upstream.streamer import UsageInfo

__all__ = [
    "ANTHROPIC_FORMAT_PROVIDERS",
    "OPENAI_FORMAT_PROVIDERS",
    "FastRoute",
    "PathChoice",
    "SSEParser",
    "select_route",
]


#: LiteLLM providers whose chat streaming is the OpenAI Chat Completions SSE format, read the
#: way LiteLLM reads each: with the OpenAI SDK (``fast_endpoints.OPENAI_SDK_PROVIDERS``:
#: OpenAI and any OpenAI-compatible ``api_base`` via ``openai/``, Cerebras, Perplexity), the
#: Azure SDK client (``azure``), or LiteLLM's line reader with the provider's stream handler
#: (``fast_formats.LINE_READ_HANDLERS``: vLLM, Together, DeepSeek, Groq, OpenRouter,
#: Fireworks, xAI, Mistral).
OPENAI_FORMAT_PROVIDERS = frozenset({
    "openai", "custom_openai", "cerebras", "perplexity", "azure",
    *fast_formats.LINE_READ_HANDLERS,
})
#: LiteLLM providers that stream Anthropic Messages SSE.
ANTHROPIC_FORMAT_PROVIDERS = frozenset({"anthropic"})

# kwargs of an EventStreamer request that are not model parameters
_NOT_PARAMS = frozenset({"model", "messages", "api_key", "api_base", "num_retries",
                         "azure_ad_token"})


@dataclass(frozen=True)
class PathChoice:
    """Which path an alias streams through, and why (for the startup log)."""

    path: str  # "fast" or "litellm"
    reason: str
    route: FastRoute | None = None


def select_route(model: str, api_base: str | None, *, fast: bool = True,
                 extra: dict[str, Any] | None = None) -> PathChoice:
    """Decide the path of one alias (imports LiteLLM). Never raises: on any doubt, LiteLLM."""
    if not fast:
        return PathChoice("litellm", "fast = false in the alias config")
    if extra:
        return PathChoice("litellm", "extra LiteLLM arguments configured")
    from relay.upstream.llm import get_litellm

    litellm = get_litellm()
    try:
        name, provider, _key, _base = litellm.get_llm_provider(model, api_base=api_base)
    except Exception:
        return PathChoice("litellm", "LiteLLM does not know the provider")
    try:
        config = litellm.ProviderConfigManager.get_provider_chat_config(
            model=name, provider=litellm.LlmProviders(provider))
    except Exception:
        config = None
    if provider in ANTHROPIC_FORMAT_PROVIDERS:
        wire = "anthropic"
    elif provider in OPENAI_FORMAT_PROVIDERS:
        wire = "openai"
    else:
        return PathChoice("litellm", _unread_provider_reason(provider, config))
    if config is None:
        return PathChoice("litellm", f"LiteLLM has no chat config for provider {provider}")
    if wire == "openai":
        refusal = _openai_reader_refusal(litellm, provider, config, name, api_base)
        if refusal is not None:
            return PathChoice("litellm", refusal)
    if provider == "azure":
        refusal = fast_formats.azure_refusal(litellm, name, api_base)
        if refusal is not None:
            return PathChoice("litellm", refusal)
    try:
        if config.should_fake_stream(model=name, stream=True, custom_llm_provider=provider):
            return PathChoice("litellm", f"LiteLLM fakes streaming for {model}")
        if config.has_custom_stream_wrapper:
            return PathChoice("litellm", f"LiteLLM has a custom stream wrapper for {provider}")
    except Exception:
        return PathChoice("litellm", f"LiteLLM cannot describe streaming for {model}")
    route = FastRoute(wire=wire, provider=provider, model=name, litellm_model=model,
                      api_base=api_base, config=config)
    return PathChoice("fast", f"{wire} streaming format (provider {provider})", route)


def _unread_provider_reason(provider: str, config: Any) -> str:
    """The startup log's reason for a provider the fast path does not read."""
    from litellm.llms.openai.chat.gpt_transformation import OpenAIGPTConfig

    if isinstance(config, OpenAIGPTConfig):
        return (f"provider {provider} streams the OpenAI format, but the fast path has not "
                "been checked against how LiteLLM calls it and reads it (not in "
                "OPENAI_FORMAT_PROVIDERS)")
    return f"provider {provider} streams a format of its own, which only LiteLLM reads"


def _openai_reader_refusal(litellm: Any, provider: str, config: Any, model: str,
                           api_base: str | None) -> str | None:
    """Why an OpenAI-format alias cannot take the fast path, or None: LiteLLM must read its
    stream the way the fast path knows (module docstring), and send it to Chat Completions
    (not its Responses API bridge)."""
    import os

    if provider in fast_endpoints.OPENAI_SDK_PROVIDERS or provider == "azure":
        if provider != "azure" and os.environ.get(
                "EXPERIMENTAL_OPENAI_BASE_LLM_HTTP_HANDLER", "").lower() in (
                "1", "true", "yes", "on"):
            return ("EXPERIMENTAL_OPENAI_BASE_LLM_HTTP_HANDLER makes LiteLLM read "
                    f"{provider}'s stream with its own HTTP handler")
        bridged = responses_bridge_reason(litellm, model, provider, api_base, tools=None)
        if bridged is not None:
            return bridged
    elif provider in fast_formats.LINE_READ_HANDLERS:
        expected = fast_formats.LINE_READ_HANDLERS[provider]
        try:
            handler = config.get_model_response_iterator(streaming_response=iter(()),
                                                         sync_stream=False)
            actual = type(handler).__name__
        except Exception:
            actual = "an unknown handler"
        if actual != expected:
            return (f"LiteLLM reads {provider}'s stream with {actual}, which the fast path "
                    f"does not know (it reads it as {expected})")
    return None


@functools.lru_cache(maxsize=256)
def _bridge_reason_with_function_tools(model: str, provider: str,
                                       api_base: str | None) -> str | None:
    from relay.upstream.llm import get_litellm

    return responses_bridge_reason(get_litellm(), model, provider, api_base,
                                   tools=[{"type": "function", "function": {
                                       "name": "f", "parameters": {}}}])


def responses_bridge_reason(litellm: Any, model: str, provider: str, api_base: str | None,
                            tools: Any) -> str | None:
    """Why LiteLLM sends this OpenAI/Azure request through its Responses API bridge (models
    whose cost-map mode is ``responses``; GPT-5.4+ with function tools on api.openai.com),
    or None when it goes to Chat Completions as the fast path would send it."""
    try:
        from litellm.responses.bridge_check import responses_api_bridge_check
    except ImportError:
        return None
    try:
        info, _model = responses_api_bridge_check(model=model, custom_llm_provider=provider,
                                                  tools=tools, api_base=api_base)
    except Exception:
        return None
    if info.get("mode") == "responses":
        return f"LiteLLM sends {model} requests{' with tools' if tools else ''} through " \
               "the Responses API"
    return None


class _Malformed(ProviderStreamError, ValueError):
    """A data line that is not the JSON object the format requires."""


class _WrongShape(ProviderStreamError, ValueError):
    """A JSON event whose fields have the wrong types (``{"choices": "abc"}``, a string
    ``delta``, a list where text belongs, nesting past what a chunk holds). Reported as
    LiteLLM's path reports the same events: "the provider's stream failed (cut off or
    malformed)"."""


#: What reading a wrong-shaped event raises inside a decoder (``obj.get`` on a string, a list
#: used as a key, ...): the provider's doing, reported as ``_WrongShape``, not a relay bug.
_SHAPE_ERRORS = (TypeError, AttributeError, KeyError, IndexError, ValueError, RecursionError)


def _shape_failure(exc: Exception) -> Exception:
    """``exc`` raised while decoding provider data, as the provider failure it reports."""
    if isinstance(exc, ProviderStreamError) or not isinstance(exc, _SHAPE_ERRORS):
        return exc
    failure = _WrongShape(f"wrong-shaped event in the provider's stream ({type(exc).__name__})")
    failure.__cause__ = exc
    return failure


def _check_shapes(deltas: list[tuple]) -> None:
    """Raise ``_WrongShape`` unless every delta's fields have the types the streamer takes:
    text, reasoning and finish reason strings, tool calls ``(index, id, name, arguments)``
    with an int index and string id/name/arguments (each may be absent)."""
    for delta in deltas:
        reasoning, content, tool_calls, finish = delta[0], delta[1], delta[2], delta[3]
        if not ((content is None or type(content) is str)
                and (reasoning is None or type(reasoning) is str)
                and (finish is None or type(finish) is str)):
            raise _WrongShape("a delta field of the wrong type")
        if tool_calls:
            for index, call_id, name, arguments in tool_calls:
                if not ((index is None or type(index) is int)
                        and (call_id is None or type(call_id) is str)
                        and (name is None or type(name) is str)
                        and type(arguments) is str):
                    raise _WrongShape("a tool call field of the wrong type")


class _ProviderStreamError(ProviderStreamError):
    """An error event inside an OpenAI-format stream (no HTTP status)."""


class _EndedUnfinished(ProviderStreamError):
    """The stream ended without a finish reason (LiteLLM raises a ``RemoteProtocolError``
    for it; both classify as "the provider's stream failed")."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    import httpx

    return (httpx.ReadError, httpx.RemoteProtocolError)


#: A delta that carries nothing: makes ``next_batch`` return (the streamer's idle timer
#: restarts) without an event.
_NO_DELTA = (None, None, None, None)


class _OpenAIDecoder(fast_formats.OpenAIUsage):
    """OpenAI ``chat.completion.chunk`` events -> deltas; ``[DONE]`` ends the stream."""

    __slots__ = ("done", "finish_reason", "usage", "_map_finish", "_stream_error")
    broken = False
    tolerates_cut_after_finish = False

    def __init__(self, map_finish, stream_error) -> None:
        self.done = False
        self.finish_reason: str | None = None
        self.usage: tuple[int | None, int | None] = (None, None)
        self._map_finish = map_finish
        self._stream_error = stream_error

    def decode(self, events: list[tuple[bytes | None, bytes]]) -> list[tuple]:
        deltas = []
        for _event, data in events:
            if self.done:
                break
            if data[:6] == b"[DONE]":
                self.done = True
                break
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise _Malformed("malformed JSON in the provider's stream") from None
            if type(obj) is not dict:
                raise _Malformed("a stream event that is not a JSON object")
            if obj.get("error"):
                raise self._stream_error(obj["error"])
            usage = obj.get("usage")
            if usage:
                self._take_usage(usage)
            choices = obj.get("choices")
            if not choices:
                # LiteLLM's wrapper hands a chunk without choices on (Azure's filter results,
                # the usage chunk): it counts as a sign of life for the idle timer.
                deltas.append(_NO_DELTA)
                continue
            choice = choices[0]
            finish = choice.get("finish_reason")
            if finish:
                if finish in fast_formats.FAILING_FINISH_REASONS:
                    raise fast_formats.failing_finish_error(finish)
                finish = self.finish_reason = self._map_finish(finish)
            delta = choice.get("delta")
            if not delta:
                if finish:
                    deltas.append((None, None, None, finish))
                continue
            reasoning = delta.get("reasoning_content")
            if reasoning is None:
                reasoning = delta.get("reasoning")  # vLLM, Groq, Cerebras name (as LiteLLM maps)
            event = fast_formats.openai_delta(delta, reasoning, finish)
            if event is not None:
                deltas.append(event)
        return deltas


class _AnthropicDecoder:
    """Anthropic Messages events -> deltas, as LiteLLM's Anthropic stream parser reads them.

    Tool calls are numbered 0, 1, ... in ``tool_use`` block order; a ``tool_use`` block whose
    input did not stream (no ``input_json_delta`` with content) completes with the input of
    its ``content_block_start`` (third-party servers send it whole there), else ``{}``. A
    data line that is not a JSON object fails the stream (``_Malformed``), except before any
    valid event, where LiteLLM's parser swallows the rest and the stream ends empty (the
    relay reports it truncated).
    """

    __slots__ = ("done", "finish_reason", "broken", "_seen", "_usage", "_tool_index",
                 "_block_type", "_block_args", "_block_input", "_names", "_map_finish",
                 "_stream_error", "_calculate_usage")
    tolerates_cut_after_finish = True

    def __init__(self, map_finish, stream_error, calculate_usage, reverse_names) -> None:
        self.done = False  # Anthropic ends at EOF, like LiteLLM's reader
        self.finish_reason: str | None = None
        self.broken = False
        self._seen = False
        self._usage: dict | None = None
        self._tool_index = -1
        self._block_type: str | None = None
        self._block_args = False
        self._block_input: Any = None
        self._names = reverse_names or {}
        self._map_finish = map_finish
        self._stream_error = stream_error
        self._calculate_usage = calculate_usage

    def decode(self, events: list[tuple[bytes | None, bytes]]) -> list[tuple]:
        deltas = []
        for _event, data in events:
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                obj = None
            if type(obj) is not dict:
                if self._seen:
                    raise _Malformed("malformed JSON in the provider's stream")
                # Before any valid event LiteLLM's parser swallows the rest and its wrapper
                # ends the stream with nothing in it: the relay reports it truncated.
                self.broken = self.done = True
                break
            self._seen = True
            kind = obj.get("type")
            if kind == "content_block_delta":
                delta = obj.get("delta") or {}
                if "text" in delta:
                    deltas.append((None, delta["text"], None, None))
                elif "partial_json" in delta:
                    if self._block_type == "tool_use":
                        piece = delta["partial_json"]
                        if piece:
                            self._block_args = True
                        deltas.append((None, None, ((self._tool_index, None, None, piece),),
                                       None))
                elif "thinking" in delta:
                    thinking = delta["thinking"]
                    if type(thinking) is str and thinking:
                        deltas.append((thinking, None, None, None))
            elif kind == "content_block_start":
                block = obj.get("content_block") or {}
                block_type = self._block_type = block.get("type")
                self._block_args = False
                if block_type == "text":
                    text = block.get("text")
                    if text:
                        deltas.append((None, text, None, None))
                elif block_type == "tool_use":
                    self._tool_index += 1
                    self._block_input = block.get("input")
                    name = block.get("name")
                    name = self._names.get(name, name)
                    deltas.append((None, None, ((self._tool_index, block.get("id"), name, ""),),
                                   None))
            elif kind == "content_block_stop":
                if self._block_type == "tool_use" and not self._block_args:
                    arguments = anthropic_tool_input_arguments(self._block_input)
                    deltas.append((None, None, ((self._tool_index, None, None, arguments),),
                                   None))
                self._block_type = None
            elif kind == "message_delta":
                delta = obj.get("delta") or {}
                finish = self.finish_reason = self._map_finish(delta.get("stop_reason") or "stop")
                if "usage" in obj:
                    self._take_usage(obj["usage"])
                deltas.append((None, None, None, finish))
            elif kind == "message_start":
                message = obj.get("message") or {}
                if "usage" in message:
                    self._take_usage(message["usage"])
            elif kind == "error":
                raise self._stream_error(obj.get("error") or {})
        return deltas

    def _take_usage(self, usage: Any) -> None:
        if type(usage) is dict:
            self._usage = {**(self._usage or {}), **usage}

    def provider_usage(self) -> UsageInfo | None:
        if self._usage is None:
            return None
        usage = self._calculate_usage(self._usage)
        p, c = usage.prompt_tokens, usage.completion_tokens
        prompt = p if isinstance(p, int) and p > 0 else None
        completion = c if isinstance(c, int) and c > 0 else None
        if prompt is None and completion is None:
            return None
        return UsageInfo(prompt or 0, completion or 0, estimated=False)


class _FastStream:
    """One open provider response, read by ``EventStreamer.events()``.

    ``next_batch()`` reads the network until the events that arrived carry at least one delta
    and returns them, or ``None`` at the end of the stream. Events without a delta (Anthropic
    pings, ``message_start``, usage-only chunks) do not end the wait, so they do not reset the
    streamer's idle timer: LiteLLM's wrapper does not hand such chunks on either.
    ``aclose()`` closes the HTTP response (and with it the connection) at once.

    Read under the caps of ``relay/upstream/caps.py``: a compressed body is inflated by
    ``caps.Inflater``, one SSE event is at most ``max_event_bytes``, and an event whose JSON
    has the wrong shape for its format fails the stream as a provider failure
    (``_WrongShape``), never as a relay bug.
    """

    __slots__ = ("_response", "_chunks", "_inflater", "_parser", "_decoder", "_ended",
                 "_failure")

    def __init__(self, response, decoder) -> None:
        self._response = response
        limits = caps.current()
        # The body stream itself (two generator layers per network chunk fewer than
        # ``aiter_bytes``; closing stays ``aclose()``'s), decoded here under the caps when
        # it is compressed (relay/upstream/caps.py), never by httpx without a limit.
        self._chunks = response.stream.__aiter__()
        encoding = response.headers.get("content-encoding")
        self._inflater = None
        if encoding and encoding.strip().lower() != "identity":
            self._inflater = caps.Inflater(encoding, limits)
        self._parser = SSEParser(limits.max_event_bytes)
        self._decoder = decoder
        self._ended = False
        self._failure: Exception | None = None

    async def next_batch(self) -> list[tuple] | None:
        decoder = self._decoder
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        if self._ended:
            self._check_finished()
            return None
        feed = self._parser.feed
        chunks = self._chunks
        inflater = self._inflater
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                self._ended = True
                self._check_finished()
                return None
            except _TRANSPORT_ERRORS:
                if decoder.tolerates_cut_after_finish and decoder.finish_reason is not None:
                    # LiteLLM reads Anthropic's stream with httpx and ends it normally when
                    # the connection breaks after the finish reason (message_delta) arrived.
                    self._ended = True
                    return None
                raise
            if inflater is not None:
                chunk = inflater.feed(chunk)
            events = feed(chunk)
            if events:
                try:
                    deltas = (decoder.decode(events) if len(events) == 1
                              else self._decode_each(events))
                    _check_shapes(deltas)
                except Exception as exc:
                    failure = _shape_failure(exc)
                    if failure is exc:
                        raise
                    raise failure from exc
                if decoder.done:
                    await self._drain()
                    if not deltas:
                        self._check_finished()
                        return None
                    return deltas
                if deltas:
                    return deltas

    def _decode_each(self, events: list[tuple[bytes | None, bytes]]) -> list[tuple]:
        """Events read together (a burst), decoded one by one: one that fails the stream
        fails it after the deltas of the events before it, exactly as when they arrive
        apart. The failure is kept and raised by the next ``next_batch()``."""
        decoder = self._decoder
        deltas: list[tuple] = []
        for event in events:
            try:
                decoded = decoder.decode((event,))
                _check_shapes(decoded)
            except Exception as exc:
                if not deltas:
                    raise
                self._failure = _shape_failure(exc)
                break
            deltas += decoded
            if decoder.done:
                break
        return deltas

    def _check_finished(self) -> None:
        decoder = self._decoder
        if decoder.finish_reason is None and not decoder.broken:
            # LiteLLM's wrapper fails a stream that ends (cleanly, or with [DONE]) without a
            # finish reason the same way. (After Anthropic garbage before any event it has
            # nothing at all, and the relay reports the stream truncated.)
            raise _EndedUnfinished("the stream ended before a finish reason")

    async def _drain(self) -> None:
        """After ``[DONE]`` (or Anthropic garbage before any event): read the rest of the
        body (connection reuse), as the OpenAI SDK does; a failure there no longer matters."""
        self._ended = True
        left = caps.current().max_error_body_bytes  # then close instead (a hostile tail)
        try:
            async for chunk in self._chunks:
                left -= len(chunk)
                if left < 0:
                    break
        except asyncio.CancelledError:
            raise
        except Exception:
            pass

    @property
    def truncated(self) -> bool:
        return self._decoder.broken

    def provider_usage(self) -> UsageInfo | None:
        return self._decoder.provider_usage()

    async def aclose(self) -> None:
        await self._response.aclose()


_TRANSPORT_ERRORS = _transport_errors()
_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _http_client():
    """The event loop's shared ``httpx.AsyncClient`` (pooled keep-alive connections)."""
    import httpx

    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None or client.is_closed:
        import urllib.request

        from relay.upstream.llm import get_litellm

        timeout = float(getattr(get_litellm(), "request_timeout", 600) or 600)
        # Without proxies from the environment (which httpx honours only for a transport
        # it builds itself): aiohttp's wire, HTTP parsed in C (relay/upstream/transport.py).
        transport = None
        if not urllib.request.getproxies():
            from relay.upstream.transport import AiohttpTransport

            transport = AiohttpTransport()
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            # One connection per concurrent stream: a pool cap would queue streams silently.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256,
                                keepalive_expiry=30.0),
            follow_redirects=False,
            transport=transport,
        )
        _clients[loop] = client
    return client


async def close_idle_http_client() -> None:
    """Close this event loop's shared client (and its keep-alive connections) unless a
    response is still open on it (another relay server on the same loop still streaming).
    ``RelayServer.close`` calls it once its streams ended: an aiohttp session left to the
    garbage collector reports itself unclosed. The next fast-path request opens a new one."""
    client = _clients.get(asyncio.get_running_loop())
    if client is None or client.is_closed:
        return
    open_responses = getattr(client._transport, "open_responses", 0)
    if open_responses == 0:
        await client.aclose()


@dataclass(frozen=True)
class FastRoute:
    """How to call one alias's provider directly. Built by ``select_route`` at startup."""

    wire: str            # "openai" or "anthropic"
    provider: str        # LiteLLM provider name
    model: str           # the provider's model name
    litellm_model: str   # the alias's LiteLLM model string
    api_base: str | None
    config: Any          # LiteLLM's provider chat config

    def accepts(self, kwargs: dict[str, Any]) -> bool:
        """False for a request only LiteLLM's own path handles (see the module docstring)."""
        return self.refusal(kwargs) is None

    def refusal(self, kwargs: dict[str, Any]) -> str | None:
        """Why this request goes through LiteLLM's own path instead (the relay logs it and
        counts it in ``relay_requests_total{path="litellm"}``), or None: the fast path
        takes it."""
        provider = self.provider
        if provider in fast_formats.DIALECT_PROVIDERS:
            if not fast_formats.dialect_accepts(provider, kwargs):
                if provider == "azure":
                    return "an Azure oidc/ token (LiteLLM exchanges it for an access token)"
                return (f"response_format on {provider} (LiteLLM answers it from a "
                        "non-streaming call)")
        elif self.wire == "anthropic" and kwargs.get("response_format") is not None:
            return ("response_format on Anthropic (LiteLLM turns it into a tool and the "
                    "tool call back into text)")
        tools = kwargs.get("tools")
        if tools and (provider in fast_endpoints.OPENAI_SDK_PROVIDERS or provider == "azure"):
            api_base = kwargs.get("api_base") or self.api_base
            if all(type(t) is dict and t.get("type") == "function" for t in tools):
                # LiteLLM's answer depends on the tools only through "has a function tool":
                # asked once per model and base (~0.3 ms of model-info lookups each time).
                return _bridge_reason_with_function_tools(self.model, provider, api_base)
            from relay.upstream.llm import get_litellm

            return responses_bridge_reason(get_litellm(), self.model, provider, api_base,
                                           tools=tools)
        return None

    async def open(self, kwargs: dict[str, Any]) -> _FastStream:
        """Send the request; return the open stream or raise LiteLLM's exception for it."""
        url, headers, body, decoder = self.build_request(kwargs)
        client = _http_client()
        request = client.build_request("POST", url, headers=headers, content=body)
        response = await client.send(request, stream=True)
        if response.status_code >= 400:
            # At most max_error_body_bytes of it, decoded under the caps; the connection is
            # closed, not drained (relay/upstream/caps.py).
            error_body = await caps.read_error_body(response)
            raise self._http_error(response.status_code, response.headers, error_body)
        try:
            return _FastStream(response, decoder)
        except BaseException:
            await response.aclose()
            raise

    # ------------------------------------------------------------------ LiteLLM knowledge

    def build_request(self, kwargs: dict[str, Any]) -> tuple[str, dict, bytes, Any]:
        """URL, headers, JSON body and a fresh decoder for one request, built by LiteLLM's
        provider code the way its own handler for this provider builds them."""
        from relay.upstream.llm import get_litellm

        litellm = get_litellm()
        _name, _provider, dynamic_key, dynamic_base = litellm.get_llm_provider(
            self.litellm_model, api_base=self.api_base)
        api_key = kwargs.get("api_key") or dynamic_key
        api_base = kwargs.get("api_base") or self.api_base or dynamic_base
        from litellm.utils import (
            validate_and_fix_openai_messages, validate_and_fix_openai_tools,
            validate_chat_completion_tool_choice, validate_openai_optional_params,
        )

        # What litellm.completion() does first, for every provider.
        messages = validate_and_fix_openai_messages(copy.deepcopy(kwargs["messages"]))
        params = {k: v for k, v in kwargs.items() if k not in _NOT_PARAMS}
        if "tools" in params:
            params["tools"] = validate_and_fix_openai_tools(params["tools"])
        if "tool_choice" in params:
            params["tool_choice"] = validate_chat_completion_tool_choice(
                tool_choice=params["tool_choice"], model=self.litellm_model)
        if "stop" in params:
            params["stop"] = validate_openai_optional_params(stop=params["stop"])
        optional = litellm.get_optional_params(
            model=self.model, custom_llm_provider=self.provider, messages=messages, **params)
        litellm_params: dict[str, Any] = {"custom_llm_provider": self.provider,
                                          "api_base": api_base}
        if kwargs.get("azure_ad_token"):
            litellm_params["azure_ad_token"] = kwargs["azure_ad_token"]
        if self.wire == "anthropic":
            return self._anthropic_request(litellm, api_key, api_base, messages, optional,
                                           litellm_params)
        return self._openai_request(litellm, api_key, api_base, messages, optional,
                                    litellm_params)

    def _openai_request(self, litellm, api_key, api_base, messages, optional, litellm_params):
        from litellm.litellm_core_utils.core_helpers import map_finish_reason

        decoder = fast_formats.openai_decoder_for(
            self.provider, _OpenAIDecoder, map_finish_reason, self._openai_stream_error,
            self._dialect_chunk_error)
        if self.provider == "azure":
            url, headers, body = fast_formats.azure_request(
                litellm, self.model, api_key, api_base, messages, optional, litellm_params,
                ad_token=litellm_params.get("azure_ad_token"))
            return url, headers, orjson.dumps(body), decoder
        config = self.config
        # The provider's default base, key and headers, as litellm.main's branch for it
        # resolves them (an alias without api_base).
        api_key, api_base, base_headers = fast_endpoints.resolve_openai_compatible(
            litellm, self.provider, config, api_key, api_base)
        extra_body = optional.pop("extra_body", None)
        headers = config.validate_environment(
            headers=base_headers, model=self.model, messages=messages, optional_params=optional,
            litellm_params=litellm_params, api_key=api_key, api_base=api_base)
        url = config.get_complete_url(api_base=api_base, api_key=api_key, model=self.model,
                                      optional_params=optional, litellm_params=litellm_params,
                                      stream=True)
        body = config.transform_request(model=self.model, messages=messages,
                                        optional_params=optional,
                                        litellm_params=litellm_params, headers=headers)
        if extra_body:
            body = {**body, **extra_body}
        body["stream"] = True
        return url, headers, orjson.dumps(body), decoder

    def _anthropic_request(self, litellm, api_key, api_base, messages, optional,
                           litellm_params):
        import os

        from litellm.anthropic_beta_gated_fields import strip_beta_gated_request_body
        from litellm.anthropic_beta_headers_manager import update_request_with_filtered_beta
        from litellm.litellm_core_utils.core_helpers import map_finish_reason
        from litellm.litellm_core_utils.url_utils import ensure_api_route
        from litellm.llms.anthropic.chat.transformation import (
            ANTHROPIC_TOOL_NAME_REVERSE_MAP_KEY, AnthropicConfig,
        )

        # As litellm.main's Anthropic branch resolves them.
        api_key = (api_key or litellm.anthropic_key or litellm.api_key
                   or os.environ.get("ANTHROPIC_API_KEY"))
        api_base = ensure_api_route(
            api_base or litellm.api_base or os.environ.get("ANTHROPIC_API_BASE")
            or os.environ.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com/v1/messages",
            "v1/messages")
        optional.pop("stream", None)
        optional.pop("json_mode", None)
        optional.pop("vertex_count_tokens_location", None)
        transform_params = {**optional, "is_vertex_request": False}
        headers = AnthropicConfig().validate_environment(
            api_key=api_key, headers={}, model=self.model, messages=messages,
            optional_params=transform_params, litellm_params=litellm_params, api_base=api_base)
        data = self.config.transform_request(model=self.model, messages=messages,
                                             optional_params=transform_params,
                                             litellm_params=litellm_params, headers=headers)
        headers, data = update_request_with_filtered_beta(
            headers=headers, request_data=data, provider=self.provider, api_base=api_base)
        data = dict(strip_beta_gated_request_body(data, headers, drop_params=None,
                                                  model=self.model, provider=self.provider))
        data["stream"] = True
        config = AnthropicConfig()
        decoder = _AnthropicDecoder(
            map_finish_reason, self._anthropic_stream_error,
            lambda usage: config.calculate_usage(usage_object=usage, reasoning_content=None),
            litellm_params.get(ANTHROPIC_TOOL_NAME_REVERSE_MAP_KEY))
        return api_base, headers, orjson.dumps(data), decoder

    def _mapped(self, error: Exception) -> Exception:
        """The exception LiteLLM raises for ``error`` (its provider exception mapping)."""
        from litellm.litellm_core_utils.exception_mapping_utils import exception_type

        try:
            exception_type(model=self.model, original_exception=error,
                           custom_llm_provider=self.provider)
        except Exception as mapped:
            return mapped
        return error

    def _http_error(self, status: int, headers, body: bytes) -> Exception:
        message = body.decode("utf-8", errors="replace")
        return self._mapped(self.config.get_error_class(
            error_message=message, status_code=status, headers=headers))

    def _openai_stream_error(self, error: Any) -> Exception:
        """An ``{"error": ...}`` event inside an OpenAI-format stream. The SDK raises an
        ``APIError`` without a status, which LiteLLM reports as a broken stream; so does
        this (``classify_upstream_exception``: "the provider's stream failed"), or, when the
        error's message (the SDK's exception text) says the provider is overloaded, so does
        this exception's (``upstream_overloaded``)."""
        message = error.get("message") if type(error) is dict else None
        if type(message) is str and "overloaded" in message.lower():
            return _ProviderStreamError("the provider reported inside the stream that it is "
                                        "overloaded")
        return _ProviderStreamError("the provider reported an error inside the stream")

    def _dialect_chunk_error(self, chunk: Any) -> Exception:
        """The exception LiteLLM raises for a chunk its provider stream handler rejects (an
        error inside a Groq/OpenRouter stream): the handler's own ``chunk_parser`` runs on
        that one chunk, and its exception goes through LiteLLM's mapping."""
        handler = self.config.get_model_response_iterator(
            streaming_response=iter(()), sync_stream=False)
        try:
            handler.chunk_parser(chunk=chunk)
        except Exception as error:
            return self._mapped(error)
        return _ProviderStreamError("the provider sent a chunk the relay cannot read")

    def _anthropic_stream_error(self, error: Any) -> Exception:
        """An ``event: error`` inside an Anthropic stream (LiteLLM: status 500)."""
        message = error.get("message") if isinstance(error, dict) else None
        return self._mapped(self.config.get_error_class(
            error_message=message or "error event", status_code=500, headers={}))
