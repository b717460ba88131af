"""The user's path: ``python -m relay serve`` in a subprocess, the demo client against it,
``--help`` without LiteLLM, SIGTERM exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.relay.helpers import reap

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict:
    return {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1"}


def test_serve_help_does_not_import_litellm():
    code = ("import sys, runpy; sys.argv=['relay','serve','--help']\n"
            "try:\n    runpy.run_module('relay', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "assert 'litellm' not in sys.modules, 'litellm imported by --help'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--demo-tps" in out.stdout and "--config" in out.stdout


def test_serve_subprocess_demo_client_and_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--port", "0",
                             "--demo-tps", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(), cwd=ROOT)
    try:
        line = proc.stdout.readline()
        match = re.search(r"listening on (ws://127\.0\.0\.1:\d+/ws).*models: demo", line)
        assert match, line + proc.stderr.read() if proc.poll() is not None else line
        client = subprocess.run(
            [sys.executable, str(ROOT / "client_demo" / "demo_client.py"), "hello relay",
             "--url", match.group(1)], capture_output=True, text=True, env=_env(), timeout=60)
        assert client.returncode == 0, client.stderr
        assert "You said: hello relay." in client.stdout
        assert "[completed: stop]" in client.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        reap(proc)


def test_bad_config_stops_startup_naming_alias(tmp_path):
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[models.gpt]\nmodel = "openai/gpt-4o-mini"\n'
                   'api_key_env = "LLM_RELAY_TEST_UNSET_KEY"\n')
    env = _env()
    env.pop("LLM_RELAY_TEST_UNSET_KEY", None)
    out = subprocess.run([sys.executable, "-m", "relay", "serve", "--config", str(cfg),
                          "--port", "0"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 2
    assert "'gpt'" in out.stderr and "LLM_RELAY_TEST_UNSET_KEY" in out.stderr


def test_settings_from_relay_env_and_flags_win(monkeypatch):
    from relay.config import RelaySettings

    monkeypatch.setenv("RELAY_PORT", "9999")
    monkeypatch.setenv("RELAY_MAX_STREAMS", "3")
    monkeypatch.setenv("RELAY_ALLOW_ORIGINS", '["https://a.example"]')
    settings = RelaySettings()
    assert (settings.port, settings.max_streams) == (9999, 3)
    assert settings.allow_origins == ["https://a.example"]
    assert RelaySettings(port=1234).port == 1234


def test_unreachable_redis_stops_startup_with_a_clear_message_and_no_password():
    closed = socket_port_with_nothing_listening()
    out = subprocess.run([sys.executable, "-m", "relay", "serve", "--port", "0", "--redis",
                          f"redis://:s3cret-pw@127.0.0.1:{closed}/0"],
                         capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=60)
    assert out.returncode == 2
    assert "cannot use Redis" in out.stderr and "Traceback" not in out.stderr
    assert "s3cret-pw" not in out.stderr + out.stdout


def socket_port_with_nothing_listening() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigusr2_prints_every_asyncio_task_and_sigusr1_every_thread():
    """Where a relay that will not exit waits: its tasks (SIGUSR2), its threads (SIGUSR1)."""
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=ROOT)
    lines: list[str] = []
    seen = {"asyncio task(s) of pid": threading.Event(), "Current thread": threading.Event()}

    def read_stderr() -> None:
        for line in proc.stderr:
            lines.append(line)
            for marker, event in seen.items():
                if marker in line:
                    event.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert "listening on" in proc.stdout.readline()
        proc.send_signal(signal.SIGUSR2)
        assert seen["asyncio task(s) of pid"].wait(30), "".join(lines)
        proc.send_signal(signal.SIGUSR1)
        assert seen["Current thread"].wait(30), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        reader.join(10)
        dump = "".join(lines)
        # the main task, waiting for SIGTERM in relay.cli._run
        assert f"asyncio task(s) of pid {proc.pid}" in dump and "in _run" in dump, dump
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


# ------------------------------------------------------------------------------ relay check

CHECK_SECRET = "sk-check-SECRET-never-printed-0123456789"


async def _relay_check(config: Path, *args: str, env: dict | None = None) -> tuple[int, str, str]:
    """``python -m relay check --config FILE ARGS`` as a subprocess, awaited without blocking
    this loop (a loopback fake upstream may be serving on it)."""
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "check", "--config", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env or _env(), cwd=ROOT)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(), err.decode()


def _relay_check_here(config: Path, capsys, caplog, *args: str) -> tuple[int, str, str]:
    """``relay check --config FILE ARGS`` by the command's own code (``relay.cli.main``) in
    this process, with this process's environment (set it with monkeypatch); what it
    logged at WARNING and above (a process prints that to stderr) is added to stderr.
    ``_relay_check`` above runs the command as a user starts it (``python -m relay``: its
    exit code and output, the network from a fresh process); a subprocess per case added
    a LiteLLM import (~4 s of CPU) and nothing else."""
    import logging

    from relay.cli import main

    with caplog.at_level(logging.WARNING):
        code = main(["check", "--config", str(config), *args])
    out = capsys.readouterr()
    return code, out.out, out.err + caplog.text


def test_check_reports_path_endpoint_and_key_status_per_alias(tmp_path, monkeypatch, capsys,
                                                              caplog):
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[models.gpt]\nmodel = "openai/gpt-4o-mini"\napi_key_env = "CHECK_OAI_KEY"\n\n'
                   '[models.claude]\nmodel = "anthropic/claude-sonnet-4-5"\n'
                   'api_key_env = "CHECK_UNSET_KEY"\n\n'
                   '[models.gem]\nmodel = "gemini/gemini-2.0-flash"\n'
                   'api_key_env = "CHECK_OAI_KEY"\n\n'
                   '[models.demo]\nmodel = "demo"\n\n'
                   '[models.nokey]\nmodel = "groq/llama-3.3-70b-versatile"\n')
    monkeypatch.setenv("CHECK_OAI_KEY", CHECK_SECRET)
    for name in ("CHECK_UNSET_KEY", "GROQ_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    code, out, err = _relay_check_here(cfg, capsys, caplog)
    assert code == 1, out + err
    lines = out.splitlines()
    assert lines[0] == ("gpt: fast path (openai streaming format (provider openai)); endpoint "
                        "POST https://api.openai.com/v1/chat/completions; key CHECK_OAI_KEY set")
    assert lines[1] == ("claude: fast path (anthropic streaming format (provider anthropic)); "
                        "endpoint POST https://api.anthropic.com/v1/messages; "
                        "key CHECK_UNSET_KEY NOT SET")
    assert "not set" in lines[2]
    assert lines[3].startswith("gem: litellm path (provider gemini streams a format of its own")
    assert "demo: litellm path" in out and "no key needed" in out
    assert ("nokey: fast path (openai streaming format (provider groq)); endpoint POST "
            "https://api.groq.com/openai/v1/chat/completions; no key variable configured, "
            "and the provider's default one is unset") in lines
    assert lines[-1] == "not usable: claude, nokey"
    assert CHECK_SECRET not in out + err


async def test_check_probe_makes_one_token_request_per_alias(tmp_path, monkeypatch):
    from tests.fakes.upstream import FakeUpstream, http_error, stream

    async with FakeUpstream() as up:
        cfg = tmp_path / "relay.toml"
        cfg.write_text(
            f'[models.oai]\nmodel = "openai/gpt-x"\napi_base = "{up.openai_base}"\n'
            'api_key_env = "CHECK_KEY"\n\n'
            f'[models.claude]\nmodel = "anthropic/claude-x"\napi_base = "{up.anthropic_base}"\n'
            'api_key_env = "CHECK_KEY"\n\n'
            f'[models.slow]\nmodel = "openai/gpt-x"\napi_base = "{up.openai_base}"\n'
            'api_key_env = "CHECK_KEY"\nfast = false\n\n'
            '[models.demo]\nmodel = "demo"\n')
        env = {**_env(), "CHECK_KEY": CHECK_SECRET}
        up.enqueue(stream("openai", ["OK"]), stream("anthropic", ["OK"]),
                   stream("openai", ["OK"]))
        code, out, err = await _relay_check(cfg, "--probe", env=env)
        assert code == 0, out + err
        assert len(up.requests) == 3           # the demo model needs no network
        assert [r.json.get("max_tokens") for r in up.requests] == [1, 1, 1]
        probes = [line for line in out.splitlines() if line.startswith("  probe: ")]
        assert len(probes) == 4, out
        assert probes[0].startswith("  probe: completed in ") and "(fast path): 'OK'" in probes[0]
        assert "(fast path): 'OK'" in probes[1]
        assert "(litellm path): 'OK'" in probes[2]
        assert out.splitlines()[-1] == "all 4 alias(es) usable"

        # A provider that refuses the key: exit 1, and the probe says what came back.
        up.enqueue(http_error("openai", 401), stream("anthropic", ["OK"]),
                   stream("openai", ["OK"]))
        code, out, err = await _relay_check(cfg, "--probe", env=env)
        assert code == 1, out + err
        probe = next(line for line in out.splitlines() if line.startswith("  probe: "))
        assert probe.startswith("  probe: failed in ") and "credentials" in probe, probe
        assert out.splitlines()[-1] == "not usable: oai"
        assert CHECK_SECRET not in out + err


def test_check_flags_a_provider_without_default_endpoint(tmp_path, monkeypatch, capsys,
                                                         caplog):
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[models.vllm]\nmodel = "hosted_vllm/qwen"\n')
    monkeypatch.delenv("HOSTED_VLLM_API_BASE", raising=False)
    code, out, _err = _relay_check_here(cfg, capsys, caplog)
    assert code == 1
    assert "provider hosted_vllm has no default endpoint: set api_base" in out


def test_check_config_error_exits_2(tmp_path, capsys, caplog):
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[models.gpt]\nmodel = "openai/gpt-4o-mini"\napi_key = "sk-inline"\n')
    code, out, err = _relay_check_here(cfg, capsys, caplog)
    assert code == 2
    assert "configuration error" in err and "sk-inline" not in out + err
