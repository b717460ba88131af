"""``decode_client_frame`` with ``DecodeLimits``: a frame beyond a limit is refused *before*
pydantic validation (the adapter is wrapped and must not be called), with a ``bad_request``
naming the limit; a frame at the limit is validated as before. Also: the nesting depth cap
(orjson's own limit moved down by wrapping), the collector pause, and ids without control
characters.

Costs are never timed here: the tests assert which mechanism refused a frame.
bench/attack_latency.py measures what that buys."""

from __future__ import annotations

import gc
import json

import orjson
import pytest

import llm_relay_protocol.codec as codec
from llm_relay_protocol import Cancel, DecodeLimits, FrameError, Ping, Resume, Start, decode_client_frame

from ._util import HI, rejected, start, text

SMALL = DecodeLimits(max_messages_bytes=4096, max_messages=5, max_tools=2,
                     max_content_parts=4, max_start_keys=40, max_json_depth=8,
                     max_json_containers=200)


class AdapterSpy:
    """Stands in for the codec's pydantic adapter; records calls and the collector state."""

    def __init__(self, real) -> None:
        self.real = real
        self.calls = 0
        self.gc_enabled_during: list[bool] = []

    def validate_python(self, obj):
        self.calls += 1
        self.gc_enabled_during.append(gc.isenabled())
        return self.real.validate_python(obj)


@pytest.fixture
def adapter(monkeypatch) -> AdapterSpy:
    spy = AdapterSpy(codec._CLIENT_ADAPTER)
    monkeypatch.setattr(codec, "_CLIENT_ADAPTER", spy)
    return spy


def refused_before_validation(data: str, adapter: AdapterSpy, limit: str,
                              limits: DecodeLimits = SMALL) -> dict:
    with pytest.raises(FrameError) as info:
        decode_client_frame(data, limits)
    frame = info.value.frame()
    assert frame["code"] == "bad_request", frame
    assert f"({limit})" in frame["message"], frame
    assert adapter.calls == 0, "the frame reached pydantic validation"
    return frame


def with_deep_value(frame: dict, depth: int) -> str:
    """``frame``'s text with its string ``"DEEP"`` replaced by ``depth`` nested arrays (built as
    text: encoders refuse such depths themselves)."""
    return text(frame).replace('"DEEP"', "[" * depth + "]" * depth)


def nested(depth: int, leaf=None) -> object:
    """``depth`` levels of arrays around ``leaf`` (depth 1 = ``[leaf]``)."""
    value = leaf if leaf is not None else []
    for _ in range(depth - (leaf is None)):
        value = [value]
    return value


# ------------------------------------------------------------------ the parser we rely on


def test_orjson_depth_limit_is_what_the_decoder_relies_on():
    """The depth check wraps a frame so orjson's own limit refuses exactly what nests deeper
    than max_json_depth: that limit must be 1024, as codec._ORJSON_MAX_DEPTH says."""
    assert codec._ORJSON_MAX_DEPTH == 1024
    orjson.loads("[" * 1024 + "]" * 1024)
    with pytest.raises(orjson.JSONDecodeError, match="depth limit"):
        orjson.loads("[" * 1025 + "]" * 1025)


def test_limits_reject_a_depth_the_parser_cannot_enforce():
    with pytest.raises(ValueError):
        DecodeLimits(max_json_depth=1024)
    with pytest.raises(ValueError):
        DecodeLimits(max_json_depth=0)


# ------------------------------------------------------------------ size and counts of a start


def test_messages_bytes_refused_before_validation(adapter):
    frame = start(id="big", messages=[{"role": "user", "content": "x" * 5000}])
    err = refused_before_validation(text(frame), adapter, "max_messages_bytes")
    assert (err["ref"], err["id"]) == ("start", "big")
    assert "4096" in err["message"]


def test_tools_count_toward_messages_bytes(adapter):
    tool = {"type": "function", "function": {"name": "f", "description": "d" * 3000}}
    refused_before_validation(text(start(tools=[tool, tool])), adapter, "max_messages_bytes")


def test_message_count_refused_before_validation(adapter):
    err = refused_before_validation(text(start(messages=HI * 6)), adapter, "max_messages")
    assert "6 messages" in err["message"] and "5" in err["message"]


def test_tool_count_refused_before_validation(adapter):
    tool = {"type": "function", "function": {"name": "f"}}
    err = refused_before_validation(text(start(tools=[tool] * 3)), adapter, "max_tools")
    assert err["ref"] == "start"


def test_content_parts_count_over_all_messages(adapter):
    part = {"type": "text", "text": "a"}
    messages = [{"role": "user", "content": [part] * 3}, {"role": "user", "content": [part] * 2}]
    refused_before_validation(text(start(messages=messages)), adapter, "max_content_parts")


@pytest.mark.parametrize("where", ["message", "part", "parameters", "params", "tool_choice"])
def test_keys_of_validated_objects_count_together(adapter, where):
    many = {f"k{i}": 0 for i in range(40)}
    frame = start()
    if where == "message":
        frame["messages"] = [{"role": "user", **many}]
    elif where == "part":
        frame["messages"] = [{"role": "user", "content": [{"type": "text", **many}]}]
    elif where == "parameters":
        frame["tools"] = [{"type": "function", "function": {"name": "f", "parameters": many}}]
    elif where == "params":
        frame["params"] = many
    else:
        frame["tool_choice"] = many
    refused_before_validation(text(frame), adapter, "max_start_keys")


def test_a_start_at_every_limit_is_validated_and_accepted(adapter):
    part = {"type": "text", "text": "a"}
    messages = [{"role": "user", "content": [part] * 2}] * 2 + [HI[0]] * 3
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    frame = start(messages=messages, tools=[tool, tool])
    msg = decode_client_frame(text(frame), SMALL)
    assert isinstance(msg, Start) and len(msg.messages) == 5 and len(msg.tools) == 2
    assert adapter.calls == 1


def test_wrong_types_are_left_to_validation(adapter):
    """The checks never choke on a field of the wrong type: validation names it."""
    for field, value in [("messages", "nope"), ("tools", {"a": 1}), ("params", [1])]:
        err = rejected(text(start(**{field: value})))
        assert field in err["message"], err


# ------------------------------------------------------------------ the default limits


def test_the_issue_frame_55000_empty_messages_never_reaches_validation(adapter):
    """Issue 10's frame (1 MB, 55,000 messages) took 0.3-0.8 s of validation; at the default
    limits it is refused by a scan of its text, before it is even parsed."""
    data = text(start(messages=[{"role": "user"}] * 55_000))
    assert len(data) < 1 << 20
    refused_before_validation(data, adapter, "max_json_containers", DecodeLimits())


def test_default_limits_refuse_each_count_before_validation(adapter):
    limits = DecodeLimits()
    cases = [
        (start(messages=[{"role": "user", "content": ""}] * 2001), "max_messages"),
        (start(tools=[{"type": "function", "function": {"name": "f"}}] * 129), "max_tools"),
        (start(messages=[{"role": "user", "content": [{}] * 5}] * 801), "max_content_parts"),
        (start(messages=[{"role": "user", **{f"k{i}": 0 for i in range(11)}}] * 1700),
         "max_start_keys"),
        (start(messages=[{"role": "user", "content": "x" * (600 * 1024)}]),
         "max_messages_bytes"),
    ]
    for frame, limit in cases:
        refused_before_validation(text(frame), adapter, limit, limits)


# ------------------------------------------------------------------ text scan and parse


def test_containers_are_counted_on_the_text_before_parsing(adapter, monkeypatch):
    def no_parse(data):
        raise AssertionError("the frame was parsed")

    data = text({"type": "ping", "data": [[]] * 200})        # 202 '[' and '{' in the text
    monkeypatch.setattr(codec.orjson, "loads", no_parse)
    refused_before_validation(data, adapter, "max_json_containers")


def test_brackets_inside_strings_count_too(adapter):
    data = text({"type": "ping", "data": "[" * 250})
    refused_before_validation(data, adapter, "max_json_containers")


@pytest.mark.parametrize("depth", [9, 33, 255, 600, 1023, 1024, 1100])
@pytest.mark.parametrize("where", ["ping", "content", "parameters", "unknown field"])
def test_nesting_deeper_than_the_limit_is_refused_while_parsing(adapter, depth, where):
    """255-1023 levels gave internal_error and a traceback (orjson.dumps refuses > 254 levels
    when the pong or the size check encoded them). Depth counts from the frame object (1)."""
    limits = DecodeLimits(max_json_depth=8, max_json_containers=4096)
    if where == "ping":
        frame = {"type": "ping", "data": "DEEP"}
    elif where == "content":
        frame = start(messages=[{"role": "user", "content": [{"type": "text", "x": "DEEP"}]}])
    elif where == "parameters":
        frame = start(tools=[{"type": "function",
                              "function": {"name": "f", "parameters": {"p": "DEEP"}}}])
    else:
        frame = {"type": "ping", "later": "DEEP"}
    data = with_deep_value(frame, depth)
    err = refused_before_validation(data, adapter, "max_json_depth", limits)
    assert "8 levels" in err["message"]


@pytest.mark.parametrize("siblings", [0, 40])
def test_nesting_at_the_limit_is_accepted(adapter, siblings):
    """With few brackets the frame cannot be too deep and is parsed as is; with many it takes
    the wrapped parse: the boundary is the same either way."""
    limits = DecodeLimits(max_json_depth=8)
    for depth, accepted in [(7, True), (8, False)]:
        # frame object (1) > data array (2) > ... : a value nested 6 deep in data makes 8.
        data = text({"type": "ping", "data": [nested(depth - 1)] + [[]] * siblings})
        if accepted:
            assert decode_client_frame(data, limits).data[0] == nested(depth - 1)
        else:
            with pytest.raises(FrameError, match="max_json_depth"):
                decode_client_frame(data, limits)


def test_default_depth_is_32(adapter):
    for siblings in (0, 40):
        ok = {"type": "ping", "data": [nested(30)] + [[]] * siblings}
        assert decode_client_frame(text(ok)).data[0] == nested(30)
        adapter.calls = 0
        deep = {"type": "ping", "data": [nested(31)] + [[]] * siblings}
        refused_before_validation(text(deep), adapter, "max_json_depth", DecodeLimits())


@pytest.mark.parametrize("data", [
    # closes one wrapping array and opens another: every bracket balanced
    '{"type":"ping","data":' + json.dumps(nested(20)) + ',"x":' + json.dumps(nested(20))
    + "}],[0",
    '1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[2',
    "[" + "[]," * 40,                                               # unterminated
    '{"type":"ping","data":[' + "[]," * 40 + "[]}",                 # one ']' short
])
def test_text_that_escapes_the_depth_wrapper_is_not_json(adapter, data):
    err = rejected(data)
    assert "not valid JSON" in err["message"], err
    assert adapter.calls == 0


@pytest.mark.parametrize(("tail", "needle"), [
    (' {"type":"ping"}', "after document"),
    ("", None),
])
def test_parser_messages_survive_the_depth_wrapper(adapter, tail, needle):
    """Frames with more brackets than max_json_depth take the wrapped parse; a bad one still
    gets the parser's own words about the frame as sent."""
    data = '{"type":"ping","data":' + json.dumps([[1]] * 40) + "}" + tail
    if needle is None:
        assert decode_client_frame(data).data == [[1]] * 40
    else:
        assert needle in rejected(data)["message"]
    bom = rejected("\ufeff" + data)
    assert "BOM" in bom["message"], bom


# ------------------------------------------------------------------ the collector


def test_the_collector_is_paused_while_decoding_and_restored(adapter):
    assert gc.isenabled()
    decode_client_frame(text(start()))
    assert adapter.gc_enabled_during == [False]
    assert gc.isenabled()
    rejected(with_deep_value({"type": "ping", "data": "DEEP"}, 40))
    assert gc.isenabled()


def test_a_collector_disabled_by_the_application_stays_disabled(adapter):
    gc.disable()
    try:
        decode_client_frame(text(start()))
        assert not gc.isenabled()
    finally:
        gc.enable()


# ------------------------------------------------------------------ ids


@pytest.mark.parametrize("bad", ["a\nINFO forged", "a\r", "\x00", "x\x1b[31m", "a\x7f", "a\x85",
                                 "a\u2028b", "a\u2029", "\t"])
def test_ids_with_control_characters_are_bad_request(bad):
    for frame in (start(id=bad), {"type": "cancel", "id": bad},
                  {"type": "resume", "stream_key": "k", "after_seq": 0, "id": bad}):
        err = rejected(text(frame))
        assert "control characters" in err["message"] and "'id'" in err["message"], err


def test_ids_may_hold_any_printable_text():
    for good in ["s1", "ünïcødé", "with space", "emoji \U0001f600", "a/b:c"]:
        assert decode_client_frame(text(start(id=good))).id == good
        assert decode_client_frame(text({"type": "cancel", "id": good})) == \
            Cancel(type="cancel", id=good)
        assert isinstance(decode_client_frame(text(
            {"type": "resume", "stream_key": "k", "after_seq": 0, "id": good})), Resume)
