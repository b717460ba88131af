"""The official ``openai`` Node SDK's Responses WebSocket mode (``ResponsesWS``, pinned with a
lockfile in tests/responses-node/) against a real relay, through Node's test runner: a text
turn and a chained turn on the demo model, a tool round trip on a loopback fake OpenAI
upstream (whose recorded request shows the tool result tied to its call), an unknown previous
id, two lanes. Node and the installed packages are required (``npm ci`` in
tests/responses-node); missing ones fail this test, never skip it."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.fakes.upstream import FakeUpstream, stream, tool_call

from .helpers import start_relay
from .test_responses import KEY, registry_for

NODE_DIR = Path(__file__).resolve().parents[2] / "tests" / "responses-node"


async def test_the_node_sdk_against_the_relay(record_property, monkeypatch):
    monkeypatch.setenv("FAKE_PROVIDER_KEY", KEY)
    node = shutil.which("node")
    assert node, "node is required for the Node SDK tests"
    assert (NODE_DIR / "node_modules" / "openai").is_dir(), \
        "run `npm ci` in tests/responses-node (.ci/run does)"
    async with FakeUpstream() as up:
        up.enqueue(stream("openai", [], tool_calls=[
            tool_call("get_weather", {"city": "Paris"}, id="call_node1")]),
            stream("openai", ["It is sunny."]))
        async with start_relay(registry=registry_for(up)) as server:
            run = await asyncio.create_subprocess_exec(
                node, "--test", "--test-reporter=spec", "responses.test.mjs", cwd=NODE_DIR,
                env={**os.environ, "RELAY_HTTP": f"http://127.0.0.1:{server.port}"},
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                out, _ = await asyncio.wait_for(run.communicate(), 120)
            finally:
                if run.returncode is None:
                    run.kill()
                    await run.wait()
    report = out.decode()
    print(report)
    record_property("node_report", " ".join(re.findall(r"ℹ (pass \d+|fail \d+)", report)))
    assert run.returncode == 0, report
    assert re.search(r"\bpass 4\b", report) and re.search(r"\bfail 0\b", report), report
    tool_turn = up.requests[1].json["messages"]
    assert tool_turn[-2]["tool_calls"][0]["id"] == "call_node1"
    assert tool_turn[-1] == {"role": "tool", "tool_call_id": "call_node1",
                             "content": "sunny, 24C"}
