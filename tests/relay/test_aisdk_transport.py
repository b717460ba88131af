"""The real AI SDK ``WebSocketChatTransport`` (npm ``ai``, pinned with a lockfile in
tests/aisdk/) against a real ``relay serve`` subprocess, through Node's test runner.

The relay serves ``demo`` and ``oai`` (a loopback fake OpenAI upstream in this process,
which records what reaches "the model"). Node and the installed packages are required:
``.ci/run`` runs ``npm ci`` in tests/aisdk; missing ones fail this test, never skip it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from tests.fakes.upstream import FakeUpstream, stream, tool_call

from .test_multinode import SHARED_REDIS

ROOT = Path(__file__).resolve().parents[2]
#: Each Node run's one-line summary is recorded as the test's ``node_report`` property and
#: printed in pytest's terminal summary (tests/conftest.py; also from xdist workers), so a CI
#: log shows what Node's runner counted, not only that the wrapping test passed.
NODE_DIR = ROOT / "tests" / "aisdk"


async def test_real_ai_sdk_transport_against_relay_serve(tmp_path, record_property):
    node = shutil.which("node")
    assert node, "node is required for the AI SDK tests"
    assert (NODE_DIR / "node_modules" / "ai").is_dir(), \
        "run `npm ci` in tests/aisdk (.ci/run does)"
    async with FakeUpstream() as up:
        # `oai` answers in this order: the tool test's first turn (a tool call) and second
        # (the tool's output sent back), then the long-answer test's 400 text chunks, one
        # at a time (so they are 400 stream events, not a few joined ones).
        up.enqueue(stream("openai", [], tool_calls=[
            tool_call("get_weather", {"city": "Paris"}, id="call_w1")]))
        up.enqueue(stream("openai", ["It is 21 degrees in Paris."]))
        up.enqueue(stream("openai", [f"long{i} " for i in range(400)]).with_delay(0.002))
        config = tmp_path / "relay.toml"
        config.write_text(
            '[models.demo]\nmodel = "demo"\n\n'
            f'[models.oai]\nmodel = "openai/gpt-x"\napi_base = "{up.openai_base}"\n'
            'api_key_env = "FAKE_PROVIDER_KEY"\n')
        env = {**os.environ, "FAKE_PROVIDER_KEY": "sk-fake", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
               "PYTHONPATH": str(ROOT)}
        # Two relays on one Redis: the resume test also resumes on the other relay.
        env["RELAY_REDIS_PREFIX"] = f"test:{uuid.uuid4().hex}:"
        relays = [await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "serve", "--port", "0", "--config", str(config),
            "--demo-tps", "60", "--detach-grace", "10", "--redis", SHARED_REDIS,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
            for _ in range(2)]
        try:
            addresses = []
            for relay in relays:
                line = (await asyncio.wait_for(relay.stdout.readline(), 90)).decode()
                match = re.search(r"ws://(\S+)/ws", line)
                assert match, line
                addresses.append(f"http://{match.group(1)}")
            node_run = await asyncio.create_subprocess_exec(
                node, "--test", "--test-reporter=spec", "transport.test.mjs",
                cwd=NODE_DIR, env={**os.environ, "RELAY_HTTP": addresses[0],
                                   "RELAY_HTTP_B": addresses[1]},
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            out, _ = await asyncio.wait_for(node_run.communicate(), 120)
            report = out.decode()
            print(report)
            record_property("node_report", _summary(report))
            assert node_run.returncode == 0, report
            assert re.search(r"\bpass 13\b", report) and re.search(r"\bfail 0\b", report), report
        finally:
            for relay in relays:
                relay.send_signal(signal.SIGTERM)
            for relay in relays:
                try:
                    await asyncio.wait_for(relay.wait(), 30)
                except TimeoutError:
                    relay.kill()
                    await relay.wait()
        # The tool's output reached the model as a tool message on the second turn.
        second = up.requests[1].json["messages"]
        tool_messages = [m for m in second if m["role"] == "tool"]
        assert tool_messages == [{"role": "tool", "tool_call_id": "call_w1",
                                  "content": json.dumps({"temp": 21}, separators=(",", ":"))}]
        assistant = [m for m in second if m["role"] == "assistant"][0]
        assert assistant["tool_calls"][0]["function"]["name"] == "get_weather"


def test_every_mapped_chunk_is_valid_for_the_ai_package():
    """Every UIMessageChunk the mapping produces, in every scenario of the pure tests, passes
    the `ai` package's own uiMessageChunkSchema (the transport closes the connection on an
    invalid one)."""
    from tests.protocol.test_aisdk import chunks_of, run, scenarios

    node = shutil.which("node")
    assert node, "node is required for the AI SDK tests"
    every = [c for frames in scenarios().values() for c in chunks_of(run(frames))]
    assert len({c["type"] for c in every}) >= 14
    result = subprocess.run([node, "validate-chunks.mjs"], input=json.dumps(every),
                            capture_output=True, text=True, cwd=NODE_DIR, timeout=60)
    assert result.returncode == 0, result.stderr
    bad = [(every[r["index"]], r["error"]) for r in json.loads(result.stdout) if not r["ok"]]
    assert not bad, bad


def _summary(report: str) -> str:
    counts = dict(re.findall(r"^\S*\s*(tests|pass|fail|skipped) (\d+)$", report, re.M))
    names = re.findall(r"^[✔✖] (.+?) \(\d", report, re.M)
    return (f"tests/aisdk/transport.test.mjs under Node's test runner: "
            f"{counts.get('tests', '?')} tests (pass {counts.get('pass', '?')}, "
            f"fail {counts.get('fail', '?')}): {'; '.join(names)}")
