"""relay-client.js in a real Chromium against a scripted fake llm-relay server.

The fake server (websockets, in the test's event loop) serves relay-client.js itself (through
relay/http/web.py) so the page and the module share its origin; each WebSocket path is a scenario
written frame by frame: unknown frame types and fields, duplicated seq, refused starts,
resume after a 1012 (the server side of resume lands on another branch; this pins the client
to the spec), resume refused, no resume offered, a non-retryable close, a dead server that
stops answering pings. Everything waits on promises in the page; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
from collections import defaultdict

from websockets.asyncio.server import ServerConnection, serve

from relay.http import web

from ..relay.helpers import start_relay

PROTOCOL = "llm-relay.v1"
WELCOME = {"type": "welcome", "protocol": PROTOCOL, "session_id": "s_fake", "models": ["demo"],
           "limits": {"max_streams": 8, "max_frame_bytes": 1048576}}


class FakeRelay:
    """ws://host:port/ws/<scenario>; ``self.frames[scenario]`` is what clients sent."""

    def __init__(self) -> None:
        self.frames: dict[str, list[dict]] = defaultdict(list)
        self.connections: dict[str, int] = defaultdict(int)
        self.port = 0

    @contextlib.asynccontextmanager
    async def running(self):
        async with serve(self._handler, "127.0.0.1", 0, subprotocols=[PROTOCOL],
                         process_request=self._process_request) as server:
            self.port = server.sockets[0].getsockname()[1]
            yield self

    def url(self, scenario: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/{scenario}"

    def _process_request(self, connection: ServerConnection, request):
        path = request.path.split("?", 1)[0]
        if path == "/ws" or path.startswith("/ws/"):
            return None
        if path == "/":
            return connection.respond(http.HTTPStatus.OK, "fake relay\n")
        return web.respond(connection, path) or connection.respond(http.HTTPStatus.NOT_FOUND, "")

    async def _handler(self, ws: ServerConnection) -> None:
        path = ws.request.path.split("?", 1)[0]
        # /ws is where the chat page (index.html served from here) connects.
        scenario = "page" if path == "/ws" else path.removeprefix("/ws/")
        n = self.connections[scenario]
        self.connections[scenario] += 1
        self.ws = ws
        self.scenario = scenario
        await getattr(self, f"scenario_{scenario}")(ws, n)

    async def recv(self, ws: ServerConnection) -> dict:
        frame = json.loads(await ws.recv())
        self.frames[self.scenario].append(frame)
        return frame

    async def recv_type(self, ws: ServerConnection, kind: str) -> dict:
        """Next frame of type ``kind``, answering pings on the way."""
        while True:
            frame = await self.recv(ws)
            if frame["type"] == kind:
                return frame
            if frame["type"] == "ping":
                await send(ws, {"type": "pong", "data": frame.get("data")})

    async def idle(self, ws: ServerConnection, *, pong: bool = True) -> None:
        with contextlib.suppress(Exception):
            while True:
                frame = await self.recv(ws)
                if pong and frame["type"] == "ping":
                    await send(ws, {"type": "pong", "data": frame.get("data")})

    # ---------------------------------------------------------------- scenarios

    async def scenario_unknown(self, ws, n):
        await self.recv_type(ws, "hello")
        await send(ws, {**WELCOME, "future_field": {"x": 1},
                        "limits": {**WELCOME["limits"], "future_limit": 3}})
        await send(ws, {"type": "announcement", "text": "a frame type from the future"})
        start = await self.recv_type(ws, "start")
        sid = start["id"]
        for raw in [
            {"type": "started", "id": sid, "seq": 0, "model": "demo", "colour": "blue"},
            {"type": "mystery", "id": sid, "seq": 1, "text": "MYSTERY"},
            {"type": "token", "id": sid, "seq": 1, "text": "Hello", "logprob": -0.1},
            {"type": "token", "id": sid, "seq": 1, "text": "Hello"},  # duplicate seq: dropped
            "not json at all",
            [1, 2, 3],
            {"no_type": True},
            {"type": 42},
            {"type": "token", "id": "someone-else", "seq": 5, "text": "NOT OURS"},
            {"type": "token", "id": sid, "seq": 3, "text": " world"},  # gaps are fine
            {"type": "reasoning", "id": sid, "seq": 4, "text": "thinking"},
            {"type": "tool_call_chunk", "id": sid, "seq": 5, "index": 0, "call_id": "c1",
             "name": "lookup", "arguments_delta": "{\"q\": "},
            {"type": "tool_call_chunk", "id": sid, "seq": 6, "index": 0, "call_id": "c1",
             "arguments_delta": "\"x\"}"},
            {"type": "tool_call_complete", "id": sid, "seq": 7, "index": 0, "call_id": "c1",
             "name": "lookup", "arguments": "{\"q\": \"x\"}", "extra": 1},
            {"type": "finish", "id": sid, "seq": 8, "status": "completed", "reason": "stop",
             "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                       "estimated": False, "cost": 0}, "trailer": True},
        ]:
            await send(ws, raw)
        refused = await self.recv_type(ws, "start")
        await send(ws, {"type": "error", "code": "unknown_model", "ref": "start",
                        "id": refused["id"], "message": "unknown model 'nope'; this relay serves: demo"})
        await self.idle(ws)

    async def scenario_resume(self, ws, n):
        await self.recv_type(ws, "hello")
        await send(ws, {**WELCOME, "limits": {**WELCOME["limits"], "detach_grace": 30}})
        if n == 0:
            start = await self.recv_type(ws, "start")
            sid = start["id"]
            await send(ws, {"type": "started", "id": sid, "seq": 0, "model": "demo",
                            "stream_key": "key-1"})
            await send(ws, {"type": "token", "id": sid, "seq": 1, "text": "a"})
            await send(ws, {"type": "token", "id": sid, "seq": 2, "text": "b"})
            await self.recv_type(ws, "ping")  # the client has read the tokens
            await ws.close(1012, "restarting")
            return
        resume = await self.recv_type(ws, "resume")
        sid = resume["id"]
        await send(ws, {"type": "resumed", "id": sid, "stream_key": resume["stream_key"],
                        "after_seq": resume["after_seq"]})
        await send(ws, {"type": "token", "id": sid, "seq": 2, "text": "b"})  # replayed: dropped
        await send(ws, {"type": "token", "id": sid, "seq": 3, "text": "c"})
        await send(ws, {"type": "finish", "id": sid, "seq": 4, "status": "completed",
                        "reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": 3,
                                                    "total_tokens": 4, "estimated": False}})
        await self.idle(ws)

    async def scenario_resumelost(self, ws, n):
        await self.recv_type(ws, "hello")
        await send(ws, {**WELCOME, "limits": {**WELCOME["limits"], "detach_grace": 30}})
        if n == 0:
            sid = (await self.recv_type(ws, "start"))["id"]
            await send(ws, {"type": "started", "id": sid, "seq": 0, "model": "demo",
                            "stream_key": "key-2"})
            await send(ws, {"type": "token", "id": sid, "seq": 1, "text": "partial"})
            await self.recv_type(ws, "ping")
            await ws.close(1012, "restarting")
            return
        resume = await self.recv_type(ws, "resume")
        await send(ws, {"type": "error", "code": "stream_lost", "ref": "resume",
                        "id": resume["id"], "message": "the stream's log expired"})
        await self.idle(ws)

    async def scenario_noresume(self, ws, n):
        await self.recv_type(ws, "hello")
        await send(ws, WELCOME)  # no detach_grace: resume disabled
        sid = (await self.recv_type(ws, "start"))["id"]
        await send(ws, {"type": "started", "id": sid, "seq": 0, "model": "demo",
                        "stream_key": "key-3"})
        await send(ws, {"type": "token", "id": sid, "seq": 1, "text": "cut"})
        if n == 0:
            await self.recv_type(ws, "ping")
            await ws.close(4008, "slow consumer")
            return
        await send(ws, {"type": "finish", "id": sid, "seq": 2, "status": "completed",
                        "reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                    "total_tokens": 2, "estimated": False}})
        await self.idle(ws)

    async def scenario_fatal(self, ws, n):
        await self.recv_type(ws, "hello")
        await send(ws, WELCOME)
        await self.recv_type(ws, "ping")
        await ws.close(4401, "credentials rejected")

    async def scenario_page(self, ws, n):
        await self.recv_type(ws, "hello")
        await send(ws, {**WELCOME, "models": ["demo", "<b>other</b>"]})
        await ws.close(4401, "token rejected")  # arrives after the welcome, in order

    async def scenario_tokenfail(self, ws, n):
        await self.recv_type(ws, "hello")
        await send(ws, WELCOME)
        await self.recv_type(ws, "start")  # the client is welcomed and streaming
        await ws.close(1012, "restarting")  # a retryable drop: the client reconnects

    async def scenario_silent(self, ws, n):
        await self.recv_type(ws, "hello")
        await send(ws, WELCOME)
        await self.idle(ws, pong=n > 0)  # the first server is "dead": it never answers


async def send(ws: ServerConnection, frame) -> None:
    await ws.send(frame if isinstance(frame, str) else json.dumps(frame))


async def run_js(page, script: str, arg=None, timeout: float = 10.0):
    async with asyncio.timeout(timeout):
        return await page.evaluate(script, arg)


IMPORT = "const m = await import('/relay-client.js');"


async def test_unknown_frames_and_fields_are_ignored_and_seq_deduped(page):
    async with FakeRelay().running() as fake:
        await page.goto(f"http://127.0.0.1:{fake.port}/")
        result = await run_js(page, """async (url) => {""" + IMPORT + """
            const c = await m.RelayClient.connect(url, {token: 'tkn'});
            const s = c.start({model: 'demo', messages: [{role: 'user', content: 'hi'}]});
            const types = [];
            for await (const f of s) types.push(f.type);
            const finish = await s.done;
            const bad = c.start({model: 'nope', messages: [{role: 'user', content: 'hi'}]});
            let err = null, iterErr = null;
            try { await bad.done; } catch (e) {
                err = {isStreamError: e instanceof m.StreamError, code: e.code, id: e.id,
                       message: e.message}; }
            try { for await (const f of bad) {} } catch (e) { iterErr = e.code; }
            c.close();
            return {types, text: s.text, reasoning: s.reasoning, toolCalls: s.toolCalls,
                    usage: s.usage, status: finish.status, models: c.models, id: s.id,
                    limits: c.limits, err, iterErr, badId: bad.id, state: c.state};
        }""", fake.url("unknown"))
    assert result["types"] == ["started", "token", "token", "reasoning", "tool_call_chunk",
                               "tool_call_chunk", "tool_call_complete", "finish"]
    assert result["text"] == "Hello world" and result["reasoning"] == "thinking"
    assert result["toolCalls"] == [{"index": 0, "callId": "c1", "name": "lookup",
                                    "arguments": "{\"q\": \"x\"}", "complete": True}]
    assert result["usage"]["total_tokens"] == 7 and result["status"] == "completed"
    assert result["models"] == ["demo"] and result["limits"]["future_limit"] == 3
    assert result["err"] == {"isStreamError": True, "code": "unknown_model",
                             "id": result["badId"],
                             "message": "unknown model 'nope'; this relay serves: demo"}
    assert result["iterErr"] == "unknown_model"
    assert result["state"] == "closed"
    hello, start = fake.frames["unknown"][:2]
    assert hello == {"type": "hello", "token": "tkn",
                     "client": {"name": "relay-client.js", "version": "0.1"}}
    assert start == {"type": "start", "id": result["id"], "model": "demo",
                     "messages": [{"role": "user", "content": "hi"}]}


# The page-side harness for reconnect scenarios: records state events and token calls.
HARNESS = """async ([url, opts]) => {""" + IMPORT + """
    const states = [];
    let tokenCalls = 0;
    const c = new m.RelayClient(url, {pingInterval: 50, pingTimeout: 2000, backoffBase: 20,
        backoffMax: 100, token: async () => `t${++tokenCalls}`, ...opts});
    c.addEventListener('state', (e) => states.push({state: e.detail.state, code: e.detail.code,
        reason: e.detail.reason, retryable: e.detail.retryable, meaning: e.detail.meaning}));
    const waitState = (want, after) => new Promise((resolve) => {
        const check = () => { const i = states.findIndex((s, k) => k >= after && s.state === want);
                              if (i >= 0) { c.removeEventListener('state', check); resolve(states[i]); } };
        c.addEventListener('state', check); check(); });
    await c.ready;
    const out = {};
    const s = c.start({model: 'demo', messages: [{role: 'user', content: 'hi'}]});
    const types = [];
    const consume = (async () => { for await (const f of s) types.push(`${f.type}:${f.text ?? ''}`); })();
    try { const fin = await s.done; out.finish = fin.status; }
    catch (e) { out.error = {isStreamError: e instanceof m.StreamError, code: e.code,
                             partialText: e.partialText, closeCode: e.closeCode}; }
    await consume.catch(() => {});
    out.text = s.text; out.types = types;
    if (opts.again) {  // the client is usable again after the reconnect
        await waitState('open', 1);
        const s2 = c.start({model: 'demo', messages: [{role: 'user', content: 'again'}]});
        await s2.done; out.again = s2.text;
    }
    if (opts.waitClosed) await waitState('closed', 0);
    out.states = states; out.tokenCalls = tokenCalls;
    c.close();
    return out;
}"""


async def test_resume_after_1012_replays_once_then_resume_refused(page):
    async with FakeRelay().running() as fake:
        await page.goto(f"http://127.0.0.1:{fake.port}/")
        ok = await run_js(page, HARNESS, [fake.url("resume"), {}])
        lost = await run_js(page, HARNESS, [fake.url("resumelost"), {}])
    # Resumed: every frame exactly once, the replayed seq 2 dropped.
    assert ok.get("error") is None and ok["finish"] == "completed"
    assert ok["text"] == "abc"
    assert ok["types"] == ["started:", "token:a", "token:b", "token:c", "finish:"]
    # (the listener is added after the constructor's "connecting"; "reconnecting" comes once
    # when the drop is seen, with the code, and again when the attempt starts; the harness's
    # own close() ends it)
    assert [s["state"] for s in ok["states"]] == ["open", "reconnecting", "reconnecting",
                                                  "open", "closed"]
    assert ok["states"][1]["code"] == 1012 and ok["states"][1]["retryable"] is True
    assert ok["tokenCalls"] == 2  # the token callback runs before every connect
    resume_frames = [f for f in fake.frames["resume"] if f["type"] == "resume"]
    start_id = next(f["id"] for f in fake.frames["resume"] if f["type"] == "start")
    assert resume_frames == [{"type": "resume", "stream_key": "key-1", "after_seq": 2,
                              "id": start_id}]
    hellos = [f for f in fake.frames["resume"] if f["type"] == "hello"]
    assert [h["token"] for h in hellos] == ["t1", "t2"]
    # Refused (stream_lost): done rejects with the typed error keeping the partial text and
    # the close code of the loss that made the resume necessary (as the Python client).
    assert lost["error"] == {"isStreamError": True, "code": "stream_lost",
                             "partialText": "partial", "closeCode": 1012}
    assert lost["text"] == "partial"


async def test_without_resume_a_drop_rejects_then_reconnects(page):
    async with FakeRelay().running() as fake:
        await page.goto(f"http://127.0.0.1:{fake.port}/")
        out = await run_js(page, HARNESS, [fake.url("noresume"), {"again": True}])
    assert out["error"] == {"isStreamError": True, "code": "connection_lost",
                            "partialText": "cut", "closeCode": 4008}
    assert out["again"] == "cut"  # the second connection's stream completes
    assert not any(f["type"] == "resume" for f in fake.frames["noresume"])
    reconnecting = [s for s in out["states"] if s["state"] == "reconnecting" and s["code"]]
    assert reconnecting[0]["code"] == 4008
    assert reconnecting[0]["meaning"] == "client read too slowly; reconnect and resume"


async def test_non_retryable_close_is_final_and_dead_server_is_detected(page):
    async with FakeRelay().running() as fake:
        await page.goto(f"http://127.0.0.1:{fake.port}/")
        fatal = await run_js(page, """async (url) => {""" + IMPORT + """
            const c = await m.RelayClient.connect(url, {pingInterval: 50});
            const detail = await new Promise((resolve) => c.onstate = (st, d) => {
                if (st === 'closed' || st === 'reconnecting') resolve(d); });
            let startErr = null;
            try { c.start({model: 'demo', messages: [{role: 'user', content: 'x'}]}); }
            catch (e) { startErr = e.code; }
            return {detail, state: c.state, startErr};
        }""", fake.url("fatal"))
        silent = await run_js(page, """async (url) => {""" + IMPORT + """
            const c = await m.RelayClient.connect(url, {pingInterval: 50, pingTimeout: 200,
                                                         backoffBase: 20});
            const seen = [];
            await new Promise((resolve) => c.onstate = (st, d) => {
                seen.push({state: st, code: d.code, reason: d.reason});
                if (st === 'open') resolve(); });
            c.close();
            return seen;
        }""", fake.url("silent"))
    assert fatal["state"] == "closed" and fatal["startErr"] == "client_closed"
    assert fatal["detail"]["code"] == 4401 and fatal["detail"]["retryable"] is False
    assert fatal["detail"]["meaning"] == "not authenticated; get new credentials first"
    assert fatal["detail"]["reason"] == "credentials rejected"
    assert fake.connections["fatal"] == 1
    # No pong within pingTimeout: the client gives up on the socket (as 1006) and reconnects.
    assert silent[0]["state"] == "reconnecting" and silent[0]["code"] == 1006
    assert "no pong" in silent[0]["reason"]
    assert fake.connections["silent"] == 2
    pings = [f for f in fake.frames["silent"] if f["type"] == "ping"]
    assert pings and all(isinstance(p.get("data"), dict) for p in pings)


async def test_origin_check_admits_the_relay_page_and_refuses_other_origins(page):
    """The relay's default Origin rule: only its own origin. The page served by the relay
    connects (other tests); a page from another origin gets the 403 as close code 1006."""
    async with start_relay() as server, FakeRelay().running() as fake:
        await page.goto(f"http://127.0.0.1:{fake.port}/")  # another origin (port differs)
        refused = await run_js(page, """(url) => new Promise((resolve) => {
            const ws = new WebSocket(url, ['llm-relay.v1']);
            ws.onopen = () => resolve('open');
            ws.onclose = (e) => resolve(e.code); })""", server.url)
        await page.goto(f"http://127.0.0.1:{server.port}/")
        admitted = await run_js(page, """(url) => new Promise((resolve) => {
            const ws = new WebSocket(url, ['llm-relay.v1']);
            ws.onopen = () => { resolve(ws.protocol); ws.close(); };
            ws.onclose = (e) => resolve(e.code); })""", server.url)
    assert refused == 1006
    assert admitted == "llm-relay.v1"


async def test_module_api_against_the_live_relay(page):
    """The README's usage, in the page, against a real relay: stream, usage, ttft, tool
    call, `break` and cancel() both end with a cancelled finish and close the upstream."""
    from relay.upstream.demo import demo_reply_tokens
    from relay.upstream.llm import demo_handler

    handler = demo_handler()
    before = handler.closed_early
    async with start_relay(demo_tps=40) as server:
        port = server.port
        await page.goto(f"http://127.0.0.1:{port}/")
        out = await run_js(page, """async () => {""" + IMPORT + """
            const c = await m.RelayClient.connect(undefined, {token: () => 'ignored'});
            const messages = [{role: 'user', content: 'hi'}];
            const s = c.start({model: c.models[0], messages, params: {temperature: 0.1}});
            let text = '';
            for await (const f of s) if (f.type === 'token') text += f.text;
            const finish = await s.done;
            const tool = {type: 'function', function: {name: 'search', parameters: {
                type: 'object', properties: {query: {type: 'string'}}}}};
            const t = c.start({model: 'demo', messages, tools: [tool], tool_choice: 'auto'});
            await t.done;
            const b = c.start({model: 'demo', messages});
            for await (const f of b) if (f.type === 'token') break;   // break = cancel
            const bFinish = await b.done;
            const k = c.start({model: 'demo', messages});
            for await (const f of k) if (f.type === 'token') { k.cancel(); k.cancel(); }
            const kFinish = await k.done;
            const out = {text, sText: s.text, status: finish.status, usage: s.usage,
                         ttft: s.ttft, tool: t.toolCalls, breakStatus: bFinish.status,
                         cancelStatus: kFinish.status, cancelReason: kFinish.reason,
                         open: c.streams.length, url: c.url};
            c.close();
            return out;
        }""")
        await handler.wait_closed_early(before + 2)
    expected = "".join(demo_reply_tokens([{"role": "user", "content": "hi"}]))
    assert out["text"] == out["sText"] == expected and out["status"] == "completed"
    assert out["usage"]["completion_tokens"] > 0 and out["ttft"] > 0
    assert out["tool"] == [{"index": 0, "callId": out["tool"][0]["callId"], "name": "search",
                            "arguments": '{"query": "hi"}', "complete": True}]
    assert out["breakStatus"] == "cancelled"
    assert (out["cancelStatus"], out["cancelReason"]) == ("cancelled", "client_cancel")
    assert out["open"] == 0 and out["url"] == f"ws://127.0.0.1:{port}/ws"


async def test_a_stream_taken_over_by_another_connection_rejects_done_with_its_code(page):
    """Another connection of the same principal takes the page's running stream over (a
    resume with ``takeover``): `done` rejects with StreamError code `stream_taken_over` (the
    text so far in partialText), instead of waiting forever; the page's connection stays
    open."""
    from relay.upstream.demo import demo_reply_tokens

    from ..relay.helpers import Client, text_of

    messages = [{"role": "user", "content": "a long answer for two readers " * 3}]
    async with start_relay(demo_tps=20, detach_grace=5) as server:
        await page.goto(f"http://127.0.0.1:{server.port}/")
        await run_js(page, """async (messages) => {""" + IMPORT + """
            const c = await m.RelayClient.connect();
            const s = c.start({model: 'demo', messages});
            window.__c = c; window.__s = s;
            (async () => { for await (const f of s) {} })().catch(() => {});  // a reader
        }""", messages)
        # started + 2 tokens delivered (leaving the loop early would cancel the stream)
        await page.wait_for_function("() => window.__s.seqs.length >= 3")
        seen = await run_js(page, """() => { const s = window.__s;
            return {key: s.streamKey, lastSeq: s.lastSeq, id: s.id, text: s.text}; }""")
        async with Client.connect(server.url) as other:
            await other.send({"type": "resume", "stream_key": seen["key"],
                              "after_seq": seen["lastSeq"], "id": "theirs",
                              "takeover": True})
            assert (await other.next_for("theirs"))["type"] == "resumed"
            ended = await run_js(page, """async () => {
                const s = window.__s;
                try { await s.done; return {resolved: true}; }
                catch (e) { return {code: e.code, id: e.id, partial: e.partialText,
                                    status: s.status, state: window.__c.state}; }
            }""")
            rest = await other.collect("theirs")
        await run_js(page, "() => window.__c.close()")
    assert ended["code"] == "stream_taken_over" and ended["id"] == seen["id"], ended
    assert (ended["status"], ended["state"]) == ("error", "open")
    full = "".join(demo_reply_tokens(messages))
    assert full.startswith(ended["partial"]) and ended["partial"].startswith(seen["text"])
    assert seen["text"] + text_of(rest) == full and rest[-1]["status"] == "completed"


async def test_chat_page_shows_a_final_close_with_its_meaning(page):
    """The chat page itself, served by the fake relay: the model picker lists welcome.models
    (as text), and a non-retryable close (4401) leaves it `closed` with the code's meaning."""
    async with FakeRelay().running() as fake:
        await page.goto(f"http://127.0.0.1:{fake.port}/index.html")
        await page.wait_for_selector('#conn-state[data-state="closed"]')
        detail = await page.text_content("#conn-detail")
        options = await page.eval_on_selector_all("#model option", "os => os.map(o => o.textContent)")
    assert detail == "4401: not authenticated; get new credentials first (token rejected)"
    assert options == ["demo", "<b>other</b>"]
    assert await page.is_disabled("#send")
    assert fake.connections["page"] == 1


async def test_client_frames_are_built_from_the_models_tables(page):
    """relay-client.js builds hello/start/cancel/ping/resume from the field table generated
    from clients/python/llm_relay_protocol/messages.py: the same frames llm_relay_protocol.frames builds for the Python client
    (key order included), which the relay accepts; its type lists are the unions' members."""
    from llm_relay_protocol import decode_client_frame, frames
    from llm_relay_protocol.messages import CLIENT_FRAME_TYPES, SERVER_FRAME_TYPES, STREAM_FRAME_TYPES

    msgs = [{"role": "user", "content": "hi"}]
    expected = {
        "hello": frames.hello("tkn", frames.client_info("js", "1")),
        "hello_bare": frames.hello(),
        "start": frames.start("q1", "demo", msgs, tool_choice="auto",
                              params={"temperature": 0.5}),
        "cancel": frames.cancel("q1"),
        "ping": frames.ping({"n": 1}),
        "resume": frames.resume("k" * 22, 4, "q1"),
    }
    async with FakeRelay().running() as fake:
        await page.goto(f"http://127.0.0.1:{fake.port}/")
        result = await run_js(page, """async (msgs) => {""" + IMPORT + """
            const f = m.clientFrame;
            const built = {
              hello: f("hello", {token: "tkn", client: {name: "js", version: "1"}}),
              hello_bare: f("hello", {token: undefined, client: null}),
              start: f("start", {id: "q1", model: "demo", messages: msgs, tools: undefined,
                                 tool_choice: "auto", params: {temperature: 0.5}}),
              cancel: f("cancel", {id: "q1"}),
              ping: f("ping", {data: {n: 1}}),
              resume: f("resume", {stream_key: "k".repeat(22), after_seq: 4, id: "q1"}),
            };
            const refused = [];
            for (const [type, fields] of [["pong", {}], ["cancel", {id: "q", stream: 1}]]) {
              try { f(type, fields); } catch (e) { refused.push(e instanceof TypeError && e.message); }
            }
            return {texts: Object.fromEntries(Object.entries(built).map(([k, v]) => [k, JSON.stringify(v)])),
                    refused, types: m.FRAME_TYPES};
        }""", msgs)
    for name, frame in expected.items():
        assert result["texts"][name] == json.dumps(frame, separators=(",", ":")), name
        decode_client_frame(result["texts"][name])          # the relay accepts it
    assert result["refused"] == ["unknown client frame type 'pong'",
                                 "client frame 'cancel' has no field 'stream'"]
    assert result["types"] == {"client": list(CLIENT_FRAME_TYPES),
                               "server": list(SERVER_FRAME_TYPES),
                               "stream": list(STREAM_FRAME_TYPES)}


async def test_a_throwing_token_function_is_reported_as_itself_never_as_a_close_code(page):
    """The README's mistake: a token function that throws (a ReferenceError) or rejects. The
    client says so (RelayClientError `token_callback_failed: ReferenceError: myToken is not
    defined`, an `error` event, `closed` without a close code), contacts the relay no more,
    and does not reconnect: on the first connect and on a reconnect after a retryable drop."""
    async with FakeRelay().running() as fake:
        await page.goto(f"http://127.0.0.1:{fake.port}/")
        out = await run_js(page, """async (url) => {""" + IMPORT + """
            const describe = (e) => e && {name: e.name, code: e.code, message: e.message,
                                            isLocal: e instanceof m.RelayClientError,
                                            isStreamError: e instanceof m.StreamError,
                                            closeCode: e.closeCode ?? null,
                                            cause: e.cause && e.cause.name};
            async function failing(token) {
              const c = new m.RelayClient(url, {token});
              const errors = [];
              const states = [];
              c.addEventListener('error', (e) => errors.push(describe(e.detail)));
              c.onstate = (st, d) => states.push({state: st, code: d.code ?? null, reason: d.reason,
                                                  retryable: d.retryable, error: describe(d.error)});
              const s = c.start({model: 'demo', messages: [{role: 'user', content: 'x'}]});
              const connectError = await c.ready.then(() => null, describe);
              const streamError = await s.done.then(() => null, describe);
              return {connectError, streamError, errors, states, state: c.state,
                      lastError: describe(c.lastError)};
            }
            const reference = await failing(() => myToken);
            const rejected = await failing(async () => { throw new Error('backend said 503'); });
            // A reconnect: welcomed, streaming, a 1012 drop, then the token function throws.
            let calls = 0;
            const c = await m.RelayClient.connect(url.replace('/never', '/tokenfail'), {
              backoffBase: 1, token: () => { calls += 1; if (calls > 1) return myToken; return 't1'; }});
            const states = [];
            c.onstate = (st, d) => states.push({state: st, code: d.code ?? null, reason: d.reason});
            const s = c.start({model: 'demo', messages: [{role: 'user', content: 'x'}]});
            const streamError = await s.done.then(() => null, describe);
            while (c.state !== 'closed') await new Promise((r) => c.addEventListener('state', r, {once: true}));
            return {reference, rejected, reconnect: {streamError, states, calls, lastError: describe(c.lastError)}};
        }""", fake.url("never"))
    message = "token_callback_failed: ReferenceError: myToken is not defined"
    local = {"name": "RelayClientError", "code": "token_callback_failed", "message": message,
             "isLocal": True, "isStreamError": False, "closeCode": None, "cause": "ReferenceError"}
    ref = out["reference"]
    assert ref["connectError"] == local and ref["lastError"] == local and ref["errors"] == [local]
    assert ref["streamError"] == {**local, "name": "StreamError", "isLocal": False,
                                  "isStreamError": True, "cause": "RelayClientError"}
    assert ref["state"] == "closed"
    assert ref["states"] == [{"state": "closed", "code": None, "reason": message,
                              "retryable": False, "error": local}]
    rejected = out["rejected"]
    assert rejected["connectError"]["message"] == "token_callback_failed: Error: backend said 503"
    assert [s["state"] for s in rejected["states"]] == ["closed"]
    assert fake.connections["never"] == 0  # nothing reached the relay
    reconnect = out["reconnect"]
    assert reconnect["calls"] == 2 and reconnect["lastError"]["message"] == message
    assert reconnect["streamError"]["code"] == "connection_lost"  # the 1012 drop, no resume
    assert [(s["state"], s["code"]) for s in reconnect["states"]] == [
        ("reconnecting", 1012), ("reconnecting", None), ("closed", None)]
    assert reconnect["states"][-1]["reason"] == message
    assert fake.connections["tokenfail"] == 1  # no second connection, no loop
