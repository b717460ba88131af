"""The chat page (client_demo/web/) in a real headless Chromium against a live relay.

The relay runs in-process (tests/relay/helpers.start_relay, port 0, embedded demo model);
Playwright's async API drives the system Chromium in the same event loop. Synchronisation
is always a wait on DOM state (wait_for_function / wait_for_selector), never a sleep; the
demo model's pace (demo_tps) only makes the streams long enough to watch.
"""

from __future__ import annotations

import json

from relay.upstream.demo import demo_reply_tokens
from relay.upstream.llm import demo_handler

from ..relay.helpers import start_relay

# `text` is the rendered answer (Markdown; for the demo's plain prose, the same characters as
# the stream's text); `raw` the text the stream received.
PANES = """() => [...document.querySelectorAll('.answer')].map(p => ({
    text: p.querySelector('.answer-text').textContent,
    raw: p.relayStream.text,
    status: p.querySelector('.answer-status').dataset.status,
    error: p.querySelector('.answer-status').dataset.error ?? null,
    notice: p.querySelector('.answer-notice').textContent,
    meta: p.querySelector('.answer-meta').textContent,
    tools: [...p.querySelectorAll('.tool-call')].map(t => ({
        name: t.querySelector('.tool-name').textContent,
        args: t.querySelector('.tool-args').textContent,
        state: t.querySelector('.tool-state').textContent})),
}))"""


def page_url(server, fragment: str = "") -> str:
    return f"http://127.0.0.1:{server.port}/{fragment}"


async def open_chat(page, server, fragment: str = "") -> None:
    await page.goto(page_url(server, fragment))
    await page.wait_for_selector('#conn-state[data-state="open"]')
    await page.wait_for_selector('#model option[value="demo"]', state="attached")


async def send(page, prompt: str) -> None:
    await page.fill("#prompt", prompt)
    await page.click("#send")


async def test_answer_streams_incrementally_then_shows_usage_and_ttft(page, tmp_path):
    prompt = "tell me about streaming"
    expected = "".join(demo_reply_tokens([{"role": "user", "content": prompt}]))
    async with start_relay(demo_tps=25) as server:
        await open_chat(page, server)
        assert await page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") \
            == ["demo"]
        await send(page, prompt)
        # Watch the text grow while the stream is still running: several distinct states.
        seen: list[int] = []
        for _ in range(4):
            handle = await page.wait_for_function(
                """(n) => { const p = document.querySelector('.answer');
                            if (!p) return false;
                            const len = p.querySelector('.answer-text').textContent.length;
                            const st = p.querySelector('.answer-status').dataset.status;
                            return len > n ? {len, st} : false; }""",
                arg=seen[-1] if seen else 0)
            state = await handle.json_value()
            assert state["st"] == "streaming", state
            seen.append(state["len"])
        assert seen == sorted(set(seen)) and seen[-1] < len(expected), seen
        await page.wait_for_selector('.answer-status[data-status="completed"]')
        [pane] = await page.evaluate(PANES)
        assert pane["text"] == expected
        assert "usage:" in pane["meta"] and "time to first token:" in pane["meta"], pane
        assert "reason: stop" in pane["meta"]
        shot = tmp_path / "chat-page.png"
        await page.screenshot(path=str(shot), full_page=True)
        print(f"\nscreenshot: {shot}")
        assert shot.stat().st_size > 0


async def test_stop_cancels_the_stream_and_closes_the_upstream(page):
    handler = demo_handler()
    before = handler.closed_early
    async with start_relay(demo_tps=15) as server:
        await open_chat(page, server)
        await send(page, "a long answer please")
        await page.wait_for_function(
            "() => document.querySelector('.answer .answer-text')?.textContent.length > 0")
        assert not await page.is_disabled("#stop")
        await page.click("#stop")
        await page.wait_for_selector('.answer-status[data-status="cancelled"]')
        await handler.wait_closed_early(before + 1)  # the relay really closed the upstream
        [pane] = await page.evaluate(PANES)
        assert pane["status"] == "cancelled" and "reason: client_cancel" in pane["meta"]
        full = "".join(demo_reply_tokens([{"role": "user", "content": "a long answer please"}]))
        assert pane["text"] and len(pane["text"]) < len(full)
        # Stop turns back into Send once nothing streams.
        await page.wait_for_selector("#stop", state="hidden")
        assert await page.is_disabled("#stop") and await page.is_visible("#send")


async def test_tool_call_streams_with_name_and_arguments(page):
    async with start_relay(demo_tps=30) as server:
        await open_chat(page, server)
        await page.check("#use-tool")
        await send(page, "Paris")
        # While it streams: the call is shown with its name and partial arguments.
        partial = await page.wait_for_function(
            """() => { const t = document.querySelector('.tool-call');
                       return t && t.querySelector('.tool-state').textContent !== 'complete'
                           ? {name: t.querySelector('.tool-name').textContent,
                              args: t.querySelector('.tool-args').textContent} : false; }""")
        partial = await partial.json_value()
        assert partial["name"] == "get_weather"
        await page.wait_for_selector('.answer-status[data-status="completed"]')
        [pane] = await page.evaluate(PANES)
        [call] = pane["tools"]
        assert call["name"] == "get_weather" and call["state"] == "complete"
        assert json.loads(call["args"]) == {"city": "Paris", "celsius": True}
        assert call["args"].startswith(partial["args"])
        assert "reason: tool_calls" in pane["meta"]


async def test_compare_mode_streams_two_answers_at_once(page, tmp_path):
    async with start_relay(demo_tps=25) as server:
        await open_chat(page, server)
        await page.check("#compare")
        await page.select_option("#model2", "demo")
        await send(page, "side by side")
        both = await page.wait_for_function(
            """() => { const ps = [...document.querySelectorAll('.answer')];
                       return ps.length === 2 && ps.every(p =>
                           p.querySelector('.answer-status').dataset.status === 'streaming'
                           && p.querySelector('.answer-text').textContent.length > 0)
                           ? ps.map(p => p.dataset.streamId) : false; }""")
        ids = await both.json_value()
        assert len(set(ids)) == 2  # two streams, one socket
        await page.wait_for_function(
            """() => [...document.querySelectorAll('.answer-status')]
                   .filter(s => s.dataset.status === 'completed').length === 2""")
        panes = await page.evaluate(PANES)
        expected = "".join(demo_reply_tokens([{"role": "user", "content": "side by side"}]))
        assert [p["text"] for p in panes] == [expected, expected]
        shot = tmp_path / "compare.png"
        await page.screenshot(path=str(shot), full_page=True)
        print(f"\nscreenshot: {shot}")


async def test_model_text_is_escaped(page):
    prompt = '<img src=x onerror="window.__pwned=1"><b>bold</b>'
    async with start_relay(demo_tps=0) as server:
        await open_chat(page, server)
        await send(page, prompt)
        await page.wait_for_selector('.answer-status[data-status="completed"]')
        # Rendered as Markdown, the HTML in the text stays text: one paragraph, no element
        # from the model's text.
        tags = await page.eval_on_selector(
            ".answer-text", "e => [...e.querySelectorAll('*')].map(n => n.tagName)")
        assert tags == ["DIV", "P"], tags  # the growing block's wrapper and the paragraph
        assert prompt in await page.text_content(".answer-text")
        assert await page.evaluate("() => window.__pwned") is None


RECORD_SENT = """
window.__sent = []; window.__urls = [];
const origSend = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
    window.__sent.push(JSON.parse(data)); window.__urls.push(this.url);
    return origSend.call(this, data);
};"""


async def test_token_from_fragment_goes_in_hello_and_leaves_the_url(page):
    async with start_relay() as server:
        await page.add_init_script(RECORD_SENT)
        await open_chat(page, server, "#token=s3cr%C3%A9t+b64%2F%3D%3D")
        hello = await page.evaluate("() => window.__sent[0]")
        assert hello["type"] == "hello" and hello["token"] == "s3crét+b64/=="
        [url] = set(await page.evaluate("() => window.__urls"))
        assert url == f"ws://127.0.0.1:{server.port}/ws"  # no query string, no token in it
        assert "token" not in await page.evaluate("() => location.href")
        assert await page.input_value("#token") == "s3crét+b64/=="
        # A token typed into the field is sent on the next connect.
        await page.fill("#token", "typed")
        await page.click("#reconnect")
        await page.wait_for_function(
            "() => window.__sent.filter(f => f.type === 'hello').length === 2")
        await page.wait_for_selector('#conn-state[data-state="open"]')
        hellos = await page.evaluate("() => window.__sent.filter(f => f.type === 'hello')")
        assert hellos[1]["token"] == "typed"


async def test_no_token_no_field_and_connection_state_on_server_shutdown(page):
    async with start_relay() as server:
        await page.add_init_script(RECORD_SENT)
        await open_chat(page, server)
        assert "token" not in await page.evaluate("() => window.__sent[0]")
        await server.close()  # 1001 going away: retryable, so the page reconnects
        await page.wait_for_selector('#conn-state[data-state="reconnecting"]')
        detail = await page.text_content("#conn-detail")
        assert detail.startswith("1001: server going away"), detail


async def test_page_connects_when_opened_via_127_0_0_1_and_localhost(page):
    """The relay's own origin comes from its listen address (not from Host), and for a
    loopback listener both loopback names are its own: the page works under either."""
    async with start_relay() as server:
        for name in ("127.0.0.1", "localhost"):
            await page.goto(f"http://{name}:{server.port}/")
            await page.wait_for_selector('#conn-state[data-state="open"]')
            await send(page, "hi")
            await page.wait_for_selector('.answer-status[data-status="completed"]')
