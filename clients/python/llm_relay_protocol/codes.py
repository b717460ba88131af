"""Close codes, error codes and the documented finish statuses/reasons of llm-relay.v1.

One enum per concept, so PROTOCOL.md, the server and the clients agree on one list.
``CloseCode.retryable`` tells a client whether reconnecting can help.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

__all__ = ["CloseCode", "ErrorCode", "FinishStatus", "FinishReason"]


class CloseCode(IntEnum):
    """WebSocket close codes of llm-relay.v1, with whether a client should reconnect. The relay
    sends every one of them except ``PROTOCOL_VIOLATION`` (see there)."""

    GOING_AWAY = 1001
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    SLOW_CONSUMER = 4008
    #: Never sent by the relay (a bad frame after ``welcome`` gets ``error`` ``bad_request``,
    #: a bad first frame closes 4401). Kept for the clients, which report a connection
    #: they cannot even attempt (an invalid URL) with it; final, like any unknown code.
    PROTOCOL_VIOLATION = 4400
    NOT_AUTHENTICATED = 4401
    UNSUPPORTED_VERSION = 4406
    HELLO_TIMEOUT = 4408
    TOO_MANY = 4429

    @property
    def retryable(self) -> bool:
        """True when reconnecting (with backoff) may succeed without the client changing anything."""
        return self in _RETRYABLE

    @property
    def meaning(self) -> str:
        """One line a UI can show."""
        return _MEANING[self]


_RETRYABLE = frozenset(
    {
        CloseCode.GOING_AWAY,
        CloseCode.INTERNAL_ERROR,
        CloseCode.SERVICE_RESTART,
        CloseCode.SLOW_CONSUMER,
        CloseCode.HELLO_TIMEOUT,
        CloseCode.TOO_MANY,
    }
)

_MEANING = {
    CloseCode.GOING_AWAY: "server going away (shutdown); reconnect",
    CloseCode.MESSAGE_TOO_BIG: "a frame exceeded max_frame_bytes; do not resend it",
    CloseCode.INTERNAL_ERROR: "internal server error; reconnect with backoff",
    CloseCode.SERVICE_RESTART: "server restarting; reconnect and resume",
    CloseCode.SLOW_CONSUMER: "client read too slowly; reconnect and resume",
    CloseCode.PROTOCOL_VIOLATION: "protocol violation; fix the client",
    CloseCode.NOT_AUTHENTICATED: "not authenticated; get new credentials first",
    CloseCode.UNSUPPORTED_VERSION: "unsupported protocol version",
    CloseCode.HELLO_TIMEOUT: "no hello in time; reconnect",
    CloseCode.TOO_MANY: "too many connections or frames; reconnect with backoff",
}


class ErrorCode(StrEnum):
    """``code`` of an ``error`` frame, and of ``finish.error`` for failed streams."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_MODEL = "unknown_model"
    DUPLICATE_ID = "duplicate_id"
    TOO_MANY_STREAMS = "too_many_streams"
    UNKNOWN_STREAM = "unknown_stream"
    STREAM_LOST = "stream_lost"
    STREAM_TAKEN_OVER = "stream_taken_over"
    STORE_UNAVAILABLE = "store_unavailable"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_RATE_LIMITED = "upstream_rate_limited"
    UPSTREAM_OVERLOADED = "upstream_overloaded"
    RATE_LIMITED = "rate_limited"
    DRAINING = "draining"
    INTERNAL_ERROR = "internal_error"


class FinishStatus(StrEnum):
    """``finish.status``: how a stream ended."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    TIMEOUT = "timeout"


class FinishReason(StrEnum):
    """``finish.reason``. For ``failed`` the reason is the error code instead."""

    # completed
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"
    # cancelled
    CLIENT_CANCEL = "client_cancel"
    CLIENT_DISCONNECT = "client_disconnect"
    SERVER_SHUTDOWN = "server_shutdown"
    # timeout
    FIRST_TOKEN_TIMEOUT = "first_token_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    TOTAL_TIMEOUT = "total_timeout"
