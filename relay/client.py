"""The Python client moved to its own distribution, ``llm-relay-client`` (import
``llm_relay_client``), so an application can use it without installing the server.

This module stays so code written against ``relay.client`` keeps working; new code imports
:mod:`llm_relay_client`. It re-exports the public names of :mod:`llm_relay_client.client`.
"""

from __future__ import annotations

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

__all__ = [
    "CompletionResult",
    "ConnectionLost",
    "ConnectionState",
    "HandshakeFailed",
    "RelayClient",
    "RelayClientError",
    "RelayStream",
    "StreamEvent",
    "StreamRejected",
    "StreamTakenOver",
    "is_retryable_close",
]
