// The official `openai` Node SDK's Responses WebSocket mode (ResponsesWS) against the relay's
// /v1/responses (tests/relay/test_responses_node.py starts the relay and its fake upstream).
// RELAY_HTTP: http://HOST:PORT of the relay. The relay serves `demo` and `oai` (a fake
// OpenAI upstream whose scripts the Python side queued: a tool call, then a text answer).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { ResponsesWS } from 'openai/resources/responses/ws';

const TERMINAL = new Set(['response.completed', 'response.incomplete', 'response.failed']);
const WEATHER = {
  type: 'function', name: 'get_weather', description: 'Weather of a city', strict: false,
  parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
};

function connect() {
  const client = new OpenAI({ baseURL: `${process.env.RELAY_HTTP}/v1`, apiKey: 'unused' });
  const ws = new ResponsesWS(client);
  const errors = [];
  ws.on('error', (err) => errors.push(err));
  return { ws, errors };
}

// Events of the next response of `lane` (undefined: any), through its terminal event or an
// `error` event.
function untilDone(ws, lane) {
  return new Promise((resolve, reject) => {
    const events = [];
    const timer = setTimeout(() => reject(new Error(`timed out: ${JSON.stringify(events)}`)),
                             10000);
    const onEvent = (event) => {
      if (lane !== undefined && event.stream_id !== lane) return;
      events.push(event);
      if (TERMINAL.has(event.type) || event.type === 'error') {
        clearTimeout(timer);
        ws.off('event', onEvent);
        resolve(events);
      }
    };
    ws.on('event', onEvent);
  });
}

function checked(events) {
  assert.deepEqual(events.map((e) => e.sequence_number), events.map((_, i) => i));
  assert.equal(events[0].type, 'response.created');
  return events.at(-1).response;
}

const text = (events) => events.filter((e) => e.type === 'response.output_text.delta')
  .map((e) => e.delta).join('');

test('a text turn, then a chained turn', async () => {
  const { ws } = connect();
  try {
    const first = untilDone(ws);
    ws.send({ type: 'response.create', model: 'demo', input: 'hello from node' });
    const events = await first;
    const response = checked(events);
    assert.equal(response.status, 'completed');
    assert.match(text(events), /You said: hello from node\./);
    const next = untilDone(ws);
    ws.send({ type: 'response.create', model: 'demo', input: 'and again',
              previous_response_id: response.id });
    const second = checked(await next);
    assert.equal(second.previous_response_id, response.id);
    assert.match(second.output[0].content[0].text, /You said: and again\./);
  } finally {
    ws.close();
  }
});

test('a tool round trip', async () => {
  const { ws } = connect();
  try {
    const first = untilDone(ws);
    ws.send({ type: 'response.create', model: 'oai', input: 'Weather in Paris?',
              tools: [WEATHER] });
    const response = checked(await first);
    const call = response.output.find((item) => item.type === 'function_call');
    assert.equal(call.name, 'get_weather');
    assert.deepEqual(JSON.parse(call.arguments), { city: 'Paris' });
    const next = untilDone(ws);
    ws.send({ type: 'response.create', model: 'oai', previous_response_id: response.id,
              tools: [WEATHER], input: [{ type: 'function_call_output', call_id: call.call_id,
                                          output: 'sunny, 24C' }] });
    const second = checked(await next);
    assert.equal(second.output[0].content[0].text, 'It is sunny.');
  } finally {
    ws.close();
  }
});

test('an unknown previous id is an error and the socket stays usable', async () => {
  const { ws } = connect();
  try {
    const failed = untilDone(ws);
    ws.send({ type: 'response.create', model: 'demo', input: 'x',
              previous_response_id: 'resp_unknown' });
    const [error] = await failed;
    assert.equal(error.type, 'error');
    assert.equal(error.error.code, 'previous_response_not_found');
    const next = untilDone(ws);
    ws.send({ type: 'response.create', model: 'demo', input: 'still here' });
    assert.equal(checked(await next).status, 'completed');
  } finally {
    ws.close();
  }
});

test('two lanes on one socket', async () => {
  const { ws } = connect();
  try {
    const a = untilDone(ws, 'a');
    const b = untilDone(ws, 'b');
    ws.send({ type: 'response.create', model: 'demo', input: 'lane a', stream_id: 'a' });
    ws.send({ type: 'response.create', model: 'demo', input: 'lane b', stream_id: 'b' });
    const [ea, eb] = await Promise.all([a, b]);
    assert.match(text(ea), /lane a/);
    assert.match(text(eb), /lane b/);
    assert.ok(ea.every((e) => e.stream_id === 'a') && eb.every((e) => e.stream_id === 'b'));
  } finally {
    ws.close();
  }
});
