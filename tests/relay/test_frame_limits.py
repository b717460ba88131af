"""Inbound frames never starve the event loop nor produce tracebacks (issue 10, items 3, 11,
12), against the real relay on a real socket:

- frames beyond the decode limits (size, counts, containers) get ``error`` ``bad_request``
  naming the limit, with no ERROR log, and the connection keeps serving;
- the limits come from the relay's settings;
- JSON nested 255-1023 levels deep (ping data, content parts, tool parameters) is
  ``bad_request``, not ``internal_error`` plus a traceback;
- a stream id with a newline is ``bad_request`` and a client-chosen string that reaches the
  text log (a token's ``sub``) stays on one line.

That these refusals happen before validation is asserted in
tests/protocol/test_decode_limits.py; bench/attack_latency.py measures the latency they buy."""

from __future__ import annotations

import json
import logging

import pytest

from llm_relay_protocol import DecodeLimits
from relay.core.auth import mint_token
from relay.logs import TextFormatter

from .helpers import Client, start_relay
from .test_bad_input import assert_still_serving

SECRET = "frame-limits-test-secret-0123456789abcdef"


def start_frame(id: str = "big", **fields) -> dict:
    frame = {"type": "start", "id": id, "model": "demo",
             "messages": [{"role": "user", "content": "hi"}]}
    frame.update(fields)
    return frame


def deep_text(frame: dict, depth: int) -> str:
    """``frame`` as text with its string ``"DEEP"`` replaced by ``depth`` nested arrays."""
    return json.dumps(frame).replace('"DEEP"', "[" * depth + "]" * depth)


def errors_logged(caplog) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


async def assert_keeps_serving(c: Client) -> None:
    await assert_still_serving(c)
    await c.start("after", params={"max_tokens": 2})
    assert (await c.collect("after"))[-1]["status"] == "completed"


# Each within the default 1 MiB frame limit, each beyond one default decode limit.
BEYOND_DEFAULT_LIMITS = {
    "55000 empty messages (issue 10)": (
        start_frame(messages=[{"role": "user"}] * 55_000), "max_json_containers"),
    "2001 messages": (
        start_frame(messages=[{"role": "user", "content": ""}] * 2001), "max_messages"),
    "129 tools": (
        start_frame(tools=[{"type": "function", "function": {"name": "f"}}] * 129),
        "max_tools"),
    "4005 content parts": (
        start_frame(messages=[{"role": "user", "content": [{}] * 5}] * 801),
        "max_content_parts"),
    "20400 message keys": (
        start_frame(messages=[{"role": "user", **{f"k{i}": 0 for i in range(11)}}] * 1700),
        "max_start_keys"),
    "600 KiB of content": (
        start_frame(messages=[{"role": "user", "content": "x" * (600 << 10)}]),
        "max_messages_bytes"),
}


@pytest.mark.parametrize("name", list(BEYOND_DEFAULT_LIMITS))
async def test_frames_beyond_the_decode_limits_get_bad_request_and_no_error_log(caplog, name):
    caplog.set_level(logging.INFO, logger="relay")
    frame, limit = BEYOND_DEFAULT_LIMITS[name]
    data = json.dumps(frame, separators=(",", ":"))
    assert len(data.encode()) <= 1 << 20
    async with start_relay() as server, Client.connect(server.url) as c:
        await c.send(data)
        err = await c.next_for("big") if limit != "max_json_containers" else await c.recv()
        assert (err["type"], err["code"]) == ("error", "bad_request"), err
        assert f"({limit})" in err["message"], err
        await assert_keeps_serving(c)
    assert errors_logged(caplog) == []


async def test_decode_limits_come_from_the_settings():
    async with start_relay(max_messages=3, max_tools=1, max_content_parts=2,
                           max_start_keys=24, max_json_depth=6,
                           max_json_containers=64) as server, \
            Client.connect(server.url) as c:
        tool = {"type": "function", "function": {"name": "f"}}
        part = {"type": "text", "text": "a"}
        cases = [
            (start_frame(messages=[{"role": "user", "content": "a"}] * 4), "max_messages", "3"),
            (start_frame(tools=[tool, tool]), "max_tools", "1"),
            (start_frame(messages=[{"role": "user", "content": [part] * 3}]),
             "max_content_parts", "2"),
            (start_frame(messages=[{"role": "user", **{f"k{i}": 0 for i in range(24)}}]),
             "max_start_keys", "24"),
            ({"type": "ping", "data": [[[[[[1]]]]]]}, "max_json_depth", "6"),
            ({"type": "ping", "data": [[]] * 64}, "max_json_containers", "64"),
        ]
        for frame, limit, number in cases:
            await c.send(frame)
            err = await c.recv()
            assert err["code"] == "bad_request" and f"({limit})" in err["message"], err
            assert number in err["message"], err
        # at every limit: served
        await c.start("ok", messages=[{"role": "user", "content": [part] * 2},
                                      {"role": "assistant", "content": "b"},
                                      {"role": "user", "content": "a"}],
                      tools=[tool], params={"max_tokens": 2})
        assert (await c.collect("ok"))[-1]["status"] == "completed"


DEEP_PLACES = {
    "ping data": {"type": "ping", "data": "DEEP"},
    "content part": start_frame(messages=[{"role": "user",
                                           "content": [{"type": "text", "text": "DEEP"}]}]),
    "tool parameters": start_frame(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": "DEEP"}}}]),
}


@pytest.mark.parametrize("depth", [255, 600, 1023])
@pytest.mark.parametrize("place", list(DEEP_PLACES))
async def test_deeply_nested_json_is_bad_request_without_a_traceback(caplog, place, depth):
    caplog.set_level(logging.INFO, logger="relay")
    async with start_relay() as server, Client.connect(server.url) as c:
        await c.send(deep_text(DEEP_PLACES[place], depth))
        err = await c.recv()
        assert (err["type"], err["code"]) == ("error", "bad_request"), err
        assert "deeper than 32 levels (max_json_depth)" in err["message"], err
        await assert_keeps_serving(c)
    assert errors_logged(caplog) == []


@pytest.mark.parametrize("bad_id", ["s\n2026-12-01 00:00:00,000 ERROR relay.runtime.hub: forged",
                                    "s\r\nx", "s\x1b[2J", "s\u2028x", "s\x00"])
async def test_stream_id_with_control_characters_is_bad_request_and_never_logged(caplog,
                                                                                   bad_id):
    caplog.set_level(logging.DEBUG, logger="relay")
    async with start_relay() as server, Client.connect(server.url) as c:
        await c.start(bad_id)
        err = await c.next_for(bad_id)
        assert (err["code"], err["ref"]) == ("bad_request", "start"), err
        assert "control characters" in err["message"], err
        for frame in ({"type": "cancel", "id": bad_id},
                      {"type": "resume", "stream_key": "k", "after_seq": 0, "id": bad_id}):
            await c.send(frame)
            err = await c.next_for(bad_id)
            assert (err["code"], err["ref"]) == ("bad_request", frame["type"]), err
        await assert_keeps_serving(c)
    assert not [r for r in caplog.records
                if any(bad_id in str(value) for value in vars(r).values())]


async def test_text_log_escapes_control_characters_in_client_chosen_strings(caplog):
    """A signed token's ``sub`` is the client's principal name and is logged with every
    stream: in the text log it stays on its one line, its control characters escaped."""
    caplog.set_level(logging.INFO, logger="relay")
    sub = "alice\n2026-12-01 00:00:00,000 ERROR relay.runtime.hub: forged\x1b[2J"
    async with start_relay(auth=True, token_secret=SECRET) as server, \
            Client.connect(server.url, hello=False) as c:
        await c.send({"type": "hello", "token": mint_token(SECRET, sub, 300)})
        assert (await c.recv())["type"] == "welcome"
        await c.start("s", params={"max_tokens": 2})
        assert (await c.collect("s"))[-1]["status"] == "completed"
    formatter = TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    lines = [formatter.format(r) for r in caplog.records if "alice" in str(vars(r))]
    assert any(r.getMessage() == "stream finished" for r in caplog.records
               if "alice" in str(vars(r))), "the principal was not logged with the stream"
    assert lines
    for line in lines:
        assert "\n" not in line and "\x1b" not in line, line
        assert "alice\\n2026-12-01" in line and "\\x1b[2J" in line, line


def test_cli_flags_set_the_decode_limits():
    from relay.cli import _build_parser
    from relay.config import RelaySettings

    args = _build_parser().parse_args([
        "serve", "--max-messages", "7", "--max-tools", "3", "--max-content-parts", "9",
        "--max-start-keys", "99", "--max-json-depth", "12", "--max-json-containers", "999",
        "--max-messages-bytes", "4096"])
    overrides = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    limits = RelaySettings(**overrides).decode_limits()
    assert (limits.max_messages, limits.max_tools, limits.max_content_parts,
            limits.max_start_keys, limits.max_json_depth, limits.max_json_containers,
            limits.max_messages_bytes) == (7, 3, 9, 99, 12, 999, 4096)
    defaults = RelaySettings().decode_limits()
    assert defaults == DecodeLimits(), "the relay's defaults and the decoder's must agree"
