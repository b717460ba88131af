"""The chat page survives reloads and outages, and several tabs show one conversation
(issue 24), in the system Chromium against a live relay.

The conversation lives in the browser's localStorage: a reload mid-answer shows it and
resumes the answer after the seq its stored text includes (a ``resume`` with that
``after_seq``, as a viewer: PROTOCOL.md "Viewers"); a second tab on the same conversation
watches the answer live and sees the turns the other tab sends; Stop in either tab stops it
for both; regenerate keeps the earlier answer as a version; New chat keeps the old one in the
list; the page reconnects forever, at once on the browser's ``online`` event.

Both tabs are pages of one browser context (one localStorage, like two tabs of one browser).
Every wait is on DOM state or page state; nothing sleeps.
"""

from __future__ import annotations

from relay.upstream.demo import demo_reply_tokens
from relay.upstream.llm import demo_handler

from ..relay.helpers import start_relay
from .test_chat_page import PANES, open_chat, page_url, send
from .test_chat_page_ux import wait_completed
from .test_resume_and_auth import RECORD_WS

PROMPT = "please keep this long answer going while the page reloads under it " * 2
FULL_TEXT = "".join(demo_reply_tokens([{"role": "user", "content": PROMPT}]))

SEQS = "() => document.querySelector('.answer')?.relayStream?.lastSeq ?? -1"


async def _until_seq(page, n: int) -> None:
    await page.wait_for_function(f"() => ({SEQS})() >= {n}")


async def test_a_reload_mid_answer_shows_the_conversation_and_resumes_where_it_was(page):
    async with start_relay(detach_grace=10, demo_tps=25) as server:
        await page.add_init_script(RECORD_WS)
        await open_chat(page, server)
        await send(page, PROMPT)
        await _until_seq(page, 5)
        await page.reload()
        await page.wait_for_selector('#conn-state[data-state="open"]')
        # The conversation is there at once, the answer carrying on where it was.
        assert await page.text_content(".turn .user") == PROMPT.strip()
        await wait_completed(page)
        [pane] = await page.evaluate(PANES)
        sockets = await page.evaluate("() => window.__sockets")
    assert pane["text"] == pane["raw"] == FULL_TEXT and pane["status"] == "completed"
    [resume] = [f for s in sockets for f in s["sent"] if f["type"] == "resume"]
    assert resume["after_seq"] >= 4 and "takeover" not in resume   # a viewer, not from 0
    assert not any(f["type"] == "start" for s in sockets for f in s["sent"])   # never re-asked
    assert "followed from seq" in pane["meta"]


async def test_a_second_tab_watches_the_answer_live_and_sees_the_next_turn(page):
    async with start_relay(detach_grace=10, demo_tps=25) as server:
        await open_chat(page, server)
        await send(page, PROMPT)
        await _until_seq(page, 3)
        second = await page.context.new_page()
        try:
            await open_chat(second, server)
            assert await second.text_content(".turn .user") == PROMPT.strip()
            # Both follow the one answer live to its end; the first was not taken over.
            await wait_completed(second)
            await wait_completed(page)
            first_panes, second_panes = await page.evaluate(PANES), await second.evaluate(PANES)
            assert [p["text"] for p in first_panes] == [p["text"] for p in second_panes] \
                == [FULL_TEXT]
            # A turn sent from the second tab appears, streaming, in the first.
            await send(second, "and now a second question")
            await page.wait_for_function("() => document.querySelectorAll('.turn').length === 2")
            await wait_completed(page, 2)
            await wait_completed(second, 2)
            first_second_turn = (await page.evaluate(PANES))[1]["text"]
            assert first_second_turn == (await second.evaluate(PANES))[1]["text"]
        finally:
            await second.close()


async def test_stop_in_the_watching_tab_stops_the_answer_for_both(page):
    handler = demo_handler()
    before = handler.closed_early
    async with start_relay(detach_grace=10, demo_tps=10) as server:
        await open_chat(page, server)
        await send(page, PROMPT)
        await _until_seq(page, 2)
        second = await page.context.new_page()
        try:
            await open_chat(second, server)
            await second.wait_for_selector('.answer-status[data-status="streaming"]')
            await second.click("#stop")
            for tab in (page, second):
                await tab.wait_for_selector('.answer-status[data-status="cancelled"]')
        finally:
            await second.close()
        await handler.wait_closed_early(before + 1)


async def test_regenerate_keeps_the_earlier_answer_as_a_version(page):
    async with start_relay(demo_tps=0) as server:
        await open_chat(page, server)
        await send(page, "first version please")
        await wait_completed(page)
        first_id = await page.get_attribute(".answer", "data-stream-id")
        await page.click(".regenerate")
        await page.wait_for_function(
            "(old) => document.querySelector('.answer').dataset.streamId !== old", arg=first_id)
        await wait_completed(page)
        assert await page.text_content(".version-label") == "2/2"
        await page.click(".version-prev")
        assert await page.text_content(".version-label") == "1/2"
        assert await page.get_attribute(".answer", "data-pid") is not None
        shown = await page.evaluate(PANES)
        assert shown[0]["text"] == "".join(demo_reply_tokens(
            [{"role": "user", "content": "first version please"}]))
        # The choice is kept: a reload shows version 1 of 2.
        await page.reload()
        await page.wait_for_selector(".version-label")
        assert await page.text_content(".version-label") == "1/2"
        await page.click(".version-next")
        assert await page.text_content(".version-label") == "2/2"


async def test_new_chat_keeps_the_old_one_in_the_list_of_past_conversations(page):
    async with start_relay(demo_tps=0) as server:
        await open_chat(page, server)
        await send(page, "the first conversation")
        await wait_completed(page)
        await page.click("#new-chat")
        assert await page.is_visible("#empty-state")
        await send(page, "the second conversation")
        await wait_completed(page)
        titles = await page.eval_on_selector_all("#chat-select option",
                                                 "os => os.map(o => o.textContent)")
        assert titles == ["the second conversation", "the first conversation"]
        await page.select_option("#chat-select", label="the first conversation")
        await page.wait_for_function(
            "() => document.querySelector('.turn .user')?.textContent === 'the first conversation'")
        # A reload keeps this tab on the conversation it shows.
        await page.reload()
        await page.wait_for_selector(".turn .user")
        assert await page.text_content(".turn .user") == "the first conversation"


async def test_the_page_keeps_reconnecting_and_retries_at_once_when_back_online(page):
    async with start_relay(detach_grace=10) as server:
        port = server.port
        await open_chat(page, server)
        assert await page.evaluate("() => window.relayClient.options.maxRetries === Infinity")
        server.draining = True              # upgrades refused from here on (503)
        for session in list(server.sessions):
            session.ws.transport.abort()
    # The relay is gone: the page waits between attempts, never "closed".
    await page.wait_for_function(
        "() => window.relayClient.state === 'reconnecting' && window.relayClient._attempt >= 3")
    async with start_relay(port=port, detach_grace=10):
        # While an attempt waits out its backoff, `online` starts it at once.
        tried_now = await page.evaluate("""async () => {
            const c = window.relayClient, calls = [];
            const original = c.reconnectNow.bind(c);
            c.reconnectNow = () => { const r = original(); calls.push(r); return r; };
            while (c._reconnectTimer === null) await new Promise((r) => setTimeout(r, 5));
            window.dispatchEvent(new Event('online'));
            return calls; }""")
        assert tried_now == [True]
        await page.wait_for_selector('#conn-state[data-state="open"]')
        await send(page, "back again")
        await wait_completed(page)
