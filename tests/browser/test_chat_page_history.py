"""The chat page with a history larger than the relay takes in one ``start`` (issue 20 item
13), in the system Chromium against a live relay: an answer of more than 1 MiB stays in the
history, yet the next ``start`` the page sends fits the relay's ``welcome.limits``
(``max_frame_bytes``, ``max_messages_bytes``): the oldest messages are left out and the page
says so. A 1009 close (a limit lower than the page believed, e.g. a proxy in between) is
never a dead end: the page reconnects, tells the user, and the next message goes through.

The >1 MiB answer comes from a loopback fake OpenAI upstream (tests/fakes/upstream.py) through
the relay's real provider path. Every wait is on DOM state; nothing sleeps.
"""

from __future__ import annotations

from ..fakes.upstream import openai_stream
from .test_chat_page import PANES, open_chat, send
from .test_chat_page_ux import chunks, relay_with_writer, wait_completed

# Every frame the page sends: its size in bytes, and the frame.
RECORD_FRAMES = """
window.__frames = [];
const origSend = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
    window.__frames.push({bytes: new TextEncoder().encode(data).length, frame: JSON.parse(data)});
    return origSend.call(this, data);
};"""

STARTS = """() => window.__frames.filter(f => f.frame.type === 'start').map(f => ({
    bytes: f.bytes, roles: f.frame.messages.map(m => m.role),
    contents: f.frame.messages.map(m => m.content.length > 100 ? m.content.length : m.content)}))"""

NOTICES = """() => [...document.querySelectorAll('.turn')].map(
    t => t.querySelector('.context-notice')?.textContent ?? '')"""

# More than 1 MiB of text: paragraphs of words, so the Markdown stays plain prose.
BIG_ANSWER = ("lorem ipsum dolor sit amet " * 40 + "\n\n") * 1000
assert len(BIG_ANSWER.encode()) > 1024 * 1024


async def test_a_history_over_the_frame_limit_is_trimmed_and_the_page_says_so(page):
    async with relay_with_writer() as (up, server):
        up.enqueue(openai_stream(chunks(BIG_ANSWER, 8192)), openai_stream(["short ", "answer"]))
        await page.add_init_script(RECORD_FRAMES)
        await open_chat(page, server)
        limits = await page.evaluate("() => window.relayClient.limits")
        assert limits["max_frame_bytes"] == 1024 * 1024, limits
        assert limits["max_messages_bytes"] == 512 * 1024, limits
        await page.select_option("#model", "writer")
        await send(page, "write a very long text")
        await wait_completed(page, 1)
        [pane] = await page.evaluate(PANES)
        assert len(pane["raw"]) == len(BIG_ANSWER)

        await send(page, "and a short one now")
        await wait_completed(page, 2)
        starts = await page.evaluate(STARTS)
        assert await page.evaluate("() => document.getElementById('conn-state').dataset.state") \
            == "open"
    first, second = starts
    assert second["bytes"] <= limits["max_frame_bytes"], second["bytes"]
    # The >1 MiB answer (and the question before it) were left out; the new question went.
    assert second["roles"] == ["user"] and second["contents"] == ["and a short one now"]
    notices = await page.evaluate(NOTICES)
    assert notices[0] == ""
    assert "2 earlier messages were left out" in notices[1], notices


async def test_a_1009_close_reconnects_and_the_next_message_fits(page):
    """The page believed the relay took more than it does (a proxy in between with a lower
    limit behaves the same): the relay closes 1009; the page reconnects on its own, says so,
    lowers what it sends, and the next message is answered."""
    async with relay_with_writer(max_frame_bytes=200_000, max_messages_bytes=150_000) as \
            (up, server):
        up.enqueue(openai_stream(chunks("x " * 60_000, 4096)),
                   openai_stream(["after ", "the ", "1009"]))
        await page.add_init_script(RECORD_FRAMES)
        await open_chat(page, server)
        await page.select_option("#model", "writer")
        await send(page, "write 120 kB")
        await wait_completed(page, 1)
        # Make the page believe the relay takes 10 MB: its next start (history 120 kB + 120 kB
        # prompt) goes out whole and the relay closes the connection 1009.
        await page.evaluate("""() => { window.relayClient.limits.max_frame_bytes = 10000000;
                                       window.relayClient.limits.max_messages_bytes = 10000000; }""")
        await send(page, "y" * 120_000)
        await page.wait_for_function(
            """() => document.querySelector('.turn:last-of-type .answer-status')
                         ?.dataset.status === 'error'""")
        await page.wait_for_selector('#conn-state[data-state="open"]')
        message = await page.text_content("#conn-message")
        assert "too large" in message and "older messages" in message, message
        [_, failed] = await page.evaluate(PANES)
        assert failed["error"] == "frame_too_large", failed
        assert "too long for the relay" in failed["notice"], failed

        await page.select_option("#model", "writer")
        await send(page, "and now a short one")
        await wait_completed(page, 2)
        starts = await page.evaluate(STARTS)
        [*_, last] = await page.evaluate(PANES)
        assert last["raw"] == "after the 1009"
    assert starts[1]["bytes"] > 200_000               # the one the relay closed 1009 on
    assert starts[2]["bytes"] <= starts[1]["bytes"] // 2, starts[2]
    assert starts[2]["contents"][-1] == "and now a short one"


async def test_a_start_over_the_limit_is_never_sent(page):
    """relay-client.js refuses a start larger than ``max_frame_bytes`` itself
    (``frame_too_large``, the connection stays open); the page keeps a prompt that alone is
    too long in the box and says so, sending nothing."""
    async with relay_with_writer(max_frame_bytes=200_000, max_messages_bytes=150_000) as \
            (_, server):
        await page.add_init_script(RECORD_FRAMES)
        await open_chat(page, server)
        refused = await page.evaluate("""async () => {
            const s = window.relayClient.start({model: 'demo',
                messages: [{role: 'user', content: 'z'.repeat(300000)}]});
            try { await s.done; return null; } catch (e) { return e.code; } }""")
        assert refused == "frame_too_large"
        prompt = "p" * 180_000          # under max_frame_bytes, over max_messages_bytes
        await send(page, prompt)
        notice = await page.text_content(".turn:last-of-type .context-notice")
        assert "too long for the relay" in notice, notice
        assert await page.input_value("#prompt") == prompt
        assert await page.evaluate(STARTS) == []
        assert await page.evaluate("() => document.getElementById('conn-state').dataset.state") \
            == "open"
