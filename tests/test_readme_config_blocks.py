"""Every config block we publish loads, and every alias in it builds its request: a
documented example can never fail at its first request.

Each ```toml block of the documentation (README.md, client_demo/README.md, docs/: the list of
tests/test_readme_examples.py) is written to a file and loaded as ``relay serve --config``
loads it (``RelaySettings`` + ``build_registry``: the real settings and model registry), with
every key variable it names set to a dummy value (the reader's real key). Then each alias
builds the request it would send (``relay.check.describe_alias``: on the fast path
``FastRoute.build_request``, whose URL must be the provider's), and ``relay check --config``
on the block exits 0 and prints no key. The command runs in this process (``relay.cli.main``,
the console script's own entry point), so the blocks share one LiteLLM import instead of
paying one per block in a subprocess.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import pytest

from relay.app import build_registry
from relay.check import describe_alias
from relay.cli import main as relay_cli
from relay.config import RelaySettings
from tests.test_readme_examples import DOCS, ROOT, fenced_blocks

DUMMY_KEY = "sk-doc-example-dummy-0123456789"



def toml_blocks(path: Path) -> list[tuple[str, str]]:
    """``(file:line, text)`` of each ```toml block of a Markdown file."""
    return [(f"{path.relative_to(ROOT)}:{start + 1}", "\n".join(body) + "\n")
            for start, lang, body in fenced_blocks(path) if lang == "toml"]


BLOCKS = [block for doc in DOCS if doc.exists() for block in toml_blocks(doc)]


def key_variables(text: str) -> set[str]:
    models = tomllib.loads(text).get("models", {})
    return {entry[name] for entry in models.values()
            for name in ("api_key_env", "azure_ad_token_env") if name in entry}


def test_the_docs_publish_config_blocks():
    # README's minimal config; docs/configuration.md's three-line, fuller and fast = false ones
    assert len(BLOCKS) >= 4, BLOCKS
    assert any(where.startswith("README.md:") for where, _ in BLOCKS), BLOCKS


@pytest.mark.parametrize(("where", "text"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_block_loads_and_every_alias_builds_its_request(where, text, tmp_path, monkeypatch):
    for name in key_variables(text):
        monkeypatch.setenv(name, DUMMY_KEY)
    config = tmp_path / "relay.toml"
    config.write_text(text)
    registry = build_registry(RelaySettings(config=config))
    assert registry.aliases == list(tomllib.loads(text)["models"])
    for spec in registry.specs:
        report = describe_alias(spec)
        assert report.usable, (where, report.lines())
        if spec.path.route is not None:
            provider = spec.path.route.provider
            assert report.endpoint.startswith("POST "), report.endpoint
            if spec.api_base:
                assert report.endpoint[5:].startswith(spec.api_base.rstrip("/")), report
            elif provider == "openai":
                assert report.endpoint == "POST https://api.openai.com/v1/chat/completions"
            elif provider == "anthropic":
                assert report.endpoint == "POST https://api.anthropic.com/v1/messages"


@pytest.mark.parametrize(("where", "text"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_relay_check_passes_on_block(where, text, tmp_path, monkeypatch, capsys, caplog):
    """``relay check --config`` on the block: the command's own code (``relay.cli.main``),
    called in this process. A subprocess per block added nothing but a LiteLLM import of
    its own (14-17 s each on a loaded machine); ``python -m relay check`` as a process, its
    exit codes and output, is tested in tests/relay/test_cli.py."""
    config = tmp_path / "relay.toml"
    config.write_text(text)
    for name in key_variables(text):
        monkeypatch.setenv(name, DUMMY_KEY)
    with caplog.at_level(logging.WARNING):        # what a process prints to stderr
        code = relay_cli(["check", "--config", str(config)])
    out = capsys.readouterr()
    assert code == 0, (where, out.out + out.err)
    assert out.out.splitlines()[-1] == \
        f"all {len(tomllib.loads(text)['models'])} alias(es) usable", out.out
    assert DUMMY_KEY not in out.out + out.err + caplog.text
