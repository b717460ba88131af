// relay-client.js: a client for the llm-relay.v1 protocol, for browsers and Node 20+ (plain ES module, no deps).
// The npm package llm-relay-client (this folder; types in relay-client.d.ts); the relay serves
// these same files to its chat page as /relay-client.js and /client-policy.js.
//
//   import { RelayClient, StreamError } from "llm-relay-client";   // or "./relay-client.js"
//   const c = await RelayClient.connect("ws://127.0.0.1:8765/ws", { token: () => getToken() });
//   const s = c.start({ model: "demo", messages: [{ role: "user", content: "hi" }] });
//   for await (const frame of s) if (frame.type === "token") out.textContent += frame.text;
//   const finish = await s.done;             // rejects with StreamError (code, partialText)
//
// What it does for you:
// * subprotocol "llm-relay.v1", hello (with the token) / welcome;
// * many streams on one socket, client-chosen ids, frames routed by id, per-stream seq dedupe;
// * app-level ping/pong on an interval: no pong in time = dead server, handled as a 1006 drop;
// * reconnect with exponential backoff and jitter, on retryable close codes only, plus once
//   after 4401 "token expired" on a welcomed connection when `token` is a function;
// * resume of unfinished streams after a reconnect when the server offers it
//   (welcome.limits.detach_grace > 0 and started.stream_key), else their `done` rejects
//   with StreamError code "connection_lost" and the text received so far;
// * c.watch(streamKey, {afterSeq, id, takeover}) follows a stream started elsewhere (another
//   tab or device of the same principal) as a viewer: a RelayStream fed by a `resume`, every
//   frame after afterSeq (default 0) then the live ones and its one finish; resumed after a
//   drop like any stream; cancel() stops it for everyone (PROTOCOL.md "Viewers");
// * maxRetries: Infinity never gives up while retryable closes go on (a page left open), and
//   c.reconnectNow() skips the backoff wait (e.g. on the browser's `online` event);
// * unknown frame types and unknown fields are ignored (protocol forward compatibility);
// * a start larger than the relay's welcome.limits.max_frame_bytes is never sent (it would
//   close the connection 1009): its stream fails with StreamError code "frame_too_large";
//   fitMessages() trims a conversation's oldest messages to what the relay takes.
//
// The policy (which close is retried, the backoff and attempt limit, what is resumed, which
// frames are replays, what a cancel does) is clients/python/llm_relay_protocol/client_policy.py, shared with the
// Python client: its tables arrive generated in ./client-policy.js (never edit that file;
// run `python -m llm_relay_protocol.client_policy --write`), and the same JSON test vectors
// (tests/vectors/client_policy.json) run against both clients. In short: retry 1005, 1006
// and the relay's retryable codes; 4401 "token expired" after a welcome (token function)
// refreshes once and re-sends the starts the relay left unanswered; everything else is
// final; at most `maxRetries` (8) attempts per loss; a start is never sent twice otherwise;
// a stream cancelled before its start left ends with a schema-valid local finish.
//
// Failures on this side are never dressed up as close codes: a `token` function that throws
// (or whose promise rejects) closes the client at once with a RelayClientError
// (`token_callback_failed: ReferenceError: ...`), nothing sent to the relay and no reconnect;
// without a WebSocket implementation (Node 20 has no global one) the constructor throws
// RelayClientError `no_websocket`: pass one as the `WebSocket` option (e.g. the `ws` package's).
//
// Connection states: "connecting" -> "open" -> ("reconnecting" -> "open")* -> "closed".
// Listen with `c.onstate = (state, detail) => ...` or
// `c.addEventListener("state", e => e.detail)`; detail is {state, code, reason, meaning,
// retryable, attempt, delay}.

import POLICY from "./client-policy.js";

export { POLICY };

export const PROTOCOL = "llm-relay.v1";

// Frame types and the client frames' fields, generated from the models of
// clients/python/llm_relay_protocol/messages.py (the ones clients/python/llm_relay_protocol/frames.py builds the Python client's frames to):
// this client builds every frame it sends with clientFrame(), and routes a stream's frames
// by FRAME_TYPES.stream, so neither list is typed out here.
export const FRAME_TYPES = Object.freeze({
  client: Object.freeze([...POLICY.frames.client_types]),
  server: Object.freeze([...POLICY.frames.server_types]),
  stream: Object.freeze([...POLICY.frames.stream_types]),
});
const STREAM_FRAME_TYPES = new Set(FRAME_TYPES.stream);

/**
 * The client frame `type` with `fields`, in the model's field order. Required fields are
 * always set (a missing one is sent absent and the relay answers with its `error`, as for
 * any bad frame); optional ones only when neither undefined nor null. An unknown type or
 * field is this client's own bug: TypeError.
 */
export function clientFrame(type, fields = {}) {
  const spec = POLICY.frames.client[type];
  if (!spec) throw new TypeError(`unknown client frame type '${type}'`);
  for (const name of Object.keys(fields)) {
    if (!spec.required.includes(name) && !spec.optional.includes(name)) {
      throw new TypeError(`client frame '${type}' has no field '${name}'`);
    }
  }
  const frame = { type };
  for (const name of spec.required) frame[name] = fields[name];
  for (const name of spec.optional) {
    if (fields[name] !== undefined && fields[name] !== null) frame[name] = fields[name];
  }
  return frame;
}

// Close codes: the server's (clients/python/llm_relay_protocol/codes.py) plus 1000/1005/1006, from the shared policy.
export const CLOSE_CODES = Object.freeze(Object.fromEntries(
  Object.entries(POLICY.close_codes).map(([code, entry]) => [Number(code), Object.freeze({ ...entry })])));

/** One line a UI can show for a close code. */
export function closeMeaning(code) {
  const known = CLOSE_CODES[code];
  return known ? known.meaning : `closed with code ${code}`;
}

/** True when reconnecting (with backoff) may succeed without changing anything. */
export function isRetryable(code) {
  const known = CLOSE_CODES[code];
  return known ? known.retryable : false;
}

/**
 * The policy's answer to a close (clients/python/llm_relay_protocol/client_policy.py `close_decision`): {code,
 * reason, retry, meaning, refreshToken, resendUnansweredStarts}. `welcomed`: the closed
 * socket had received `welcome`; `tokenRefreshable`: the `token` option is a function.
 */
export function closeDecision(code, reason, { welcomed, tokenRefreshable }) {
  const refresh = POLICY.token_refresh;
  const r = reason || "";
  if (code === refresh.close_code && r === refresh.reason
      && (welcomed || !refresh.requires_welcome) && (tokenRefreshable || !refresh.requires_token_function)) {
    return { code, reason: r, retry: true, meaning: closeMeaning(code), refreshToken: true,
             resendUnansweredStarts: refresh.resend_unanswered_starts };
  }
  return { code, reason: r, retry: isRetryable(code), meaning: closeMeaning(code), refreshToken: false,
           resendUnansweredStarts: false };
}

/** Delay in ms of reconnect attempt `attempt` (0-based) for `r` in [0, 1) (policy rule 2). */
export function backoffDelay(attempt, r, base = POLICY.backoff.base_ms, cap = POLICY.backoff.cap_ms) {
  const b = POLICY.backoff;
  const exp = base > 0 ? Math.min(cap, base * b.factor ** attempt) : 0;
  return exp * (b.jitter_min + (b.jitter_max - b.jitter_min) * r);
}

/**
 * A stream that did not end with a `finish`: refused start (`error` frame with its id),
 * a resume the server could not honour (`unknown_stream`, `stream_lost`), a resume on
 * another connection that took the stream over (`stream_taken_over`: it goes on there), a
 * lost connection without resume (`connection_lost`), or the client closed (`client_closed`).
 */
export class StreamError extends Error {
  constructor(message, { code, id = null, partialText = "", frame = null, closeCode = null } = {}) {
    super(message);
    this.name = "StreamError";
    this.code = code;
    this.id = id;
    this.partialText = partialText;
    this.frame = frame;
    this.closeCode = closeCode;
  }
}

/**
 * A failure on this side, where the relay was never reached (so no close code): `code`
 * "token_callback_failed" (the `token` function threw or its promise rejected; `cause` is
 * what it threw), "cannot_open" (the WebSocket constructor threw, e.g. a malformed URL) or
 * "no_websocket" (no WebSocket implementation: none global, none in the options).
 */
export class RelayClientError extends Error {
  constructor(message, { code, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "RelayClientError";
    this.code = code;
  }
}

const NO_WEBSOCKET = "RelayClient: no WebSocket implementation: this runtime has no global WebSocket "
  + "(Node before 22) and the `WebSocket` option is not set. Install the `ws` package and pass it: "
  + "new RelayClient(url, { WebSocket: (await import('ws')).WebSocket })";

/** "Name: message" of anything thrown (an Error or not). */
function describeThrown(err) {
  if (err instanceof Error) return `${err.name}: ${err.message}`;
  try {
    return String(err);
  } catch (_) {
    return typeof err;
  }
}

let idCounter = 0;
const utf8 = new TextEncoder();

/** Bytes of `value` as compact UTF-8 JSON: what the relay measures (and receives). */
export function jsonBytes(value) {
  return utf8.encode(JSON.stringify(value)).length;
}

/**
 * The newest part of a conversation that the relay takes in one `start` (its
 * `welcome.limits`): the whole frame within `max_frame_bytes` (above it the relay closes the
 * connection 1009) and `messages` + `tools` within `max_messages_bytes` (above it the start
 * is refused `bad_request`), each only when the relay announced it. `maxFrameBytes` lowers
 * the frame limit further (e.g. after a proxy in between closed 1009 on less).
 *
 * The oldest messages are left out first; system messages at the head stay; a context never
 * begins with an answer (assistant or tool messages right after the kept head go too).
 * Returns {messages, dropped (how many were left out), fits (false: even the last message
 * alone is too large; `messages` is then empty), frameBytes (of the start, with `fits`)}.
 */
export function fitMessages(messages, limits = {}, { model = "", tools, tool_choice, params, maxFrameBytes } = {}) {
  const frameLimit = Math.min(Number(limits.max_frame_bytes) > 0 ? Number(limits.max_frame_bytes) : Infinity,
    Number(maxFrameBytes) > 0 ? Number(maxFrameBytes) : Infinity);
  const messagesLimit = Number(limits.max_messages_bytes) > 0 ? Number(limits.max_messages_bytes) : Infinity;
  const toolList = tools && tools.length ? tools : undefined;
  // Sizes of the frame and of {"m":[],"t":...} without messages; each message adds its own
  // JSON and a comma between two: the sum is exact, so no message is serialised twice.
  const frameBase = jsonBytes(clientFrame("start", {
    id: newId() + "-xxxxxxxx", model, messages: [], tools: toolList, tool_choice,
    params: params && Object.keys(params).length ? params : undefined,
  }));
  const messagesBase = jsonBytes({ m: [], t: toolList || null });
  const sizes = messages.map((m) => jsonBytes(m));
  let head = 0;
  while (head < messages.length - 1 && messages[head] && messages[head].role === "system") head += 1;
  const fitsFrom = (first) => {
    let total = 0;
    let count = 0;
    for (let i = 0; i < messages.length; i++) {
      if (i >= head && i < first) continue;
      total += sizes[i];
      count += 1;
    }
    const commas = Math.max(0, count - 1);
    return { frame: frameBase + total + commas, ok: frameBase + total + commas <= frameLimit && messagesBase + total + commas <= messagesLimit };
  };
  let first = head;
  let size = fitsFrom(first);
  while (!size.ok && first < messages.length - 1) {
    first += 1;
    while (first < messages.length - 1 && messages[first] && messages[first].role !== "user") first += 1;
    size = fitsFrom(first);
  }
  if (!size.ok) {
    return { messages: [], dropped: messages.length, fits: false, frameBytes: size.frame };
  }
  const kept = [...messages.slice(0, head), ...messages.slice(first)];
  return { messages: kept, dropped: messages.length - kept.length, fits: true, frameBytes: size.frame };
}

function newId() {
  idCounter += 1;
  return `s${idCounter}-${Math.random().toString(36).slice(2, 8)}`;
}

/** One stream: an async iterator of its frames, with live state. */
export class RelayStream {
  constructor(client, id, startFrame) {
    this.client = client;
    this.id = id;
    this.model = startFrame.model;
    this.startFrame = startFrame;
    this.text = "";
    this.reasoning = "";
    this.refusal = ""; // the model's refusal to answer (refusal frames), never part of text
    this.toolCalls = []; // by index: {index, callId, name, arguments, complete}
    this.usage = null;
    this.finish = null;
    this.status = "pending"; // pending | streaming | resuming | <finish.status> | error
    this.streamKey = null;
    this.lastSeq = -1; // the policy's dedupe state: a frame whose seq is not above it is a replay
    this.seqs = []; // the seqs of the last POLICY.recent_seqs_kept frames delivered (debugging)
    this.framesDelivered = 0; // frames delivered in all (after dedupe)
    this.resumes = 0; // successful resumes after dropped connections
    this.lastResume = null; // {afterSeq, closeCode} of the latest one
    this.startedAt = null; // performance.now() when start was sent
    this.firstTokenAt = null;
    this.ttft = null; // ms from start sent to first token/reasoning/tool-call frame
    this.error = null;
    this._sent = false;
    this._cancelRequested = false;
    this._queue = [];
    this._waiters = []; // pending next() calls, oldest first: any number may wait at once
    this._ended = false;
    this.done = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this.done.catch(() => {}); // a rejection nobody awaits is not an unhandled error
  }

  /** Stop the stream: sends `cancel`; `done` then resolves with the `cancelled` finish. */
  cancel() {
    if (this._ended || this._cancelRequested) return;
    this._cancelRequested = true;
    this.client._cancel(this);
  }

  get finished() {
    return this._ended;
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  next() {
    if (this._queue.length) return Promise.resolve({ value: this._queue.shift(), done: false });
    if (this._ended) {
      return this.error ? Promise.reject(this.error) : Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve, reject) => {
      this._waiters.push({ resolve, reject });
    });
  }

  /** `break` out of a for-await loop cancels the stream (like closing a provider stream). */
  return() {
    this.cancel();
    return Promise.resolve({ value: undefined, done: true });
  }

  _push(frame) {
    if (typeof frame.seq === "number") {
      this.seqs.push(frame.seq);
      if (this.seqs.length > POLICY.recent_seqs_kept) this.seqs.shift();
    }
    this.framesDelivered += 1;
    const w = this._waiters.shift();
    if (w) w.resolve({ value: frame, done: false });
    else this._queue.push(frame);
  }

  _wakeEnd() {
    // Every waiter left once the queue is empty gets the end (the queue is empty whenever
    // someone waits: a frame goes to a waiter before it is queued).
    if (this._queue.length) return;
    const waiters = this._waiters;
    this._waiters = [];
    for (const w of waiters) {
      if (this.error) w.reject(this.error);
      else w.resolve({ value: undefined, done: true });
    }
  }

  _apply(frame) {
    switch (frame.type) {
      case "started":
        this.status = "streaming";
        if (typeof frame.stream_key === "string" && frame.stream_key) this.streamKey = frame.stream_key;
        break;
      case "token":
        this._firstOutput();
        if (typeof frame.text === "string") this.text += frame.text;
        break;
      case "reasoning":
        this._firstOutput();
        if (typeof frame.text === "string") this.reasoning += frame.text;
        break;
      case "refusal":
        this._firstOutput();
        if (typeof frame.text === "string") this.refusal += frame.text;
        break;
      case "tool_call_chunk": {
        this._firstOutput();
        const call = this._call(frame.index);
        if (typeof frame.call_id === "string") call.callId = frame.call_id;
        if (typeof frame.name === "string" && frame.name) call.name = frame.name;
        if (typeof frame.arguments_delta === "string") call.arguments += frame.arguments_delta;
        break;
      }
      case "tool_call_complete": {
        const call = this._call(frame.index);
        if (typeof frame.call_id === "string") call.callId = frame.call_id;
        if (typeof frame.name === "string") call.name = frame.name;
        if (typeof frame.arguments === "string") call.arguments = frame.arguments;
        call.complete = true;
        break;
      }
      case "finish":
        this.finish = frame;
        this.usage = frame.usage || null;
        this.status = frame.status;
        break;
      default:
        break;
    }
  }

  _firstOutput() {
    if (this.firstTokenAt === null) {
      this.firstTokenAt = performance.now();
      if (this.startedAt !== null) this.ttft = this.firstTokenAt - this.startedAt;
    }
  }

  _call(index) {
    const i = Number.isInteger(index) && index >= 0 ? index : 0;
    while (this.toolCalls.length <= i) {
      this.toolCalls.push({ index: this.toolCalls.length, callId: "", name: "", arguments: "", complete: false });
    }
    return this.toolCalls[i];
  }

  _end(finish) {
    if (this._ended) return;
    this._ended = true;
    this._resolve(finish);
    this._wakeEnd();
  }

  _fail(error) {
    if (this._ended) return;
    this._ended = true;
    this.status = "error";
    this.error = error;
    this._reject(error);
    this._wakeEnd();
  }
}

const DEFAULTS = {
  token: undefined, // string, or () => string | Promise<string>; called before every connect
  clientName: "relay-client.js",
  clientVersion: "0.1",
  pingInterval: 15000, // ms between app-level pings (0 = none)
  pingTimeout: 10000, // ms without pong before the connection counts as dead
  reconnect: true,
  maxRetries: POLICY.backoff.max_attempts, // attempts after one loss before giving up ("closed")
  backoffBase: POLICY.backoff.base_ms, // ms; delay = min(backoffMax, base * 2^attempt) * (0.5 .. 1.0)
  backoffMax: POLICY.backoff.cap_ms,
  WebSocket: undefined, // a WebSocket constructor (e.g. the `ws` package's on Node 20); default: the global one
};

/** A connection to a relay that survives drops; see the header comment. */
export class RelayClient extends EventTarget {
  /**
   * Connects and resolves after the first `welcome`; rejects when the connection closes for
   * good first (StreamError `connection_lost`) or fails on this side (RelayClientError).
   */
  static async connect(url, options = {}) {
    const client = new RelayClient(url, options);
    await client.ready;
    return client;
  }

  /** Throws RelayClientError `no_websocket` when there is no WebSocket implementation to use. */
  constructor(url, options = {}) {
    super();
    this.options = { ...DEFAULTS, ...options };
    // Checked here, not at the first connect: without it nothing can work, and the fix
    // (inject one) belongs in the caller's code, not in a close code it would have to decode.
    this._WebSocket = this.options.WebSocket || globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new RelayClientError(NO_WEBSOCKET, { code: "no_websocket" });
    }
    this.url = url || defaultUrl();
    this.state = "idle";
    this.welcome = null;
    this.models = [];
    this.limits = {};
    this.sessionId = null;
    this.onstate = null;
    this.onframe = null; // every parsed frame, known or not (debugging)
    this.lastClose = null;
    this.lastError = null; // the RelayClientError that closed the client, if one did
    this._ws = null;
    this._streams = new Map(); // id -> RelayStream, until it ends
    this._outbox = []; // frames waiting for the next welcome
    this._attempt = 0;
    this._closedByUser = false;
    this._reconnectTimer = null;
    this._pingTimer = null;
    this._pongTimer = null;
    this._pingCounter = 0;
    this._socketWelcomed = false; // the current socket got its welcome
    this.ready = new Promise((resolve, reject) => {
      this._readyResolve = resolve;
      this._readyReject = reject;
    });
    this.ready.catch(() => {});
    this._open("connecting");
  }

  /**
   * Start a stream. `params` must stick to the protocol's allowlist (temperature, ...).
   * Throws StreamError (`client_closed`) once the client is closed for good.
   */
  start({ model, messages, tools, tool_choice, params, id } = {}) {
    if (this.state === "closed") {
      throw new StreamError("client is closed", { code: "client_closed" });
    }
    const sid = id || newId();
    if (this._streams.has(sid)) throw new StreamError(`stream id '${sid}' is already running`, { code: "duplicate_id", id: sid });
    const frame = clientFrame("start", {
      id: sid, model, messages,
      tools: tools && tools.length ? tools : undefined,
      tool_choice,
      params: params && Object.keys(params).length ? params : undefined,
    });
    const stream = new RelayStream(this, sid, frame);
    this._streams.set(sid, stream);
    if (this.state === "open") this._sendStart(stream);
    else this._outbox.push(stream);
    return stream;
  }

  /**
   * Watch a stream started elsewhere by its `stream_key` (policy rule 6): joins it as a
   * viewer (`takeover: true`: becomes its only attachment; reconnects never take over).
   * Throws StreamError (`client_closed`) once the client is closed for good.
   */
  watch(streamKey, { afterSeq = 0, id, takeover = false } = {}) {
    if (this.state === "closed") {
      throw new StreamError("client is closed", { code: "client_closed" });
    }
    if (typeof streamKey !== "string" || !streamKey) throw new TypeError("watch: streamKey must be a non-empty string");
    const sid = id || newId();
    if (this._streams.has(sid)) throw new StreamError(`stream id '${sid}' is already running`, { code: "duplicate_id", id: sid });
    const stream = new RelayStream(this, sid, { model: undefined });
    stream.streamKey = streamKey;
    stream.lastSeq = Math.max(0, afterSeq);
    stream.status = "resuming";
    stream._sent = true; // a `resume`: sent now if open, else by the next welcome
    this._streams.set(sid, stream);
    if (this.state === "open") {
      this._send(clientFrame("resume", { stream_key: streamKey, after_seq: stream.lastSeq, id: sid,
                                        takeover: takeover ? true : undefined }));
    }
    return stream;
  }

  /**
   * While waiting to reconnect: try now instead of after the backoff delay. False (nothing
   * done) when no attempt is waiting (open, closed, or an attempt already under way).
   */
  reconnectNow() {
    if (this.state !== "reconnecting" || this._reconnectTimer === null || this._closedByUser) return false;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._open("reconnecting");
    return true;
  }

  /** Streams that have not ended yet. */
  get streams() {
    return [...this._streams.values()];
  }

  /** Close for good: no reconnect; unfinished streams reject with `client_closed`. */
  close(code = 1000, reason = "client closed") {
    this._closedByUser = true;
    clearTimeout(this._reconnectTimer);
    this._stopPing();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      detach(ws);
      try {
        ws.close(code, reason);
      } catch (_) {
        /* already closing */
      }
    }
    this._failAll("client_closed", "client closed the connection", code);
    this._setState("closed", { code, reason, meaning: closeMeaning(code), retryable: false });
    this._readyReject(new StreamError("client closed before the first welcome", { code: "client_closed", closeCode: code }));
  }

  // ---------------------------------------------------------------- connection

  async _open(state) {
    this._setState(state, { attempt: this._attempt });
    let token;
    try {
      // Called after a microtask, never inside the constructor: a failure must reach the
      // listeners and streams the caller adds right after `new RelayClient(...)`.
      token = await Promise.resolve().then(() => (
        typeof this.options.token === "function" ? this.options.token() : this.options.token));
    } catch (err) {
      // The caller's own code failed (often a plain bug, e.g. a ReferenceError): say so as
      // it is. The relay was not contacted, so no close code; retrying would fail the same
      // way, so no reconnect either.
      if (this._closedByUser) return;
      this._failLocally(new RelayClientError(`token_callback_failed: ${describeThrown(err)}`, {
        code: "token_callback_failed", cause: err }));
      return;
    }
    if (this._closedByUser) return;
    let ws;
    try {
      ws = new this._WebSocket(this.url, [PROTOCOL]);
    } catch (err) {
      // E.g. a malformed URL: retrying cannot help.
      this._failLocally(new RelayClientError(`cannot_open: ${this.url}: ${describeThrown(err)}`, {
        code: "cannot_open", cause: err }));
      return;
    }
    this._ws = ws;
    this._socketWelcomed = false;
    ws.onopen = () => {
      if (ws.protocol !== PROTOCOL) {
        detach(ws);
        ws.close(1000, "no subprotocol");
        this._onClose(4406, "server did not select " + PROTOCOL);
        return;
      }
      const hello = clientFrame("hello", {
        token: typeof token === "string" && token ? token : undefined,
        client: { name: this.options.clientName, version: this.options.clientVersion },
      });
      ws.send(JSON.stringify(hello));
    };
    ws.onmessage = (event) => this._onMessage(event.data);
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._onClose(event.code, event.reason);
    };
    ws.onerror = () => {}; // onclose follows with the code
  }

  /**
   * Close for good because of a failure on this side (a RelayClientError): no reconnect;
   * unfinished streams reject with StreamError of the error's code (`cause`: the error);
   * an `error` event (detail: the error), then `closed` with {error, reason: its message} and
   * no `code`; `ready` rejects with the error.
   */
  _failLocally(error) {
    this._ws = null;
    this._stopPing();
    clearTimeout(this._reconnectTimer);
    this.lastError = error;
    for (const stream of [...this._streams.values()]) {
      const failed = new StreamError(error.message, { code: error.code, id: stream.id, partialText: stream.text });
      failed.cause = error;
      this._drop(stream, failed);
    }
    this._outbox = [];
    this.dispatchEvent(new CustomEvent("error", { detail: error }));
    this._setState("closed", { reason: error.message, meaning: "failed in this client; the relay was not contacted",
                              retryable: false, error });
    this._readyReject(error);
  }

  _onClose(code, reason) {
    this._ws = null;
    this._stopPing();
    this.lastClose = { code, reason };
    const welcomed = this._socketWelcomed;
    this._socketWelcomed = false;
    // The shared policy decides (clients/python/llm_relay_protocol/client_policy.py rule 1). Its one special case: a
    // token that expired while the connection was open (4401 "token expired" after a
    // welcome) with a token function reconnects with a fresh token; the relay left the
    // starts that hit the expiry unanswered (PROTOCOL.md), so they are sent again. A fresh
    // token refused too (4401 before any welcome) is final: no loop.
    const decision = closeDecision(code, reason, { welcomed, tokenRefreshable: typeof this.options.token === "function" });
    if (decision.resendUnansweredStarts && !this._closedByUser) {
      for (const stream of this._streams.values()) {
        if (stream._sent && !stream.streamKey && stream.status === "pending") {
          stream._sent = false;
          this._outbox.push(stream);
        }
      }
    }
    const lost = this._handleLostStreams(code);
    if (this._closedByUser) return;
    const retryable = decision.retry;
    const detail = { code, reason, meaning: closeMeaning(code), retryable, lostStreams: lost };
    if (retryable && this.options.reconnect && this._attempt < this.options.maxRetries) {
      const delay = Math.round(backoffDelay(this._attempt, Math.random(), this.options.backoffBase, this.options.backoffMax));
      this._attempt += 1;
      this._setState("reconnecting", { ...detail, attempt: this._attempt, delay });
      this._reconnectTimer = setTimeout(() => {
        this._reconnectTimer = null;
        this._open("reconnecting");
      }, delay);
      return;
    }
    this._failAll("connection_lost", `connection closed (${code}: ${closeMeaning(code)})`, code);
    this._setState("closed", detail);
    this._readyReject(new StreamError(`connection closed (${code}: ${closeMeaning(code)})`, { code: "connection_lost", closeCode: code }));
  }

  /** After a drop: streams that can be resumed wait; the others reject now. */
  _handleLostStreams(code) {
    const canResume = Number(this.limits.detach_grace) > 0 && !this._closedByUser;
    const lost = [];
    for (const stream of [...this._streams.values()]) {
      if (!stream._sent) continue; // still in the outbox; sent after the next welcome
      if (canResume && stream.streamKey) {
        stream.status = "resuming";
        continue;
      }
      lost.push(stream.id);
      this._drop(stream, new StreamError(`connection lost (${code}: ${closeMeaning(code)}) before the stream finished`, {
        code: "connection_lost", id: stream.id, partialText: stream.text, closeCode: code,
      }));
    }
    return lost;
  }

  _failAll(code, message, closeCode) {
    for (const stream of [...this._streams.values()]) {
      this._drop(stream, new StreamError(message, { code, id: stream.id, partialText: stream.text, closeCode }));
    }
    this._outbox = [];
  }

  _drop(stream, error) {
    this._streams.delete(stream.id);
    this._outbox = this._outbox.filter((s) => s !== stream);
    stream._fail(error);
  }

  _send(frame) {
    if (!this._ws || this._ws.readyState !== 1) return false;
    this._ws.send(JSON.stringify(frame));
    return true;
  }

  _sendStart(stream) {
    // Never a start larger than the relay takes: it would close the connection 1009 (and
    // every stream on it with it). The stream fails here instead (use fitMessages first).
    const text = JSON.stringify(stream.startFrame);
    const limit = Number(this.limits.max_frame_bytes);
    if (limit > 0 && text.length > limit / 4) {
      const size = utf8.encode(text).length;
      if (size > limit) {
        this._drop(stream, new StreamError(`start is ${size} bytes; the relay takes at most ${limit} (max_frame_bytes)`, {
          code: "frame_too_large", id: stream.id,
        }));
        return;
      }
    }
    stream._sent = true;
    stream.startedAt = performance.now();
    stream.status = "pending";
    if (this._ws && this._ws.readyState === 1) this._ws.send(text);
    if (stream._cancelRequested) this._send(clientFrame("cancel", { id: stream.id }));
  }

  _cancel(stream) {
    if (!stream._sent) {
      // Its start never left this page: the relay does not know it, so it ends here with
      // the policy's local finish (schema-valid: cancelled, client_cancel, zero usage
      // flagged estimated). A stream the relay knows always ends with the relay's finish.
      this._streams.delete(stream.id);
      this._outbox = this._outbox.filter((s) => s !== stream);
      const local = POLICY.local_cancel_finish;
      const finish = { ...local, id: stream.id, usage: { ...local.usage } };
      stream._apply(finish);
      stream._push(finish);
      stream._end(finish);
      return;
    }
    if (this.state === "open" && stream.status !== "resuming") this._send(clientFrame("cancel", { id: stream.id }));
    // else: sent after the resume succeeds (see _onResumed)
  }

  _setState(state, detail = {}) {
    this.state = state;
    const full = { state, ...detail };
    if (typeof this.onstate === "function") {
      try {
        this.onstate(state, full);
      } catch (err) {
        console.error(err);
      }
    }
    this.dispatchEvent(new CustomEvent("state", { detail: full }));
  }

  // ---------------------------------------------------------------- ping

  _startPing() {
    this._stopPing();
    if (!(this.options.pingInterval > 0)) return;
    this._pingTimer = setInterval(() => this.ping(), this.options.pingInterval);
  }

  _stopPing() {
    clearInterval(this._pingTimer);
    clearTimeout(this._pongTimer);
    this._pingTimer = null;
    this._pongTimer = null;
  }

  /** Send an app-level ping now; no pong within pingTimeout drops the connection (1006). */
  ping() {
    if (this._pongTimer) return; // one outstanding ping is enough
    this._pingCounter += 1;
    if (!this._send(clientFrame("ping", { data: { n: this._pingCounter } }))) return;
    const ws = this._ws;
    this._pongTimer = setTimeout(() => {
      this._pongTimer = null;
      if (this._ws !== ws) return;
      // A dead server may never complete the closing handshake: stop listening now.
      detach(ws);
      try {
        ws.close(4000, "no pong");
      } catch (_) {
        /* ignore */
      }
      this._onClose(1006, "no pong from the server within " + this.options.pingTimeout + " ms");
    }, this.options.pingTimeout);
  }

  // ---------------------------------------------------------------- frames

  _onMessage(data) {
    if (typeof data !== "string") return; // the server never sends binary
    let frame;
    try {
      frame = JSON.parse(data);
    } catch (_) {
      return;
    }
    if (frame === null || typeof frame !== "object" || Array.isArray(frame) || typeof frame.type !== "string") return;
    if (typeof this.onframe === "function") {
      try {
        this.onframe(frame);
      } catch (err) {
        console.error(err);
      }
    }
    switch (frame.type) {
      case "welcome":
        return this._onWelcome(frame);
      case "pong":
        clearTimeout(this._pongTimer);
        this._pongTimer = null;
        return;
      case "error":
        return this._onError(frame);
      case "resumed":
        return this._onResumed(frame);
      default:
        if (STREAM_FRAME_TYPES.has(frame.type)) return this._onStreamFrame(frame);
        return; // unknown frame type: ignored, as the protocol requires
    }
  }

  _onWelcome(frame) {
    this.welcome = frame;
    this._socketWelcomed = true;
    this.models = Array.isArray(frame.models) ? frame.models.filter((m) => typeof m === "string") : [];
    this.limits = frame.limits && typeof frame.limits === "object" ? frame.limits : {};
    this.sessionId = frame.session_id || null;
    const reconnected = this._attempt > 0 || this.state === "reconnecting";
    this._attempt = 0;
    const canResume = Number(this.limits.detach_grace) > 0;
    for (const stream of [...this._streams.values()]) {
      if (stream.status !== "resuming") continue;
      if (canResume && stream.streamKey) {
        this._send(clientFrame("resume", { stream_key: stream.streamKey, after_seq: Math.max(0, stream.lastSeq), id: stream.id }));
      } else {
        this._drop(stream, new StreamError("connection lost and the server does not offer resume", {
          code: "connection_lost", id: stream.id, partialText: stream.text, closeCode: this.lastClose && this.lastClose.code,
        }));
      }
    }
    this._setState("open", { sessionId: this.sessionId, models: this.models, reconnected });
    this._readyResolve(this);
    this._startPing();
    const queued = this._outbox;
    this._outbox = [];
    for (const stream of queued) if (this._streams.get(stream.id) === stream) this._sendStart(stream);
  }

  _onError(frame) {
    const id = typeof frame.id === "string" ? frame.id : null;
    const code = typeof frame.code === "string" ? frame.code : "error";
    const message = typeof frame.message === "string" ? frame.message : code;
    if (id === null) {
      // A resume the server does not understand (an older relay) answers without an id.
      if (frame.ref === "resume") {
        for (const stream of [...this._streams.values()]) {
          if (stream.status === "resuming") {
            this._drop(stream, new StreamError(`resume refused: ${message}`, {
              code, id: stream.id, partialText: stream.text, frame, closeCode: this._lastCloseCode() }));
          }
        }
      }
      return;
    }
    const stream = this._streams.get(id);
    if (!stream || frame.ref === "cancel") return; // e.g. cancel raced the finish: harmless
    // Any other error with the stream's id ends it here: a refused start or resume, or
    // (unprompted) `stream_taken_over` when another connection resumed it. A refused resume
    // keeps the close code of the loss that made it necessary.
    const resumeRefused = code !== POLICY.taken_over_code && (frame.ref === "resume" || stream.status === "resuming");
    this._drop(stream, new StreamError(message, {
      code, id, partialText: stream.text, frame, closeCode: resumeRefused ? this._lastCloseCode() : null }));
  }

  _lastCloseCode() {
    return this.lastClose ? this.lastClose.code : null;
  }

  _onResumed(frame) {
    const stream = typeof frame.id === "string" ? this._streams.get(frame.id) : null;
    if (!stream || stream.status !== "resuming") return;
    stream.status = "streaming";
    stream.resumes += 1;
    stream.lastResume = {
      afterSeq: typeof frame.after_seq === "number" ? frame.after_seq : stream.lastSeq,
      closeCode: this.lastClose ? this.lastClose.code : null,
    };
    if (stream._cancelRequested) this._send(clientFrame("cancel", { id: stream.id }));
  }

  _onStreamFrame(frame) {
    const stream = typeof frame.id === "string" ? this._streams.get(frame.id) : null;
    if (!stream) return;
    if (typeof frame.seq === "number") {
      if (frame.seq <= stream.lastSeq) return; // replayed after a resume: already seen
      stream.lastSeq = frame.seq;
    }
    stream._apply(frame);
    stream._push(frame);
    if (frame.type === "finish") {
      this._streams.delete(stream.id);
      stream._end(frame);
    }
  }
}

function detach(ws) {
  ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
}

function defaultUrl() {
  const loc = globalThis.location;
  if (!loc) throw new Error("RelayClient: a URL is required outside a page");
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/ws`;
}
