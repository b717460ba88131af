// The real AI SDK `WebSocketChatTransport` (package `ai`, pinned in package.json) against a
// real `relay serve`. Run by tests/relay/test_aisdk_transport.py, which starts the relay
// (aliases `demo` and `oai`, the latter a loopback fake OpenAI upstream) and passes:
//   RELAY_HTTP  http://127.0.0.1:PORT   (the relay; /ai-sdk and /metrics live there)
// Node's built-in test runner; `ws` is the WebSocket implementation (Node 20 has none).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { WebSocketChatTransport, readUIMessageStream } from 'ai';

const HTTP = process.env.RELAY_HTTP;
assert.ok(HTTP, 'RELAY_HTTP must be set (run through pytest)');
const URL_AI = HTTP.replace(/^http/, 'ws') + '/ai-sdk';
// A second relay on the same Redis (RELAY_HTTP_B).
const URL_AI_B = (process.env.RELAY_HTTP_B ?? '').replace(/^http/, 'ws') + '/ai-sdk';

// One browser's cookie jar: without --auth a chat belongs to the relay's owner cookie (set
// on the /ai-sdk upgrade, HttpOnly), which a browser sends back on every later upgrade to
// that host (whatever the port). `ws` keeps no cookies, so this WebSocket class does.
function browser() {
  let cookie;
  return class BrowserWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols, cookie ? { headers: { cookie } } : {});
      this.once('upgrade', response => {
        const set = response.headers['set-cookie'];
        if (set) cookie = set[0].split(';')[0];
      });
    }
  };
}

const transport = (url = URL_AI, webSocket = browser()) => new WebSocketChatTransport({ url, webSocket });
const user = (text, id = 'u-' + text.slice(0, 8)) => ({
  id, role: 'user', parts: [{ type: 'text', text }],
});

async function readAll(stream) {
  const chunks = [];
  const reader = stream.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return chunks;
    chunks.push(value);
  }
}

async function assemble(chunks) {
  // readUIMessageStream: the SDK's own assembly of a UIMessage from chunks.
  const source = new ReadableStream({
    start(controller) { for (const c of chunks) controller.enqueue(c); controller.close(); },
  });
  let last;
  for await (const message of readUIMessageStream({ stream: source })) last = message;
  return last;
}

const textOf = chunks => chunks.filter(c => c.type === 'text-delta').map(c => c.delta).join('');

async function metric(name) {
  const body = await (await fetch(HTTP + '/metrics')).text();
  const line = body.split('\n').find(l => l.startsWith(name + ' '));
  return line ? Number(line.split(' ')[1]) : 0;
}

function send(t, chatId, messages, body = {}, abortSignal) {
  return t.sendMessages({
    chatId, messages, trigger: 'submit-message', messageId: undefined, abortSignal, body,
  });
}

test('a text answer assembled with readUIMessageStream equals the deltas', async () => {
  const t = transport();
  try {
    const chunks = await readAll(await send(t, 'text-chat', [user('hello there relay')], { model: 'demo' }));
    assert.equal(chunks[0].type, 'start');
    assert.equal(chunks.at(-1).type, 'finish');
    assert.equal(chunks.at(-1).finishReason, 'stop');
    assert.equal(chunks.at(-1).messageMetadata.usage.estimated, false);
    const text = textOf(chunks);
    assert.match(text, /hello there relay/);
    const message = await assemble(chunks);
    assert.equal(message.id, chunks[0].messageId);
    assert.equal(message.role, 'assistant');
    const parts = message.parts.filter(p => p.type === 'text');
    assert.equal(parts.map(p => p.text).join(''), text);
  } finally {
    t.close();
  }
});

test('abort mid-stream closes the upstream and the chat takes a new turn at once', async () => {
  const t = transport();
  try {
    const before = await metric('relay_upstream_closed_on_cancel_total');
    const controller = new AbortController();
    const long = Array.from({ length: 200 }, (_, i) => `word${i}`).join(' ');
    const stream = await send(t, 'abort-chat', [user(long)], { model: 'demo' }, controller.signal);
    const reader = stream.getReader();
    let got = 0;
    while (got < 4) { await reader.read(); got++; }
    controller.abort();
    for (let i = 0; i < 100; i++) {
      if (await metric('relay_upstream_closed_on_cancel_total') > before) break;
      await new Promise(r => setTimeout(r, 50));   // polling the relay's metric, not a sync sleep
    }
    assert.ok(await metric('relay_upstream_closed_on_cancel_total') > before,
      'the relay closed the upstream call after abort');
    const next = await readAll(await send(t, 'abort-chat', [user('short one')], { model: 'demo' }));
    assert.match(textOf(next), /short one/);
  } finally {
    t.close();
  }
});

test('a second tab resumes as a viewer: it replays the whole message and both stream to the one finish', async () => {
  const web = browser();
  const a = transport(URL_AI, web);
  const b = transport(URL_AI, web);
  try {
    const long = Array.from({ length: 60 }, (_, i) => `r${i}`).join(' ');
    const stream = await send(a, 'resume-chat', [user(long)], { model: 'demo' });
    const reader = stream.getReader();
    const first = [];
    while (first.length < 5) first.push((await reader.read()).value);
    const resumed = await b.reconnectToStream({ chatId: 'resume-chat' });
    assert.ok(resumed, 'an active response is found');
    const replay = await readAll(resumed);
    assert.equal(replay[0].type, 'start');
    assert.equal(replay[0].messageId, first[0].messageId);
    assert.match(textOf(replay), new RegExp(long.split(' ').slice(0, 5).join(' ')));
    assert.equal(replay.at(-1).type, 'finish');
    // The first tab was not taken over: it keeps streaming to the same finish.
    const rest = [];
    for (;;) { const { done, value } = await reader.read(); if (done) break; rest.push(value); }
    assert.equal(rest.at(-1).type, 'finish');
    assert.equal(textOf([...first, ...rest]), textOf(replay));
    assert.deepEqual(await assemble([...first, ...rest]), await assemble(replay));
  } finally {
    a.close();
    b.close();
  }
});

test('abort from the tab that resumed stops the answer for every tab', async () => {
  const web = browser();
  const a = transport(URL_AI, web);
  const b = transport(URL_AI, web);
  try {
    const before = await metric('relay_upstream_closed_on_cancel_total');
    const long = Array.from({ length: 300 }, (_, i) => `s${i}`).join(' ');
    const reader = (await send(a, 'abort-all-chat', [user(long)], { model: 'demo' })).getReader();
    const first = [];
    while (first.length < 4) first.push((await reader.read()).value);
    const controller = new AbortController();
    const watching = (await b.reconnectToStream({ chatId: 'abort-all-chat', abortSignal: controller.signal })).getReader();
    await watching.read();                         // its start: it is attached
    controller.abort();                            // the second tab's stop button
    const rest = [];
    for (;;) { const { done, value } = await reader.read(); if (done) break; rest.push(value); }
    // The first tab's answer ends as aborted (the relay's cancelled finish), not complete.
    assert.ok(rest.some(c => c.type === 'abort'), JSON.stringify(rest.map(c => c.type)));
    assert.ok(textOf([...first, ...rest]).length < long.length);
    assert.ok(await metric('relay_upstream_closed_on_cancel_total') > before);
  } finally {
    a.close();
    b.close();
  }
});

test('a new send is what every tab resumes next', async () => {
  const web = browser();
  const a = transport(URL_AI, web);
  const b = transport(URL_AI, web);
  try {
    const one = await readAll(await send(a, 'two-turn-chat', [user('first question')], { model: 'demo' }));
    const seen1 = await readAll(await b.reconnectToStream({ chatId: 'two-turn-chat' }));
    assert.equal(seen1[0].messageId, one[0].messageId);
    const two = await readAll(await send(a, 'two-turn-chat', [user('first question'), user('second question')], { model: 'demo' }));
    const seen2 = await readAll(await b.reconnectToStream({ chatId: 'two-turn-chat' }));
    assert.notEqual(two[0].messageId, one[0].messageId);
    assert.equal(seen2[0].messageId, two[0].messageId);
    assert.equal(textOf(seen2), textOf(two));
  } finally {
    a.close();
    b.close();
  }
});

test('one active response per chat holds across relays', async () => {
  const web = browser();
  const a = transport(URL_AI, web);
  const b = transport(URL_AI_B, web);
  try {
    const long = Array.from({ length: 80 }, (_, i) => `o${i}`).join(' ');
    const reader = (await send(a, 'one-active-chat', [user(long)], { model: 'demo' })).getReader();
    const first = [];
    while (first.length < 5) first.push((await reader.read()).value);
    // Relay B learns of the chat through Redis (written asynchronously): wait until B
    // finds it (as a viewer, the second tab), then a send on B is refused.
    let watching = null;
    for (let i = 0; i < 100 && watching === null; i++) {
      watching = await b.reconnectToStream({ chatId: 'one-active-chat' });
      if (watching === null) await new Promise(r => setTimeout(r, 20));
    }
    assert.ok(watching, 'relay B finds the chat running on relay A');
    const watched = readAll(watching);
    let refused = null;
    try {
      await readAll(await send(b, 'one-active-chat', [user('again')], { model: 'demo' }));
    } catch (err) {
      refused = err;
    }
    assert.ok(refused, 'relay B refused a second answer while relay A runs one');
    assert.match(refused.message, /already active/);
    const rest = [];
    for (;;) { const { done, value } = await reader.read(); if (done) break; rest.push(value); }
    assert.equal(rest.at(-1).type, 'finish');
    assert.equal(textOf(await watched), textOf([...first, ...rest]));
    // Once A's answer finished, B takes the next turn (A marks it finished in Redis after
    // its last frame: poll for that).
    let next = null;
    for (let i = 0; i < 100 && next === null; i++) {
      try {
        next = await readAll(await send(b, 'one-active-chat', [user('next turn')], { model: 'demo' }));
      } catch (err) {
        assert.match(err.message, /already active/);
        await new Promise(r => setTimeout(r, 20));
      }
    }
    assert.ok(next, 'relay B accepts the next turn');
    assert.match(textOf(next), /next turn/);
  } finally {
    a.close();
    b.close();
  }
});

test('resume on the other of two relays on Redis replays the whole message', async () => {
  assert.ok(process.env.RELAY_HTTP_B, 'RELAY_HTTP_B must be set');
  const web = browser();
  const a = transport(URL_AI, web);
  const b = transport(URL_AI_B, web);
  try {
    const long = Array.from({ length: 60 }, (_, i) => `x${i}`).join(' ');
    const stream = await send(a, 'cross-relay-chat', [user(long)], { model: 'demo' });
    const reader = stream.getReader();
    const first = [];
    while (first.length < 5) first.push((await reader.read()).value);
    // The chat index reaches Redis asynchronously; a resume before it lands is null.
    let resumed = null;
    for (let i = 0; i < 100 && resumed === null; i++) {
      resumed = await b.reconnectToStream({ chatId: 'cross-relay-chat' });
      if (resumed === null) await new Promise(r => setTimeout(r, 20));
    }
    assert.ok(resumed, 'relay B finds the chat running on relay A');
    const replay = await readAll(resumed);
    assert.equal(replay[0].messageId, first[0].messageId);
    assert.match(textOf(replay), new RegExp(long.split(' ').slice(0, 5).join(' ')));
    assert.equal(replay.at(-1).type, 'finish');
  } finally {
    a.close();
    b.close();
  }
});

test('resume of an unknown chat is null', async () => {
  const t = transport();
  try {
    assert.equal(await t.reconnectToStream({ chatId: 'never-seen' }), null);
  } finally {
    t.close();
  }
});

test('a tool call yields tool-input-available; its output reaches the model as a tool message', async () => {
  const t = transport();
  try {
    const tools = [{ type: 'function', function: {
      name: 'get_weather',
      parameters: { type: 'object', properties: { city: { type: 'string' } } },
    } }];
    const chunks = await readAll(await send(t, 'tool-chat', [user('weather in Paris?')], { model: 'oai', tools }));
    const available = chunks.find(c => c.type === 'tool-input-available');
    assert.ok(available, JSON.stringify(chunks));
    assert.deepEqual(available.input, { city: 'Paris' });
    assert.equal(chunks.at(-1).finishReason, 'tool-calls');
    const message = await assemble(chunks);
    const part = message.parts.find(p => p.type === 'tool-get_weather');
    assert.equal(part.state, 'input-available');
    // What Chat does after addToolOutput: the part carries the output; the next turn sends it.
    const withOutput = {
      ...message,
      parts: message.parts.map(p => p === part ? { ...p, state: 'output-available', output: { temp: 21 } } : p),
    };
    const next = await readAll(await send(t, 'tool-chat', [user('weather in Paris?'), withOutput], { model: 'oai', tools }));
    assert.equal(next.at(-1).type, 'finish');
  } finally {
    t.close();
  }
});

test('a long answer resumes as a few merged chunks that assemble into the same message', async () => {
  const web = browser();
  const a = transport(URL_AI, web);
  const b = transport(URL_AI, web);
  try {
    // `oai` answers with 400 text chunks, one by one (tests/relay/test_aisdk_transport.py).
    const live = await readAll(await send(a, 'long-chat', [user('a long answer please')], { model: 'oai' }));
    // Many live chunks, so that a replay of at most 10 is a merge. How many of the 400 stay
    // apart depends on the machine: the relay joins what it reads together, more of it when
    // it is slow (292 at load average 12, over 300 at rest), so the bound is far below that.
    assert.ok(live.filter(c => c.type === 'text-delta').length > 100, `live: ${live.length} chunks`);
    const resumed = await b.reconnectToStream({ chatId: 'long-chat' });
    assert.ok(resumed, 'the retained answer is found');
    const replay = await readAll(resumed);
    assert.ok(replay.length <= 10, `replay: ${replay.length} chunks`);
    assert.deepEqual(await assemble(replay), await assemble(live));
  } finally {
    a.close();
    b.close();
  }
});

test('another browser behind the same address cannot resume or take over a chat', async () => {
  const ownersBrowser = browser();
  const owner = transport(URL_AI, ownersBrowser);
  const neighbour = transport();
  const ownerAgain = transport(URL_AI, ownersBrowser);
  try {
    const long = Array.from({ length: 60 }, (_, i) => `n${i}`).join(' ');
    const reader = (await send(owner, 'my-chat', [user(long)], { model: 'demo' })).getReader();
    const first = [];
    while (first.length < 5) first.push((await reader.read()).value);
    assert.equal(await neighbour.reconnectToStream({ chatId: 'my-chat' }), null);
    // the owner's answer was not taken over: it streams to its end
    const rest = [];
    for (;;) { const { done, value } = await reader.read(); if (done) break; rest.push(value); }
    assert.equal(rest.at(-1).type, 'finish');
    // the owner's browser (its cookie) resumes it on a new connection
    const replay = await readAll(await ownerAgain.reconnectToStream({ chatId: 'my-chat' }));
    assert.equal(replay[0].messageId, first[0].messageId);
    assert.equal(textOf(replay), textOf([...first, ...rest]));
  } finally {
    owner.close();
    neighbour.close();
    ownerAgain.close();
  }
});

test('four chats on one socket never mix', async () => {
  const t = transport();
  try {
    const prompts = ['alpha one', 'bravo two', 'charlie three', 'delta four'];
    const streams = await Promise.all(prompts.map((p, i) => send(t, `mix-${i}`, [user(p)], { model: 'demo' })));
    const results = await Promise.all(streams.map(readAll));
    results.forEach((chunks, i) => {
      const text = textOf(chunks);
      assert.match(text, new RegExp(prompts[i]));
      for (const other of prompts.filter((_, j) => j !== i)) assert.doesNotMatch(text, new RegExp(other));
    });
  } finally {
    t.close();
  }
});

test('a malformed frame closes only that connection', async () => {
  const raw = new WebSocket(URL_AI);
  await new Promise((resolve, reject) => { raw.once('open', resolve); raw.once('error', reject); });
  const closed = new Promise(resolve => raw.once('close', code => resolve(code)));
  raw.send('{not json');
  assert.equal(await closed, 1008);
  const t = transport();
  try {
    assert.match(textOf(await readAll(await send(t, 'after-bad', [user('still fine')], { model: 'demo' }))), /still fine/);
  } finally {
    t.close();
  }
});
