"""Every Python and shell block in README.md, client_demo/README.md, docs/ and the protocol
documents docs/ includes (clients/python/llm_relay_protocol/PROTOCOL.md, clients/python/llm_relay_protocol/AISDK.md) runs as written, every
flag they document exists, and they tell no development history (that is CHANGELOG.md's).
The JavaScript/TSX blocks run in tests/browser/test_readme_js_examples.py, the TOML blocks in
tests/test_readme_config_blocks.py, and the docs site builds in tests/test_readme_docs_site.py.

How the blocks run: each fenced ```python / ```sh block is one test. A `relay serve` on the
demo model (a real subprocess, `--demo-tps 0`) stands in for the relay the docs assume on
127.0.0.1:8765. Three substitutions, and only these, are made to the text before it runs:

* `127.0.0.1:8765` -> the test relay's address (`8765` -> a fresh free port in a block
  marked `serves`, which starts a relay of its own);
* `.venv/bin/` -> the bin directory of the virtualenv running the tests (the docs' `.venv`);
* nothing else: the blocks run from the repository root as in a fresh terminal: the venv is
  not on PATH (a bare `relay` is "command not found"; the docs say `.venv/bin/relay`) and no
  earlier block's `export` is in the environment (`RELAY_TOKEN_SECRET` and the `RELAY_*`
  settings are unset); `PYTHONPATH` = the repository and `RELAY_URL` = the test relay's URL
  (the demo clients' default for `--url`, as 8765 is when it is unset).

Python blocks run as `python -c BLOCK`. Shell blocks run with `bash -e -o pipefail`, in a
process group of their own that is killed afterwards (a block may start `relay serve &`),
and `RELAY_PORT` pointing at a free port so a relay they start never takes 8765. Each must
exit 0 without a traceback.

Markers, an HTML comment on the line before the fence (invisible on GitHub and in the site):

* `<!-- snippet: serves -->`: the block starts a relay in the foreground. It passes when the
  relay prints its `llm-relay listening on` line; then it is stopped (SIGTERM).
* `<!-- snippet: skip (reason) -->`: not run. Only for the kinds of block in SKIP_KINDS
  (installs, the whole suite, benchmarks, a real provider's key, ...); the reason is required
  and must name its kind.
* `browser`, `browser-auth`, `node`, `react`: how a JavaScript/TSX block runs (see
  tests/browser/test_readme_js_examples.py).

Other fences (```text, ```json, bare ```) are documentation, not commands, and are not run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Every Markdown page a reader is pointed to: the READMEs, docs/ and the protocol documents
#: docs/PROTOCOL.md and docs/AISDK.md include.
DOCS = [ROOT / "README.md", ROOT / "client_demo" / "README.md",
        ROOT / "client_demo" / "ai-sdk" / "README.md",
        *sorted((ROOT / "docs").glob("**/*.md")),
        ROOT / "clients" / "python" / "llm_relay_protocol" / "PROTOCOL.md", ROOT / "clients" / "python" / "llm_relay_protocol" / "AISDK.md"]
VENV_BIN = str(Path(sys.executable).parent)
RUN_TIMEOUT = 120

_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!--\s*snippet:\s*([\w-]+)\s*(.*?)\s*-->\s*$")
#: The only blocks not run, by kind: what a skip reason must say. Anything else runs.
SKIP_KINDS = {
    "install": "installs packages (the project, npm packages, the benchmark's proxy)",
    "whole test suite": "runs the whole test suite",
    "benchmark": "minutes of CPU",
    "real OPENAI_API_KEY": "needs a real provider's key",
    "committed file": "rewrites a file of the repository",
    "/v1/responses": "the OpenAI Responses endpoint, until it is merged",
}


@dataclass(frozen=True)
class Snippet:
    file: str
    line: int
    lang: str  # "python" or "sh"
    code: str
    marker: str | None  # None, "serves" or "skip"
    reason: str

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def fenced_blocks(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(index of the opening fence line, language, body lines)`` of each fenced block of a
    Markdown file (also read by tests/test_readme_config_blocks.py)."""
    blocks = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start, lang, body = i, fence.group(1), []
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        i += 1
        blocks.append((start, lang, body))
    return blocks


def marker_of(lines: list[str], start: int) -> str | None:
    """The snippet marker on the line before a fence at line index ``start``, if any."""
    match = _MARKER.match(lines[start - 1]) if start else None
    return match.group(1) if match else None


def extract(path: Path) -> list[Snippet]:
    """The ```python and ```sh/```bash blocks of a Markdown file, with their markers."""
    snippets: list[Snippet] = []
    lines = path.read_text().splitlines()
    for start, lang, body in fenced_blocks(path):
        if lang in ("sh", "bash", "shell", "console"):
            lang = "sh"
        elif lang not in ("python", "py"):
            continue
        marker = _MARKER.match(lines[start - 1]) if start else None
        snippets.append(Snippet(
            str(path.relative_to(ROOT)), start + 1, "python" if lang == "py" else lang,
            "\n".join(body) + "\n", marker.group(1) if marker else None,
            marker.group(2).strip("() ") if marker else ""))
    return snippets


SNIPPETS = [s for doc in DOCS for s in extract(doc)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _path_without(directory: str) -> str:
    """PATH as a fresh terminal has it: without the virtualenv running the tests."""
    return os.pathsep.join(entry for entry in os.environ.get("PATH", "").split(os.pathsep)
                           if entry and os.path.realpath(entry) != os.path.realpath(directory))


def _env(relay_port: int, relay_url: str | None = None) -> dict:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1",
           "PATH": _path_without(VENV_BIN), "PYTHONPATH": str(ROOT),
           "RELAY_PORT": str(relay_port)}
    for name in [name for name in env if name.startswith("RELAY_") and name != "RELAY_PORT"]:
        env.pop(name)
    if relay_url:
        env["RELAY_URL"] = relay_url
    return env


@pytest.fixture(scope="module")
def relay_address():
    """`relay serve` on the demo model, as README's reader runs it; yields 127.0.0.1:PORT."""
    proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--port", "0",
                             "--demo-tps", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(0), cwd=ROOT)
    try:
        line = proc.stdout.readline()
        match = re.search(r"listening on ws://(127\.0\.0\.1:\d+)/ws", line)
        assert match, line + (proc.stderr.read() if proc.poll() is not None else "")
        yield match.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        # `relay serve` prints its asyncio tasks on SIGUSR2 and every thread's stack on
        # SIGUSR1 (faulthandler): say where it was stuck, then kill it. A warning, not a
        # failure: the snippet itself ran.
        for sig in (signal.SIGUSR2, signal.SIGUSR1):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        warnings.warn(f"a relay did not exit within 30 s of SIGTERM (pid {proc.pid}); "
                      "its stacks are in its output", stacklevel=2)


def _run(snippet: Snippet, relay_address: str, tmp_path: Path) -> None:
    own_port = _free_port()
    code = snippet.code.replace(".venv/bin/", VENV_BIN + "/")
    if snippet.marker == "serves":
        code = code.replace("8765", str(own_port))
    else:
        code = code.replace("127.0.0.1:8765", relay_address)
    if snippet.lang == "python":
        argv = [sys.executable, "-c", code]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", code]
    if snippet.marker == "serves":
        _run_server_block(snippet, argv, own_port)
        return
    # Output to a file, not a pipe: a relay the block leaves running in the background
    # would hold a pipe open, and the block's end is its own process exiting.
    log = tmp_path / "output.txt"
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=_env(own_port, f"ws://{relay_address}/ws"),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        try:
            proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{snippet.id} did not finish within {RUN_TIMEOUT} s:\n{log.read_text()}")
        output = log.read_text()
        assert proc.returncode == 0, f"{snippet.id} exited {proc.returncode}:\n{output}"
        assert "Traceback" not in output, f"{snippet.id}:\n{output}"
    finally:
        _kill_group(proc)


def _run_server_block(snippet: Snippet, argv: list[str], port: int) -> None:
    """A block that runs a relay in the foreground: it passes once the relay prints its
    listening line (read line by line from a pipe; EOF first means the block ended)."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(port), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen: list[str] = []
    drain: threading.Thread | None = None
    try:
        for line in proc.stdout:
            seen.append(line)
            if "llm-relay listening on" in line:
                # Keep reading: a relay whose pipe fills up blocks on its next log line.
                drain = threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True)
                drain.start()
                return
        pytest.fail(f"{snippet.id} ended without starting a relay:\n{''.join(seen)}")
    finally:
        with warnings.catch_warnings(record=True) as slow_exit:
            warnings.simplefilter("always")
            _kill_group(proc)
        if drain is not None:
            drain.join(timeout=5)            # the relay exited: its pipe is at EOF
        if slow_exit:
            warnings.warn(f"{snippet.id}: {slow_exit[0].message}:\n{''.join(seen[-200:])}",
                          stacklevel=2)
        proc.stdout.close()


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.marker != "skip"],
                         ids=lambda s: s.id)
def test_readme_snippet_runs_as_written(snippet, relay_address, tmp_path):
    _run(snippet, relay_address, tmp_path)


def test_shell_blocks_call_the_project_commands_by_their_venv_path():
    """A bare `relay` or `python` is "command not found" (or another Python) in a fresh
    terminal; the README's blocks say `.venv/bin/relay` and `.venv/bin/python`
    (`python3` only for the standard library)."""
    bare = re.compile(r"(?:^|[;&|(`]|\$\(|\bexec\s)\s*(?:[A-Z_]+=\S+\s+)*(relay|python)\s")
    found = [(s.id, line) for s in SNIPPETS if s.lang == "sh" and s.marker != "skip"
             for line in s.code.splitlines() if bare.search(line.split("#")[0])]
    assert not found, found


def test_the_docs_have_runnable_snippets_and_skip_only_what_cannot_run():
    """The extraction finds the blocks (a broken fence regex would silently test nothing),
    every skip names its reason and its reason is one of the kinds that cannot run in a
    test, and no Python or shell block carries a marker meant for JavaScript."""
    by_lang = {lang: [s for s in SNIPPETS if s.lang == lang] for lang in ("python", "sh")}
    assert len(by_lang["python"]) >= 5 and len(by_lang["sh"]) >= 10, SNIPPETS
    assert {s.file for s in SNIPPETS} >= {"README.md", "client_demo/README.md",
                                           "docs/getting-started.md"}
    wrong = [(s.id, s.marker) for s in SNIPPETS if s.marker not in (None, "serves", "skip")]
    assert not wrong, f"markers for Python/shell blocks are `serves` and `skip`: {wrong}"
    skipped = [s for s in SNIPPETS if s.marker == "skip"]
    unexplained = [(s.id, s.reason) for s in skipped
                   if not any(kind in s.reason for kind in SKIP_KINDS)]
    assert not unexplained, f"a skip must say which of {sorted(SKIP_KINDS)} it is: {unexplained}"
    # Most blocks run: the skipped ones are the exceptions.
    assert len(skipped) * 2 < len(SNIPPETS), [s.id for s in skipped]
    # The terminal chat is documented as a command that runs.
    assert any("client_demo/chat.py" in s.code for s in SNIPPETS if s.marker is None)


# ---------------------------------------------------------------------------- history

#: Development history belongs in CHANGELOG.md, not in what a newcomer reads.
HISTORY = re.compile(r"\bissues? #?\d+|\(issue|\bround \d|\brounds? ago\b|\bprevious round"
                     r"|\bfixed by\b|\bthis session\b|\bin this round\b", re.IGNORECASE)


def test_the_docs_tell_no_development_history():
    found = [(str(doc.relative_to(ROOT)), number + 1, line.strip()[:100]) for doc in DOCS
             for number, line in enumerate(doc.read_text().splitlines())
             if HISTORY.search(line)]
    assert not found, found


def test_the_readme_stays_short():
    """README is the front page: what it is, the quick start, the three ways to connect, a
    real provider, where to go next. Everything else belongs in docs/."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 260, len(lines)
    for section in ("## Quick start", "## Connect a client", "## Use a real provider",
                    "## Architecture", "## Documentation"):
        assert section in lines, section


# ---------------------------------------------------------------------------- flags


def _help_flags(*argv: str) -> set[str]:
    out = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True,
                         cwd=ROOT, env=_env(0), timeout=60)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.stdout))


def _doc_flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


#: Pages whose commands are all other tools' (pip, python -m build, twine, npm): their flags
#: are those tools' to define, not ours.
_OTHER_TOOLS_ONLY = {"publishing.md"}


def test_every_flag_the_docs_document_exists():
    """The docs' flags against the commands' own `--help`: the settings table of
    docs/configuration.md is all `relay serve` flags; anywhere else a flag must belong to one
    of the commands the docs show (serve, token mint, check, the demo clients, the
    benchmarks, the schema generator, mkdocs)."""
    commands = [("-m", "relay", "serve"), ("-m", "relay", "token", "mint"),
                ("-m", "relay", "check"), ("-m", "mkdocs", "build"),   # the docs site's own
                *[(script,) for script in (
                    "client_demo/demo_client.py", "client_demo/chat.py",
                    "client_demo/responses_agent.py",
                    "bench/relay_vs_litellm.py", "bench/render_markdown.py",
                    "bench/attack_latency.py", "bench/fast_path.py",
                    "bench/detached_streams_rss.py", "bench/capacity.py",
                    "bench/relay_layers.py", "bench/first_stream.py")]]
    # Each --help is a Python start-up of its own: ask them all at once.
    with ThreadPoolExecutor(max_workers=4) as pool:
        flags = dict(zip(commands, pool.map(lambda argv: _help_flags(*argv), commands)))
    serve = flags[("-m", "relay", "serve")]
    known = set().union(*flags.values())
    # The schema generator reads its one flag by hand (no --help): take it from its source.
    known |= _doc_flags((ROOT / "clients" / "python" / "llm_relay_protocol" / "schema.py").read_text())
    configuration = (ROOT / "docs" / "configuration.md").read_text()
    settings = configuration[configuration.index("## Settings"):
                             configuration.index("\n## ", configuration.index("## Settings") + 1)]
    table = "\n".join(line for line in settings.splitlines() if line.startswith("| `--"))
    assert len(_doc_flags(table)) >= 15, table
    assert _doc_flags(table) - serve == set(), "docs/configuration.md's settings table " \
        "names flags missing from `relay serve --help`"
    for path in DOCS:
        if path.name in _OTHER_TOOLS_ONLY:
            continue
        missing = _doc_flags(path.read_text()) - known
        assert not missing, f"{path.name} documents flags no command has: {sorted(missing)}"
    assert "--redis-max-frames" in serve
