"""Every JavaScript and TSX block of README.md, client_demo/README.md and docs/ runs as written
against a real relay: in the system Chromium, under the real Node, or bundled with the pinned
AI SDK packages and mounted in Chromium.

Each ```js / ```jsx / ```ts / ```tsx block must carry a marker (an HTML comment on the line
before the fence) saying how it runs; a block without one fails
`test_every_js_block_says_how_it_runs`:

* `<!-- snippet: browser -->`: a module in a page of a relay on the demo model (the page's
  origin is the relay's, as for the chat page). It is served at `/docs-snippet.mjs` and
  imported; the import resolves when the module ran to its end (top-level awaits included)
  and rejects with what it threw. Any uncaught page error fails the test too.
* `<!-- snippet: browser-auth -->`: the same against a relay run with `--auth`; the page's
  backend route the block fetches, `/api/relay-token`, answers a token minted with the
  relay's secret (what "your backend" does in the block's comment).
* `<!-- snippet: node -->`: written next to `relay-client.js` and `client-policy.js` as a
  `.mjs` file, with `ws` installed (tests/aisdk's pinned copy), run by `node`; it must exit 0.
* `<!-- snippet: react -->`: a module whose default export is a chat component taking
  `chatId`. It is bundled by the esbuild of client_demo/ai-sdk (the pinned `ai`,
  `@ai-sdk/react` and `react`), mounted in a page of the relay, and used as a person would: the
  test types a prompt into its input, presses Enter, and waits for the demo model's whole
  answer to appear on the page.

The one change made to a block's text: `127.0.0.1:8765` becomes the test relay's address.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from relay.core.auth import mint_token
from relay.upstream.demo import demo_reply_tokens

from ..relay.helpers import start_relay
from ..test_readme_examples import DOCS, ROOT, fenced_blocks, marker_of
from .test_relay_client_node import WS_MODULE, node

JS_LANGS = {"js", "javascript", "mjs", "jsx", "ts", "tsx"}
RUN_MARKERS = {"browser", "browser-auth", "node", "react"}
CLIENT_DIR = ROOT / "clients" / "js"
AI_SDK_DIR = ROOT / "client_demo" / "ai-sdk"
ESBUILD = AI_SDK_DIR / "node_modules" / ".bin" / "esbuild"
SECRET = "docs-snippet-secret-0123456789abcdef0123456789"


def js_blocks() -> list[tuple[str, str, str | None, str]]:
    """``(file:line, language, marker, code)`` of every JavaScript/TSX block."""
    found = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        for start, lang, body in fenced_blocks(doc):
            if lang in JS_LANGS:
                found.append((f"{doc.relative_to(ROOT)}:{start + 1}", lang,
                              marker_of(lines, start), "\n".join(body) + "\n"))
    return found


BLOCKS = js_blocks()


def _runs(marker: str) -> list:
    return [pytest.param(b[3], id=b[0]) for b in BLOCKS if b[2] == marker]


async def test_every_js_block_says_how_it_runs():
    assert len(BLOCKS) >= 4, BLOCKS   # README's page and AI SDK blocks, the docs' Node and auth ones
    unmarked = [(where, marker) for where, _, marker, _ in BLOCKS if marker not in RUN_MARKERS]
    assert not unmarked, f"JS blocks without a run marker ({sorted(RUN_MARKERS)}): {unmarked}"


def _for_relay(code: str, server) -> str:
    changed = code.replace("127.0.0.1:8765", f"127.0.0.1:{server.port}")
    assert changed != code or "8765" not in code
    return changed


async def _run_module_in_page(page, server, code: str) -> list[str]:
    """Serve the block at /docs-snippet.mjs on the relay's origin and import it; returns the
    page's console lines."""
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    await page.route("**/docs-snippet.mjs", lambda route: route.fulfill(
        status=200, content_type="text/javascript", body=_for_relay(code, server)))
    await page.goto(f"http://127.0.0.1:{server.port}/")
    async with asyncio.timeout(30):
        error = await page.evaluate("""async () => {
            try { await import('/docs-snippet.mjs'); return null; }
            catch (e) { return String(e && e.stack || e); } }""")
    assert error is None, f"the block threw: {error}\nconsole: {console}"
    return console


@pytest.mark.parametrize("code", _runs("browser"))
async def test_browser_block_runs_in_a_page_of_the_relay(page, code):
    async with start_relay() as server:
        console = await _run_module_in_page(page, server, code)
    assert any("completed" in line for line in console), console


@pytest.mark.parametrize("code", _runs("browser-auth"))
async def test_browser_block_runs_against_a_relay_with_auth(page, code):
    minted: list[str] = []

    async def token_backend(route):
        minted.append(mint_token(SECRET, "docs-reader", 300))
        await route.fulfill(status=200, content_type="text/plain", body=minted[-1])

    await page.route("**/api/relay-token", token_backend)
    async with start_relay(auth=True, token_secret=SECRET) as server:
        console = await _run_module_in_page(page, server, code)
    assert minted, "the block never asked the backend for a token"
    assert any("completed" in line for line in console), console


@pytest.mark.parametrize("code", _runs("node"))
async def test_node_block_runs_under_node(tmp_path, code):
    assert WS_MODULE.is_file(), "run `npm ci` in tests/aisdk (.ci/run does): it pins `ws`"
    for name in ("relay-client.js", "client-policy.js"):
        shutil.copy(CLIENT_DIR / name, tmp_path / name)
    (tmp_path / "node_modules").symlink_to(WS_MODULE.parents[1], target_is_directory=True)
    async with start_relay() as server:
        (tmp_path / "example.mjs").write_text(_for_relay(code, server))
        out = await node("example.mjs", cwd=tmp_path)
    if "process.stdout.write(frame.text)" in code:
        assert out == "".join(demo_reply_tokens([{"role": "user", "content": "hi"}]))


HARNESS = """import { createRoot } from 'react-dom/client';
import Chat from './snippet.tsx';
createRoot(document.getElementById('root')).render(<Chat chatId="docs-snippet-chat" />);
"""


def _bundle(tmp_path: Path, code: str) -> str:
    assert ESBUILD.is_file(), \
        "run `npm ci` in client_demo/ai-sdk (.ci/run does): it pins esbuild and the AI SDK"
    (tmp_path / "node_modules").symlink_to(AI_SDK_DIR / "node_modules", target_is_directory=True)
    (tmp_path / "snippet.tsx").write_text(code)
    (tmp_path / "entry.jsx").write_text(HARNESS)
    out = subprocess.run([str(ESBUILD), "entry.jsx", "--bundle", "--format=esm", "--jsx=automatic",
                          "--target=es2022", "--outfile=app.js", "--log-level=error",
                          "--define:process.env.NODE_ENV=\"production\""],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return (tmp_path / "app.js").read_text()


@pytest.mark.parametrize("code", _runs("react"))
async def test_react_block_chats_with_the_relay(page, tmp_path, code):
    prompt = "hello from the docs"
    expected = "".join(demo_reply_tokens([{"role": "user", "content": prompt}]))
    async with start_relay(detach_grace=30) as server:
        bundle = _bundle(tmp_path, _for_relay(code, server))
        await page.route("**/docs-react/app.js", lambda route: route.fulfill(
            status=200, content_type="text/javascript", body=bundle))
        # A document the relay itself served (a page fulfilled by the test would count as a
        # public address, and Chromium's local network access checks would block its
        # WebSocket to 127.0.0.1), rewritten in place: same origin, same address space.
        await page.goto(f"http://127.0.0.1:{server.port}/healthz")
        await page.set_content('<!doctype html><div id="root"></div>'
                               '<script type="module" src="/docs-react/app.js"></script>')
        await page.fill("input", prompt)
        await page.press("input", "Enter")
        await page.wait_for_function(
            "(text) => document.body.innerText.includes(text)", arg=expected.strip(),
            timeout=30_000)
        assert prompt in await page.inner_text("body")
