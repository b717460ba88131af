"""Anthropic Messages SSE (``event: X`` + ``data: {...}``) -> ``Delta`` values, as LiteLLM's
Anthropic stream parser reads them (provider ``anthropic``, LiteLLM 1.110).

What LiteLLM still decides: finish reasons (``map_finish``: ``map_finish_reason``), the
usage arithmetic (``calculate_usage``: ``AnthropicConfig.calculate_usage``), the exception
for an ``event: error`` (``stream_error``) and the original names of tools it renamed in
the request (``reverse_names``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson

from relay.upstream.deltas import Delta, ToolCallPiece, UsageInfo
from relay.upstream.fast.decoding import Malformed, SSEEvent
from relay.upstream.raw_tap import anthropic_tool_input_arguments

__all__ = ["AnthropicDecoder"]


class AnthropicDecoder:
    """Anthropic Messages events -> deltas, as LiteLLM's Anthropic stream parser reads them.

    Tool calls are numbered 0, 1, ... in ``tool_use`` block order; a ``tool_use`` block whose
    input did not stream (no ``input_json_delta`` with content) completes with the input of
    its ``content_block_start`` (third-party servers send it whole there), else ``{}``. A
    data line that is not a JSON object fails the stream (``Malformed``), except before any
    valid event, where LiteLLM's parser swallows the rest and the stream ends empty (the
    relay reports it truncated).
    """

    __slots__ = ("done", "finish_reason", "broken", "_seen", "_usage", "_tool_index",
                 "_block_type", "_block_args", "_block_input", "_names", "_map_finish",
                 "_stream_error", "_calculate_usage")
    tolerates_cut_after_finish = True

    def __init__(self, map_finish: Callable[[Any], Any],
                 stream_error: Callable[[Any], Exception],
                 calculate_usage: Callable[[dict[str, Any]], Any],
                 reverse_names: dict[str, str] | None) -> None:
        self.done = False  # Anthropic ends at EOF, like LiteLLM's reader
        self.finish_reason: str | None = None
        self.broken = False
        self._seen = False
        self._usage: dict[str, Any] | None = None
        self._tool_index = -1
        self._block_type: str | None = None
        self._block_args = False
        self._block_input: Any = None
        self._names: dict[Any, str] = reverse_names or {}
        self._map_finish = map_finish
        self._stream_error = stream_error
        self._calculate_usage = calculate_usage

    def decode(self, events: Sequence[SSEEvent]) -> list[Delta]:
        deltas: list[Delta] = []
        for _event, data in events:
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                obj = None
            if type(obj) is not dict:
                if self._seen:
                    raise Malformed("malformed JSON in the provider's stream")
                # Before any valid event LiteLLM's parser swallows the rest and its wrapper
                # ends the stream with nothing in it: the relay reports it truncated.
                self.broken = self.done = True
                break
            self._seen = True
            kind = obj.get("type")
            if kind == "content_block_delta":
                delta = obj.get("delta") or {}
                if "text" in delta:
                    deltas.append(Delta(None, delta["text"]))
                elif "partial_json" in delta:
                    if self._block_type == "tool_use":
                        piece = delta["partial_json"]
                        if piece:
                            self._block_args = True
                        deltas.append(Delta(None, None, (
                            ToolCallPiece(self._tool_index, None, None, piece),)))
                elif "thinking" in delta:
                    thinking = delta["thinking"]
                    if type(thinking) is str and thinking:
                        deltas.append(Delta(thinking))
            elif kind == "content_block_start":
                block = obj.get("content_block") or {}
                block_type = self._block_type = block.get("type")
                self._block_args = False
                if block_type == "text":
                    text = block.get("text")
                    if text:
                        deltas.append(Delta(None, text))
                elif block_type == "tool_use":
                    self._tool_index += 1
                    self._block_input = block.get("input")
                    name = block.get("name")
                    name = self._names.get(name, name)
                    deltas.append(Delta(None, None, (
                        ToolCallPiece(self._tool_index, block.get("id"), name, ""),)))
            elif kind == "content_block_stop":
                if self._block_type == "tool_use" and not self._block_args:
                    arguments = anthropic_tool_input_arguments(self._block_input)
                    deltas.append(Delta(None, None, (
                        ToolCallPiece(self._tool_index, None, None, arguments),)))
                self._block_type = None
            elif kind == "message_delta":
                delta = obj.get("delta") or {}
                finish = self.finish_reason = self._map_finish(delta.get("stop_reason") or "stop")
                if "usage" in obj:
                    self._take_usage(obj["usage"])
                deltas.append(Delta(None, None, None, finish))
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
