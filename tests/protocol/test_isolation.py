"""``llm_relay_protocol`` is sans-I/O: importing it (every submodule) loads no asyncio, websockets,
litellm or httpx, so any client, sync or async, can use it."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import llm_relay_protocol

FORBIDDEN = ("asyncio", "websockets", "litellm", "httpx")
PACKAGE_DIR = Path(llm_relay_protocol.__file__).parent
ROOT = Path(__file__).resolve().parents[2]  # the repository (not where the package is)
SUBMODULES = sorted(f"{llm_relay_protocol.__name__}.{m.name}"
                    for m in pkgutil.iter_modules([str(PACKAGE_DIR)]))

PROBE = """
import importlib, json, sys
before = [m for m in {forbidden!r} if m in sys.modules]
for name in ["llm_relay_protocol", *{submodules!r}]:
    importlib.import_module(name)
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({forbidden!r}))
print(json.dumps({{"before": before, "loaded": loaded}}))
"""


def test_submodules_found():
    assert {"llm_relay_protocol.codec", "llm_relay_protocol.codes", "llm_relay_protocol.frames", "llm_relay_protocol.messages",
            "llm_relay_protocol.schema", "llm_relay_protocol.version"} <= set(SUBMODULES)


def test_import_loads_no_io_libraries():
    code = PROBE.format(forbidden=FORBIDDEN, submodules=SUBMODULES)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["before"] == [], "the interpreter preloads these; the check would be void"
    assert result["loaded"] == [], f"importing protocol loaded {result['loaded']}"


def test_no_module_imports_io_libraries():
    # Static check too: it also covers imports inside functions, which run only later.
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
