"""The useChat example (client_demo/ai-sdk/: React, the AI SDK's WebSocketChatTransport,
bundled by esbuild from the pinned npm packages) in a real Chromium against a live relay:
ask and watch it stream, Stop (the relay closes the upstream), reload mid-answer and see the
same answer resume. .ci/run builds the bundle (`npm ci && npm run build`); a missing bundle
fails these tests."""

from __future__ import annotations

from relay.runtime.aisdk import AI_SDK_EXAMPLE_ROOT
from relay.upstream.demo import demo_reply_tokens
from relay.upstream.llm import demo_handler

from ..relay.helpers import start_relay

ANSWER_TEXT = """() => [...document.querySelectorAll('.message.assistant .text')]
    .map(e => e.textContent).join('')"""


def example_url(server) -> str:
    return f"http://127.0.0.1:{server.port}/examples/ai-sdk/"


async def open_example(page, server) -> None:
    assert (AI_SDK_EXAMPLE_ROOT / "dist" / "app.js").is_file(), \
        "build the example: cd client_demo/ai-sdk && npm ci && npm run build (.ci/run does)"
    await page.goto(example_url(server))
    await page.wait_for_selector("#prompt")


async def ask(page, prompt: str) -> None:
    await page.fill("#prompt", prompt)
    await page.click("#send")


async def test_ask_and_watch_it_stream(page):
    prompt = "tell me how the relay streams answers"
    expected = "".join(demo_reply_tokens([{"role": "user", "content": prompt}]))
    async with start_relay(demo_tps=30) as server:
        await open_example(page, server)
        await ask(page, prompt)
        # partial text while streaming, then the whole answer once the status is ready
        await page.wait_for_function(
            f"""() => {{ const t = ({ANSWER_TEXT})();
                       return t.length > 0 && t.length < {len(expected)}; }}""")
        await page.wait_for_selector('#status:text-is("ready")')
        assert await page.evaluate(ANSWER_TEXT) == expected
        assert await page.eval_on_selector_all(
            ".message.user .text", "es => es.map(e => e.textContent)") == [prompt]


async def test_stop_closes_the_upstream(page):
    handler = demo_handler()
    before = handler.closed_early
    async with start_relay(demo_tps=10) as server:
        await open_example(page, server)
        await ask(page, "a long answer please " * 10)
        await page.wait_for_function(f"() => ({ANSWER_TEXT})().length > 10")
        await page.click("#stop")
        await handler.wait_closed_early(before + 1)   # the relay really closed the upstream
        await page.wait_for_selector("#send")
        stopped = await page.evaluate(ANSWER_TEXT)
        assert 0 < len(stopped) < len("".join(demo_reply_tokens(
            [{"role": "user", "content": "a long answer please " * 10}])))


async def test_reload_mid_answer_resumes_the_same_answer(page):
    prompt = "keep streaming while I reload the page " * 3
    expected = "".join(demo_reply_tokens([{"role": "user", "content": prompt}]))
    async with start_relay(demo_tps=20, detach_grace=30) as server:
        await open_example(page, server)
        await ask(page, prompt)
        await page.wait_for_function(f"() => ({ANSWER_TEXT})().length > 20")
        await page.reload()
        # The resumed answer replaces the partial one (same messageId): one assistant
        # message, and it completes with the whole text.
        await page.wait_for_selector('#status:text-is("ready")', timeout=30_000)
        await page.wait_for_function(f"() => ({ANSWER_TEXT})().length >= {len(expected)}")
        assert await page.evaluate(ANSWER_TEXT) == expected
        assert await page.locator(".message.assistant").count() == 1
        assert await page.locator(".message.user").count() == 1
        # What let the reloaded page resume: the chat owner cookie the relay set on the first
        # /ai-sdk upgrade, kept by Chromium and sent back on the next one (relay/runtime/aisdk.py).
        [owner] = [c for c in await page.context.cookies()
                   if c["name"] == "llm-relay-chat-owner"]
        assert owner["httpOnly"] and owner["sameSite"] == "Strict" and owner["path"] == "/ai-sdk"

