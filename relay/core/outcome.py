"""How a stream ended, as a typed value: ``StreamOutcome`` (issue 22, "typed insides").

A stream's source reports its end as a ``StreamOutcome`` (``FrameSink.finish``); the hub
keeps it as ``HubStream.end`` and reads its fields (metrics, the token budget, the log line).
It becomes a wire frame only where it is logged for sending: ``StreamOutcome.frame`` builds
the ``finish`` frame (``llm_relay_protocol.frames.finish``, PROTOCOL.md "finish"), and
``StreamOutcome.of_frame`` reads one back (a follower reading a stream's finish from Redis,
where the owner logged it as a frame). ``of_frame(o.frame(id, seq)) == o`` for every outcome.

Sans-I/O: values only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llm_relay_protocol import ErrorCode, FinishStatus, frames
from llm_relay_protocol.frames import Frame

__all__ = ["FinishError", "StreamOutcome", "TokenUsage"]


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """``finish.usage`` (``total_tokens`` is derived); ``estimated``: the provider reported
    none, so the relay counted."""

    prompt_tokens: int
    completion_tokens: int
    estimated: bool

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class FinishError:
    """``finish.error`` of a ``failed`` or ``timeout`` stream (``llm_relay_protocol.ErrorInfo``)."""

    code: str
    message: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class StreamOutcome:
    """A stream's end: its ``finish`` frame without the frame's ``id`` and ``seq``."""

    status: FinishStatus
    #: A documented ``FinishReason``, or for ``failed`` the error code.
    reason: str | None
    usage: TokenUsage
    error: FinishError | None = None

    def frame(self, id: str, seq: int) -> Frame:
        """The ``finish`` frame saying this outcome, as stream ``id``'s frame ``seq``."""
        usage = self.usage
        error = self.error
        return frames.finish(
            id, seq, str(self.status), self.reason,
            frames.usage(usage.prompt_tokens, usage.completion_tokens, usage.estimated),
            frames.error_info(error.code, error.message, error.retry_after)
            if error is not None else None)

    @classmethod
    def of_frame(cls, frame: Mapping[str, Any]) -> StreamOutcome:
        """The outcome a ``finish`` frame says (one the relay built with ``frame``; a frame
        of any other shape raises ``KeyError``/``ValueError``). ``Any``: decoded JSON, read
        as the finish frame's fields."""
        usage = frame["usage"]
        error = frame.get("error")
        return cls(
            status=FinishStatus(frame["status"]),
            reason=frame.get("reason"),
            usage=TokenUsage(int(usage["prompt_tokens"]), int(usage["completion_tokens"]),
                             bool(usage["estimated"])),
            error=None if error is None else FinishError(
                str(error["code"]), str(error["message"]), error.get("retry_after")))

    @classmethod
    def relay_bug(cls, message: str) -> StreamOutcome:
        """The outcome of a local stream whose task ended without one (a relay bug):
        ``failed`` with ``internal_error``, usage an estimate of nothing."""
        return cls(FinishStatus.FAILED, ErrorCode.INTERNAL_ERROR, TokenUsage(0, 0, True),
                   FinishError(ErrorCode.INTERNAL_ERROR, message))
