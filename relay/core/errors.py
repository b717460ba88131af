"""The relay's own refusals, each carrying its wire code. The connection machine turns them
into ``error`` frames in one place (``relay.core.connection.error_frame_for``, fed by
``ActionFailed`` or by its own admission); nothing else builds error frames from exceptions.

    RelayError(code)                  -> error frame {code, message, ref, id}
      BadRequest                         bad_request
        NotAuthenticated                 bad_request (a dialect's request without usable
                                         credentials, relay.core.connection)
      UnknownModel                       unknown_model
      DuplicateId                        duplicate_id
      TooManyStreams                     too_many_streams
      UnknownStream                      unknown_stream
      StreamLost                         stream_lost
      Draining                           draining
      RateLimited                        rate_limited (with retry_after)

Provider failures are not exceptions at this level: the streamer ends the stream with a
``finish`` whose error comes from ``relay.upstream.errors``. A stream that ends by a bug of
the relay's ends ``failed``/``internal_error`` with ``RELAY_BUG_MESSAGE`` (the streamer's
``RELAY_BUG``, and the hub's fallback finish of a stream task that died without one).
"""

from __future__ import annotations

from llm_relay_protocol import ErrorCode

__all__ = [
    "RELAY_BUG_MESSAGE", "BadRequest", "Draining", "DuplicateId", "NotAuthenticated",
    "RateLimited", "RelayError", "StreamLost", "TooManyStreams", "UnknownModel", "UnknownStream",
]

#: The message of the ``internal_error`` that ends a stream cut short by a relay bug.
RELAY_BUG_MESSAGE = "the stream ended unexpectedly"


class RelayError(Exception):
    code: str = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, retry_after: float | None = None,
                 id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        #: The stream id the answer names, when the frame's own ``id`` is not it.
        self.id = id


class BadRequest(RelayError):
    code = ErrorCode.BAD_REQUEST


class NotAuthenticated(BadRequest):
    """A request of a dialect with per-request credentials (/ai-sdk) that carries none, or
    another principal's; the connection stays (relay.core.connection, per-request credentials)."""


class UnknownModel(RelayError):
    code = ErrorCode.UNKNOWN_MODEL


class DuplicateId(RelayError):
    code = ErrorCode.DUPLICATE_ID


class TooManyStreams(RelayError):
    code = ErrorCode.TOO_MANY_STREAMS


class UnknownStream(RelayError):
    code = ErrorCode.UNKNOWN_STREAM


class StreamLost(RelayError):
    code = ErrorCode.STREAM_LOST


class Draining(RelayError):
    code = ErrorCode.DRAINING


class RateLimited(RelayError):
    code = ErrorCode.RATE_LIMITED
