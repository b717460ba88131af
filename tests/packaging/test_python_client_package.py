"""The Python client as a user gets it: llm-relay-client's wheel and sdist, built the way CI
and a release build them (`python -m build`), the wheel installed into a clean venv where
the server is not (no LiteLLM, no ``relay``), imported, and streaming from a real relay.

The relay runs in this test's own process (the test venv has the server); the client runs
in the clean venv as a subprocess, isolated (``-I``: no repository folder on ``sys.path``),
so only what the wheel installed can be imported. The wheel's size and the client's import
time are printed (never asserted: the machine is shared).
"""

from __future__ import annotations

import asyncio
import email.parser
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from relay.upstream.demo import demo_reply_tokens

from ..relay.helpers import start_relay
from ..test_import_cycles import CLIENT_SOURCE, ROOT

#: What llm-relay-client may depend on at run time (issue 25: no LiteLLM, nothing else).
RUNTIME_DEPENDENCIES = {"websockets", "pydantic", "orjson"}
#: The protocol package's import name, and every package the wheel installs.
PROTOCOL_PACKAGE = "llm_relay_protocol"
TOP_LEVEL = {"llm_relay_client", PROTOCOL_PACKAGE}

CLIENT_SCRIPT = """
import asyncio, importlib.metadata, importlib.resources, importlib.util, json, sys, time
started = time.perf_counter()
import llm_relay_client
import_seconds = time.perf_counter() - started
from llm_relay_client import Finish, RelayClient, Token
import llm_relay_protocol

async def main(url):
    async with RelayClient(url) as client:
        text, finish = "", None
        stream = client.stream("demo", [{"role": "user", "content": "hello from the wheel"}])
        async for event in stream:
            if isinstance(event, Token):
                text += event.text
            elif isinstance(event, Finish):
                finish = event
        return {"text": text, "status": finish.status, "models": list(client.welcome.models)}

result = asyncio.run(main(sys.argv[1]))
result.update(
    import_seconds=import_seconds,
    version=llm_relay_client.__version__,
    client_file=llm_relay_client.__file__,
    protocol_file=llm_relay_protocol.__file__,
    litellm=importlib.util.find_spec("litellm") is not None,
    server=importlib.util.find_spec("relay") is not None,
    typed=[(importlib.resources.files(name) / "py.typed").is_file()
           for name in ("llm_relay_client", "llm_relay_protocol")],
    spec=(importlib.resources.files("llm_relay_protocol") / "PROTOCOL.md").is_file(),
    requires=importlib.metadata.requires("llm-relay-client"),
)
print(json.dumps(result))
"""


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """The client's sdist and wheel (`python -m build`, as CI builds them) and a clean venv
    with only the wheel and its dependencies installed (pip's cache serves them)."""
    work = tmp_path_factory.mktemp("client-package")
    # Built from a copy, so the build's egg-info and build/ never land in the work tree
    # (symlinks copied as their targets, as a fresh sdist would hold them).
    source = shutil.copytree(CLIENT_SOURCE, work / "source", symlinks=False,
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    dist = work / "dist"
    _run(sys.executable, "-m", "build", "--outdir", dist, source)
    wheel, = dist.glob("llm_relay_client-*.whl")
    sdist, = dist.glob("llm_relay_client-*.tar.gz")
    venv = work / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    # This venv's pip installs into the clean one: no second pip to bootstrap.
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", wheel)
    return {"wheel": wheel, "sdist": sdist, "venv": venv, "python": python}


def test_the_wheel_holds_the_client_and_the_protocol_package_only(built):
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = wheel.namelist()
        metadata = email.parser.Parser().parsestr(
            wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == TOP_LEVEL
    for package in TOP_LEVEL:
        assert f"{package}/py.typed" in names
    assert {f"{PROTOCOL_PACKAGE}/PROTOCOL.md", f"{PROTOCOL_PACKAGE}/schema.json"} <= set(names)
    assert metadata["Name"] == "llm-relay-client"
    required = {r.split(";")[0].split(">")[0].split("<")[0].split("=")[0].strip()
                for r in metadata.get_all("Requires-Dist")}
    assert required == RUNTIME_DEPENDENCIES


#: A user's program, type-checked with ``mypy --strict`` against the installed wheel: the
#: one error it must report proves the types are real (py.typed found, nothing is ``Any``).
USER_PROGRAM = """
from llm_relay_client import CompletionResult, RelayClient, Token


async def answer(url: str) -> str:
    async with RelayClient(url, token="t") as client:
        text = ""
        async for event in client.stream("demo", [{"role": "user", "content": "hi"}]):
            if isinstance(event, Token):
                text += event.text
        result: CompletionResult = await client.complete("demo", [{"role": "user", "content": "x"}])
        wrong: int = result.text
        return text + str(wrong)
"""


def test_a_users_program_type_checks_against_the_installed_wheel(built, tmp_path):
    program = tmp_path / "user_program.py"
    program.write_text(USER_PROGRAM, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--python-executable", str(built["python"]), "--config-file", os.devnull,
         str(program)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, done.stdout + done.stderr
    wrong_line = USER_PROGRAM.splitlines().index(
        "        wrong: int = result.text") + 1
    assert f"user_program.py:{wrong_line}: error: Incompatible types in assignment " \
        '(expression has type "str", variable has type "int")' in errors[0], errors


def test_the_sdist_builds_the_same_packages(built):
    with tarfile.open(built["sdist"]) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    assert "pyproject.toml" in members and "README.md" in members
    for package in TOP_LEVEL:
        assert f"{package}/__init__.py" in members and f"{package}/py.typed" in members


async def test_the_installed_wheel_streams_from_a_real_relay_without_the_server(built, tmp_path,
                                                                               capsys):
    async with start_relay() as server:
        proc = await asyncio.create_subprocess_exec(
            str(built["python"]), "-I", "-c", CLIENT_SCRIPT, server.url, cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 120)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    venv = str(built["venv"])
    assert result["client_file"].startswith(venv) and result["protocol_file"].startswith(venv)
    assert result["litellm"] is False, "LiteLLM was installed with the client"
    assert result["server"] is False, "the relay server was installed with the client"
    assert result["typed"] == [True, True] and result["spec"] is True
    assert result["version"] == "0.1.0"
    assert result["text"] == "".join(demo_reply_tokens(
        [{"role": "user", "content": "hello from the wheel"}]))
    assert result["status"] == "completed" and "demo" in result["models"]
    size = built["wheel"].stat().st_size
    installed = sum(p.stat().st_size for p in built["venv"].rglob("*") if p.is_file())
    with capsys.disabled():
        print(f"\nllm-relay-client wheel: {size / 1024:.0f} KiB; clean venv with its "
              f"dependencies: {installed / 2**20:.1f} MiB; `import llm_relay_client`: "
              f"{result['import_seconds'] * 1000:.0f} ms")


def test_the_server_wheel_depends_on_the_client_and_ships_no_protocol_package(tmp_path):
    """llm-relay-server (the root pyproject.toml) installs ``relay`` only: the protocol
    package comes from llm-relay-client, pinned to the same version."""
    source = tmp_path / "server"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "relay", source / "relay",
                    ignore=shutil.ignore_patterns("__pycache__"))
    _run(sys.executable, "-m", "build", "--wheel", "--outdir", tmp_path / "dist", source)
    wheel, = (tmp_path / "dist").glob("llm_relay_server-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = email.parser.Parser().parsestr(
            archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
    assert {name.split("/")[0] for name in names
            if not name.split("/")[0].endswith(".dist-info")} == {"relay"}
    client_version = tomllib.loads((CLIENT_SOURCE / "pyproject.toml").read_text())["project"][
        "version"]
    assert metadata["Version"] == client_version
    assert f"llm-relay-client=={client_version}" in metadata.get_all("Requires-Dist")
