"""Close codes, error codes and finish statuses/reasons, exactly as PROTOCOL.md documents them."""

from __future__ import annotations

import pytest

from llm_relay_protocol import CloseCode, ErrorCode, FinishReason, FinishStatus

# PROTOCOL.md, "Close codes": code -> should a client reconnect?
RETRY = {
    4400: False,  # protocol violation
    4401: False,  # not authenticated: not without new credentials
    4406: False,  # unsupported version
    4408: True,   # hello timeout
    4429: True,   # too many connections or frames, with backoff
    4008: True,   # slow consumer
    1001: True,   # going away
    1009: False,  # message too big
    1011: True,   # internal error, with backoff
    1012: True,   # service restart, resume
}


def test_close_codes_are_exactly_the_documented_ones():
    assert {int(c) for c in CloseCode} == set(RETRY)


@pytest.mark.parametrize("code", sorted(RETRY))
def test_close_code_retryable(code):
    assert CloseCode(code).retryable is RETRY[code]


@pytest.mark.parametrize("code", list(CloseCode))
def test_close_code_has_a_meaning(code):
    assert isinstance(code.meaning, str) and code.meaning


def test_close_code_names():
    assert {c.name: int(c) for c in CloseCode} == {
        "GOING_AWAY": 1001, "MESSAGE_TOO_BIG": 1009, "INTERNAL_ERROR": 1011,
        "SERVICE_RESTART": 1012, "SLOW_CONSUMER": 4008, "PROTOCOL_VIOLATION": 4400,
        "NOT_AUTHENTICATED": 4401, "UNSUPPORTED_VERSION": 4406, "HELLO_TIMEOUT": 4408,
        "TOO_MANY": 4429,
    }


def test_application_close_codes_are_in_the_private_range():
    # RFC 6455: 4000-4999 are for applications; the others are registered codes.
    for code in CloseCode:
        assert 4000 <= code <= 4999 or code in (1001, 1009, 1011, 1012)


def test_error_code_values():
    assert [e.value for e in ErrorCode] == [
        "bad_request", "unknown_model", "duplicate_id", "too_many_streams", "unknown_stream",
        "stream_lost", "stream_taken_over", "store_unavailable", "upstream_error", "upstream_timeout", "upstream_rate_limited", "upstream_overloaded", "rate_limited",
        "draining", "internal_error",
    ]
    # StrEnum: the member is the wire string itself.
    assert ErrorCode.BAD_REQUEST == "bad_request" and str(ErrorCode.DRAINING) == "draining"


def test_finish_statuses():
    assert [s.value for s in FinishStatus] == ["completed", "cancelled", "failed", "timeout"]


def test_finish_reasons():
    assert [r.value for r in FinishReason] == [
        "stop", "length", "tool_calls", "content_filter",
        "client_cancel", "client_disconnect", "server_shutdown",
        "first_token_timeout", "idle_timeout", "total_timeout",
    ]
    # A failed finish uses the error code as its reason: the two sets never collide.
    assert not {r.value for r in FinishReason} & {e.value for e in ErrorCode}
