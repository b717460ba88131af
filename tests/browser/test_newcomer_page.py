"""What a newcomer sees on the chat page with nothing but the relay: the demo model's
Markdown answer (ask it for "markdown") rendered with every block the page knows, and a
failed answer whose main line says why in words (the relay's sentence), in the system
Chromium against a live relay."""

from __future__ import annotations

import pytest

from relay.upstream.demo import DEMO_MARKDOWN

from ..fakes.upstream import http_error
from ..relay.helpers import start_relay
from .test_chat_page import PANES, open_chat, send
from .test_chat_page_ux import relay_with_writer, wait_completed


async def test_the_demo_model_shows_off_the_pages_markdown(page):
    async with start_relay(demo_tps=200) as server:
        await open_chat(page, server)
        assert "ask it for markdown" in await page.text_content("#empty-state")  # the hint
        await send(page, "show me some markdown")
        await wait_completed(page)
        dom = await page.eval_on_selector(".answer-text", """e => ({
            heading: e.querySelector('h2')?.textContent,
            items: e.querySelectorAll('ul > li').length,
            rows: e.querySelectorAll('.table-wrap > table tr').length,
            lang: e.querySelector('.code-block .code-lang')?.textContent,
            code: e.querySelector('.code-block pre code')?.textContent,
            copy: Boolean(e.querySelector('.copy-code')),
            link: e.querySelector('a')?.getAttribute('href'),
        })""")
        raw = (await page.evaluate(PANES))[0]["raw"]
    assert raw == DEMO_MARKDOWN
    assert dom["heading"] == "What the demo model can show"
    assert dom["items"] == 3 and dom["rows"] == 3
    assert dom["lang"] == "python" and "RelayClient" in dom["code"] and dom["copy"]
    assert dom["link"] == "https://docs.litellm.ai/docs/providers"


@pytest.mark.parametrize(("status", "reason"), [
    (401, "The provider rejected the relay's credentials (check the relay's key "
          "configuration)."),
    (502, "The provider failed (HTTP 502)."),
])
async def test_a_failed_answer_says_why_in_its_main_line(page, status, reason):
    # 502, not 503: the fake's 503 body says the engine is overloaded, which is its own
    # answer (upstream_overloaded, worded by the page as such).
    async with relay_with_writer() as (up, server):
        up.enqueue(http_error("openai", status, message="Bad gateway" if status == 502 else None))
        await open_chat(page, server)
        await page.select_option("#model", "writer")
        await send(page, "provider says no")
        await page.wait_for_selector('.answer-status[data-status="failed"]')
        pane = (await page.evaluate(PANES))[0]
    assert pane["notice"] == reason
    assert "error: upstream_error" in pane["meta"]       # the code stays in the details
