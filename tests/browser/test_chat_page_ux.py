"""The chat page as a person uses it (issue 14, items 1-5), in the system Chromium against a
live relay: Markdown answers (rendered safely, incrementally, code blocks with a Copy
button), following the answer while it streams, nothing wider than the window, Send that
becomes Stop, the empty state, Regenerate, messages for people (codes in the details), the
Token field only when the relay wants one, and a favicon with no failed request.

Markdown needs a model that writes Markdown: a loopback fake OpenAI upstream
(tests/fakes/upstream.py) streams it through the relay's real LiteLLM path. Every wait is on
DOM state; nothing sleeps.
"""

from __future__ import annotations

import contextlib

from relay.app import load_models
from relay.core.auth import mint_token
from relay.upstream.llm import set_demo_tps
from relay.upstream.providers import ModelRegistry, demo_spec
from relay.upstream.event_streamer import Timeouts

from ..fakes.upstream import FakeUpstream, http_error, openai_stream
from ..relay.helpers import start_relay
from .test_chat_page import PANES, RECORD_SENT, open_chat, page_url, send
from .test_resume_and_auth import drop_all, wait_seqs

MARKDOWN = """# Release notes

Some *emphasis*, **strong** text and a [link](https://example.com/docs).

- first item
- second item with `inline code`

1. one
2. two

| Name | Value |
|------|------:|
| alpha | 1 |
| beta | 2 |

```python
def greet(name):
    return f"hello {name}"
```

> a quote

Done.
"""
CODE = 'def greet(name):\n    return f"hello {name}"\n'


def chunks(text: str, size: int = 4) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@contextlib.asynccontextmanager
async def relay_with_writer(**settings):
    """A relay serving `demo` (at `demo_tps`, default as fast as it can) and `writer`, a
    fake OpenAI upstream (enqueue its scripts on `up`)."""
    set_demo_tps(settings.get("demo_tps", 0))  # a given registry skips build_registry's
    async with FakeUpstream() as up:
        registry = ModelRegistry([demo_spec(), *load_models({"models": {
            "writer": {"model": "openai/gpt-writer", "api_base": up.openai_base}}},
            Timeouts(10.0, 10.0, 30.0))])
        async with start_relay(registry=registry, **settings) as server:
            yield up, server


async def wait_completed(page, n: int = 1) -> None:
    # 60 s, not Playwright's 10: a 5 s demo answer rendered on a loaded 2-core machine once
    # took longer; this waits for an event, it does not time one.
    await page.wait_for_function(
        """(n) => [...document.querySelectorAll('.answer-status')]
                 .filter(s => s.dataset.status === 'completed').length >= n""", arg=n,
        timeout=60_000)


# ---------------------------------------------------------------------- Markdown


async def test_answer_is_rendered_as_markdown_with_a_copy_button(page):
    await page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    async with relay_with_writer() as (up, server):
        up.enqueue(openai_stream(chunks(MARKDOWN)).with_delay(0.002))
        await open_chat(page, server)
        await page.select_option("#model", "writer")
        await send(page, "release notes please")
        await wait_completed(page)
        dom = await page.eval_on_selector(".answer-text", """e => ({
            h1: e.querySelector('h1')?.textContent,
            em: e.querySelector('em')?.textContent,
            strong: e.querySelector('strong')?.textContent,
            link: [...e.querySelectorAll('a')].map(a => [a.getAttribute('href'), a.target, a.rel]),
            ul: [...e.querySelectorAll('ul > li')].map(li => li.textContent),
            ol: [...e.querySelectorAll('ol > li')].map(li => li.textContent),
            inlineCode: e.querySelector('li code')?.textContent,
            table: [...e.querySelectorAll('.table-wrap > table tr')].map(
                tr => [...tr.children].map(c => c.textContent)),
            rightAligned: e.querySelector('td:last-child')?.getAttribute('align'),
            lang: e.querySelector('.code-block .code-lang')?.textContent,
            code: e.querySelector('.code-block pre code')?.textContent,
            quote: e.querySelector('blockquote')?.textContent.trim(),
            committed: [...e.children].filter(c => !c.classList.contains('md-tail')).length,
        })""")
        assert dom["h1"] == "Release notes"
        assert (dom["em"], dom["strong"]) == ("emphasis", "strong")
        assert dom["link"] == [["https://example.com/docs", "_blank", "noopener noreferrer nofollow"]]
        assert dom["ul"] == ["first item", "second item with inline code"]
        assert dom["inlineCode"] == "inline code" and dom["ol"] == ["one", "two"]
        assert dom["table"] == [["Name", "Value"], ["alpha", "1"], ["beta", "2"]]
        assert dom["rightAligned"] == "right"
        assert (dom["lang"], dom["code"]) == ("python", CODE)
        assert dom["quote"] == "a quote"
        # Rendered block by block as the text grew: all but the last block were committed.
        assert dom["committed"] >= 7, dom
        # ... and the result is the same as rendering the whole answer at once.
        same = await page.evaluate("""async () => {
            const {renderMarkdown} = await import('/markdown.js');
            const pane = document.querySelector('.answer-text').cloneNode(true);
            const tail = pane.querySelector('.md-tail');
            tail.replaceWith(...tail.childNodes);
            const whole = document.createElement('div');
            whole.append(renderMarkdown(document.querySelector('.answer').relayStream.text));
            const norm = (html) => html.replace(/>\\s+</g, '><');
            return [norm(pane.innerHTML), norm(whole.innerHTML)];
        }""")
        assert same[0] == same[1]
        # Copy puts exactly the code on the clipboard.
        await page.click(".copy-code")
        await page.wait_for_selector('.copy-code[data-copied="yes"]')
        assert await page.evaluate("() => navigator.clipboard.readText()") == CODE


async def test_markdown_cannot_run_script_or_load_anything(page):
    evil = ('Click [me](javascript:window.__pwned=1) and <img src=x onerror="window.__pwned=2">'
            ' <script>window.__pwned=3</script>\n\n'
            '<a href="javascript:window.__pwned=4">raw</a>\n\n'
            '![pixel](https://tracker.example/p.png) [fine](https://example.org/ok)\n')
    async with relay_with_writer() as (up, server):
        up.enqueue(openai_stream(chunks(evil, 7)))
        await open_chat(page, server)
        await page.select_option("#model", "writer")
        await send(page, "be evil")
        await wait_completed(page)
        found = await page.eval_on_selector(".answer-text", """e => ({
            tags: [...new Set([...e.querySelectorAll('*')].map(n => n.tagName))].sort(),
            hrefs: [...e.querySelectorAll('[href]')].map(a => a.getAttribute('href')),
            handlers: [...e.querySelectorAll('*')].flatMap(
                n => [...n.attributes].map(a => a.name).filter(a => a.startsWith('on'))),
            text: e.textContent})""")
        pwned = await page.evaluate("() => window.__pwned")
    assert pwned is None
    assert found["tags"] == ["A", "DIV", "P"], found
    assert found["hrefs"] == ["https://tracker.example/p.png", "https://example.org/ok"]
    assert found["handlers"] == []
    # Raw HTML is shown as text, not dropped silently.
    assert '<img src=x onerror="window.__pwned=2">' in found["text"]
    assert "<script>window.__pwned=3</script>" in found["text"]


INCREMENTAL_DOCS = [
    MARKDOWN,
    "1. first\n\n2. second (loose)\n\n3. third\n\ntext\n",
    "Setext heading\n---\n\npara line one\nline two\n===\n\n- a\n  lazy\n- b\n\n    indented\n",
    "| a | b |\n|---|:-:|\n| 1 | 2 |\n\n```\nunclosed fence\n\nstill code",
    "> quote\ncontinued\n\n***\n\nText with <b>html</b> and trailing  \nbreak\n- list after para\n",
    "Windows\r\nline endings\r\n\r\n- item\r\n- item 2\r\n",
]


async def test_incremental_rendering_matches_rendering_the_whole_text(page):
    """The per-block renderer, fed the text in pieces of many sizes, ends with the same DOM
    as rendering the finished text at once (the tricky cases: a list that turns loose, setext
    headings, lazy lines, an unclosed fence, CRLF)."""
    async with start_relay() as server:
        await page.goto(page_url(server, "relay-client.js"))
        results = await page.evaluate("""async (docs) => {
            const {MarkdownView, renderMarkdown} = await import('/markdown.js');
            const norm = (html) => html.replace(/>\\s+</g, '><');
            const out = [];
            for (const doc of docs) {
                const whole = document.createElement('div');
                whole.append(renderMarkdown(doc));
                for (const size of [1, 2, 3, 5, 8, 13, 40]) {
                    const box = document.createElement('div');
                    const view = new MarkdownView(box, {schedule: (fn) => fn()});
                    for (let i = size; i < doc.length + size; i += size) view.update(doc.slice(0, i));
                    const tail = box.querySelector('.md-tail');
                    tail.replaceWith(...tail.childNodes);
                    out.push({size, same: norm(box.innerHTML) === norm(whole.innerHTML),
                              got: box.innerHTML, want: whole.innerHTML});
                }
            }
            return out;
        }""", INCREMENTAL_DOCS)
    bad = [r for r in results if not r["same"]]
    assert not bad, bad[0]


# ---------------------------------------------------------------------- layout


LONG_URL = "https://example.com/" + "a" * 230
WIDE = ("Here is a wide block:\n\n```text\n" + "x" * 300 + "\n```\n\n"
        "| " + " | ".join(f"column{i}" for i in range(30)) + " |\n"
        "|" + "---|" * 30 + "\n| " + " | ".join(str(i) for i in range(30)) + " |\n\n"
        + "word" * 80 + "\n")


async def test_long_urls_words_and_code_never_make_the_page_scroll_sideways(page):
    assert len(LONG_URL) == 250
    async with relay_with_writer() as (up, server):
        up.enqueue(openai_stream(chunks(WIDE, 16)), openai_stream(chunks(WIDE, 16)))
        await open_chat(page, server)
        for width in (1100, 390):
            await page.set_viewport_size({"width": width, "height": 800})
            await page.click("#clear")
            await page.select_option("#model", "demo")
            await send(page, f"see {LONG_URL}")  # the demo echoes it back
            await wait_completed(page, 1)
            await page.select_option("#model", "writer")
            await send(page, "something wide")
            await wait_completed(page, 2)
            sizes = await page.evaluate("""() => {
                const pre = document.querySelector('.code-block pre');
                const wrap = document.querySelector('.table-wrap');
                const main = document.getElementById('answers');
                return {doc: document.documentElement.scrollWidth, body: document.body.scrollWidth,
                        view: window.innerWidth, main: [main.scrollWidth, main.clientWidth],
                        pre: [pre.scrollWidth, pre.clientWidth],
                        table: [wrap.scrollWidth, wrap.clientWidth]}; }""")
            assert sizes["doc"] <= sizes["view"] and sizes["body"] <= sizes["view"], sizes
            assert sizes["main"][0] <= sizes["main"][1], sizes  # nothing sideways inside either
            # The code line and the table scroll inside their own boxes.
            assert sizes["pre"][0] > sizes["pre"][1] and sizes["table"][0] > sizes["table"][1]
            user = await page.text_content(".turn .user")
            assert LONG_URL in user and LONG_URL in (await page.evaluate(PANES))[0]["text"]


async def test_follows_the_answer_until_the_reader_scrolls_up_then_offers_jump_to_latest(page):
    prompt = " ".join(f"word{i}" for i in range(500))
    await page.set_viewport_size({"width": 900, "height": 560})
    async with start_relay(demo_tps=100) as server:
        await open_chat(page, server)
        await send(page, prompt)
        # While streaming, taller than the view, and kept at the bottom.
        await page.wait_for_function("""() => {
            const m = document.getElementById('answers');
            const st = document.querySelector('.answer-status')?.dataset.status;
            return st === 'streaming' && m.scrollHeight > m.clientHeight + 300
                && m.scrollHeight - m.scrollTop - m.clientHeight <= 4; }""")
        assert await page.is_hidden("#jump-latest")
        # The reader scrolls up: the page stops following and offers the jump.
        # (An instant scroll, as a wheel or a scrollbar drag would end: a smooth wheel
        # animation could still be moving when the position is read below.)
        await page.evaluate("() => document.getElementById('answers').scrollBy(0, -600)")
        await page.wait_for_selector("#jump-latest", state="visible")
        top = await page.evaluate("() => document.getElementById('answers').scrollTop")
        length = await page.evaluate("() => document.querySelector('.answer').relayStream.text.length")
        await page.wait_for_function(
            "(n) => document.querySelector('.answer .answer-text').textContent.length > n + 100",
            arg=length)
        assert await page.evaluate("() => document.getElementById('answers').scrollTop") == top
        assert await page.get_attribute(".answer-status", "data-status") == "streaming"
        # Jump: back at the bottom, and following again as the answer grows and ends.
        await page.click("#jump-latest")
        await page.wait_for_selector("#jump-latest", state="hidden")
        await wait_completed(page)
        geometry = await page.evaluate("""() => {
            const m = document.getElementById('answers');
            const meta = document.querySelector('.answer-meta').getBoundingClientRect();
            const composer = document.getElementById('composer').getBoundingClientRect();
            const view = m.getBoundingClientRect();
            return {gap: m.scrollHeight - m.scrollTop - m.clientHeight, metaTop: meta.top,
                    metaBottom: meta.bottom, composerTop: composer.top, viewTop: view.top,
                    viewBottom: view.bottom}; }""")
    # The finished footer is in view, above the composer, never behind it.
    assert geometry["gap"] <= 4, geometry
    assert geometry["metaBottom"] <= geometry["composerTop"], geometry
    assert geometry["viewTop"] <= geometry["metaTop"] and geometry["metaBottom"] <= geometry["viewBottom"]


# ---------------------------------------------------------------------- composer


LONG = " ".join(f"w{i}" for i in range(80))  # long replies: they are still streaming below


async def test_send_becomes_stop_and_enter_starts_no_second_answer_unless_comparing(page):
    async with start_relay(demo_tps=20) as server:
        await open_chat(page, server)
        assert await page.is_visible("#send") and await page.is_hidden("#stop")
        await send(page, f"first question {LONG}")
        await page.wait_for_selector('.answer-status[data-status="streaming"]')
        assert await page.is_hidden("#send") and await page.is_visible("#stop")
        # Enter while an answer streams: nothing is sent, the typed text stays.
        await page.fill("#prompt", "second question")
        await page.press("#prompt", "Enter")
        assert await page.eval_on_selector_all(".turn", "ts => ts.length") == 1
        assert await page.input_value("#prompt") == "second question"
        await page.click("#stop")
        await page.wait_for_selector('.answer-status[data-status="cancelled"]')
        await page.wait_for_selector("#send", state="visible")
        await page.press("#prompt", "Enter")
        await page.wait_for_function("() => document.querySelectorAll('.turn').length === 2")
        await wait_completed(page)
        # With Compare on, Enter may start another answer while one streams.
        await page.check("#compare")
        await send(page, f"compare one {LONG}")
        await page.wait_for_selector('.turn:nth-of-type(3) .answer-status[data-status="streaming"]')
        assert await page.is_visible("#send") and await page.is_visible("#stop")
        await page.fill("#prompt", f"compare two {LONG}")
        await page.press("#prompt", "Enter")
        await page.wait_for_function("() => document.querySelectorAll('.turn').length === 4")
        await page.click("#stop")
        await page.wait_for_selector("#stop", state="hidden")


async def test_empty_state_then_regenerate_the_last_answer(page):
    async with start_relay(demo_tps=0) as server:
        await page.add_init_script(RECORD_SENT)
        await open_chat(page, server)
        empty = await page.text_content("#empty-state")
        assert await page.is_visible("#empty-state")
        assert "This relay serves: demo" in empty and "relay serve" in empty
        await send(page, "hello")
        await wait_completed(page, 1)
        assert await page.is_hidden("#empty-state")
        await send(page, "again")
        await wait_completed(page, 2)
        # Regenerate only on the last answer.
        assert await page.eval_on_selector_all(
            ".regenerate", "bs => bs.map(b => b.closest('.turn') === document.querySelector('.turn:last-of-type'))") == [True]
        old_id = await page.get_attribute(".turn:last-of-type .answer", "data-stream-id")
        await page.click(".regenerate")
        await page.wait_for_function(
            """(old) => { const p = document.querySelector('.turn:last-of-type .answer');
                          return p.dataset.streamId !== old
                              && p.querySelector('.answer-status').dataset.status === 'completed'; }""",
            arg=old_id)
        assert await page.eval_on_selector_all(".turn", "ts => ts.length") == 2
        await send(page, "third")
        await wait_completed(page, 3)
        starts = await page.evaluate("() => window.__sent.filter(f => f.type === 'start')")
        await page.click("#clear")
        assert await page.is_visible("#empty-state")
    first, second, regenerated, third = (s["messages"] for s in starts)
    assert regenerated == second  # the same question, with the same history
    assert [m["content"] for m in third if m["role"] == "user"] == ["hello", "again", "third"]
    assert len(third) == 5  # the replaced answer is not in the history twice


# ---------------------------------------------------------------------- messages


WATCH_MESSAGES = """() => {
    window.__messages = [];
    window.relayClient.addEventListener('state', (e) => window.__messages.push({
        state: e.detail.state, message: document.getElementById('conn-message').textContent,
        detail: document.getElementById('conn-detail').textContent}));
}"""


async def test_connection_lost_and_relay_restarted_are_said_in_words_with_codes_in_details(page):
    async with start_relay(detach_grace=5, demo_tps=30) as server:
        port = server.port
        await open_chat(page, server)
        await page.evaluate(WATCH_MESSAGES)
        await send(page, "please keep streaming while the relay restarts under this page")
        await wait_seqs(page, 5)
        # The relay refuses new upgrades (503) from here on, so the page cannot reconnect
        # to it before it is gone, then drops the page (1006) and shuts down.
        server.draining = True
        await drop_all(server, "abort")
        await server.close()
    async with start_relay(port=port, detach_grace=5, demo_tps=30):
        await page.wait_for_selector('.answer-status[data-status="error"]')
        await page.wait_for_selector('#conn-state[data-state="open"]')
        [pane] = await page.evaluate(PANES)
        messages = await page.evaluate("() => window.__messages")
    reconnecting = [m for m in messages if m["state"] == "reconnecting"]
    assert reconnecting[0]["message"].startswith("Connection lost, reconnecting…"), messages
    assert reconnecting[0]["detail"].startswith("1006: connection lost"), messages
    assert pane["notice"] == ("The relay restarted and this answer could not be resumed; "
                              "partial answer kept.")
    assert pane["error"] == "unknown_stream" and "unknown_stream" in pane["meta"]
    assert pane["text"] and pane["raw"].startswith(pane["text"].strip())


async def test_refused_and_failed_answers_are_explained_with_the_code_in_details(page):
    """A start the relay refuses (too many streams on the connection, here with Compare on
    and max_streams 1) and a provider failure (429) each say what happened in words."""
    async with relay_with_writer(max_streams=1, demo_tps=20) as (up, server):
        up.enqueue(http_error("openai", 429, retry_after=7))
        await open_chat(page, server)
        await page.check("#compare")
        await send(page, f"two at once {LONG}")  # demo twice: the second start is refused
        await page.wait_for_selector('.answer-status[data-error="too_many_streams"]')
        await page.click("#stop")
        await page.wait_for_selector('.answer-status[data-status="cancelled"]')
        await page.uncheck("#compare")
        await page.select_option("#model", "writer")
        await send(page, "provider says no")
        await page.wait_for_selector('.turn:nth-of-type(2) .answer-status[data-status="failed"]')
        panes = await page.evaluate(PANES)
    cancelled, refused, failed = panes  # A runs, B (the second start) is refused
    assert refused["notice"] == "Too many answers at once: wait for one to finish, then try again."
    assert "too_many_streams" in refused["meta"] and refused["status"] == "error"
    assert cancelled["notice"] == "" and "reason: client_cancel" in cancelled["meta"]
    assert failed["notice"] == "The model provider is rate limiting the relay: try again later."
    assert "error: upstream_rate_limited" in failed["meta"]


async def test_token_field_only_when_the_relay_requires_one(page):
    secret = "ux-tests-secret-0123456789abcdef0123"
    async with start_relay() as server:
        await open_chat(page, server)
        assert await page.is_hidden("#token-group") and await page.is_hidden("#reconnect")
    async with start_relay(auth=True, token_secret=secret) as server:
        await page.goto(page_url(server))
        await page.wait_for_selector('#conn-state[data-state="closed"]')
        assert await page.is_visible("#token") and await page.is_visible("#reconnect")
        assert await page.text_content("#conn-message") == (
            "This relay requires a token. Enter it above and press Connect.")
        assert await page.text_content("#conn-detail") == (
            "4401: not authenticated; get new credentials first (missing token)")
        await page.fill("#token", mint_token(secret, "alice", 300))
        await page.click("#reconnect")
        await page.wait_for_selector('#conn-state[data-state="open"]')
        assert await page.is_visible("#token")  # still in use: it can be changed
        await send(page, "with a token")
        await wait_completed(page)


async def test_favicon_and_vendored_modules_are_served_and_nothing_fails(page):
    failures: list[str] = []
    page.on("response", lambda r: r.status >= 400 and failures.append(f"{r.status} {r.url}"))
    page.on("requestfailed", lambda r: failures.append(f"failed {r.url}"))
    page.on("console", lambda m: m.type in ("error", "warning") and failures.append(m.text))
    async with start_relay() as server:
        await open_chat(page, server)
        await send(page, "hello")
        await wait_completed(page)
        served = await page.evaluate("""async () => {
            const out = {};
            for (const path of ['/favicon.svg', '/vendor/marked.esm.js', '/vendor/purify.es.mjs',
                                '/markdown.js', '/vendor/marked.LICENSE.txt']) {
                const r = await fetch(path);
                out[path] = [r.status, r.headers.get('content-type')];
            }
            out.icon = document.querySelector('link[rel=icon]').getAttribute('href');
            return out; }""")
    assert not failures, failures
    assert served.pop("icon") == "favicon.svg"
    assert served == {
        "/favicon.svg": [200, "image/svg+xml"],
        "/vendor/marked.esm.js": [200, "text/javascript; charset=utf-8"],
        "/vendor/purify.es.mjs": [200, "text/javascript; charset=utf-8"],
        "/markdown.js": [200, "text/javascript; charset=utf-8"],
        "/vendor/marked.LICENSE.txt": [200, "text/plain; charset=utf-8"],
    }


async def test_a_refusal_is_shown_as_a_refusal_as_text_only(page):
    """OpenAI's structured-output refusal (``refusal`` frames): shown apart from the answer,
    styled as a refusal, through textContent (markup in it stays text)."""
    import json

    from ..fakes.upstream import Script, SSEEvent

    def chunk(delta: dict, finish: str | None = None) -> SSEEvent:
        return SSEEvent(json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1,
                                    "model": "gpt-writer", "choices": [
                                        {"index": 0, "delta": delta, "finish_reason": finish}]}))

    refusal = ["I can't help ", 'with <img src=x onerror="window.__pwned=1"> that.']
    events = [chunk({"role": "assistant", "content": None, "refusal": ""}),
              *(chunk({"refusal": piece}) for piece in refusal), chunk({}, "stop"),
              SSEEvent("[DONE]")]
    async with relay_with_writer() as (up, server):
        up.enqueue(Script(format="openai", events=tuple(events)))
        await open_chat(page, server)
        await page.select_option("#model", "writer")
        await send(page, "something it refuses")
        await wait_completed(page)
        shown = await page.eval_on_selector(".answer-refusal", """e => ({
            text: e.textContent, children: e.children.length,
            label: getComputedStyle(e, '::before').content,
            border: getComputedStyle(e).borderLeftStyle,
            visible: e.getBoundingClientRect().height > 0})""")
        answer = await page.eval_on_selector(".answer-text", "e => e.textContent")
        meta = await page.eval_on_selector(".answer-meta", "e => e.textContent")
        pwned = await page.evaluate("() => window.__pwned")
    assert shown["text"] == "".join(refusal) and shown["children"] == 0
    assert "refused" in shown["label"] and shown["border"] == "solid" and shown["visible"]
    assert answer == "" and pwned is None
    assert "reason: content_filter" in meta


async def test_an_overloaded_provider_is_said_in_words(page):
    async with relay_with_writer() as (up, server):
        up.enqueue(http_error("openai", 503, retry_after=4))
        await open_chat(page, server)
        await page.select_option("#model", "writer")
        await send(page, "busy?")
        await page.wait_for_selector('.answer-status[data-status="failed"]')
        panes = await page.evaluate(PANES)
    assert panes[0]["notice"] == "The model provider is overloaded: try again in 4 s."
    assert "error: upstream_overloaded" in panes[0]["meta"]
