"""relay-client.js in Chromium against the shared client-policy vectors
(tests/vectors/client_policy.json), the same ones tests/protocol/test_client_policy.py runs
against the Python policy: both clients make the same decisions.

The page imports the real relay-client.js (served, with its generated client-policy.js, by
the scripted fake relay of test_relay_client_js.py) and hands the client a scripted
WebSocket class (its ``WebSocket`` option): each vector step opens a socket, delivers a
frame or closes it, in order, synchronously; the client's own timers (reconnect after a
0 ms backoff) run as usual. Nothing sleeps: the runner waits for the client to construct
its next socket, and flushes pending promise jobs with one macrotask before reading results.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_asyncio

from llm_relay_protocol import Finish, decode_server_frame

from .test_relay_client_js import FakeRelay, run_js

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "client_policy.json")
                     .read_text("utf-8"))

# window.__policyRun(scenario) -> what the vectors' `expect` describes, plus each stream's
# finish frame (to validate it against the protocol's schema here).
RUNNER = """async () => {
const m = await import('/relay-client.js');
window.__m = m;
const flush = () => new Promise((resolve) => setTimeout(resolve, 0));
window.__scripted = () => {
  const sockets = [];
  let waiting = null;
  class ScriptedSocket {
    constructor(url, protocols) {
      this.url = url; this.protocol = protocols[0]; this.readyState = 0; this.sent = [];
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      sockets.push(this);
      if (waiting) { const w = waiting; waiting = null; w(); }
    }
    send(data) { this.sent.push(JSON.parse(data)); }
    close() { this.readyState = 3; }
  }
  const socket = async (i) => { while (sockets.length <= i) await new Promise((r) => { waiting = r; }); return sockets[i]; };
  return {ScriptedSocket, sockets, socket};
};
window.__policyRun = async (sc) => {
  const {ScriptedSocket, sockets, socket} = window.__scripted();
  const c = new m.RelayClient('ws://scripted/ws', {WebSocket: ScriptedSocket, pingInterval: 0,
      backoffBase: 0, backoffMax: 0, token: sc.token === 'function' ? () => 'fresh' : 'fixed'});
  const streams = {}, events = {}, ends = {}, decisions = [];
  let current = null, used = 0;
  for (const step of sc.steps) {
    if (step.connect) {
      current = await socket(used++);
      current.readyState = 1;
      current.onopen();
      if (step.connect.welcome !== false) {
        current.onmessage({data: JSON.stringify({type: 'welcome', protocol: 'llm-relay.v1',
            session_id: 's', models: ['demo'], limits: {max_streams: 8, max_frame_bytes: 1048576,
            detach_grace: step.connect.detach_grace}})});
      }
    } else if (step.app === 'start') {
      const s = c.start({model: 'demo', messages: [{role: 'user', content: 'hi'}], id: step.id});
      streams[step.id] = s; events[step.id] = [];
      (async () => { for await (const f of s) events[step.id].push(`${f.type}:${f.seq}`); })().catch(() => {});
      s.done.then((f) => { ends[step.id] = {finish: f.status, reason: f.reason}; },
                  (e) => { ends[step.id] = {error: e.code, close_code: e.closeCode ?? null}; });
    } else if (step.app === 'watch') {
      const s = c.watch(step.stream_key, {id: step.id, afterSeq: step.after_seq ?? 0});
      streams[step.id] = s; events[step.id] = [];
      (async () => { for await (const f of s) events[step.id].push(`${f.type}:${f.seq}`); })().catch(() => {});
      s.done.then((f) => { ends[step.id] = {finish: f.status, reason: f.reason}; },
                  (e) => { ends[step.id] = {error: e.code, close_code: e.closeCode ?? null}; });
    } else if (step.app === 'cancel') {
      streams[step.id].cancel();
    } else if (step.recv) {
      current.onmessage({data: JSON.stringify(step.recv)});
    } else if (step.close) {
      current.readyState = 3;
      if (current.onclose) current.onclose({code: step.close.code, reason: step.close.reason});
      decisions.push({code: step.close.code, retry: c.state === 'reconnecting'});
    }
  }
  await flush();
  const out = {decisions, state: c.state, connections: sockets.length,
    sent: sockets.map((s) => s.sent.filter((f) => f.type !== 'hello' && f.type !== 'ping')
        .map((f) => f.type === 'start' ? {type: 'start', id: f.id} : f)),
    streams: Object.fromEntries(Object.keys(streams).map((id) => [id, {events: events[id], end: ends[id] ?? null}])),
    finishes: Object.fromEntries(Object.entries(streams).filter(([, s]) => s.finish).map(([id, s]) => [id, s.finish]))};
  c.close();
  return out;
};
}"""


@pytest_asyncio.fixture(loop_scope="session")
async def policy_page(page):
    async with FakeRelay().running() as fake:
        await page.goto(f"http://127.0.0.1:{fake.port}/")
        await run_js(page, RUNNER)
        yield page


async def test_vector_scenarios_against_relay_client_js(policy_page):
    failures = {}
    for scenario in VECTORS["scenarios"]:
        out = await run_js(policy_page, "(sc) => window.__policyRun(sc)", scenario)
        for frame in out.pop("finishes").values():
            assert isinstance(decode_server_frame(json.dumps(frame)), Finish), frame
        if out != scenario["expect"]:
            failures[scenario["name"]] = {"got": out, "want": scenario["expect"]}
    assert not failures, json.dumps(failures, indent=1)


async def test_vector_close_decisions_and_backoff_against_relay_client_js(policy_page):
    out = await run_js(policy_page, """(v) => ({
        decisions: v.close_decisions.map((r) => window.__m.closeDecision(r.code, r.reason,
            {welcomed: r.welcomed, tokenRefreshable: r.token_function}).retry),
        delays: v.backoff.map((r) => window.__m.backoffDelay(r.attempt, r.r)),
        maxRetries: new window.__m.RelayClient('ws://127.0.0.1:1/ws', {reconnect: false}).options.maxRetries,
    })""", VECTORS)
    assert out["decisions"] == [row["retry"] for row in VECTORS["close_decisions"]]
    assert out["delays"] == pytest.approx([row["delay_ms"] for row in VECTORS["backoff"]])
    assert out["maxRetries"] == VECTORS["max_reconnect_attempts"]


async def test_concurrent_next_calls_each_get_a_frame_and_seqs_stay_bounded(policy_page):
    out = await run_js(policy_page, """async () => {
        const {ScriptedSocket, socket} = window.__scripted();
        const c = new window.__m.RelayClient('ws://scripted/ws', {WebSocket: ScriptedSocket, pingInterval: 0});
        const ws = await socket(0);
        ws.readyState = 1; ws.onopen();
        ws.onmessage({data: JSON.stringify({type: 'welcome', protocol: 'llm-relay.v1', session_id: 's',
            models: ['demo'], limits: {max_streams: 8, max_frame_bytes: 1048576}})});
        const s = c.start({model: 'demo', messages: [{role: 'user', content: 'hi'}], id: 'a'});
        const waits = [s.next(), s.next(), s.next()];   // three readers wait at once
        const recv = (f) => ws.onmessage({data: JSON.stringify({id: 'a', ...f})});
        recv({type: 'started', seq: 0, model: 'demo'});
        recv({type: 'token', seq: 1, text: 'x'});
        const n = 1000;
        for (let i = 2; i < n; i++) recv({type: 'token', seq: i, text: 'y'});
        recv({type: 'finish', seq: n, status: 'completed', reason: 'stop',
              usage: {prompt_tokens: 1, completion_tokens: n - 1, total_tokens: n, estimated: false}});
        const first = await Promise.all(waits);
        let rest = 0;
        for (;;) { const r = await s.next(); if (r.done) break; rest += 1; }
        // A stream with three readers waiting when it ends: one gets the finish, the other
        // two the end of iteration; none hangs.
        const b = c.start({model: 'demo', messages: [{role: 'user', content: 'hi'}], id: 'b'});
        const bWaits = [b.next(), b.next(), b.next()];
        ws.onmessage({data: JSON.stringify({type: 'finish', id: 'b', seq: 0, status: 'completed',
            reason: 'stop', usage: {prompt_tokens: 1, completion_tokens: 0, total_tokens: 1, estimated: false}})});
        const bEnds = await Promise.all(bWaits);
        c.close();
        return {first: first.map((r) => r.value.seq), rest,
                bEnds: bEnds.map((r) => r.done ? 'done' : r.value.type),
                seqs: s.seqs.length, lastSeqs: s.seqs.slice(-2), delivered: s.framesDelivered,
                text: s.text.length, kept: window.__m.POLICY.recent_seqs_kept};
    }""")
    assert out["first"] == [0, 1, 2]
    assert out["rest"] == 1001 - 3  # started, 999 tokens, finish
    assert out["bEnds"] == ["finish", "done", "done"]
    # The dedupe state is lastSeq; `seqs` is a debugging window of the last 64, not a log.
    assert out["seqs"] == out["kept"] == 64 and out["lastSeqs"] == [999, 1000]
    assert out["delivered"] == 1001 and out["text"] == 999
