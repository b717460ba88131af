"""What a wire dialect is to the relay: a sans-I/O codec over the one connection machine.

The relay serves several wire protocols ("dialects") on one core: llm-relay.v1 on ``/ws``
(``llm_relay_protocol.v1.V1Codec``), the AI SDK's chat transport on ``/ai-sdk``
(``llm_relay_protocol.aisdk.AiSdkCodec``). A dialect is a ``Codec`` and nothing else:

* ``decode`` turns one client frame into one ``Request`` of the core's vocabulary below
  (``Greet``, ``Begin``, ``Stop``, ``Reattach``, ``Probe``, ``Ignore``, or ``Malformed`` for a
  frame that cannot be honoured). It never raises for client input;
* ``encode_reply`` turns a reply of the core into the dialect's frame, or None when the
  dialect has no such frame (nothing is sent). The core's replies are llm-relay.v1 server
  frames as dicts (``llm_relay_protocol.frames``: ``welcome``, ``pong``, ``started``, ``resumed``,
  ``error`` {code, message, ref, id, retry_after}): v1 is the relay's native vocabulary,
  and the hub's stream logs hold v1 frames too;
* ``response_encoder`` returns, for one stream attached to a request, the ``ResponseEncoder``
  that turns the stream's v1 frames (``token``, ``reasoning``, ``tool_call_*``, ``finish``)
  into the dialect's frames; None means the v1 frames themselves (the relay's writer then
  merges token frames and re-addresses them without decoding them).

What a codec declares about its door (``handshake``, ``subprotocol``,
``per_request_credentials``) is read by the connection machine (``relay.core.connection``),
which alone decides the handshake, authentication, limits, every ``error`` and every close,
whatever the dialect. Adding a dialect is one codec module plus one route
(``relay.runtime.routes``): no new error or close handling. CORE_API: see
docs/architecture.md.

This module imports nothing of the relay and no I/O (tests/test_layers.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .codec import DecodeLimits, FrameError
from .frames import Frame
from .messages import Resume, Start

__all__ = [
    "Begin", "Codec", "Greet", "Handshake", "Ignore", "Malformed", "Probe", "Reattach",
    "Request", "ResponseEncoder", "Stop",
]


class Handshake(enum.Enum):
    """How a connection of a dialect starts."""

    #: The first frame must be a greeting (``Greet``); credentials come in the upgrade's
    #: ``Authorization`` header, else in the greeting's token. Answered by ``welcome``.
    HELLO = "hello"
    #: No greeting: the connection is served from its first request on. Credentials come
    #: in the upgrade's ``Authorization`` header, else (``per_request_credentials``) in each
    #: request (``Begin.authorization`` / ``Reattach.authorization``).
    NONE = "none"


# ---------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Greet:
    """The greeting of a ``Handshake.HELLO`` dialect (v1 ``hello``); ``token``: its
    credential, if any."""

    token: str | None = None
    ref: str = "hello"


@dataclass(frozen=True, slots=True)
class Begin:
    """Start a stream. ``start``: the v1 ``start`` it means (validated with the decode
    limits), None when ``invalid`` says why it cannot be built (answered ``bad_request``,
    after the request's credentials are checked). ``id``: the stream's id on this
    connection (the request's); ``ref``: the frame's type as the dialect names it;
    ``authorization``: the request's own ``Authorization`` value (per-request credentials);
    ``context``: the decoded frame, for the dialect's runtime adapter."""

    id: str
    start: Start | None
    ref: str = "start"
    authorization: str | None = None
    invalid: str | None = None
    context: object = None


@dataclass(frozen=True, slots=True)
class Stop:
    """Cancel the stream ``id`` of this connection. ``strict``: an id not running here is
    answered ``unknown_stream`` (v1 ``cancel``); otherwise ignored (AI SDK ``abort``)."""

    id: str
    ref: str = "cancel"
    strict: bool = True


@dataclass(frozen=True, slots=True)
class Reattach:
    """Attach a stream that runs or is retained (resume). ``resume``: the v1 ``resume`` when
    the frame names the stream; None when the dialect's runtime adapter finds it from
    ``context`` (the AI SDK's chat id). ``id``: the stream's id on this connection, when
    the frame names one."""

    id: str | None
    resume: Resume | None = None
    ref: str = "resume"
    authorization: str | None = None
    context: object = None


@dataclass(frozen=True, slots=True)
class Probe:
    """A keep-alive asking for an answer (v1 ``ping``): answered ``pong`` with ``data``."""

    data: Any = None        # Any: the ping's JSON, echoed as given
    ref: str = "ping"


@dataclass(frozen=True, slots=True)
class Ignore:
    """A valid frame that needs no answer."""

    ref: str = "ignored"


@dataclass(frozen=True, slots=True)
class Malformed:
    """A frame that cannot be honoured: ``error`` says why (its code, message, ``ref`` and
    the request ``id`` it names, if any). ``answerable``: an ``error`` reply can reach the
    client; when False (the dialect cannot correlate an answer without an id) the
    connection is closed 1008 instead."""

    error: FrameError
    answerable: bool = True
    ref: str = "malformed"


Request = Greet | Begin | Stop | Reattach | Probe | Ignore | Malformed


# ---------------------------------------------------------------------------- codecs


@runtime_checkable
class ResponseEncoder(Protocol):
    """The dialect's frames for one stream attached to one request, fed the stream's v1
    frames in order from its first (a replay feeds the whole log again to a fresh one)."""

    def feed(self, v1_frames: list[Frame], *, more: bool = False) -> list[Frame]:
        """The frames for these consecutive v1 frames. ``more``: further frames follow at
        once (an encoder may hold text back to merge it with them)."""
        ...


@runtime_checkable
class Codec(Protocol):
    """One wire dialect (module docstring). Instances are stateless and shared by every
    connection of the dialect."""

    #: Names the dialect in logs ("llm-relay.v1", "ai-sdk").
    name: str
    #: Words naming a frame of the dialect in a log line ("" for v1: "a start frame";
    #: "ai-sdk " for the AI SDK: "an ai-sdk send frame").
    log_prefix: str
    handshake: Handshake
    #: The WebSocket subprotocol a connection must have negotiated (else close 4406), or
    #: None when the dialect uses none.
    subprotocol: str | None
    #: Requests may carry their own credentials (``Handshake.NONE`` only).
    per_request_credentials: bool

    def decode(self, raw: str | bytes, limits: DecodeLimits, default_model: str) -> Request:
        """The request ``raw`` makes; never raises for client input. ``default_model``:
        the alias a dialect whose requests may omit a model uses."""
        ...

    def encode_reply(self, frame: Frame) -> Frame | None:
        """This dialect's frame for a reply of the core (a v1 server frame), or None."""
        ...

    def response_encoder(self, id: str, stream_key: str,
                         request: Begin | Reattach) -> ResponseEncoder | None:
        """The encoder of the stream ``stream_key`` attached as ``id`` for ``request``, or
        None to send its v1 frames as they are."""
        ...
