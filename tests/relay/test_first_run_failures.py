"""What a newcomer sees when something is off (issue 14, items 9 and 10): `relay serve` on a
port in use, and the demo clients (`client_demo/demo_client.py`, `client_demo/chat.py`)
against no relay at all or against a relay that requires a token. Each answer is one line
on stderr that says what is wrong and what to do, with no traceback; the clients take
`--token` or `RELAY_TOKEN`. Everything runs as a real subprocess, as a user would run it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from relay.core.auth import mint_token

from .helpers import start_relay

ROOT = Path(__file__).resolve().parents[2]
DEMO_CLIENT = str(ROOT / "client_demo" / "demo_client.py")
CHAT = str(ROOT / "client_demo" / "chat.py")
SECRET = "first-run-tests-secret-0123456789abcdef"


def _env(**extra: str) -> dict:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1"}
    env.pop("RELAY_TOKEN", None)
    env.update(extra)
    return env


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_on_a_port_in_use_names_the_port_and_exits_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "relay", "serve", "--port", str(port)],
                             capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert out.returncode == 2
    line = _one_line(out.stderr)
    assert f"port {port} on 127.0.0.1 is already in use" in line, line
    assert "--port" in line and out.stdout == ""


@pytest.mark.parametrize("script", [DEMO_CLIENT, CHAT], ids=["demo_client", "chat"])
def test_client_without_a_running_relay_says_so_in_one_line(script):
    url = f"ws://127.0.0.1:{_closed_port()}/ws"
    out = subprocess.run([sys.executable, script, "--url", url], input="", capture_output=True,
                         text=True, env=_env(), timeout=60)
    assert out.returncode == 1
    line = _one_line(out.stderr)
    assert f"no relay reachable at {url}" in line and "relay serve" in line, line


async def _run(*args: str, env: dict, stdin: str = "") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), timeout=60)
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("script", [DEMO_CLIENT, CHAT], ids=["demo_client", "chat"])
async def test_client_against_a_relay_that_requires_a_token(script):
    async with start_relay(auth=True, token_secret=SECRET) as server:
        # No token: one line naming the reason and both ways to pass one.
        code, out, err = await _run(script, "--url", server.url, env=_env())
        assert code == 1, err
        line = _one_line(err)
        assert "requires a valid token" in line and "missing token" in line, line
        assert "--token" in line and "RELAY_TOKEN" in line
        # A bad token: the relay's reason is in the line.
        code, out, err = await _run(script, "--url", server.url, "--token", "nope", env=_env())
        assert code == 1 and "invalid token" in _one_line(err)
        # A valid token from RELAY_TOKEN, then from --token: the answer streams.
        # (demo_client takes the prompt as an argument, chat.py reads it from stdin.)
        good = mint_token(SECRET, "newcomer", 300)
        prompt = ["hello with a token"] if script == DEMO_CLIENT else []
        code, out, err = await _run(script, *prompt, "--url", server.url,
                                    env=_env(RELAY_TOKEN=good), stdin="hello with a token\n")
        assert code == 0, err
        assert "You said: hello with a token." in out
        code, out, err = await _run(script, *prompt, "--url", server.url, "--token", good,
                                    env=_env(), stdin="hello with a token\n")
        assert code == 0 and "You said: hello with a token." in out, err
