"""`.ci/run` leaves nothing running that it started (issue 14, CI hygiene): the redis-server it
launches is stopped when it exits, also when the suite fails, and a Redis that was already
running is left alone. The script is run for real, with two edits so the check is quick and
safe: Redis on a free port instead of 6379 (the shared one), and the venv/install/pytest
lines replaced by a stand-in suite that records its exit status (and the npm installs
skipped)."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

from .redis_server import RedisServerProcess, redis_ping

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _script_on(port: int, tmp_path: Path, suite_status: int) -> Path:
    text = (ROOT / ".ci" / "run").read_text()
    text = text.replace("6379", str(port))
    text, installs = re.subn(r"(?m)^\s*(python3 -m venv|\.venv/bin/python -m pip).*$", ":",
                             text)
    text, suites = re.subn(r"(?m)^\.venv/bin/python -m pytest .*\|\| status=\$\?$",
                           f"(exit {suite_status}) || status=$?", text)
    # npm installs and builds for the Node tests (a copy of the script has no package dirs)
    text, npms = re.subn(r"(?m)^\s*\(cd (tests/aisdk|tests/responses-node|client_demo/ai-sdk) .*$", ":", text)
    assert installs == 3 and suites == 1 and npms == 3, \
        "the .ci/run lines this test replaces changed"
    (tmp_path / ".ci").mkdir()
    script = tmp_path / ".ci" / "run"
    script.write_text(text)
    return script


@pytest.mark.parametrize("suite_status", [0, 1])
def test_ci_run_stops_the_redis_it_started(tmp_path, suite_status):
    port = _free_port()
    out = subprocess.run(["bash", str(_script_on(port, tmp_path, suite_status))],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == suite_status, out.stderr
    assert not redis_ping("127.0.0.1", port), "the redis-server .ci/run started is still up"
    # It says what it does, step by step (README lists the same needs).
    said = [line for line in out.stdout.splitlines() if line.startswith("ci: ")]
    assert said[0] == f"ci: Redis: starting redis-server on 127.0.0.1:{port} (stopped when " \
        "this script exits)", out.stdout
    assert [line.split(":")[1].split()[0] for line in said[1:]] == \
        ["Chromium", "Node", "Python", "running"], out.stdout


def test_ci_run_leaves_a_redis_it_did_not_start_running(tmp_path):
    with RedisServerProcess() as server:
        out = subprocess.run(["bash", str(_script_on(server.port, tmp_path, 0))],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert redis_ping("127.0.0.1", server.port)
        assert f"ci: Redis: using the one answering on 127.0.0.1:{server.port}" in out.stdout
