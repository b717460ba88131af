"""A local upstream call as the hub's ``StreamSource`` (``relay.core.ports``): the one place
where ``EventStreamer`` events become protocol frames.

``UpstreamSource(streamer, request, ...)`` is built per ``start`` by the session;
the hub's task for the stream awaits ``run(sink)``, which iterates ``streamer.events(**request)``
and logs each event as its frame (``TextDelta`` -> ``token``, ``ReasoningDelta`` ->
``reasoning``, ``RefusalDelta`` -> ``refusal``, ``ToolCallDelta`` -> ``tool_call_chunk``,
``ToolCallDone`` -> ``tool_call_complete``, ``StreamEnd`` -> ``finish``). Frames are
numbered here (``seq`` from 1). Per token it counts the ``relay_tokens`` metric (and the
time to the first one) and calls ``on_chunk(n)`` for its n chunks (the group's token
budget, relays on Redis). Each upstream request is counted in
``relay_requests_total{alias,path}`` with the path it took.

After ``cancel`` nothing but the finish follows (a ``ToolCallDone``, which only comes after
the provider completed, still does: the finish then says ``completed``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from llm_relay_protocol import FinishReason, frames

from relay.core.outcome import FinishError, StreamOutcome, TokenUsage
from relay.core.ports import FrameSink
from relay.metrics import RelayMetrics
from relay.upstream.event_streamer import (
    EventStreamer,
    ReasoningDelta,
    RefusalDelta,
    StreamEnd,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
)

__all__ = ["UpstreamSource", "outcome_of"]


class UpstreamSource:
    """``StreamSource`` of one local upstream call. ``request``: the keyword arguments of
    ``streamer.events``; ``on_chunk``: called with 1 for every streamed chunk (not for the
    assembled tool calls); ``metrics``: the relay's (tokens, time to first token)."""

    def __init__(self, streamer: EventStreamer, request: dict[str, Any], *,
                 metrics: RelayMetrics | None = None,
                 on_chunk: Callable[[int], None] | None = None,
                 alias: str | None = None) -> None:
        self.streamer = streamer
        #: The model alias, for ``relay_requests_total{alias,path}`` (None: not counted).
        self.alias = alias
        self.request = request
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self.on_chunk = on_chunk
        self.started_at = time.monotonic()
        #: The upstream call's ``StreamEnd``, once ``run`` logged its finish.
        self.end: StreamEnd | None = None

    @property
    def cancelled(self) -> bool:
        """Whether ``cancel`` was called (nothing but the finish follows)."""
        return self.streamer.cancelled

    def cancel(self, reason: str = FinishReason.CLIENT_CANCEL) -> None:
        self.streamer.cancel(reason)

    async def run(self, sink: FrameSink) -> None:
        try:
            await self._run(sink)
        finally:
            path = getattr(self.streamer, "path_taken", None)
            if path is not None and self.alias is not None:
                # The path this request actually took (a fast-path alias's request that
                # only LiteLLM can make counts as litellm).
                self.metrics.requests.labels(self.alias, path).inc()

    async def _run(self, sink: FrameSink) -> None:
        streamer = self.streamer
        sid = sink.id
        append = sink.append
        on_chunk = self.on_chunk
        tokens = self.metrics.tokens
        clock = time.perf_counter
        first_token = True
        seq = 0
        events = streamer.events(**self.request)
        async with contextlib.aclosing(events):
            async for event in events:
                received = clock()
                if isinstance(event, StreamEnd):
                    self.end = event
                    seq += 1
                    sink.finish(seq, outcome_of(event), received)
                    return
                if streamer.cancelled and not isinstance(event, ToolCallDone):
                    # Nothing but the finish follows a cancel. (ToolCallDone only comes
                    # after the provider completed, and then the finish says completed.)
                    continue
                seq += 1
                chunks = 1
                if isinstance(event, TextDelta):
                    chunks = event.chunks
                    # Chunks that arrived together are one frame, numbered as if they had
                    # been sent one by one and merged (the last seq kept, PROTOCOL.md).
                    seq += chunks - 1
                    frame = frames.token(sid, seq, event.text)
                    tokens.inc(chunks)
                    if first_token:
                        first_token = False
                        self.metrics.time_to_first_token.observe(
                            time.monotonic() - self.started_at)
                elif isinstance(event, ToolCallDelta):
                    frame = frames.tool_call_chunk(sid, seq, event.index, event.call_id,
                                                   event.name, event.arguments_delta)
                elif isinstance(event, ToolCallDone):
                    frame = frames.tool_call_complete(sid, seq, event.index, event.call_id,
                                                      event.name, event.arguments)
                elif isinstance(event, ReasoningDelta):
                    frame = frames.reasoning(sid, seq, event.text)
                elif isinstance(event, RefusalDelta):
                    frame = frames.refusal(sid, seq, event.text)
                else:
                    seq -= 1
                    continue
                if on_chunk is not None and not isinstance(event, ToolCallDone):
                    on_chunk(chunks)       # one per streamed chunk; topped up at the end
                append(frame, received)


def outcome_of(end: StreamEnd) -> StreamOutcome:
    """The outcome of a stream whose upstream call ended with ``end`` (the hub logs it as
    the stream's ``finish`` frame)."""
    usage = end.usage
    error = end.error
    return StreamOutcome(
        end.status, end.reason,
        TokenUsage(usage.prompt_tokens, usage.completion_tokens, usage.estimated),
        FinishError(error.code, error.message, error.retry_after) if error is not None else None)
