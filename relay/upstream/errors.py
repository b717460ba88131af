"""The one place that turns provider/LiteLLM exceptions into safe wire error codes.

Nothing from the provider's response body or the exception text reaches a client: messages
here are fixed sentences, so a key echoed in an upstream error body can never leak.

    UpstreamFailure(code, message, retry_after)
      code  upstream_error          401/403 (credentials), 5xx, cut stream, malformed data,
                                    a cap on upstream bytes exceeded (relay/upstream/caps.py:
                                    the message names the limit), any other provider failure
            upstream_rate_limited   429 (retry_after: seconds, when the provider says)
            upstream_overloaded     the provider says it is overloaded: Anthropic's 529 and its
                                    ``overloaded_error`` (also as an error event mid-stream),
                                    a 5xx whose error says "overloaded" (OpenAI's 503)
                                    (retry_after: seconds, when the provider says)
            upstream_timeout        a transport timeout inside LiteLLM/httpx
            bad_request             the provider rejected the request itself (400/404/422),
                                    or LiteLLM cannot tell which provider serves the model
                                    string (the message says how to write one)

Not every exception raised while a stream runs is the provider's: ``is_provider_failure``
tells a provider failure (an exception of the HTTP/provider libraries, a socket error, an
exception carrying an HTTP status, or one of ours marked ``ProviderStreamError``: a stream
cut before its finish, malformed provider data) from a bug in the relay's own code (a
``TypeError`` in our chunk handling, ...). A bug is never classified here: the streamer ends
the stream ``failed``/``internal_error`` with ``RELAY_BUG`` and logs the traceback.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass

from llm_relay_protocol import ErrorCode, frames

from relay.core.errors import RELAY_BUG_MESSAGE

__all__ = ["ProviderStreamError", "RELAY_BUG", "RETRYABLE_CONNECT_FAILURES",
           "UNROUTABLE_MODEL_MESSAGE", "UpstreamFailure", "classify_upstream_exception",
           "is_provider_failure"]

#: The codes of a failed provider *connect* that the opt-in ``retries_before_first_token``
#: tries again (the rule is PROTOCOL.md's, under ``finish``: "The relay does not retry a
#: provider request on its own"). ``bad_request`` (the same request would fail the same way)
#: and ``upstream_timeout`` are never tried again.
RETRYABLE_CONNECT_FAILURES = frozenset({ErrorCode.UPSTREAM_ERROR, ErrorCode.UPSTREAM_RATE_LIMITED,
                                        ErrorCode.UPSTREAM_OVERLOADED})

UNROUTABLE_MODEL_MESSAGE = (
    "LiteLLM cannot tell which provider serves this model: write it as 'provider/model' "
    "(e.g. 'openai/gpt-4o-mini', 'anthropic/claude-sonnet-4-5'), or use 'demo' for the "
    "built-in demo model"
)


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    code: str
    message: str
    retry_after: float | None = None

    def __post_init__(self) -> None:
        # A plain ``str`` (not the ErrorCode member): reasons and error codes read the same
        # in library use (``repr``, ``==``, JSON) whichever path produced them.
        object.__setattr__(self, "code", str(self.code))

    def as_error(self) -> dict:
        """The ``error`` object of the stream's ``finish`` (``llm_relay_protocol.ErrorInfo``)."""
        return frames.error_info(self.code, self.message, self.retry_after)


class ProviderStreamError(Exception):
    """Base of the relay's own exceptions that report what the *provider* did wrong (its
    stream ended before a finish reason, its data was malformed, it sent an error event):
    provider failures for ``is_provider_failure``, never relay bugs."""


#: Roots of the modules whose exceptions mean "calling or reading the provider failed".
_PROVIDER_MODULES = frozenset({
    "httpx", "httpcore", "h11", "h2", "anyio", "ssl", "aiohttp", "litellm", "openai",
    "anthropic", "google", "botocore", "boto3",
})


def is_provider_failure(exc: BaseException) -> bool:
    """True when ``exc`` says the provider (or the way to it) failed; False when it is a bug
    in the relay's own code (see the module docstring). Wrapped exceptions (LiteLLM's
    ``original_exception``) are judged by what they wrap, as ``classify_upstream_exception``
    does."""
    for candidate in (exc, _unwrap(exc)):
        if isinstance(candidate, (ProviderStreamError, OSError, EOFError, TimeoutError)):
            return True       # OSError: refused/reset sockets, DNS, TLS (ssl.SSLError)
        if _status_code(candidate) is not None:
            return True       # an HTTP answer of the provider, whatever raised it
        for cls in type(candidate).__mro__:
            if cls.__module__.partition(".")[0] in _PROVIDER_MODULES:
                return True
        if _raised_inside_provider_code(candidate):
            return True
    return False


def _raised_inside_provider_code(exc: BaseException) -> bool:
    """A built-in exception (ValueError, KeyError, ...) raised by the provider libraries'
    own code while reading the provider's data, e.g. LiteLLM's Groq parser doing
    ``int("server_error")`` on an in-stream error: judged by the innermost frame of its
    traceback, which belongs to one of ``_PROVIDER_MODULES`` and not to the relay."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return module.partition(".")[0] in _PROVIDER_MODULES


#: ``finish.error`` of a stream that a bug in the relay ended (the same code and wording as
#: the hub's fallback finish, with which a stream whose task died ends).
RELAY_BUG = UpstreamFailure(ErrorCode.INTERNAL_ERROR, RELAY_BUG_MESSAGE)


def classify_upstream_exception(exc: BaseException, *, mid_stream: bool = False) -> UpstreamFailure:
    """Map any exception raised while calling or reading the provider to a safe failure.

    ``mid_stream``: the provider's response had already started (headers received). A
    transport failure then means the stream was cut or garbled, not that the provider could
    not be reached (LiteLLM reports both as a connection error).
    """
    capped = _relay_message(exc)
    if capped is not None:
        return UpstreamFailure(ErrorCode.UPSTREAM_ERROR, capped)
    exc = _unwrap(exc)
    if type(exc).__name__ == "_Truncated":
        return UpstreamFailure(ErrorCode.UPSTREAM_ERROR,
                               "the provider's stream ended before it finished")
    status = _status_code(exc)
    name = type(exc).__name__
    if name == "BadRequestError" and "LLM Provider NOT provided" in str(exc):
        # LiteLLM refuses a model string without a provider before any request is made.
        return UpstreamFailure(ErrorCode.BAD_REQUEST, UNROUTABLE_MODEL_MESSAGE)
    if _overloaded(exc, status):
        # Before the mid-stream check: LiteLLM reports an error event inside the stream as a
        # connection error (status 500) whose text is the provider's error message.
        return UpstreamFailure(
            ErrorCode.UPSTREAM_OVERLOADED,
            "the provider is overloaded; retry later",
            _retry_after(exc),
        )
    if mid_stream and status in (None, 500) and (
            _connect_failed(exc) or name in _TRANSPORT_ERRORS):
        return _STREAM_FAILED
    if status in (401, 403) or name in ("AuthenticationError", "PermissionDeniedError"):
        return UpstreamFailure(
            ErrorCode.UPSTREAM_ERROR,
            "the provider rejected the relay's credentials (check the relay's key configuration)",
        )
    if status == 429 or name == "RateLimitError":
        return UpstreamFailure(
            ErrorCode.UPSTREAM_RATE_LIMITED,
            "the provider is rate limiting the relay; retry later",
            _retry_after(exc),
        )
    if name in ("Timeout", "ReadTimeout", "ConnectTimeout", "APITimeoutError") or status == 408:
        return UpstreamFailure(ErrorCode.UPSTREAM_TIMEOUT, "the provider timed out")
    if status in (None, 500) and _connect_failed(exc):
        # LiteLLM reports a refused/unresolvable connection as an InternalServerError with
        # status 500; no HTTP response ever came, so do not claim the provider said 500.
        return UpstreamFailure(ErrorCode.UPSTREAM_ERROR, "could not reach the provider")
    if status in (400, 404, 413, 422) or name in ("BadRequestError", "NotFoundError",
                                                  "UnprocessableEntityError",
                                                  "ContextWindowExceededError",
                                                  "UnsupportedParamsError"):
        return UpstreamFailure(
            ErrorCode.BAD_REQUEST, f"the provider rejected the request (HTTP {status or 400})"
        )
    if status is not None and status >= 500:
        return UpstreamFailure(
            ErrorCode.UPSTREAM_ERROR, f"the provider failed (HTTP {status})"
        )
    if name in ("APIConnectionError", "ServiceUnavailableError", "ConnectError"):
        return UpstreamFailure(ErrorCode.UPSTREAM_ERROR, "could not reach the provider")
    return _STREAM_FAILED


_STREAM_FAILED = UpstreamFailure(ErrorCode.UPSTREAM_ERROR,
                                 "the provider's stream failed (cut off or malformed)")
_TRANSPORT_ERRORS = frozenset({"ReadError", "RemoteProtocolError", "ClientPayloadError",
                               "TransferEncodingError"})
_CONNECT_ERRORS = frozenset({"ConnectError", "APIConnectionError", "ClientConnectorError",
                             "ConnectionRefusedError", "gaierror"})


#: Anthropic's "overloaded" status (not an IANA code; its error type is ``overloaded_error``).
_OVERLOADED_STATUS = 529


def _overloaded(exc: BaseException, status: int | None) -> bool:
    """True when the provider said it is overloaded: HTTP 529, or a server-side failure (5xx,
    or no status: an error event inside the stream, which LiteLLM reports as 500) whose error
    names it (Anthropic's ``overloaded_error``, OpenAI's 503 "... currently overloaded ...").
    The exception text is only searched, never shown to anyone."""
    if status == _OVERLOADED_STATUS:
        return True
    if status is not None and status < 500:
        return False
    try:
        text = str(exc)
    except Exception:  # an exception whose __str__ fails: not one we can read
        return False
    return "overloaded" in text.lower()


def _relay_message(exc: BaseException) -> str | None:
    """The ``wire_message`` of a ``ProviderStreamError`` in the exception's chain (wrapped
    by LiteLLM or the OpenAI SDK or not): a sentence the relay wrote about what the provider
    sent (a cap exceeded, a malformed stream), safe for the client."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 10:
        seen.add(id(current))
        message = getattr(current, "wire_message", None)
        if isinstance(current, ProviderStreamError) and isinstance(message, str):
            return message
        inner = getattr(current, "original_exception", None)
        current = (inner if isinstance(inner, BaseException) else None) \
            or current.__cause__ or current.__context__
    return None


def _connect_failed(exc: BaseException) -> bool:
    """True when the exception chain shows the connection to the provider never opened."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 10:
        seen.add(id(current))
        if type(current).__name__ in _CONNECT_ERRORS:
            return True
        current = current.__cause__ or current.__context__
    return False


def _unwrap(exc: BaseException) -> BaseException:
    # LiteLLM wraps mid-stream failures in MidStreamFallbackError(original_exception=...).
    for _ in range(4):
        inner = getattr(exc, "original_exception", None)
        if not isinstance(inner, BaseException):
            break
        if _status_code(exc) not in (None, 500, 503) and _status_code(inner) is None:
            break
        exc = inner
    return exc


def _status_code(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _retry_after(exc: BaseException) -> float | None:
    """Seconds from a Retry-After (or retry-after-ms) header, wherever LiteLLM kept it."""
    for headers in _header_sources(exc):
        try:
            ms = headers.get("retry-after-ms")
            if ms is not None:
                return max(0.0, float(ms) / 1000.0)
            value = headers.get("retry-after")
        except Exception:  # a header container we do not understand: try the next one
            continue
        if value is None:
            continue
        parsed = _parse_retry_after(str(value))
        if parsed is not None:
            return parsed
    return None


def _header_sources(exc: BaseException):
    seen = set()
    candidates = [exc, getattr(exc, "original_exception", None)]
    for obj in candidates:
        if obj is None:
            continue
        for attr in ("litellm_response_headers", "headers"):
            h = getattr(obj, attr, None)
            if h is not None and id(h) not in seen:
                seen.add(id(h))
                yield _lower(h)
        response = getattr(obj, "response", None)
        h = getattr(response, "headers", None)
        if h is not None and id(h) not in seen:
            seen.add(id(h))
            yield _lower(h)


def _lower(headers) -> dict:
    try:
        return {str(k).lower(): v for k, v in dict(headers).items()}
    except Exception:
        return {}


def _parse_retry_after(value: str) -> float | None:
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
