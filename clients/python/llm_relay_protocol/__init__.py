"""llm-relay.v1 protocol, sans I/O: frame models, codec, codes and version constants.

This package never imports asyncio, websockets or litellm (a test enforces it), so any
client or server, sync or async, can use it. The written spec is ``PROTOCOL.md`` beside it.
The relay's other wire dialects are codecs here too (``llm_relay_protocol.dialect`` says what a
dialect is; ``llm_relay_protocol.v1``, ``llm_relay_protocol.aisdk`` and ``llm_relay_protocol.responses``, the OpenAI
Responses WebSocket mode, are the three).
"""

from . import frames
from .codec import (
    DecodeLimits, FrameError, decode_client_frame, decode_relay_message, decode_server_frame,
    encode_frame,
)
from .codes import CloseCode, ErrorCode, FinishReason, FinishStatus
from .messages import *  # noqa: F403
from .messages import __all__ as _messages_all
from .version import PROTOCOL_VERSION, SUPPORTED_VERSIONS

__all__ = [
    "CloseCode", "DecodeLimits", "ErrorCode", "FinishReason", "FinishStatus", "FrameError",
    "PROTOCOL_VERSION", "SUPPORTED_VERSIONS", "decode_client_frame", "decode_relay_message",
    "decode_server_frame",
    "encode_frame", "frames", *_messages_all,
]
