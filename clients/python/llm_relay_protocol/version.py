"""Protocol version constants.

The version travels in the WebSocket subprotocol (``Sec-WebSocket-Protocol``). A version is
never changed in place: new frame types and fields are additions; renames need a new version.
"""

__all__ = ["PROTOCOL_VERSION", "SUPPORTED_VERSIONS"]

PROTOCOL_VERSION = "llm-relay.v1"

#: Every version this implementation speaks, most preferred first.
SUPPORTED_VERSIONS: tuple[str, ...] = (PROTOCOL_VERSION,)
