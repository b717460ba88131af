"""The seed's import path of its public API: ``from relay.streamer import TokenStreamer``
(README, "Use as a library"). The code is in ``relay/token_streamer.py``."""

from relay.token_streamer import TokenChunk, TokenStreamer

__all__ = ["TokenChunk", "TokenStreamer"]
