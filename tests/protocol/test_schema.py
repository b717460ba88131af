"""The committed JSON Schema is what the models produce."""

from __future__ import annotations

import json

import llm_relay_protocol.schema
from llm_relay_protocol.schema import SCHEMA_PATH, json_schema, render

CLIENT_TYPES = {"hello", "start", "cancel", "ping", "resume"}
SERVER_TYPES = {"welcome", "started", "resumed", "token", "reasoning", "refusal",
                "tool_call_chunk",
                "tool_call_complete", "finish", "error", "pong"}


def test_committed_schema_is_current():
    committed = SCHEMA_PATH.read_text(encoding="utf-8")
    assert committed == render(), (
        "clients/python/llm_relay_protocol/schema.json is stale: run `python -m llm_relay_protocol.schema --write` and commit it"
    )


def test_schema_is_valid_json_with_both_directions():
    schema = json.loads(render())
    assert schema == json_schema()
    assert schema["title"] == "llm-relay.v1 frames"
    for key, types in (("client_to_server", CLIENT_TYPES), ("server_to_client", SERVER_TYPES)):
        part = schema[key]
        assert set(part["discriminator"]["mapping"]) == types
        assert len(part["oneOf"]) == len(types)


def test_params_schema_is_the_allowlist():
    params = json_schema()["client_to_server"]["$defs"]["Params"]
    assert params["additionalProperties"] is False
    assert set(params["properties"]) == set(llm_relay_protocol.ALLOWED_PARAMS)


def test_main_prints_without_writing(capsys, monkeypatch):
    def no_write(*args, **kwargs):
        raise AssertionError("must not write without --write")

    monkeypatch.setattr(type(SCHEMA_PATH), "write_text", no_write)
    assert llm_relay_protocol.schema.main([]) == 0
    assert capsys.readouterr().out == render()
