"""llm-relay-client: the async Python client of the llm-relay.v1 WebSocket protocol.

    from llm_relay_client import RelayClient, Token

    async with RelayClient("ws://127.0.0.1:8765/ws", token="...") as client:
        async for event in client.stream("demo", [{"role": "user", "content": "hi"}]):
            if isinstance(event, Token):
                print(event.text, end="")

The client itself (reconnect, resume, the contracts) is :mod:`llm_relay_client.client`; the
frames it yields are the protocol package's frozen pydantic models, re-exported here so an
application needs one import. The protocol package (sans-I/O: frame models, codec, codes, the
shared client policy) ships in the same distribution; the relay server depends on it.

Runtime dependencies: websockets, pydantic and orjson only.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from llm_relay_protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    Finish,
    Reasoning,
    Refusal,
    Started,
    Token,
    ToolCallChunk,
    ToolCallComplete,
    Usage,
    Welcome,
)

from llm_relay_client.client import (
    CompletionResult,
    ConnectionLost,
    ConnectionState,
    HandshakeFailed,
    RelayClient,
    RelayClientError,
    RelayStream,
    StreamEvent,
    StreamRejected,
    StreamTakenOver,
    is_retryable_close,
)

try:
    __version__ = version("llm-relay-client")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "PROTOCOL_VERSION",
    "CompletionResult",
    "ConnectionLost",
    "ConnectionState",
    "ErrorCode",
    "Finish",
    "HandshakeFailed",
    "Reasoning",
    "Refusal",
    "RelayClient",
    "RelayClientError",
    "RelayStream",
    "Started",
    "StreamEvent",
    "StreamRejected",
    "StreamTakenOver",
    "Token",
    "ToolCallChunk",
    "ToolCallComplete",
    "Usage",
    "Welcome",
    "__version__",
    "is_retryable_close",
]
