"""PROTOCOL.md and the code stay in step: the spec names every frame type, error code, close
code, finish status/reason and allowed param the code knows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import protocol
from protocol import ALLOWED_PARAMS, CloseCode, ErrorCode, FinishReason, FinishStatus
from protocol.codec import _CLIENT_TYPES, _SERVER_TYPES

SPEC = (Path(protocol.__file__).parent / "PROTOCOL.md").read_text(encoding="utf-8")
FRAME_TYPES = sorted(set(_CLIENT_TYPES) | set(_SERVER_TYPES))


def test_frame_types_known():
    assert set(FRAME_TYPES) == {"hello", "welcome", "start", "started", "token", "reasoning",
                                "tool_call_chunk", "tool_call_complete", "finish", "cancel",
                                "ping", "pong", "error", "resume", "resumed"}


@pytest.mark.parametrize("ftype", FRAME_TYPES)
def test_every_frame_type_has_a_section(ftype):
    assert re.search(rf"^### `{ftype}`$", SPEC, re.M), f"PROTOCOL.md: no section for {ftype}"
    assert f'"type": "{ftype}"' in SPEC, f"PROTOCOL.md: no JSON example of {ftype}"


@pytest.mark.parametrize("code", [e.value for e in ErrorCode])
def test_every_error_code_is_documented(code):
    assert re.search(rf"^\| `{code}` \|", SPEC, re.M), f"PROTOCOL.md: {code} not in the table"


@pytest.mark.parametrize("code", list(CloseCode), ids=lambda c: str(int(c)))
def test_every_close_code_is_documented(code):
    row = re.search(rf"^\| {int(code)} \| `{code.name}` \| (yes|no)\b", SPEC, re.M)
    assert row, f"PROTOCOL.md: close code {int(code)} missing from the table"
    assert (row.group(1) == "yes") is code.retryable, f"retry column of {int(code)}"


@pytest.mark.parametrize("value", [s.value for s in FinishStatus] +
                         [r.value for r in FinishReason])
def test_every_finish_status_and_reason_is_documented(value):
    assert f"`{value}`" in SPEC


@pytest.mark.parametrize("key", ALLOWED_PARAMS)
def test_every_allowed_param_is_documented(key):
    assert re.search(rf"^\| `{key}` \|", SPEC, re.M)


def test_version_and_path():
    assert f"`{protocol.PROTOCOL_VERSION}`" in SPEC
    assert "`/ws`" in SPEC
    assert "python -m protocol.schema --write" in SPEC
