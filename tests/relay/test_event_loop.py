"""The event loop a relay runs on (relay/runtime/eventloop.py, ``relay serve --loop``):
uvloop by default where it is installed, asyncio's own loop on request or without uvloop,
and a clear refusal when uvloop is demanded but missing. (The in-process suite runs on
uvloop, and modules marked ``both_loops`` on both loops: tests/conftest.py.)"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from relay.runtime import eventloop
from tests.relay.helpers import reap
from tests.relay.test_cli import _env

ROOT = Path(__file__).resolve().parents[2]


def test_auto_takes_uvloop_when_installed():
    import uvloop          # a dependency of the package on Linux: its absence is a failure

    choice = eventloop.choose_loop("auto")
    assert choice.name == f"uvloop {uvloop.__version__}"
    assert eventloop.run(_loop_type(), choice) is uvloop.Loop


def test_asyncio_is_asyncio_own_loop():
    choice = eventloop.choose_loop("asyncio")
    assert choice == eventloop.LoopChoice("asyncio", None)
    assert issubclass(eventloop.run(_loop_type(), choice), asyncio.BaseEventLoop)


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)       # import uvloop -> ImportError
    assert eventloop.choose_loop("auto") == eventloop.LoopChoice("asyncio", None)
    with pytest.raises(eventloop.LoopUnavailable, match="uvloop is not installed"):
        eventloop.choose_loop("uvloop")


def test_unknown_loop_is_a_value_error():
    with pytest.raises(ValueError, match="unknown event loop 'trio'"):
        eventloop.choose_loop("trio")


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


@pytest.mark.parametrize(("flags", "expected"), [
    ([], r"uvloop \d"), (["--loop", "asyncio"], "asyncio"),
])
def test_serve_streams_on_the_chosen_loop_and_says_which(flags, expected):
    proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--port", "0",
                             "--demo-tps", "0", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    try:
        line = proc.stdout.readline()
        match = re.search(r"listening on (ws://127\.0\.0\.1:\d+/ws)", line)
        assert match, line + (proc.stderr.read() if proc.poll() is not None else "")
        client = subprocess.run(
            [sys.executable, str(ROOT / "client_demo" / "demo_client.py"), "hi loop",
             "--url", match.group(1)], capture_output=True, text=True, env=_env(), timeout=60)
        assert client.returncode == 0, client.stderr
        assert "You said: hi loop." in client.stdout and "[completed: stop]" in client.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        log = proc.stderr.read()
        assert re.search(rf"event loop: {expected}", log), log
    finally:
        reap(proc)


def test_serve_refuses_loop_uvloop_without_uvloop():
    code = ("import sys, runpy; sys.modules['uvloop'] = None\n"
            "sys.argv = ['relay', 'serve', '--port', '0', '--loop', 'uvloop']\n"
            "runpy.run_module('relay', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == ("relay: --loop uvloop: uvloop is not installed "
                                  "(pip install uvloop, or use --loop asyncio)")


def test_relay_event_loop_environment_variable_is_the_flag(monkeypatch):
    from relay.config import RelaySettings

    monkeypatch.setenv("RELAY_EVENT_LOOP", "asyncio")
    assert RelaySettings().event_loop == "asyncio"
    with pytest.raises(ValueError):
        RelaySettings(event_loop="twisted")


async def test_the_suite_runs_on_the_loop_relay_serve_defaults_to():
    import os

    expected = os.environ.get("RELAY_TEST_LOOP") or "uvloop"
    assert type(asyncio.get_running_loop()).__module__.split(".")[0] == expected
