"""The JS/TS client as a user gets it: `npm pack` of clients/js (the npm package
``llm-relay-client``), installed from the tarball into a fresh Node project whose
TypeScript, ``ws`` and type packages are pinned by tests/packaging/js/package-lock.json
(`npm ci`), a strict TypeScript program (tests/packaging/js/consumer.ts) compiled with
``tsc --strict`` against the package's own ``.d.ts``, and run on the machine's Node (20+)
with ``ws`` injected against a real relay.

The relay serves the page's copy of the client from the same folder the tarball packs
(relay/http/web.py), so the Chromium tests (tests/browser) run the packed files; the last
test checks they are byte for byte the tarball's.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from relay.http import web
from relay.upstream.demo import demo_reply_tokens

from ..relay.helpers import start_relay
from ..test_import_cycles import ROOT

PACKAGE = ROOT / "clients" / "js"
CONSUMER = ROOT / "tests" / "packaging" / "js"
#: What the tarball holds: the module, its generated policy tables, their types, the rest npm adds.
PACKED_FILES = {"package.json", "README.md", "relay-client.js", "relay-client.d.ts",
                "client-policy.js", "client-policy.d.ts"}


def _npm(*args: str | Path, cwd: Path) -> str:
    npm = shutil.which("npm")
    assert npm, "npm (Node 20+) is required for the JS client package tests"
    done = subprocess.run([npm, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"npm {args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict:
    """The tarball `npm pack` makes, and a fresh project with it installed and compiled."""
    work = tmp_path_factory.mktemp("js-package")
    info, = json.loads(_npm("pack", "--json", "--pack-destination", work, cwd=PACKAGE))
    tarball = work / info["filename"]
    project = work / "consumer"
    project.mkdir()
    for name in ("package.json", "package-lock.json", "tsconfig.json", "consumer.ts"):
        shutil.copy(CONSUMER / name, project / name)
    quiet = ("--no-audit", "--no-fund", "--prefer-offline", "--loglevel=error")
    _npm("ci", *quiet, cwd=project)
    _npm("install", "--no-save", *quiet, tarball, cwd=project)
    tsc = subprocess.run(["node", "node_modules/typescript/bin/tsc", "--strict", "-p", "."],
                         cwd=project, capture_output=True, text=True, timeout=300)
    assert tsc.returncode == 0, f"tsc --strict failed:\n{tsc.stdout}\n{tsc.stderr}"
    return {"info": info, "tarball": tarball, "project": project}


def test_the_tarball_holds_the_module_its_policy_and_their_types(packed):
    files = {entry["path"] for entry in packed["info"]["files"]}
    assert files == PACKED_FILES
    manifest = json.loads((PACKAGE / "package.json").read_text("utf-8"))
    assert packed["info"]["name"] == manifest["name"] == "llm-relay-client"
    assert manifest["type"] == "module"
    assert "dependencies" not in manifest, "the client has no runtime dependencies"
    installed = packed["project"] / "node_modules" / "llm-relay-client"
    assert json.loads((installed / "package.json").read_text("utf-8"))["version"] == \
        manifest["version"]


async def test_a_strict_typescript_program_streams_from_a_real_relay_on_node(packed):
    async with start_relay() as server:
        proc = await asyncio.create_subprocess_exec(
            "node", "dist/consumer.js", server.url, cwd=packed["project"],
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["protocol"] == "llm-relay.v1"
    assert result["text"] == "".join(demo_reply_tokens(
        [{"role": "user", "content": "hello from TypeScript"}]))
    assert result["types"][0] == "started" and result["types"][-1] == "finish"
    assert result["status"] == "completed" and result["totalTokens"] > 0
    assert result["refused"] == "unknown_model"
    assert result["maxAttempts"] == 8 and result["retries1006"] is True


def test_the_relay_serves_the_page_the_packed_client(packed):
    """The chat page and the Chromium tests import /relay-client.js and /client-policy.js
    from the relay: the very files in the tarball."""
    with tarfile.open(packed["tarball"]) as tar:
        for name in web.CLIENT_PACKAGE_FILES:
            packed_bytes = tar.extractfile(f"package/{name}").read()
            served = web.resolve(f"/{name}")
            assert served is not None and served.read_bytes() == packed_bytes, name
