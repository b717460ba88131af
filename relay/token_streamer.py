"""The seed's public API, kept: ``TokenStreamer(model, api_key, base_url, on_token)`` with
``stream_completion``, ``stream_with_tools``, ``cancel()``, ``get_accumulated_content()``,
``get_total_tokens()`` and ``reset()``.

Users import it as ``relay.streamer`` (the seed's module name, kept as a re-export).
It is a thin view of ``relay.upstream.event_streamer.EventStreamer`` (whose ``events()`` the
relay itself consumes), so both seed methods behave the same way on errors: they never raise
for a provider failure; they end with a final item whose status is ``failed`` and whose
error is safe to show. Nothing in the relay imports this module; it exists for library
users.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from relay.upstream.event_streamer import (
    EventStreamer,
    ReasoningDelta,
    RefusalDelta,
    StreamEnd,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
    UsageInfo,
    _estimate_text_tokens,
)

__all__ = ["TokenChunk", "TokenStreamer"]


@dataclass
class TokenChunk:
    """Item of ``stream_completion`` (the seed's shape, with real usage on the last one)."""

    content: str
    token_count: int = 1
    finish_reason: str | None = None
    model: str | None = None
    accumulated_content: str = ""
    total_tokens: int = 0
    status: str | None = None
    usage: UsageInfo | None = None
    error: dict | None = None


class TokenStreamer(EventStreamer):
    """``EventStreamer`` with the seed's methods. ``on_token`` is called with a
    ``TokenChunk`` for every text delta of ``stream_completion``/``stream_with_tools``;
    every other argument is ``EventStreamer``'s."""

    def __init__(self, model: str, api_key: str | None = None, base_url: str | None = None,
                 on_token: Callable[[TokenChunk], None] | None = None, **kwargs: Any) -> None:
        super().__init__(model, api_key, base_url, **kwargs)
        self.on_token = on_token

    def get_accumulated_content(self) -> str:
        return self.accumulated_content

    def get_total_tokens(self) -> int:
        """Completion tokens: the provider's count once the stream ended (else an estimate)."""
        if self.usage is not None:
            return self.usage.completion_tokens
        return _estimate_text_tokens(self.model, self.accumulated_content)

    async def stream_completion(
        self,
        messages: list[dict[str, Any]],
        temperature: float = 0.1,
        max_tokens: int = 4096,
        **params: Any,
    ) -> AsyncIterator[TokenChunk]:
        """Text deltas as ``TokenChunk``; the last chunk has status, finish_reason, usage."""
        async for event in self.events(
            messages, temperature=temperature, max_tokens=max_tokens, **params
        ):
            if isinstance(event, TextDelta):
                yield self._text_chunk(event.text)
            elif isinstance(event, StreamEnd):
                yield TokenChunk(
                    content="",
                    token_count=0,
                    finish_reason=event.reason,
                    model=self.model,
                    accumulated_content=self.accumulated_content,
                    total_tokens=event.usage.completion_tokens,
                    status=str(event.status),
                    usage=event.usage,
                    error=event.error.as_error() if event.error else None,
                )

    async def stream_with_tools(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        temperature: float = 0.1,
        max_tokens: int = 4096,
        **params: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """Event dicts named as in the seed: token, reasoning, refusal, tool_call_chunk,
        tool_call_complete, then exactly one finish (errors too: status ``failed``)."""
        async for event in self.events(
            messages, tools=tools, temperature=temperature, max_tokens=max_tokens, **params
        ):
            if isinstance(event, TextDelta):
                chunk = self._text_chunk(event.text)
                yield {"type": "token", "content": event.text,
                       "accumulated": chunk.accumulated_content}
            elif isinstance(event, ReasoningDelta):
                yield {"type": "reasoning", "content": event.text}
            elif isinstance(event, RefusalDelta):
                yield {"type": "refusal", "content": event.text}
            elif isinstance(event, ToolCallDelta):
                yield {"type": "tool_call_chunk", "index": event.index, "call_id": event.call_id,
                       "name": event.name, "arguments_delta": event.arguments_delta}
            elif isinstance(event, ToolCallDone):
                yield {"type": "tool_call_complete", "index": event.index,
                       "call_id": event.call_id, "name": event.name,
                       "arguments": event.arguments}
            else:
                yield {
                    "type": "finish",
                    "status": str(event.status),
                    "reason": event.reason,
                    "accumulated": self.accumulated_content,
                    "usage": {
                        "prompt_tokens": event.usage.prompt_tokens,
                        "completion_tokens": event.usage.completion_tokens,
                        "total_tokens": event.usage.total_tokens,
                        "estimated": event.usage.estimated,
                    },
                    "error": event.error.as_error() if event.error else None,
                }

    def _text_chunk(self, text: str) -> TokenChunk:
        chunk = TokenChunk(content=text, model=self.model,
                           accumulated_content=self.accumulated_content)
        if self.on_token is not None:
            self.on_token(chunk)
        return chunk

