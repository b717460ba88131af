"""A stream's outcome is a typed value (relay.core.outcome) that becomes the wire's
``finish`` frame only where it is logged, and reads back from that frame unchanged (a
follower reads it from Redis)."""

from __future__ import annotations

import json

import jsonschema
import orjson
import pytest

from llm_relay_protocol import ErrorCode, FinishReason, FinishStatus
from llm_relay_protocol.messages import Finish
from llm_relay_protocol.schema import SCHEMA_PATH
from relay.core.outcome import FinishError, StreamOutcome, TokenUsage

OUTCOMES = [
    StreamOutcome(FinishStatus.COMPLETED, FinishReason.STOP, TokenUsage(3, 5, False)),
    StreamOutcome(FinishStatus.CANCELLED, FinishReason.CLIENT_CANCEL, TokenUsage(3, 0, True)),
    StreamOutcome(FinishStatus.FAILED, ErrorCode.UPSTREAM_RATE_LIMITED, TokenUsage(0, 0, True),
                  FinishError(ErrorCode.UPSTREAM_RATE_LIMITED, "slow down", 2.5)),
    StreamOutcome(FinishStatus.TIMEOUT, FinishReason.IDLE_TIMEOUT, TokenUsage(1, 2, True),
                  FinishError(ErrorCode.UPSTREAM_TIMEOUT, "no data for 30 s")),
    StreamOutcome.relay_bug("a relay bug"),
]


@pytest.mark.parametrize("outcome", OUTCOMES, ids=lambda o: str(o.status))
def test_an_outcome_becomes_a_valid_finish_frame_and_reads_back_unchanged(outcome):
    frame = outcome.frame("q1", 7)
    assert (frame["type"], frame["id"], frame["seq"]) == ("finish", "q1", 7)
    assert frame["usage"]["total_tokens"] == outcome.usage.total_tokens
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))["server_to_client"]
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(frame)) == []
    Finish.model_validate(frame)
    # As a follower reads it: the owner's encoding, from Redis.
    assert StreamOutcome.of_frame(orjson.loads(orjson.dumps(frame))) == outcome
