"""The chat page and relay-client.js against the REAL relay: resume after a dropped
connection (and after a relay-sent retryable close), no resume with detach_grace 0, and
authentication with signed tokens (fragment token, bad token, models claim, a token
function called again before a reconnect).

The relay runs in-process (tests/relay/helpers.start_relay); the drop is made on the
server side (`transport.abort()`: no close frame, so the browser sees 1006) or is a close
frame the relay's own socket sends (1012). Every wait is on DOM state or on a promise in the
page; nothing sleeps. RECORD_WS records, per WebSocket the page opens, the frames it sent
and received and its close code, so the tests can check the wire as well as the page.
"""

from __future__ import annotations

import dataclasses

import pytest

from llm_relay_protocol import CloseCode
from relay.core.auth import mint_token
from relay.upstream.demo import demo_reply_tokens
from relay.upstream.llm import demo_handler, set_demo_tps
from relay.upstream.providers import ModelRegistry, demo_spec

from ..relay.helpers import start_relay
from .test_chat_page import PANES, open_chat, page_url, send

SECRET = "browser-tests-secret-0123456789abcdef"
PROMPT = "please keep streaming while the network drops under this page"
MESSAGES = [{"role": "user", "content": PROMPT}]
FULL_TEXT = "".join(demo_reply_tokens(MESSAGES))

RECORD_WS = """
window.__sockets = [];
const NativeWebSocket = window.WebSocket;
window.WebSocket = class extends NativeWebSocket {
    constructor(url, protocols) {
        super(url, protocols);
        const rec = {url, sent: [], received: [], close: null};
        this.__rec = rec;
        window.__sockets.push(rec);
        this.addEventListener('message', (e) => {
            try { rec.received.push(JSON.parse(e.data)); } catch (_) { rec.received.push(e.data); } });
        this.addEventListener('close', (e) => { rec.close = {code: e.code, reason: e.reason}; });
    }
    send(data) { this.__rec.sent.push(JSON.parse(data)); return super.send(data); }
};"""

# Connection-state events of the page's client, each with the answer pane's status at that
# moment (the page redraws its panes in its own onstate, which runs before these listeners).
WATCH_STATES = """() => {
    window.__states = [];
    window.relayClient.addEventListener('state', (e) => window.__states.push({
        state: e.detail.state, code: e.detail.code ?? null,
        pane: document.querySelector('.answer .answer-status')?.dataset.status ?? null}));
}"""

STREAM_INFO = """() => { const s = document.querySelector('.answer').relayStream;
    return {id: s.id, text: s.text, seqs: s.seqs, status: s.status, resumes: s.resumes,
            lastResume: s.lastResume, streamKey: s.streamKey}; }"""


def frames_of(sock: dict, sid: str) -> list[dict]:
    return [f for f in sock["received"] if isinstance(f, dict) and f.get("id") == sid]


def text_of(frames: list[dict]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "token")


async def drop_all(server, how: str) -> None:
    """Drop every connection of ``server`` from its side, mid-stream."""
    for session in server.sessions:
        if how == "abort":  # a network drop: no close frame; the browser sees 1006
            session.ws.transport.abort()
        else:  # the relay's socket sends a retryable close frame
            await session.ws.close(CloseCode.SERVICE_RESTART, "restarting")


async def wait_seqs(page, n: int) -> None:
    """Until the page's stream has delivered ``n`` frames (started + n-1 tokens)."""
    await page.wait_for_function(
        "(n) => (document.querySelector('.answer')?.relayStream?.seqs.length ?? 0) >= n", arg=n)


# ---------------------------------------------------------------------- resume


@pytest.mark.parametrize("how,code", [("abort", 1006), ("close", 1012)])
async def test_page_resumes_a_stream_after_the_connection_drops(page, tmp_path, how, code):
    async with start_relay(detach_grace=5, demo_tps=30) as server:
        await page.add_init_script(RECORD_WS)
        await open_chat(page, server)
        await page.evaluate(WATCH_STATES)
        await send(page, PROMPT)
        await wait_seqs(page, 6)
        await drop_all(server, how)
        await page.wait_for_selector('.answer-status[data-status="completed"]')
        await page.wait_for_selector('#conn-state[data-state="open"]')
        [pane] = await page.evaluate(PANES)
        info = await page.evaluate(STREAM_INFO)
        sockets = await page.evaluate("() => window.__sockets")
        states = await page.evaluate("() => window.__states")
        if how == "abort":
            shot = tmp_path / "resumed.png"
            await page.screenshot(path=str(shot), full_page=True)
            print(f"\nscreenshot: {shot}")

    # The page: the whole reply, exactly the uninterrupted one, completed, resumed once.
    assert pane["text"] == info["text"] == FULL_TEXT
    assert pane["status"] == info["status"] == "completed"
    assert info["resumes"] == 1 and info["lastResume"]["closeCode"] == code
    assert f"resumed 1× after a dropped connection (last: close {code}" in pane["meta"]
    # Every seq the page delivered, once, increasing, started (0) through the finish.
    seqs = info["seqs"]
    assert seqs[0] == 0 and seqs == sorted(set(seqs)), seqs

    # The wire: two sockets; the first ended with `code`, the second resumed after the last
    # seq the first delivered, and the server replayed nothing the page had already seen.
    assert len(sockets) == 2, [s["close"] for s in sockets]
    first, second = sockets
    assert first["close"]["code"] == code and second["close"] is None
    before = frames_of(first, info["id"])
    after = frames_of(second, info["id"])
    last = before[-1]["seq"]
    hello, resume = second["sent"][:2]
    assert hello["type"] == "hello"
    assert resume == {"type": "resume", "stream_key": info["streamKey"], "after_seq": last,
                      "id": info["id"]}
    assert after[0] == {"type": "resumed", "id": info["id"], "stream_key": info["streamKey"],
                        "after_seq": last}
    # (The replay may merge the token frames sent while detached into one, keeping the last
    # seq, so seqs can skip; the texts still concatenate to the same reply.)
    wire_seqs = [f["seq"] for f in before + after[1:]]
    assert wire_seqs == seqs  # nothing dropped as a duplicate, nothing missing
    assert text_of(before) + text_of(after) == FULL_TEXT
    assert [f["type"] for f in before + after].count("finish") == 1
    assert not any(f["type"] == "start" for f in second["sent"])  # resumed, not restarted

    # Connection state: open -> reconnecting (with the close code; the pane shows
    # "resuming") -> ... -> open, and the pane was still resuming until the replay came.
    names = [s["state"] for s in states]
    assert names[0] == "reconnecting" and states[0]["code"] == code, states
    assert states[0]["pane"] == "resuming"
    assert "open" in names and set(names[:names.index("open")]) == {"reconnecting"}, states


async def test_without_detach_grace_a_drop_ends_the_stream_with_its_partial_text(page):
    handler = demo_handler()
    closed_before = handler.closed_early
    async with start_relay(detach_grace=0, demo_tps=30) as server:
        await page.add_init_script(RECORD_WS)
        await open_chat(page, server)
        await page.evaluate(WATCH_STATES)
        await send(page, PROMPT)
        await wait_seqs(page, 6)
        await drop_all(server, "abort")
        await page.wait_for_selector('.answer-status[data-status="error"]')
        error = await page.evaluate("""async () => {
            const s = document.querySelector('.answer').relayStream;
            try { await s.done; return null; } catch (e) {
                return {name: e.name, code: e.code, partialText: e.partialText,
                        closeCode: e.closeCode, id: e.id, text: s.text}; } }""")
        [pane] = await page.evaluate(PANES)
        status_text = await page.text_content(".answer-status")
        # The page reconnects (1006 is retryable) and can be used again.
        await page.wait_for_selector('#conn-state[data-state="open"]')
        sockets = await page.evaluate("() => window.__sockets")
        await handler.wait_closed_early(closed_before + 1)  # the relay cancelled upstream

    assert error["name"] == "StreamError" and error["code"] == "connection_lost"
    assert error["closeCode"] == 1006
    assert error["partialText"] == error["text"] == pane["raw"] == pane["text"]
    assert pane["text"] and FULL_TEXT.startswith(pane["text"]) and pane["text"] != FULL_TEXT
    # A sentence for people; the code and the close code in the details.
    assert status_text == "interrupted" and pane["error"] == "connection_lost"
    assert pane["notice"] == ("The connection was lost and this answer could not be resumed; "
                              "partial answer kept.")
    assert "connection_lost · close 1006" in pane["meta"]
    assert "connection lost (1006" in pane["meta"]
    assert len(sockets) == 2
    assert not any(f["type"] == "resume" for f in sockets[1]["sent"])


# ---------------------------------------------------------------------- authentication


def _two_alias_registry(tps: float) -> ModelRegistry:
    set_demo_tps(tps)
    demo = demo_spec()
    return ModelRegistry([demo, dataclasses.replace(demo, alias="other")])


async def test_page_with_a_minted_token_streams_and_lists_only_its_models(page):
    limited = mint_token(SECRET, "alice", 300, models=["demo"])
    unlimited = mint_token(SECRET, "bob", 300)
    async with start_relay(registry=_two_alias_registry(0), auth=True,
                           token_secret=SECRET) as server:
        await page.add_init_script(RECORD_WS)
        await open_chat(page, server, f"#token={limited}")
        assert "token" not in await page.evaluate("() => location.href")
        options = await page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
        assert options == ["demo"]  # welcome.models, filtered by the token's claim
        assert [s.principal for s in server.sessions] == ["jwt:alice"]
        await send(page, "hello with a token")
        await page.wait_for_selector('.answer-status[data-status="completed"]')
        [pane] = await page.evaluate(PANES)
        assert pane["text"] == "".join(
            demo_reply_tokens([{"role": "user", "content": "hello with a token"}]))
        # A token without a models claim: every alias.
        await page.fill("#token", unlimited)
        await page.click("#reconnect")
        await page.wait_for_function(
            "() => document.querySelectorAll('#model option').length === 2")
        await page.wait_for_selector('#conn-state[data-state="open"]')
        options = await page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
        assert options == ["demo", "other"]
        sockets = await page.evaluate("() => window.__sockets")
    assert [s["sent"][0]["token"] for s in sockets] == [limited, unlimited]
    assert all(s["received"][0]["type"] == "welcome" for s in sockets)


@pytest.mark.parametrize("fragment,reason", [("#token=not-a-valid-token", "invalid token"),
                                             ("", "missing token")])
async def test_page_with_a_bad_or_no_token_shows_4401_and_does_not_retry(page, fragment, reason):
    async with start_relay(auth=True, token_secret=SECRET) as server:
        await page.add_init_script(RECORD_WS)
        await page.goto(page_url(server, fragment))
        await page.wait_for_selector('#conn-state[data-state="closed"]')
        detail = await page.text_content("#conn-detail")
        code = await page.get_attribute("#conn-detail", "data-code")
        sockets = await page.evaluate("() => window.__sockets")
        pending = await page.evaluate("() => window.relayClient._reconnectTimer")
        assert await page.is_disabled("#send")
    assert detail == f"4401: not authenticated; get new credentials first ({reason})"
    assert code == "4401"
    assert len(sockets) == 1 and sockets[0]["close"] == {"code": 4401, "reason": reason}
    assert sockets[0]["received"] == []  # no welcome
    assert pending is None  # nothing scheduled: closed is final


async def test_token_function_is_called_before_every_connect_and_resume_keeps_the_principal(
        page):
    minted: list[str] = []

    def mint() -> str:
        minted.append(mint_token(SECRET, "alice", 60))
        return minted[-1]

    async with start_relay(auth=True, token_secret=SECRET, detach_grace=5,
                           demo_tps=30) as server:
        await page.add_init_script(RECORD_WS)
        await page.expose_function("mintToken", mint)
        # A page of the relay's origin without the chat app (which would connect itself).
        await page.goto(page_url(server, "relay-client.js"))
        await page.evaluate("""async (messages) => {
            const m = await import('/relay-client.js');
            const c = await m.RelayClient.connect(undefined, {
                token: () => window.mintToken(), backoffBase: 20, backoffMax: 100});
            window.__c = c;
            window.__s = c.start({model: 'demo', messages});
        }""", MESSAGES)
        await page.wait_for_function("() => window.__s.seqs.length >= 4")
        assert len(minted) == 1
        assert [s.principal for s in server.sessions] == ["jwt:alice"]
        await drop_all(server, "abort")
        out = await page.evaluate("""async () => {
            const s = window.__s, c = window.__c;
            const finish = await s.done;
            const out = {status: finish.status, text: s.text, resumes: s.resumes,
                         state: c.state, seqs: s.seqs};
            c.close();
            return out;
        }""")
        sockets = await page.evaluate("() => window.__sockets")
    assert len(minted) == 2  # called again before the reconnect
    assert [s["sent"][0]["token"] for s in sockets] == minted
    assert out["status"] == "completed" and out["text"] == FULL_TEXT
    assert out["resumes"] == 1 and out["seqs"] == sorted(set(out["seqs"]))
    assert sockets[1]["sent"][1]["type"] == "resume"


async def test_a_token_expiring_on_an_open_connection_is_refreshed_once_and_the_start_resent(
        page):
    """The relay closes 4401 `token expired` at the first start after `exp` and leaves that
    start unanswered; a client with a token function reconnects once with a fresh token and
    sends the start again. A refused fresh token ends it (`closed`, no loop)."""
    minted: list[str] = []
    ttl = [300]

    def mint() -> str:
        minted.append(mint_token(SECRET, "alice", ttl[0]))
        return minted[-1]

    async with start_relay(auth=True, token_secret=SECRET, demo_tps=0) as server:
        await page.add_init_script(RECORD_WS)
        await page.expose_function("mintToken", mint)
        await page.goto(page_url(server, "relay-client.js"))
        await page.evaluate("""async () => {
            const m = await import('/relay-client.js');
            window.__states = [];
            window.__c = await m.RelayClient.connect(undefined, {
                token: () => window.mintToken(), backoffBase: 20, backoffMax: 100});
            window.__c.addEventListener('state', (e) => window.__states.push(
                {state: e.detail.state, code: e.detail.code ?? null, reason: e.detail.reason}));
        }""")
        # Time passes on the relay: the first token (300 s) has expired, a fresh one
        # (7200 s) has not.
        real = server.auth.clock
        server.auth.clock = lambda: real() + 3600
        ttl[0] = 7200
        out = await page.evaluate("""async (messages) => {
            const s = window.__c.start({model: 'demo', messages, id: 'after-expiry'});
            const finish = await s.done;
            return {status: finish.status, text: s.text, state: window.__c.state};
        }""", MESSAGES)
        # Now every token is expired: the next refresh is refused before any welcome.
        server.auth.clock = lambda: real() + 10 * 86400
        final = await page.evaluate("""async () => {
            const c = window.__c;
            const s = c.start({model: 'demo', messages: [{role: 'user', content: 'x'}]});
            let error = null;
            try { await s.done; } catch (e) { error = e.code; }
            if (c.state !== 'closed') await new Promise((resolve) => c.addEventListener(
                'state', (e) => e.detail.state === 'closed' && resolve()));
            return {error, states: window.__states};
        }""")
        sockets = await page.evaluate("() => window.__sockets")
    assert out == {"status": "completed", "text": FULL_TEXT, "state": "open"}
    first, second, third = sockets  # no fourth: the refused refresh was final
    assert first["close"] == {"code": 4401, "reason": "token expired"}
    starts = [[f for f in s["sent"] if f["type"] == "start"] for s in (first, second)]
    assert starts[0] == [starts[1][0]]  # sent again, once, on the refreshed connection
    assert not [f for f in first["received"] if f.get("id") == "after-expiry"]
    assert second["received"][0]["type"] == "welcome"
    assert second["close"] == {"code": 4401, "reason": "token expired"}
    assert third["received"] == []  # refused at hello: no welcome, and no further attempt
    assert third["close"] == {"code": 4401, "reason": "token expired"}
    assert [s["sent"][0]["token"] for s in sockets] == minted and len(minted) == 3
    assert final["error"] == "connection_lost"
    names = [(s["state"], s["code"]) for s in final["states"]]
    assert names[-1] == ("closed", 4401)
