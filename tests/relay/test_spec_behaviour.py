"""Normative statements of clients/python/llm_relay_protocol/PROTOCOL.md that no other relay test drives, driven here
through the real server on a real socket. tests/protocol/test_spec.py maps every section of
the spec to the tests that show it (these and the ones in the other tests/relay files).

Where the spec gives a literal example (the bad-input table, the example session), the test
reads it from PROTOCOL.md, so the document cannot drift from what the relay answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import llm_relay_protocol
from llm_relay_protocol import decode_server_frame
from relay.upstream.demo import demo_reply_tokens

from .helpers import Client, start_relay
from .test_core import SEARCH_TOOL
from .test_resume import _StreamerThatBreaks

SPEC = (Path(llm_relay_protocol.__file__).parent / "PROTOCOL.md").read_text(encoding="utf-8")
HI = [{"role": "user", "content": "hi"}]


def _section(title: str) -> str:
    """The text of the PROTOCOL.md section headed ``title`` (up to the next heading)."""
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", SPEC, re.M | re.S)
    assert match, f"PROTOCOL.md has no section {title!r}"
    return match.group(1)


def _assert_no_nulls(frame: dict, path: str = "") -> None:
    """"The server omits optional fields rather than sending null" (pong data and the
    provider's own JSON aside, which the spec passes through unchanged)."""
    for key, value in frame.items():
        assert value is not None, f"{frame.get('type', path)}: {path}{key} is null"
        if isinstance(value, dict) and key != "data":
            _assert_no_nulls(value, f"{path}{key}.")


# ------------------------------------------------------------------ Version negotiation

async def test_the_server_selects_v1_among_other_offered_subprotocols():
    """"The client MUST offer llm-relay.v1. It MAY offer other values as well; the server
    selects the first version it supports and echoes it." """
    async with start_relay() as server, \
            Client.connect(server.url, subprotocols=["chat", "llm-relay.v2", "llm-relay.v1",
                                                     "llm-relay.v0"]) as c:
        assert c.ws.subprotocol == "llm-relay.v1"
        assert c.welcome["protocol"] == "llm-relay.v1"


# ------------------------------------------------------------------ Handshake

async def test_frames_sent_right_after_hello_are_handled_in_order_after_welcome():
    """"A client MAY send further frames right after hello without waiting for welcome;
    they are handled, in order, after welcome has been sent." """
    async with start_relay(demo_tps=20) as server, \
            Client.connect(server.url, hello=False) as c:
        for frame in ({"type": "hello"}, {"type": "ping", "data": 1},
                      {"type": "start", "id": "q1", "model": "demo", "messages": HI},
                      {"type": "ping", "data": 2}, {"type": "cancel", "id": "q1"}):
            await c.send(frame)
        order = []
        while not order or order[-1] != "finish":
            frame = await c.recv()
            if frame["type"] != "token":        # stream frames interleave freely
                order.append(frame["type"] if frame["type"] != "pong"
                             else f"pong{frame['data']}")
        assert order[:4] == ["welcome", "pong1", "started", "pong2"], order
        assert order.count("finish") == 1


# ------------------------------------------------------------------ Streams, ids and seq

async def test_a_stream_id_may_be_reused_once_its_finish_was_received():
    """"The id MUST be unique among the connection's running streams; an id MAY be reused
    once its finish has been received." """
    async with start_relay() as server, Client.connect(server.url) as c:
        for _ in range(2):
            await c.start("same")
            frames = await c.collect("same")
            assert frames[0]["type"] == "started" and frames[-1]["status"] == "completed"


async def test_seqs_are_consecutive_without_merging_and_only_stream_frames_carry_one():
    """Gaps come only from merging: a client that keeps up sees seq 0, 1, 2, ... on a text
    stream and on a tool-call stream; ``welcome``, ``pong`` and ``error`` carry no seq.
    (PROTOCOL.md said suppressed events leave gaps; they take no seq at all.)"""
    async with start_relay() as server, Client.connect(server.url) as c:
        assert "seq" not in c.welcome
        await c.start("text")
        text = await c.collect("text")
        await c.start("tool", messages=[{"role": "user", "content": "weather in Paris"}],
                      tools=[SEARCH_TOOL], tool_choice="auto")
        tool = await c.collect("tool")
        await c.send({"type": "ping"})
        await c.send({"type": "cancel", "id": "nope"})
        assert "seq" not in await c.next_for(None)
        assert "seq" not in await c.next_for("nope")
    for frames in (text, tool):
        assert [f["seq"] for f in frames] == list(range(len(frames))), frames
    assert {f["type"] for f in tool} >= {"tool_call_chunk", "tool_call_complete"}


async def test_tool_call_events_after_a_cancel_take_no_seq():
    """A cancel while the provider streams a tool call: the tool-call events the relay no
    longer sends take no seq, so the finish follows the last sent frame without a gap."""
    async with start_relay(demo_tps=5) as server, Client.connect(server.url) as c:
        await c.start("tool", messages=[{"role": "user", "content": "weather in Paris"}],
                      tools=[SEARCH_TOOL], tool_choice="auto")
        frames = [await c.next_for("tool")]
        frames.append(await c.next_for("tool"))
        assert frames[-1]["type"] == "tool_call_chunk", frames
        await c.send({"type": "cancel", "id": "tool"})
        while frames[-1]["type"] != "finish":
            frames.append(await c.next_for("tool"))
    assert frames[-1]["status"] == "cancelled"
    assert "tool_call_complete" not in {f["type"] for f in frames}
    assert [f["seq"] for f in frames] == list(range(len(frames))), frames


# ------------------------------------------------------------------ Frames

async def test_every_server_frame_matches_the_models_and_has_no_null_optional_field():
    """"the server omits optional fields rather than sending null"; every frame the relay
    sends in a session with text, tools, a cancel, refusals and pongs validates against
    the models the JSON Schema is generated from; every finish carries a reason."""
    async with start_relay(demo_tps=20) as server, Client.connect(server.url) as c:
        seen = [c.welcome]
        await c.start("t", messages=[{"role": "user", "content": "weather in Paris"}],
                      tools=[SEARCH_TOOL], tool_choice="auto", params={"max_tokens": 50})
        await c.start("u", model="nope")
        await c.start("c")
        seen.append(await c.next_for("c"))
        await c.send({"type": "cancel", "id": "c"})
        await c.send({"type": "ping"})
        await c.send({"type": "ping", "data": None})
        await c.send({"type": "ping", "data": {"t": [1, None]}})
        await c.send("[]")
        seen += await c.collect("t") + await c.collect("u") + await c.collect("c")
        seen += [await c.next_for(None) for _ in range(4)]
    assert {f["type"] for f in seen} == {"welcome", "started", "tool_call_chunk", "finish",
                                         "tool_call_complete", "error", "pong"}
    for frame in seen:
        assert decode_server_frame(json.dumps(frame)) is not None, frame
        _assert_no_nulls(frame)
        if frame["type"] == "finish":
            assert frame["reason"], frame
    pongs = [f for f in seen if f["type"] == "pong"]
    assert pongs == [{"type": "pong"}, {"type": "pong"}, {"type": "pong", "data": {"t": [1, None]}}]


async def test_the_fallback_finish_carries_internal_error_as_its_reason():
    """"The relay always sends [reason]"; for failed, reason equals error.code. A stream
    whose task dies without an end (a relay bug) ends with failed / internal_error in both
    (issue 12: that finish had no reason at all)."""
    async with start_relay(streamer_factory=lambda spec: _StreamerThatBreaks("demo")) as server, \
            Client.connect(server.url) as c:
        await c.start("q1")
        frames = await c.collect("q1")
        # The connection and the relay go on.
        await c.start("q2")
        assert (await c.collect("q2"))[-1]["type"] == "finish"
    finish = frames[-1]
    assert finish["type"] == "finish" and finish["status"] == "failed"
    assert finish.get("reason") == finish["error"]["code"] == "internal_error", finish
    assert decode_server_frame(json.dumps(finish)) is not None
    assert [f["seq"] for f in frames] == list(range(len(frames)))


async def test_an_error_names_the_id_of_the_frame_it_answers_even_an_invalid_one():
    """error.id: "the id of the start or cancel answered, whenever that frame had a string
    id (even an invalid one, e.g. empty, so the client can correlate)"."""
    async with start_relay() as server, Client.connect(server.url) as c:
        await c.send({"type": "start", "id": "", "model": "demo", "messages": HI})
        err = await c.next_for("")
        assert (err["code"], err["ref"], err["id"]) == ("bad_request", "start", "")
        await c.send({"type": "cancel", "id": "x" * 129})
        err = await c.next_for("x" * 129)
        assert (err["code"], err["ref"]) == ("bad_request", "cancel")
        await c.send({"type": "start", "id": 5, "model": "demo", "messages": HI})
        err = await c.next_for(None)
        assert err["ref"] == "start" and "id" not in err


async def test_params_null_is_bad_request_and_a_null_param_counts_as_absent():
    """start.params: "When present it MUST be an object (null is bad_request)"; "a key set
    to null counts as absent"."""
    async with start_relay() as server, Client.connect(server.url) as c:
        await c.start("n", params=None)
        err = await c.next_for("n")
        assert (err["type"], err["code"], err["ref"]) == ("error", "bad_request", "start")
        assert "params" in err["message"]
        await c.start("k", params={"temperature": None, "max_tokens": 2})
        frames = await c.collect("k")
        assert frames[-1]["status"] == "completed" and frames[-1]["reason"] == "length"


# ------------------------------------------------------------------ Bad input

#: An input for each row of the spec's bad-input table (keyed by how the row begins).
BAD_INPUT_ROWS: dict[str, str | bytes] = {
    "not valid JSON": "{nope",
    "JSON that is not an object": "[1, 2]",
    "a binary message": b"\x00\x01",
    "no `type`": '{"no": "type"}',
    "unknown `type`": '{"type": "foo"}',
    "missing or mistyped field": json.dumps(
        {"type": "start", "id": "q1", "model": "demo", "messages": []}),
    "forbidden `params` key": json.dumps(
        {"type": "start", "id": "q1", "model": "demo", "messages": HI,
         "params": {"api_base": "http://elsewhere"}}),
    "beyond a [frame limit]": '{"type": "ping", "data": ' + "[" * 40 + "]" * 40 + "}",
    "a stream `id` with control characters": json.dumps(
        {"type": "start", "id": "a\nb", "model": "demo", "messages": HI}),
}


def _bad_input_rows() -> list[tuple[str, str]]:
    rows = re.findall(r"^\| (.+?) \| `(\{.+|\.\.\..+)` \|$", _section("Bad input"), re.M)
    assert len(rows) >= 9, rows
    return rows


@pytest.mark.parametrize(("situation", "answer"), _bad_input_rows(), ids=lambda v: v[:30])
async def test_the_bad_input_table_is_what_the_relay_answers(situation, answer):
    """Each row of PROTOCOL.md's bad-input table, sent to the relay: the answer is the
    row's example (``...`` standing for any text), and the connection stays usable."""
    inputs = [raw for prefix, raw in BAD_INPUT_ROWS.items() if situation.startswith(prefix)]
    assert len(inputs) == 1, f"no input for the spec row {situation!r}: add one"
    if answer.startswith("..."):      # the table's shorthand for the common start
        answer = '{"type":"error","code":"bad_request",' + answer[3:]
    expected = json.loads(answer)
    async with start_relay() as server, Client.connect(server.url) as c:
        await c.send(inputs[0])
        got = await c.recv()
        await c.send({"type": "ping", "data": "still open"})
        assert (await c.recv()) == {"type": "pong", "data": "still open"}
    pattern = ".*".join(re.escape(part) for part in expected.pop("message").split("..."))
    assert re.fullmatch(pattern, got.pop("message"), re.S), (situation, got)
    assert got == expected


# ------------------------------------------------------------------ Example session

async def test_the_example_session_runs_as_written():
    """The spec's example session, sent as written to a relay serving only ``demo``: the
    same answers in kind, the errors word for word."""
    lines = re.findall(r"^(C→S|S→C)  (\{.*\})$", _section("Example session"), re.M)
    sent = [json.loads(text) for way, text in lines if way == "C→S"]
    expected = [json.loads(text) for way, text in lines if way == "S→C"]
    async with start_relay(demo_tps=5) as server, Client.connect(server.url, hello=False) as c:
        got: list[dict] = []
        for frame in sent:
            await c.send(frame)
            if frame["type"] == "hello":
                got.append(await c.recv())
            elif frame["type"] == "start":
                got.append(await c.next_for(frame["id"]))
            elif frame["type"] == "ping":
                got.append(await c.next_for(None))
            elif frame["type"] == "cancel":
                got.append(await c.next_for("a"))
                while got[-1]["type"] == "token":
                    got.append(await c.next_for("a"))
    expected = [f for f in expected if f["type"] != "token"]
    got = [f for f in got if f["type"] != "token"]
    assert [f["type"] for f in got] == [f["type"] for f in expected], got
    for want, have in zip(expected, got):
        if want["type"] == "error":
            assert have == want
        elif want["type"] == "pong":
            assert have == want
        elif want["type"] == "finish":
            assert (have["status"], have["reason"], have["usage"]["estimated"]) == (
                want["status"], want["reason"], want["usage"]["estimated"])
        elif want["type"] == "started":
            assert have.keys() == want.keys() and have["seq"] == 0
        elif want["type"] == "welcome":
            assert have["protocol"] == want["protocol"] and have["models"] == want["models"]
    assert demo_reply_tokens(sent[1]["messages"])    # the demo model answers that prompt
