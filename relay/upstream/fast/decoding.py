"""What every fast-path decoder is: SSE events in, ``Delta`` values out, and the failures a
provider's data may cause.

A decoder (``relay.upstream.fast.openai.OpenAIDecoder``,
``relay.upstream.fast.anthropic.AnthropicDecoder``) is fresh per stream and is fed the events
``SSEParser`` completed, in order, by ``relay.upstream.fast.reader.FastStream``. Its contract
(``Decoder``):

* ``decode(events)`` returns the deltas those events carried (possibly none) or raises the
  stream's failure; ``done`` becomes true at the format's end marker (then nothing more is
  decoded); ``finish_reason`` is the last finish reason read; ``broken`` says the stream
  ended without one valid event (the streamer reports it truncated);
* ``tolerates_cut_after_finish``: a connection cut after the finish reason ends the stream
  normally (as LiteLLM's reader of that format does);
* ``provider_usage()`` is the usage the provider sent, or ``None``.

Provider data is untrusted: whatever a decoder raises while reading a wrong-shaped event
(``obj.get`` on a string, a list used as a key, ...) is a provider failure
(``shape_failure``), and every delta's field types are checked (``check_shapes``) before the
streamer sees it. All of these classify as "the provider's stream failed"
(``relay.upstream.errors``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from relay.upstream.deltas import Delta, UsageInfo
from relay.upstream.errors import ProviderStreamError

__all__ = ["Decoder", "EndedUnfinished", "Malformed", "ProviderReportedError", "SSEEvent",
           "WrongShape", "check_shapes", "shape_failure"]

#: One completed Server-Sent Event: ``(event name or None, data)``, as ``SSEParser`` gives it.
SSEEvent = tuple[bytes | None, bytes]


class Decoder(Protocol):
    """One stream's decoder (see the module docstring)."""

    done: bool
    finish_reason: str | None

    @property
    def broken(self) -> bool: ...

    @property
    def tolerates_cut_after_finish(self) -> bool: ...

    def decode(self, events: Sequence[SSEEvent]) -> list[Delta]: ...

    def provider_usage(self) -> UsageInfo | None: ...


class Malformed(ProviderStreamError, ValueError):
    """A data line that is not the JSON object the format requires."""


class WrongShape(ProviderStreamError, ValueError):
    """A JSON event whose fields have the wrong types (``{"choices": "abc"}``, a string
    ``delta``, a list where text belongs, nesting past what a chunk holds). Reported as
    LiteLLM's path reports the same events: "the provider's stream failed (cut off or
    malformed)"."""


class ProviderReportedError(ProviderStreamError):
    """An error event inside an OpenAI-format stream (no HTTP status)."""


class EndedUnfinished(ProviderStreamError):
    """The stream ended without a finish reason (LiteLLM raises a ``RemoteProtocolError``
    for it; both classify as "the provider's stream failed")."""


#: What reading a wrong-shaped event raises inside a decoder: the provider's doing.
_SHAPE_ERRORS = (TypeError, AttributeError, KeyError, IndexError, ValueError, RecursionError)


def shape_failure(exc: Exception) -> Exception:
    """``exc`` raised while decoding provider data, as the provider failure it reports
    (``WrongShape``); a provider failure already, or an error no wrong shape causes (a relay
    bug), unchanged."""
    if isinstance(exc, ProviderStreamError) or not isinstance(exc, _SHAPE_ERRORS):
        return exc
    failure = WrongShape(f"wrong-shaped event in the provider's stream ({type(exc).__name__})")
    failure.__cause__ = exc
    return failure


def check_shapes(deltas: Sequence[Delta]) -> None:
    """Raise ``WrongShape`` unless every delta's fields have the types the streamer takes:
    text, reasoning and finish reason strings (a refusal is a string when it is read),
    tool-call pieces with an int index
    and string id/name/arguments (each may be absent, the arguments may not)."""
    for delta in deltas:
        content, reasoning, finish = delta.content, delta.reasoning, delta.finish_reason
        if not ((content is None or type(content) is str)
                and (reasoning is None or type(reasoning) is str)
                and (finish is None or type(finish) is str)):
            raise WrongShape("a delta field of the wrong type")
        tool_calls = delta.tool_calls
        if tool_calls:
            for piece in tool_calls:
                index, call_id, name = piece.index, piece.call_id, piece.name
                if not ((index is None or type(index) is int)
                        and (call_id is None or type(call_id) is str)
                        and (name is None or type(name) is str)
                        and type(piece.arguments) is str):
                    raise WrongShape("a tool call field of the wrong type")
