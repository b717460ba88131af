"""What LiteLLM's stream wrapper loses, read from the provider's own chunks on their way in.

LiteLLM's ``CustomStreamWrapper`` turns each provider chunk into a ``ModelResponseStream``.
On the way it loses four things the relay's clients need (LiteLLM 1.110):

* ``delta.refusal`` (OpenAI's structured-output refusal): a chunk that carries only a
  refusal counts as empty and is not handed on, nor is its refusal on what it hands on;
* whether a tool-call delta had an ``index`` (Gemini's OpenAI-compatible endpoint sends
  none): LiteLLM's ``Delta`` numbers the calls of every such delta from 0, so "no index"
  (continue the last call) cannot be told from index 0;
* an Anthropic ``tool_use`` block whose ``input`` comes whole in ``content_block_start``
  (third-party Anthropic-compatible servers) and not as ``input_json_delta``: LiteLLM's
  parser streams its arguments as ``""``;
* a ``delta.content`` that is an array of parts (Mistral's Magistral models through an
  OpenAI-compatible alias: ``thinking`` parts and ``text`` parts, see ``content_parts``):
  the wrapper drops the chunk's text and reasoning.

``RawTap.install(wrapper)`` reads the provider's chunks before the wrapper does: the OpenAI
SDK's chunk objects (the wrapper's ``completion_stream`` is replaced by a read-through), or,
for LiteLLM's own HTTP handlers (Anthropic, Groq, OpenRouter), each event's JSON as that
iterator's ``chunk_parser`` receives it. Two things are changed: a chunk with refusal text
gets ``provider_specific_fields: {"refusal": ...}`` on its delta, so that the wrapper hands
it on at once (``_hand_on``) and the refusal streams as the provider streams it; a content
part array is replaced by its text, and its thinking set as the delta's reasoning
(``reasoning_content`` and ``reasoning``), as the fast path reads it. A part array of the
wrong shape is kept as ``failure``, which ``_LiteLLMUpstream`` raises in place of the
wrapper's next chunk (the fast path fails the stream at that event too). The
wrapper reads one provider chunk at a time and returns as soon as one gives it something
to hand on, so the tap's last chunk is the one the wrapper's next chunk came from, and what
the tap keeps from earlier chunks came before it. ``relay.upstream.event_streamer._LiteLLMUpstream``
hands ``take_pending()`` on before each chunk of the wrapper, and reads the tool calls'
indexes from ``tool_indexes``.

Upstream data is untrusted: every field is type-checked, and observing never raises.
"""

from __future__ import annotations

import json
from typing import Any

from relay.upstream.deltas import Delta, ToolCallPiece
from relay.upstream.errors import ProviderStreamError

__all__ = ["RawTap", "WrongShapedContentParts", "anthropic_tool_input_arguments",
           "content_parts"]


def anthropic_tool_input_arguments(block_input: Any) -> str:
    """The arguments of an Anthropic ``tool_use`` block whose input did not stream as
    ``input_json_delta``: its ``content_block_start`` input, serialised as LiteLLM's
    non-streaming Anthropic path serialises a tool input (``json.dumps``), or ``{}``.
    Shared by both paths, so they give the same string."""
    if type(block_input) is dict and block_input:
        return json.dumps(block_input)
    return "{}"


class WrongShapedContentParts(ProviderStreamError, ValueError):
    """A ``delta.content`` part array that is not the shape ``content_parts`` reads: the
    provider's doing, reported as any wrong-shaped event ("the provider's stream failed")."""


def content_parts(parts: list) -> tuple[str | None, str | None]:
    """``(text, reasoning)`` of a ``delta.content`` that is an array of parts, as LiteLLM's
    ``mistral/`` provider reads Magistral's (``MistralChatResponseIterator``): a
    ``{"type": "text", "text": ...}`` part is answer text; a ``{"type": "thinking",
    "thinking": [{"type": "text", "text": ...}, ...]}`` part is reasoning (its text parts
    joined, the thinking parts of one array joined with a newline); parts (and thinking
    items) of any other type are ignored. ``None`` for what the array does not carry.
    Shared by both paths, so they give the same text.

    Raises ``WrongShapedContentParts`` for a part that is not an object, a text that is not
    a string, or a ``thinking`` that is not an array of objects (LiteLLM's ``mistral/``
    parser would fall back to dropping such a chunk; the relay fails the stream, as for any
    wrong-shaped event)."""
    texts: list[str] = []
    thoughts: list[str] = []
    for part in parts:
        if type(part) is not dict:
            raise WrongShapedContentParts("a content part that is not an object")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text", "")
            if type(text) is not str:
                raise WrongShapedContentParts("a text part whose text is not a string")
            texts.append(text)
        elif kind == "thinking":
            items = part.get("thinking", [])
            if type(items) is not list:
                raise WrongShapedContentParts("a thinking part that is not an array")
            pieces = []
            for item in items:
                if type(item) is not dict:
                    raise WrongShapedContentParts("a thinking item that is not an object")
                if item.get("type") == "text":
                    text = item.get("text", "")
                    if type(text) is not str:
                        raise WrongShapedContentParts("a thinking text that is not a string")
                    pieces.append(text)
            thought = "".join(pieces)
            if thought:
                thoughts.append(thought)
    return ("".join(texts) if texts else None), ("\n".join(thoughts) if thoughts else None)


def _field(obj: Any, name: str) -> Any:
    if type(obj) is dict:
        return obj.get(name)
    return getattr(obj, name, None)


class RawTap:
    """See the module docstring. ``pending``: deltas (as an upstream's ``next_batch``
    gives them: refusal text, an Anthropic tool input) not on the wrapper's chunks; ``tool_indexes``: the
    ``index`` (``None`` when absent) of each tool call of the last OpenAI-format chunk;
    ``replaced``: Anthropic tool indexes whose arguments the tap supplies (the wrapper's
    own ``"{}"`` for them is dropped); ``failure``: the ``WrongShapedContentParts`` of a
    chunk whose content parts are of the wrong shape (nothing after it is observed)."""

    __slots__ = ("pending", "tool_indexes", "replaced", "failure", "_tool_index",
                 "_block_input", "_block_args", "_in_tool_block")

    def __init__(self) -> None:
        self.pending: list[Delta] = []
        self.failure: WrongShapedContentParts | None = None
        self.tool_indexes: list[int | None] | None = None
        self.replaced: set[int] = set()
        self._tool_index = -1
        self._block_input: Any = None
        self._block_args = False
        self._in_tool_block = False

    @classmethod
    def install(cls, wrapper: Any) -> RawTap | None:
        """Tap ``wrapper``'s provider stream; ``None`` when it has none (an injected test
        double, a provider LiteLLM reads some other way)."""
        stream = getattr(wrapper, "completion_stream", None)
        if stream is None:
            return None
        tap = cls()
        parser = getattr(stream, "chunk_parser", None)
        if callable(parser):
            def chunk_parser(chunk, *args, **kwargs):
                refused = tap.observe(chunk)
                parsed = parser(chunk, *args, **kwargs)
                if refused:
                    _hand_on(parsed)
                return parsed

            try:
                stream.chunk_parser = chunk_parser
            except (AttributeError, TypeError):
                return None
            return tap
        if not hasattr(stream, "__aiter__"):
            return None
        try:
            wrapper.completion_stream = _ReadThrough(stream, tap)
        except (AttributeError, TypeError):
            return None
        return tap

    def take_pending(self) -> list[Delta]:
        pending, self.pending = self.pending, []
        return pending

    def observe(self, chunk: Any) -> bool:
        """One provider chunk: an OpenAI-format chunk (SDK object or JSON) or an Anthropic
        event (JSON). True when it carried refusal text."""
        if self.failure is not None:
            return False  # the stream fails at the chunk that failed: nothing after counts
        try:
            if type(chunk) is dict and "choices" not in chunk:
                self._observe_anthropic(chunk)
                return False
            return self._observe_openai(chunk)
        except Exception:  # untrusted data the wrapper itself will judge: never fail here
            self.tool_indexes = None
            return False

    def _observe_openai(self, chunk: Any) -> bool:
        self.tool_indexes = None
        choices = _field(chunk, "choices")
        if not choices or type(choices) not in (list, tuple):
            return False
        delta = _field(choices[0], "delta")
        if delta is None:
            return False
        content = _field(delta, "content")
        if type(content) is list:
            try:
                text, reasoning = content_parts(content)
            except WrongShapedContentParts as exc:
                self.failure = exc
                return False
            _set_field(delta, "content", text)
            if reasoning is not None:
                # Both names: LiteLLM's handlers read one or the other (OpenRouter's only
                # ``reasoning``; the generic one maps ``reasoning`` over ``reasoning_content``).
                _set_field(delta, "reasoning_content", reasoning)
                _set_field(delta, "reasoning", reasoning)
        tool_calls = _field(delta, "tool_calls")
        if tool_calls and type(tool_calls) in (list, tuple):
            self.tool_indexes = [index if type(index) is int else None
                                 for index in (_field(tc, "index") for tc in tool_calls)]
        refusal = _field(delta, "refusal")
        if type(refusal) is str and refusal:
            self.pending.append(Delta(refusal=refusal))
            return True
        return False

    def _observe_anthropic(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "content_block_start":
            block = event.get("content_block")
            self._in_tool_block = type(block) is dict and block.get("type") == "tool_use"
            if self._in_tool_block and block is not None:
                self._tool_index += 1
                self._block_input = block.get("input")
                self._block_args = False
        elif kind == "content_block_delta" and self._in_tool_block:
            delta = event.get("delta")
            if type(delta) is dict and delta.get("partial_json"):
                self._block_args = True
        elif kind == "content_block_stop" and self._in_tool_block:
            self._in_tool_block = False
            if not self._block_args:
                # No arguments streamed: the block's start input is its arguments (LiteLLM
                # gives "" without any delta, "{}" after empty ones; the latter is dropped).
                self.replaced.add(self._tool_index)
                arguments = anthropic_tool_input_arguments(self._block_input)
                self.pending.append(Delta(tool_calls=(
                    ToolCallPiece(self._tool_index, None, None, arguments),)))


def _set_field(obj: Any, name: str, value: Any) -> None:
    if type(obj) is dict:
        obj[name] = value
    else:
        setattr(obj, name, value)


def _hand_on(chunk: Any) -> None:
    """Make the wrapper hand on a chunk that carries refusal text, now rather than with the
    next chunk that has content: it hands on a chunk whose delta has
    ``provider_specific_fields`` (and drops one with nothing else it knows). The field
    holds the refusal, which the wrapper's own callers could read there too."""
    try:
        delta = chunk.choices[0].delta
        fields = getattr(delta, "provider_specific_fields", None)
        merged = {**fields} if type(fields) is dict else {}
        merged["refusal"] = delta.refusal
        delta.provider_specific_fields = merged
    except Exception:  # a chunk we cannot mark: its refusal waits for the next chunk
        pass


class _ReadThrough:
    """The OpenAI SDK's stream as the wrapper's ``completion_stream``: each chunk goes to the
    tap, then on unchanged. Closing closes the SDK stream (and its HTTP response)."""

    __slots__ = ("_stream", "_iterator", "_tap")

    def __init__(self, stream: Any, tap: RawTap) -> None:
        self._stream = stream
        self._iterator = stream.__aiter__()
        self._tap = tap

    def __aiter__(self) -> _ReadThrough:
        return self

    async def __anext__(self) -> Any:
        chunk = await self._iterator.__anext__()
        if self._tap.observe(chunk):
            _hand_on(chunk)
        return chunk

    async def aclose(self) -> None:
        try:
            close_iterator = getattr(self._iterator, "aclose", None)
            if close_iterator is not None:
                await close_iterator()
        finally:
            close = getattr(self._stream, "aclose", None)
            if close is not None:
                await close()

    def __getattr__(self, name: str) -> Any:
        # Anything else the wrapper asks of its stream (``response``, ...) is the SDK's.
        return getattr(object.__getattribute__(self, "_stream"), name)
