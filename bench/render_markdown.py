"""How fast the chat page renders a long streamed answer, side by side, in the system Chromium.

    .venv/bin/python bench/render_markdown.py [--tokens 20000] [--naive-tokens 2000] [--rounds 1]

One Markdown answer of ``--tokens`` tokens (paragraphs, lists, code blocks, tables, the mix
a model writes) is fed to the page token by token, as fast as the page takes it: each token
is its own task, as a WebSocket message would be, so the page may render between tokens.
Three ways to show it (and ``none``: the same feed rendering nothing, the floor):

  before  the old page: ``element.textContent = text`` on every token (plain text, and O(n^2)
          over an answer: every token rewrites the whole text)
  naive   Markdown the simple way: parse + sanitise + replace the whole answer on every
          token (O(n^2) with a far bigger constant; only ``--naive-tokens`` tokens, it is slow)
  after   the page now (client_demo/web/markdown.js): finished blocks are rendered once, only
          the growing last block is re-rendered, at most once per animation frame

Printed per way: tokens, wall time until the last token is on screen, milliseconds of
rendering work per 1,000 tokens, the longest single piece of work (a long one freezes the
page), and how many times it rendered. The web files are served from client_demo/web by a
small static server; nothing here is a test and nothing asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import http.server
import os
import re
import shutil
import threading
from pathlib import Path

WEB = Path(__file__).resolve().parent.parent / "client_demo" / "web"
CHROMIUM = os.environ.get("RELAY_TEST_CHROMIUM", "/usr/bin/chromium")


def answer_tokens(n: int) -> list[str]:
    """A deterministic Markdown answer cut into about ``n`` word-sized tokens."""
    sections = []
    i = 0
    while True:
        i += 1
        sections.append(
            f"## Part {i}\n\nThis part explains step {i} in some detail, with *emphasis*, "
            f"**strong words**, `inline_code({i})` and a [link](https://example.com/{i}). "
            "It goes on for a while, as answers do, so that paragraphs are of a realistic "
            "length and the renderer has real work to do on every block it sees.\n\n"
            f"- first point of part {i}\n- second point, a little longer than the first\n"
            f"- third point with `code` and a number {i * 7}\n\n"
            f"```python\ndef step_{i}(values):\n    total = 0\n    for v in values:\n"
            f"        total += v * {i}\n    return total\n```\n\n"
            "| key | value | note |\n|---|---:|---|\n"
            f"| a{i} | {i} | first |\n| b{i} | {i * 2} | second |\n\n"
        )
        tokens = re.findall(r"\S+\s*|\s+", "".join(sections))
        if len(tokens) >= n:
            return tokens[:n]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".js": "text/javascript", ".mjs": "text/javascript"}

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def static_server():
    handler = functools.partial(_Quiet, directory=str(WEB))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# Runs in the page. `mode` picks the way to render; returns the figures.
FEED = """async ([mode, tokens]) => {
  const { MarkdownView, renderMarkdown } = await import('/markdown.js');
  const box = document.createElement('div');
  document.body.replaceChildren(box);
  // A macrotask per token (MessageChannel is not clamped like setTimeout), like ws messages.
  const channel = new MessageChannel();
  const yieldTask = () => new Promise((resolve) => { channel.port1.onmessage = resolve;
                                                     channel.port2.postMessage(0); });
  const nextFrame = () => new Promise((resolve) => requestAnimationFrame(resolve));
  let work = 0, longest = 0, renders = 0;
  const timed = (fn) => { const t0 = performance.now(); fn(); const d = performance.now() - t0;
                          work += d; longest = Math.max(longest, d); renders += 1; };
  let view = null;
  if (mode === 'after') {
    view = new MarkdownView(box, { schedule: (fn) => requestAnimationFrame(() => timed(fn)) });
  }
  let text = '';
  const start = performance.now();
  for (const token of tokens) {
    text += token;
    if (mode === 'before') timed(() => { box.textContent = text; });
    else if (mode === 'naive') timed(() => { box.replaceChildren(renderMarkdown(text)); });
    else if (mode === 'after') view.update(text);
    await yieldTask();
  }
  if (view) timed(() => view.flush());
  await nextFrame();
  box.getBoundingClientRect(); // the last layout is part of putting it on screen
  const wall = performance.now() - start;
  return { wall, work, longest, renders, chars: text.length,
           html: mode === 'before' ? box.textContent.length : box.innerHTML.length };
}"""


async def run(args: argparse.Namespace) -> None:
    from playwright.async_api import async_playwright

    executable = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    tokens = answer_tokens(args.tokens)
    with static_server() as base:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            try:
                print(f"answer: {len(tokens)} tokens, {len(''.join(tokens))} characters of "
                      f"Markdown; Chromium {browser.version}")
                print(f"{'way':8} {'tokens':>7} {'wall s':>8} {'ms/1k tok':>10} "
                      f"{'longest ms':>11} {'renders':>8}")
                for round_no in range(args.rounds):
                    if args.rounds > 1:
                        print(f"round {round_no + 1}")
                    for mode, count in (("none", len(tokens)), ("before", len(tokens)),
                                        ("naive", args.naive_tokens), ("after", len(tokens))):
                        if count <= 0:
                            continue
                        page = await browser.new_page(viewport={"width": 1100, "height": 800})
                        await page.goto(f"{base}/vendor/marked.LICENSE.txt")
                        r = await page.evaluate(FEED, [mode, tokens[:count]])
                        await page.close()
                        print(f"{mode:8} {count:>7} {r['wall'] / 1000:>8.2f} "
                              f"{r['work'] / count * 1000:>10.1f} {r['longest']:>11.1f} "
                              f"{r['renders']:>8}")
            finally:
                await browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--naive-tokens", type=int, default=2_000,
                        help="tokens for the naive way (0 = skip it); it is O(n^2) and slow")
    parser.add_argument("--rounds", type=int, default=1)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
