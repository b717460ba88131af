"""The layout shows the architecture (issue 12, item 7): each package of ``relay/`` has one
role, and the sans-I/O layers import no I/O.

- ``protocol`` and ``relay.core`` are sans-I/O: no asyncio, sockets, websockets, HTTP
  clients, LiteLLM or Redis, and nothing from the relay's I/O packages;
- ``relay.runtime`` (the asyncio glue) may use the adapters; the adapters (``relay.upstream``,
  ``relay.cluster``, ``relay.http``) never import the glue, except ``relay.cluster`` which
  implements the hub's ports (it imports ``relay.runtime.hub`` for their types only).

Imports anywhere in a module count (function level and ``TYPE_CHECKING`` too), read with
``ast`` as in tests/test_import_cycles.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IO_MODULES = {"asyncio", "socket", "selectors", "websockets", "httpx", "aiohttp", "litellm",
              "openai", "redis", "subprocess", "threading"}


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every absolute module name imported anywhere in ``path`` (relative ones resolved
    against its package, ``root`` being the folder that holds the top-level packages)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    package = parts[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module or "")
    return found


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _violations(folder: str, forbidden, root: Path = ROOT) -> list[str]:
    return [f"{path.relative_to(root)} imports {name}"
            for path in sorted((root / folder).rglob("*.py"))
            for name in sorted(_imports(path, root)) if forbidden(name)]


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("folder", ["protocol", "relay/core"])
def test_sans_io_layers_import_no_io(folder):
    bad = _violations(folder, lambda n: _under(n, IO_MODULES) or _under(n, (
        "relay.runtime", "relay.upstream", "relay.cluster", "relay.http", "relay.client")))
    assert not bad, "\n".join(bad)


def test_protocol_imports_nothing_of_the_relay():
    assert not _violations("protocol", lambda n: _under(n, ("relay",)))


@pytest.mark.parametrize("folder", ["relay/upstream", "relay/http"])
def test_adapters_never_import_the_asyncio_glue(folder):
    bad = _violations(folder, lambda n: _under(n, ("relay.runtime",)))
    assert not bad, "\n".join(bad)


def test_every_relay_package_says_what_it_owns():
    for init in (ROOT / "relay").glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc) > 80, f"{init.relative_to(ROOT)} has no docstring"
    for path in _modules("relay"):
        if path.name != "__init__.py" or path.parent.name != "relay":
            assert ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))), path


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The detector itself: imports hidden in a function, relative ones included, are found
    (so the tests above can fail)."""
    (tmp_path / "relay" / "core").mkdir(parents=True)
    (tmp_path / "relay" / "core" / "probe.py").write_text(
        '"""probe"""\n\ndef f():\n    import asyncio\n    from ..runtime import hub\n')
    assert _violations("relay/core", lambda n: _under(n, IO_MODULES), tmp_path) == [
        "relay/core/probe.py imports asyncio"]
    assert _violations("relay/core", lambda n: _under(n, ("relay.runtime",)), tmp_path) == [
        "relay/core/probe.py imports relay.runtime"]
