"""The documentation site builds with `mkdocs build --strict` (mkdocs-material, from the test
extra), so CI fails on a broken link, a missing anchor, a page left out of the navigation, or
an include of clients/python/llm_relay_protocol/*.md that no longer resolves. About a second; no network."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def nav_pages(config: str) -> set[str]:
    """The ``something.md`` entries of mkdocs.yml's nav (one per line, ``- Title: page.md``)."""
    nav = config[config.index("\nnav:"):]
    return {line.rsplit(":", 1)[1].strip() for line in nav.splitlines()
            if line.strip().startswith("- ") and line.rstrip().endswith(".md")}


def test_every_docs_page_is_in_the_navigation():
    """A page missing from the nav is only an INFO line to mkdocs: a reader never finds it."""
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").glob("**/*.md")}
    listed = nav_pages((ROOT / "mkdocs.yml").read_text())
    assert pages - listed == set(), "add these pages to mkdocs.yml's nav"
    assert listed - pages == set(), "mkdocs.yml's nav names pages that do not exist"


def test_the_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                          "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    # The protocol documents are included, not linked: their text is on the site.
    protocol = (tmp_path / "site" / "PROTOCOL" / "index.html").read_text()
    assert "Close codes" in protocol and "--8&lt;--" not in protocol
    assert (tmp_path / "site" / "getting-started" / "index.html").is_file()



def test_the_readmes_link_to_files_that_exist():
    """mkdocs checks links inside docs/; the READMEs (read on the forge, outside the site) are
    checked here: every relative link names a file or directory of the repository."""
    missing = set()
    for readme in (ROOT / "README.md", ROOT / "client_demo" / "README.md",
                   ROOT / "client_demo" / "ai-sdk" / "README.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme.read_text()):
            if "://" in target:
                continue
            path = (readme.parent / target).resolve()
            if not path.exists():
                missing.add(str(path.relative_to(ROOT)))
    assert not missing, sorted(missing)
