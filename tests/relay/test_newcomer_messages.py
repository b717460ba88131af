"""The messages a newcomer reads when something is wrong, each saying what and where:
a bad setting names its flag or ``RELAY_*`` variable, every unset key variable is listed at
once, the demo client prints why a stream failed, the log names the upstream host and the
cause, a second Ctrl-C ends the drain at once (streams still get their ``finish``), and the
Redis shutdown log says what it does. CLI behaviour runs the real ``relay`` subprocess."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from relay.app import load_models
from relay.upstream.providers import ModelRegistry
from relay.upstream.event_streamer import Timeouts
from tests.fakes.upstream import FakeUpstream, http_error

from ..redis_server import redis_ping
from .helpers import Client, reap, start_relay

ROOT = Path(__file__).resolve().parents[2]
DEMO_CLIENT = str(ROOT / "client_demo" / "demo_client.py")
KEY = "sk-test-SECRET-newcomer-0123456789"


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1", **extra})
    return env


def _serve(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay", "serve", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ settings and config


def test_a_bad_environment_variable_is_named_without_a_pydantic_dump():
    out = _serve(env=_env(RELAY_PORT="abc"))
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("relay: RELAY_PORT: ") and "integer" in lines[0], lines[0]
    assert "validation error" not in out.stderr and "pydantic" not in out.stderr


def test_a_bad_flag_is_named_as_the_flag_and_every_bad_setting_is_listed():
    out = _serve("--port", "0", "--max-streams", "0", env=_env(RELAY_HELLO_TIMEOUT="-1"))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2, out.stderr
    assert any(line.startswith("relay: --max-streams: ") and "1" in line for line in lines)
    assert any(line.startswith("relay: RELAY_HELLO_TIMEOUT: ") for line in lines)


def test_a_list_variable_that_is_not_json_is_named():
    out = _serve("--port", "0", env=_env(RELAY_ALLOW_ORIGINS="https://a.example"))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == ('relay: RELAY_ALLOW_ORIGINS is not valid JSON (a list is '
                                  'written \'["a", "b"]\')')


def test_every_unset_key_variable_is_reported_at_once(tmp_path):
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[models.gpt]\nmodel = "openai/gpt-4o-mini"\n'
                   'api_key_env = "LLM_RELAY_TEST_UNSET_OPENAI"\n'
                   '[models.fine]\nmodel = "demo"\n'
                   '[models.claude]\nmodel = "anthropic/claude-sonnet-4-5"\n'
                   'api_key_env = "LLM_RELAY_TEST_UNSET_ANTHROPIC"\n')
    out = _serve("--port", "0", "--config", str(cfg), env=_env())
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "2 problems" in out.stderr
    for alias, variable in (("gpt", "LLM_RELAY_TEST_UNSET_OPENAI"),
                            ("claude", "LLM_RELAY_TEST_UNSET_ANTHROPIC")):
        assert re.search(rf"'{alias}'.*{variable}", out.stderr), out.stderr


# ------------------------------------------------------------------ a failed stream


def _registry(api_base: str, model: str = "openai/gpt-x", fast: bool = True) -> ModelRegistry:
    return ModelRegistry(load_models({"models": {
        "gpt": {"model": model, "api_base": api_base, "api_key_env": "NEWCOMER_KEY",
                "fast": fast},
    }}, Timeouts(10.0, 10.0, 30.0)))


async def test_demo_client_prints_why_the_stream_failed(monkeypatch):
    monkeypatch.setenv("NEWCOMER_KEY", KEY)
    async with FakeUpstream() as up, \
            start_relay(registry=_registry(up.openai_base)) as server:
        up.enqueue(http_error("openai", 401, message="bad key"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, DEMO_CLIENT, "hi", "--url", server.url, "--model", "gpt",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1, err
    assert ("[failed: upstream_error] the provider rejected the relay's credentials"
            in out.decode()), out


@pytest.mark.parametrize("model", ["openai/gpt-x", "anthropic/claude-x"])
async def test_the_log_names_the_upstream_host_and_the_cause(monkeypatch, caplog, model):
    monkeypatch.setenv("NEWCOMER_KEY", KEY)
    port = _closed_port()
    base = f"http://127.0.0.1:{port}/v1?api-key={KEY}"
    async with start_relay(registry=_registry(base, model)) as server, \
            Client.connect(server.url) as client:
        with caplog.at_level(logging.WARNING, logger="relay.upstream.event_streamer"):
            await client.start("s", model="gpt")
            frames = await client.collect("s")
    assert frames[-1]["reason"] == "upstream_error"
    lines = [r.getMessage() for r in caplog.records if "upstream failure" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    line = lines[0]
    assert f"at 127.0.0.1:{port}:" in line, line
    assert "upstream_error" in line and "refused" in line.lower(), line
    assert KEY not in caplog.text and "api-key" not in caplog.text and "/v1" not in line


# ------------------------------------------------------------------ shutdown


async def _wait_for_line(stream: asyncio.StreamReader, needle: str) -> str:
    while True:
        line = (await asyncio.wait_for(stream.readline(), 60)).decode()
        assert line, f"the relay ended its output before printing {needle!r}"
        if needle in line:
            return line


async def test_a_second_ctrl_c_ends_the_drain_at_once_and_streams_get_their_finish():
    # A drain of 600 s: without the second Ctrl-C ending it, the relay would wait for the
    # slow stream (2 tokens/s) to finish, far beyond this test's wait.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--port", "0", "--demo-tps", "2",
        "--drain-timeout", "600", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env=_env(), cwd=ROOT)
    try:
        line = await _wait_for_line(proc.stdout, "listening on")
        url = re.search(r"(ws://\S+/ws)", line).group(1)
        async with Client.connect(url) as client:
            await client.start("s", content="a slow answer " * 40)   # ~60 s at 2 tokens/s
            assert (await client.next_for("s"))["type"] == "started"
            assert (await client.next_for("s"))["type"] == "token"
            proc.send_signal(signal.SIGINT)
            assert "Ctrl-C again" in await _wait_for_line(proc.stdout, "draining")
            proc.send_signal(signal.SIGINT)
            frames = await client.collect("s")
        assert (frames[-1]["status"], frames[-1]["reason"]) == ("cancelled", "server_shutdown")
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_the_redis_shutdown_log_says_what_it_does(caplog):
    assert redis_ping("127.0.0.1", 6379), "this test needs Redis on 127.0.0.1:6379 (.ci/run)"
    async with start_relay(redis_url="redis://127.0.0.1:6379/0", demo_tps=20,
                           redis_prefix=f"test:{uuid.uuid4().hex}:",
                           detach_grace=5) as server:
        async with Client.connect(server.url) as client:
            await client.start("s", content="carry on")
            assert (await client.next_for("s"))["type"] == "started"
            with caplog.at_level(logging.INFO, logger="relay.runtime.server"):
                await server.shutdown(drain_timeout=10)
    messages = [r.getMessage() for r in caplog.records if r.name == "relay.runtime.server"]
    said = next(m for m in messages if "1012" in m)
    assert "restarting" not in said
    assert said.startswith("shutting down: closing 1 connection(s) with 1012 so their "
                           "clients resume on another relay; 1 stream(s) go on writing to "
                           "Redis for up to 10 s"), said


@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "litellm_path"])
async def test_the_log_names_the_host_and_the_status_of_a_refused_key(monkeypatch, caplog,
                                                                       fast):
    monkeypatch.setenv("NEWCOMER_KEY", KEY)
    async with FakeUpstream() as up, \
            start_relay(registry=_registry(up.openai_base, fast=fast)) as server, \
            Client.connect(server.url) as client:
        up.enqueue(http_error("openai", 401, message=f"bad key {KEY} body-echo-marker"))
        with caplog.at_level(logging.WARNING, logger="relay.upstream.event_streamer"):
            await client.start("s", model="gpt")
            await client.collect("s")
    host = up.openai_base.split("//")[1].split("/")[0]
    lines = [r.getMessage() for r in caplog.records if "upstream failure" in r.getMessage()]
    assert len(lines) == 1 and f"at {host}: upstream_error (" in lines[0], caplog.text
    assert lines[0].endswith("HTTP 401)"), lines[0]
    assert KEY not in caplog.text and "body-echo-marker" not in caplog.text
