"""The layout shows the architecture (issue 12, item 7): each package of ``relay/`` has one
role, and the sans-I/O layers import no I/O.

- ``llm_relay_protocol`` and ``relay.core`` are sans-I/O: no asyncio, sockets, websockets, HTTP
  clients, LiteLLM or Redis, and nothing from the relay's I/O packages. The interfaces
  between the hub and its adapters (``relay.core.ports``) are in ``relay.core`` too;
- ``relay.runtime`` (the asyncio glue) may use the adapters; the adapters (``relay.upstream``,
  ``relay.cluster``, ``relay.http``) never import the glue: they implement the ports of
  ``relay.core.ports`` instead;
- the hub (``relay.runtime.hub``) imports none of what implements its ports: not the
  sessions, not the upstream adapters, not the replication;
- only the hub changes a stream: nothing else assigns a field of a stream record or of its
  log, or calls a stream's source or its attachment's subscriber (issue 12, item 1).

Imports anywhere in a module count (function level and ``TYPE_CHECKING`` too), read with
``ast`` as in tests/test_import_cycles.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.test_import_cycles import PACKAGES, ROOT
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


def _violations(package: str, forbidden, source: Path | None = None) -> list[str]:
    """``path imports name`` for every import in the (sub)package ``package`` (dotted) that
    ``forbidden(name)`` rejects; ``source``: the folder holding it (default: ``PACKAGES``)."""
    source = source or PACKAGES[package.partition(".")[0]]
    return [f"{path.relative_to(source)} imports {name}"
            for path in sorted((source / package.replace(".", "/")).rglob("*.py"))
            for name in sorted(_imports(path, source)) if forbidden(name)]


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("package", ["llm_relay_protocol", "relay.core"])
def test_sans_io_layers_import_no_io(package):
    bad = _violations(package, lambda n: _under(n, IO_MODULES) or _under(n, (
        "relay.runtime", "relay.upstream", "relay.cluster", "relay.http", "relay.client",
        "llm_relay_client")))
    assert not bad, "\n".join(bad)


def test_protocol_imports_nothing_of_the_relay():
    assert not _violations("llm_relay_protocol", lambda n: _under(n, ("relay", "llm_relay_client")))


def test_the_client_imports_nothing_of_the_server():
    """llm-relay-client installs without the server: its package may import the protocol
    package and its own modules, never ``relay`` (tests/packaging runs the built wheel
    where the server is not installed)."""
    assert not _violations("llm_relay_client", lambda n: _under(n, ("relay",)))


@pytest.mark.parametrize("package", ["relay.upstream", "relay.cluster", "relay.http"])
def test_adapters_never_import_the_asyncio_glue(package):
    bad = _violations(package, lambda n: _under(n, ("relay.runtime",)))
    assert not bad, "\n".join(bad)


#: What the hub may import of the relay: the sans-I/O cores (its ports among them), the
#: settings, the metrics, and the group limits' types it holds for the sessions.
HUB_MAY_IMPORT = ("llm_relay_protocol", "relay.config", "relay.core", "relay.metrics",
                  "relay.cluster.shared_limits")


def test_the_hub_imports_none_of_what_implements_its_ports():
    hub = ROOT / "relay" / "runtime" / "hub.py"
    bad = sorted(n for n in _imports(hub) if (_under(n, ("relay", "llm_relay_protocol"))
                                              and not _under(n, HUB_MAY_IMPORT)))
    assert not bad, bad


#: Fields of a stream record (``HubStream``) and of its log (``FrameLog``) that say where
#: the stream is: only their owner assigns them (the hub; the log itself).
#: (Names other objects use too, such as ``principal`` or ``budget``, are left out.)
STREAM_FIELDS = frozenset({
    "key", "id", "alias", "session_id", "source", "log", "remote", "task", "attachment",
    "end", "state", "started_at", "detached_at", "timer", "timer_kind", "shared", "charged",
    "replicated", "trimmed_through", "finished", "last_seq", "keep", "end_offset",
    "max_bytes"})


def _changes_of_streams(path: Path, root: Path = ROOT) -> list[str]:
    """Assignments to another object's stream fields (``x.state = ...``; ``self.state``
    is the object's own) and calls of a stream's source or subscriber in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            if (isinstance(target, ast.Attribute) and target.attr in STREAM_FIELDS
                    and not (isinstance(target.value, ast.Name) and target.value.id == "self")):
                found.append(f"{path.relative_to(root)}:{node.lineno} assigns "
                             f"{ast.unparse(target)}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Attribute)
                and node.func.value.attr in ("source", "subscriber")):
            found.append(f"{path.relative_to(root)}:{node.lineno} calls "
                         f"{ast.unparse(node.func)}")
    return found


def test_only_the_hub_changes_a_stream():
    """Replication used to cancel a stream's source, notify its subscriber and set its
    fields itself, behind the lifecycle table's back."""
    owners = {ROOT / "relay" / "runtime" / "hub.py", ROOT / "relay" / "core" / "streamlog.py"}
    bad = [line for path in _modules("relay") if path not in owners
           for line in _changes_of_streams(path)]
    assert not bad, "\n".join(bad)


def test_the_stream_checker_sees_what_replication_used_to_do(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f(stream, att):\n    stream.replicated = True\n"
                     "    stream.log.trimmed_through = 3\n    stream.source.cancel('x')\n"
                     "    att.subscriber.taken_over(att)\n    self.state = 1\n"
                     "    att.cursor = 2\n")
    found = _changes_of_streams(probe, tmp_path)
    assert [line.split(" ", 1)[1] for line in found] == [
        "assigns stream.replicated", "assigns stream.log.trimmed_through",
        "calls stream.source.cancel", "calls att.subscriber.taken_over"]


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
    assert _violations("relay.core", lambda n: _under(n, IO_MODULES), tmp_path) == [
        "relay/core/probe.py imports asyncio"]
    assert _violations("relay.core", lambda n: _under(n, ("relay.runtime",)), tmp_path) == [
        "relay/core/probe.py imports relay.runtime"]
