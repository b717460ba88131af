"""What an upstream hands ``EventStreamer.events()``: the typed deltas of the provider's
chunks, and the reader interface both upstreams implement.

Two upstreams feed the streamer's loop: LiteLLM's stream wrapper
(``relay.upstream.event_streamer``'s ``_LiteLLMUpstream``, plus what ``RawTap`` recovers) and
the fast path's ``relay.upstream.fast.reader.FastStream``. Each turns one provider chunk into
at most one ``Delta``; the streamer turns deltas into the stream events clients see
(``TextDelta``, ``ReasoningDelta``, ...), joins text, assembles tool calls and keeps time.

Contract of a ``Delta`` (values straight from the provider: ``relay.upstream.fast.decoding``
checks their types before a fast-path delta reaches the streamer):

* ``reasoning``, ``content``, ``refusal``: text pieces of the chunk, or ``None``;
* ``tool_calls``: the chunk's tool-call pieces, or ``None``;
* ``finish_reason``: the provider's finish reason (after LiteLLM's mapping), or ``None``;
* ``chunks``: how many provider chunks a text delta stands for (more than one only for the
  text the streamer joined from chunks that arrived in one read);
* ``NO_DELTA`` (every field empty) is a sign of life without content: it restarts the
  streamer's idle timer and yields no event.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["NO_DELTA", "Delta", "ToolCallPiece", "UpstreamReader", "UsageInfo"]


@dataclass(slots=True, frozen=True)
class ToolCallPiece:
    """One tool call's piece in a provider chunk. ``index`` is the provider's (``None`` when
    it sent none: the streamer's assembly decides which call the piece continues);
    ``call_id`` and ``name`` come with a call's first piece, ``arguments`` is the next piece
    of its JSON arguments (``""`` when the chunk carried none)."""

    index: int | None
    call_id: str | None
    name: str | None
    arguments: str


@dataclass(slots=True, frozen=True)
class Delta:
    """What one provider chunk carried (see the module docstring)."""

    reasoning: str | None = None
    content: str | None = None
    tool_calls: Sequence[ToolCallPiece] | None = None
    finish_reason: str | None = None
    refusal: str | None = None
    chunks: int = 1


#: A chunk that carried nothing the client sees (a usage-only chunk, Azure's filter
#: results): restarts the idle timer, yields no event.
NO_DELTA = Delta()


@dataclass(frozen=True, slots=True)
class UsageInfo:
    """Token counts of one stream: the provider's own (``estimated`` False) or the relay's
    estimate."""

    prompt_tokens: int
    completion_tokens: int
    estimated: bool

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class UpstreamReader(Protocol):
    """One open provider stream, as ``EventStreamer.events()`` reads it."""

    async def next_batch(self) -> Sequence[Delta] | None:
        """The deltas of what arrived next (at least one), or ``None`` at the end of the
        stream. Raises the provider's failure (classified by ``relay.upstream.errors``)."""
        ...

    @property
    def truncated(self) -> bool:
        """The stream ended without one parseable chunk (the streamer reports it cut off)."""
        ...

    def provider_usage(self) -> UsageInfo | None:
        """The usage the provider itself sent, or ``None`` (the streamer then estimates)."""
        ...

    async def aclose(self) -> None:
        """Close the provider's response (and its connection) now."""
        ...
