"""Bad input rows of the "Bad input and what the relay answers" table (docs/bad-input.md)
that had no test elsewhere, and a check that every test the table names exists (so the table cannot rot).

Real relay, real socket, real websockets client; upstream failures through LiteLLM's real
providers against the loopback FakeUpstream."""

from __future__ import annotations

import ast
import asyncio
import functools
import re
import socket
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from relay.app import load_models
from relay.upstream.providers import ModelRegistry
from relay.upstream.event_streamer import Timeouts
from tests.fakes.upstream import FakeUpstream, http_error, stream

from .helpers import Client, start_relay
from .test_core import _close_of

ROOT = Path(__file__).resolve().parents[2]
KEY_ENV = "BAD_INPUT_FAKE_KEY"
ALIAS = {"openai": "oai", "anthropic": "claude"}


@pytest.fixture(autouse=True)
def provider_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-bad-input-test")


def registry_for(openai_base: str, anthropic_base: str) -> ModelRegistry:
    return ModelRegistry(load_models({"models": {
        "oai": {"model": "openai/gpt-x", "api_base": openai_base, "api_key_env": KEY_ENV},
        "claude": {"model": "anthropic/claude-x", "api_base": anthropic_base,
                   "api_key_env": KEY_ENV},
    }}, Timeouts(5.0, 5.0, 10.0)))


async def assert_still_serving(c: Client) -> None:
    await c.send({"type": "ping", "data": "still"})
    assert await c.next_for(None) == {"type": "pong", "data": "still"}


# ---------------------------------------------------------------- frames after hello

EDGE_TEXT = [
    ("", "not valid JSON"),                                     # empty text frame
    ("   ", "not valid JSON"),                                  # whitespace only
    ('{"type":"ping","data":NaN}', "not valid JSON"),           # NaN is not JSON
    ('{"type":"ping","data":1e400}', "infinity"),               # number out of range
    ('{"type":"ping"} {"type":"ping"}', "after document"),      # two frames in one
    ('\ufeff{"type":"ping"}', "BOM"),                           # byte order mark
]


@pytest.mark.parametrize(("raw", "needle"), EDGE_TEXT)
async def test_edge_case_text_frames_get_bad_request(raw, needle):
    async with start_relay() as server, Client.connect(server.url) as c:
        await c.send(raw)
        err = await c.recv()
        assert (err["type"], err["code"]) == ("error", "bad_request"), err
        assert needle in err["message"], err
        await assert_still_serving(c)


OUT_OF_RANGE = [
    ({"params": {"max_tokens": 0}}, "max_tokens"),
    ({"params": {"max_tokens": -5}}, "max_tokens"),
    ({"params": {"max_tokens": 1.5}}, "max_tokens"),
    ({"params": {"temperature": 2.5}}, "temperature"),
    ({"params": {"stop": ["a", "b", "c", "d", "e"]}}, "stop"),
    ({"model": ""}, "model"),
    ({"id": "x" * 300}, "id"),
    ({"tools": {"type": "function"}}, "tools"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": []}, "messages"),
]


@pytest.mark.parametrize(("override", "needle"), OUT_OF_RANGE)
async def test_out_of_range_or_mistyped_start_fields_get_bad_request(override, needle):
    async with start_relay() as server, Client.connect(server.url) as c:
        frame = {"type": "start", "id": "q", "model": "demo",
                 "messages": [{"role": "user", "content": "hi"}], **override}
        await c.send(frame)
        err = await c.recv()
        assert (err["type"], err["code"], err["ref"]) == ("error", "bad_request", "start"), err
        assert needle in err["message"], err
        await c.start("ok", params={"max_tokens": 1})
        assert (await c.collect("ok"))[-1]["status"] == "completed"


async def test_unknown_fields_are_ignored_and_duplicate_keys_last_wins():
    async with start_relay() as server, Client.connect(server.url) as c:
        await c.send({"type": "ping", "data": 1, "future_field": {"x": 1}})
        assert await c.recv() == {"type": "pong", "data": 1}
        await c.start("s", params={"max_tokens": 2}, priority="high", x_trace=[1, 2])
        assert (await c.collect("s"))[-1]["status"] == "completed"
        # duplicate keys: the last one wins (a start without its fields -> bad_request)
        await c.send('{"type": "ping", "type": "start", "id": "d"}')
        err = await c.recv()
        assert (err["code"], err["ref"], err["id"]) == ("bad_request", "start", "d"), err


async def test_integer_beyond_64_bits_is_read_as_a_double():
    async with start_relay() as server, Client.connect(server.url) as c:
        await c.send('{"type": "ping", "data": 123456789012345678901234567890}')
        pong = await c.recv()
        assert pong["type"] == "pong" and pong["data"] == pytest.approx(1.2345678901234568e29)


# ---------------------------------------------------------------- at the door

async def test_oversize_first_frame_closes_1009_before_hello():
    async with start_relay(max_frame_bytes=2048) as server:
        async with connect(server.url, subprotocols=["llm-relay.v1"]) as ws:
            await ws.send('{"type": "hello", "client": {"name": "' + "x" * 4096 + '"}}')
            code, _ = await _close_of(ws)
        assert code == 1009
        async with Client.connect(server.url) as c:  # the relay still serves others
            await assert_still_serving(c)


async def test_upgrade_while_draining_is_http_503_and_start_is_draining():
    async with start_relay(demo_tps=0.5, drain_timeout=30) as server:
        async with Client.connect(server.url) as c:
            await c.start("long")
            assert (await c.next_for("long"))["type"] == "started"
            shutdown = asyncio.create_task(server.shutdown())  # waits for "long" to end
            await c.send({"type": "ping"})  # a round trip: the drain has begun
            assert (await c.next_for(None))["type"] == "pong"
            assert server.draining
            with pytest.raises(InvalidStatus) as info:
                async with connect(server.url, subprotocols=["llm-relay.v1"]):
                    pass
            assert info.value.response.status_code == 503
            await c.start("late")
            err = await c.next_for("late")
            assert (err["type"], err["code"]) == ("error", "draining")
            await c.send({"type": "cancel", "id": "long"})
            assert (await c.collect("long"))[-1]["status"] == "cancelled"
            await shutdown
            code, _ = await _close_of(c.ws)
        assert code == 1001


# ---------------------------------------------------------------- upstream failures

@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
@pytest.mark.parametrize("status", [400, 404, 422])
async def test_upstream_rejects_request_finish_failed_bad_request(fmt, status):
    async with FakeUpstream() as up:
        registry = registry_for(up.openai_base, up.anthropic_base)
        async with start_relay(registry=registry) as server, Client.connect(server.url) as c:
            up.enqueue(http_error(fmt, status, message="context too long"))
            await c.start("s", model=ALIAS[fmt])
            frames = await c.collect("s")
            assert [f["type"] for f in frames] == ["started", "finish"]
            finish = frames[-1]
            assert (finish["status"], finish["reason"]) == ("failed", "bad_request"), finish
            assert finish["error"]["code"] == "bad_request"
            assert f"HTTP {status}" in finish["error"]["message"]
            assert len(up.requests) == 1  # no retry
            up.enqueue(stream(fmt, ["fine"]))
            await c.start("next", model=ALIAS[fmt])
            assert (await c.collect("next"))[-1]["status"] == "completed"


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
@pytest.mark.parametrize("status", [502, 503])
async def test_upstream_5xx_finish_failed_upstream_error(fmt, status):
    """A 5xx whose error does not say the provider is overloaded (that one is
    ``upstream_overloaded``: tests/relay/test_fast_path.py)."""
    async with FakeUpstream() as up:
        registry = registry_for(up.openai_base, up.anthropic_base)
        async with start_relay(registry=registry) as server, Client.connect(server.url) as c:
            up.enqueue(http_error(fmt, status, message="The server had an error."))
            await c.start("s", model=ALIAS[fmt])
            finish = (await c.collect("s"))[-1]
            assert (finish["status"], finish["reason"]) == ("failed", "upstream_error"), finish
            assert f"HTTP {status}" in finish["error"]["message"]
            assert len(up.requests) == 1


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
async def test_upstream_unreachable_finish_failed_upstream_error(fmt):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    registry = registry_for(f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}")
    async with start_relay(registry=registry) as server, Client.connect(server.url) as c:
        await c.start("s", model=ALIAS[fmt])
        frames = await c.collect("s")
        assert [f["type"] for f in frames] == ["started", "finish"]
        finish = frames[-1]
        assert (finish["status"], finish["reason"]) == ("failed", "upstream_error"), finish
        assert "reach" in finish["error"]["message"], finish
        await assert_still_serving(c)


# ---------------------------------------------------------------- the docs' table

#: The table of every bad input, its answer and its test (docs/bad-input.md).
TABLE_DOC = ROOT / "docs" / "bad-input.md"
SECTION = "# Bad input and what the relay answers"
REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def readme_rows() -> list[tuple[str, list[tuple[str, str]]]]:
    text = TABLE_DOC.read_text(encoding="utf-8")
    assert SECTION in text, f"{TABLE_DOC.name} has no section {SECTION!r}"
    body = text.split(SECTION, 1)[1]
    body = re.split(r"\n## ", body, maxsplit=1)[0]
    rows = []
    for line in body.splitlines():
        if not line.startswith("|") or set(line) <= set("|- "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "Bad input":
            continue
        rows.append((cells[0], REF.findall(line)))
    return rows


@functools.cache
def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.name.startswith("test_")}


def test_readme_bad_input_table_names_only_existing_tests():
    rows = readme_rows()
    assert len(rows) >= 30, f"the table lost rows: {len(rows)}"
    missing = []
    for label, refs in rows:
        assert refs, f"bad-input row {label!r} names no test"
        for path, name in refs:
            file = ROOT / path
            if not file.is_file() or name not in _test_functions(file):
                missing.append(f"{path}::{name}")
    assert not missing, f"{TABLE_DOC.name} names tests that do not exist: {missing}"
