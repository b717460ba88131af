"""llm-relay.v1 as a dialect (``llm_relay_protocol.dialect.Codec``): the relay's native protocol on ``/ws``.

Decoding is ``llm_relay_protocol.codec.decode_client_frame`` (its limits before validation, its precise
errors); each client frame maps to one request of the core (``hello`` -> ``Greet``,
``start`` -> ``Begin``, ``cancel`` -> ``Stop``, ``resume`` -> ``Reattach``, ``ping`` ->
``Probe``). Replies and stream frames are v1 already: ``encode_reply`` returns them as they
are and ``response_encoder`` is None (the writer merges token frames and re-addresses the
logged bytes, ``relay.core.streamlog.coalesce``).
"""

from __future__ import annotations

from .codec import DecodeLimits, FrameError, decode_client_frame
from .dialect import Begin, Greet, Handshake, Ignore, Malformed, Probe, Reattach, Request, Stop
from .frames import Frame
from .messages import Cancel, Hello, Ping, Resume, Start
from .version import PROTOCOL_VERSION

__all__ = ["V1Codec"]


class V1Codec:
    """llm-relay.v1 (module docstring)."""

    name = PROTOCOL_VERSION
    log_prefix = ""
    handshake = Handshake.HELLO
    subprotocol: str | None = PROTOCOL_VERSION
    per_request_credentials = False

    def decode(self, raw: str | bytes, limits: DecodeLimits, default_model: str) -> Request:
        try:
            msg = decode_client_frame(raw, limits)
        except FrameError as exc:
            return Malformed(exc)
        if isinstance(msg, Start):
            return Begin(msg.id, msg)
        if isinstance(msg, Cancel):
            return Stop(msg.id)
        if isinstance(msg, Resume):
            return Reattach(msg.id, msg)
        if isinstance(msg, Ping):
            return Probe(msg.data)
        if isinstance(msg, Hello):
            return Greet(msg.token)
        return Ignore(getattr(msg, "type", "ignored"))   # decoded, but needs no answer

    def encode_reply(self, frame: Frame) -> Frame:
        return frame

    def response_encoder(self, id: str, stream_key: str, request: Begin | Reattach) -> None:
        return None
