// The chat page: UI only; the protocol lives in relay-client.js, Markdown in markdown.js.
// Model text is untrusted: it reaches the DOM only as sanitised Markdown (markdown.js) or
// through textContent (reasoning, refusals, tool calls, the user's own messages).
//
// Conversations live in the browser's localStorage (one record per chat, and an index):
// every turn's prompt and answer versions, and for each answer its text so far, its
// stream_key and the last seq that text includes (saved together, so they always match).
// A reload shows the conversation and resumes a running answer where it was (watch() after
// that seq); a second tab on the same conversation watches it live (PROTOCOL.md "Viewers");
// the `storage` event tells each tab what the others changed. While the page is open it
// keeps reconnecting (capped backoff, and at once on the browser's `online` event).

import { RelayClient, StreamError, fitMessages } from "./relay-client.js";
import { MarkdownView, copyCodeFromClick } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const ui = {
  state: $("conn-state"), message: $("conn-message"), details: $("conn-details"), detail: $("conn-detail"),
  tokenGroup: $("token-group"), token: $("token"), reconnect: $("reconnect"),
  model: $("model"), compare: $("compare"), model2: $("model2"), useTool: $("use-tool"),
  answers: $("answers"), empty: $("empty-state"), emptyModels: $("empty-models"),
  composer: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"), clear: $("clear"),
  jump: $("jump-latest"), chatSelect: $("chat-select"), newChat: $("new-chat"),
};

// A sample tool: with it the demo model answers with one get_weather call.
const SAMPLE_TOOL = {
  type: "function",
  function: {
    name: "get_weather",
    description: "Current weather for a city",
    parameters: { type: "object", properties: { city: { type: "string" }, celsius: { type: "boolean" } }, required: ["city"] },
  },
};

let client = null;
const running = new Map(); // RelayStream -> its pane
// Answers followed by this tab: pane id -> {stream, parts, data} (data: the stored record).
const live = new Map();
let authRequired = false; // learnt from a 4401, or assumed while a token is in use
// Largest start the page sends, below the relay's own limit: lowered when something in
// between (a proxy) closed 1009 on less than the relay announced. null: the relay's limit.
let frameCap = null;
let lastStartBytes = 0; // size of the last start sent
let recoveredFromTooBig = false; // reconnected after a 1009: say so once connected

// ------------------------------------------------------------------ token (never in the query)

function takeTokenFromFragment() {
  // `#token=...` (percent-encoded; a "+" stays a "+", unlike URLSearchParams' form decoding,
  // since tokens are often base64). Other fragment parts are kept.
  const parts = location.hash.replace(/^#/, "").split("&").filter(Boolean);
  const index = parts.findIndex((p) => p.startsWith("token="));
  if (index < 0) return;
  let token = parts[index].slice("token=".length);
  try {
    token = decodeURIComponent(token);
  } catch (_) {
    /* not percent-encoded: use it as it is */
  }
  ui.token.value = token;
  parts.splice(index, 1);
  // Keep the token out of the address bar and the browser history from now on.
  window.history.replaceState(null, "", location.pathname + location.search + (parts.length ? "#" + parts.join("&") : ""));
}

// ------------------------------------------------------------------ connection

const BADGE = { idle: "idle", connecting: "connecting", open: "connected", reconnecting: "reconnecting", closed: "disconnected" };

/** What a person should read about the connection; the codes go to the details. */
function connectionMessage(state, detail) {
  if (state === "connecting" || state === "idle") return "Connecting to the relay…";
  if (state === "open" && recoveredFromTooBig) {
    return "Reconnected. A request was too large for the connection; older messages are now left out to fit.";
  }
  if (state === "open") return detail.reconnected ? "Reconnected." : "";
  const retry = detail.delay !== undefined ? ` (next try in ${(detail.delay / 1000).toFixed(1)} s)` : "";
  if (state === "reconnecting") {
    if (detail.code === 1001 || detail.code === 1012) return `The relay is restarting, reconnecting…${retry}`;
    if (detail.code === 4429) return `The relay is busy, reconnecting…${retry}`;
    return `Connection lost, reconnecting…${retry}`;
  }
  // closed
  if (detail.code === 4401) {
    return ui.token.value.trim()
      ? "The relay did not accept this token. Enter a valid one and press Connect."
      : "This relay requires a token. Enter it above and press Connect.";
  }
  if (detail.code === 1000) return "Disconnected.";
  return "Disconnected from the relay. Press Connect to try again.";
}

function showState(state, detail = {}) {
  ui.state.textContent = BADGE[state] || state;
  ui.state.dataset.state = state;
  let text = "";
  if (state === "open") {
    text = detail.sessionId ? `session ${detail.sessionId}` : "";
  } else if (state === "reconnecting" && detail.code !== undefined) {
    text = `${detail.code}: ${detail.meaning}; retrying in ${(detail.delay / 1000).toFixed(1)} s (attempt ${detail.attempt})`;
  } else if (state === "reconnecting") {
    text = `attempt ${detail.attempt}`;
  } else if (state === "closed" && detail.code !== undefined) {
    text = `${detail.code}: ${detail.meaning}${detail.reason ? ` (${detail.reason})` : ""}`;
  }
  ui.detail.textContent = text;
  ui.detail.dataset.code = detail.code ?? "";
  ui.details.hidden = !text;
  ui.message.textContent = connectionMessage(state, detail);
  if (state === "closed" && detail.code === 4401) authRequired = true;
  if (state === "open" && !ui.token.value.trim()) authRequired = false; // welcomed without one
  showTokenField(state);
  showEmptyState(state);
  updateButtons();
}

/** The Token field only when the relay wants one (a 4401) or one is in use. */
function showTokenField(state) {
  const wanted = authRequired || Boolean(ui.token.value.trim());
  ui.tokenGroup.hidden = !wanted;
  ui.reconnect.hidden = !wanted && state !== "closed";
  if (state === "closed" && authRequired) ui.token.focus();
}

function showEmptyState(state) {
  const models = client ? client.models : [];
  if (state === "open" && models.length) {
    const names = models.join(", ");
    const demo = models.includes("demo") ? " (demo is the built-in demo model: it answers by echoing your message, no API key needed; ask it for markdown to see headings, lists, tables and code)" : "";
    ui.emptyModels.textContent = `This relay serves: ${names}${demo}. Pick one above and type a message.`;
  } else if (state === "open") {
    ui.emptyModels.textContent = "Connected, but this relay serves no models you may use.";
  } else if (state === "closed" || state === "reconnecting") {
    ui.emptyModels.textContent = "Not connected to a relay right now (see above).";
  }
}

function fillModels(models) {
  for (const select of [ui.model, ui.model2]) {
    const keep = select.value;
    select.replaceChildren(...models.map((m) => {
      const option = document.createElement("option");
      option.value = m;
      option.textContent = m;
      return option;
    }));
    if (models.includes(keep)) select.value = keep;
  }
}

function connect() {
  if (client) client.close(1000, "reconnecting with new settings");
  // Never give up while the page is open (the relay may come back): retryable closes are
  // retried forever with the policy's capped backoff; `online` retries at once.
  const c = new RelayClient(undefined, { token: () => ui.token.value.trim(), maxRetries: Infinity });
  client = c;
  window.relayClient = c; // handy from the console
  c.onstate = (state, detail) => {
    if (client !== c) return;
    if (state === "open") fillModels(c.models);
    if (state === "closed" && detail.code === 1009) {
      // A message too big for the connection (the relay, or a proxy with a lower limit):
      // final for that socket, never for the chat. Send less from now on and reconnect.
      frameCap = Math.max(1024, Math.floor((frameCap ? Math.min(frameCap, lastStartBytes) : lastStartBytes) / 2));
      recoveredFromTooBig = true;
      showState(state, detail);
      connect();
      return;
    }
    showState(state, detail);
    if (state === "open") recoveredFromTooBig = false; // said once, by the first open after it
    if (state === "open") followStoredAnswers(); // answers this tab could not watch yet
    // A drop changes running streams without a frame (e.g. to "resuming"): redraw them.
    for (const [stream, parts] of running) draw(parts, stream);
  };
  showState(c.state);
}

// ------------------------------------------------------------------ scrolling

// Follow the newest text while the reader is at the bottom; stop following as soon as they
// scroll up (content growing never moves scrollTop up, only the reader does), and offer
// "Jump to latest" until they are back at the bottom.
let following = true;
let lastScrollTop = 0;

function atBottom() {
  const el = ui.answers;
  return el.scrollHeight - el.scrollTop - el.clientHeight <= 4;
}

function scrollToLatest() {
  ui.answers.scrollTop = ui.answers.scrollHeight;
  following = true;
  lastScrollTop = ui.answers.scrollTop;
  ui.jump.hidden = true;
}

function afterContentChange() {
  if (following) scrollToLatest();
  else ui.jump.hidden = atBottom();
}

ui.answers.addEventListener("scroll", () => {
  const top = ui.answers.scrollTop;
  if (top < lastScrollTop - 1) following = false;
  if (atBottom()) following = true;
  lastScrollTop = top;
  ui.jump.hidden = following || atBottom();
}, { passive: true });
ui.jump.addEventListener("click", scrollToLatest);

// ------------------------------------------------------------------ rendering

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function renderPane(stream, label) {
  const pane = el("section", "answer");
  pane.dataset.streamId = stream.id;
  pane.relayStream = stream; // for the console (and the tests): text, seqs, resumes, ...
  const head = el("div", "answer-head");
  head.append(el("span", "answer-model", label), el("span", "answer-status", "waiting…"));
  const parts = {
    pane,
    status: head.lastChild,
    reasoning: el("div", "answer-reasoning"),
    text: el("div", "answer-text"),
    refusal: el("div", "answer-refusal"),
    tools: el("ul", "tool-calls"),
    notice: el("div", "answer-notice"),
    meta: el("div", "answer-meta"),
    pending: false,
  };
  parts.markdown = new MarkdownView(parts.text, { schedule: (fn) => fn() });
  parts.status.dataset.status = "pending";
  parts.refusal.setAttribute("role", "note");
  parts.refusal.dataset.label = "The model refused";
  pane.append(head, parts.reasoning, parts.text, parts.refusal, parts.tools, parts.notice, parts.meta);
  return parts;
}

/** Redraw a pane from its stream at most once per animation frame (tokens come faster). */
function drawSoon(parts, stream) {
  if (parts.pending) return;
  parts.pending = true;
  const run = () => {
    if (!parts.pending) return;
    draw(parts, stream);
  };
  requestAnimationFrame(run);
  setTimeout(run, 250); // hidden tabs get no animation frames
}

function draw(parts, stream) {
  parts.pending = false;
  parts.markdown.update(stream.text); // renders now: this function is already once per frame
  if (parts.reasoning.textContent.length !== stream.reasoning.length) parts.reasoning.textContent = stream.reasoning;
  // Provider text: textContent only, never markup.
  if (parts.refusal.textContent.length !== stream.refusal.length) parts.refusal.textContent = stream.refusal;
  setStatus(parts, stream.status === "resuming" ? "resuming" : stream.status);
  while (parts.tools.children.length < stream.toolCalls.length) {
    const li = el("li", "tool-call");
    li.append(el("span", "tool-name"), el("span", "tool-state"), el("div", "tool-args"));
    parts.tools.append(li);
  }
  stream.toolCalls.forEach((call, i) => {
    const [name, state, args] = parts.tools.children[i].children;
    name.textContent = call.name || "(unnamed)";
    state.textContent = call.complete ? "complete" : "streaming…";
    args.textContent = call.arguments;
  });
  afterContentChange();
}

const STATUS_TEXT = {
  pending: "waiting…", streaming: "answering…", resuming: "resuming…", completed: "done",
  cancelled: "stopped", failed: "failed", timeout: "timed out", error: "interrupted",
};

function setStatus(parts, status) {
  parts.status.textContent = STATUS_TEXT[status] || status;
  parts.status.dataset.status = status;
}

/** A sentence for a person about why an answer ended early; codes stay in the details. */
function humanEnding(code, { partial, frame, finish } = {}) {
  const kept = partial ? "; partial answer kept" : "";
  switch (code) {
    case "connection_lost":
      return `The connection was lost and this answer could not be resumed${kept}.`;
    case "unknown_stream":
    case "stream_lost":
      return `The relay restarted and this answer could not be resumed${kept}.`;
    case "stream_taken_over":
      return "This answer is now being followed somewhere else (another tab or window).";
    case "client_closed":
      return `The page closed its connection${kept}.`;
    case "unknown_model":
      return "This relay does not serve that model. Pick another one above.";
    case "frame_too_large":
      return "This message is too long for the relay to accept: shorten it and send it again.";
    case "too_many_streams":
      return "Too many answers at once: wait for one to finish, then try again.";
    case "rate_limited": {
      const wait = frame && typeof frame.retry_after === "number" ? ` in ${Math.ceil(frame.retry_after)} s` : " later";
      return `Too many requests: try again${wait}.`;
    }
    case "draining":
      return "The relay is shutting down: try again in a moment.";
    case "bad_request":
      return finish
        ? "The model provider rejected this request."
        : "The relay refused this request (see details).";
    case "upstream_rate_limited":
      return "The model provider is rate limiting the relay: try again later.";
    case "upstream_overloaded": {
      const wait = frame && typeof frame.retry_after === "number" ? ` in ${Math.ceil(frame.retry_after)} s` : " in a moment";
      return `The model provider is overloaded: try again${wait}${kept}.`;
    }
    case "upstream_timeout":
      return `The model provider took too long to answer${kept}.`;
    case "upstream_error":
      // The relay's sentence says why (credentials, unreachable, HTTP 5xx, a cut stream):
      // fixed wording of the relay's own, never the provider's text.
      return finish && finish.error && finish.error.message
        ? `${sentence(finish.error.message)}${kept}.`
        : `The model provider failed${kept}.`;
    default:
      return `The answer ended with an error${kept}.`;
  }
}

/** "could not reach the provider" -> "Could not reach the provider" (no final stop). */
function sentence(text) {
  const trimmed = text.trim().replace(/[.\s]+$/, "");
  return trimmed.charAt(0).toUpperCase() + trimmed.slice(1);
}

function describeEnd(stream) {
  const bits = [];
  const u = stream.usage;
  if (u) {
    bits.push(`usage: ${u.prompt_tokens} prompt + ${u.completion_tokens} completion = ${u.total_tokens} tokens${u.estimated ? " (estimated)" : ""}`);
  }
  if (stream.ttft !== null) bits.push(`time to first token: ${Math.round(stream.ttft)} ms`);
  if (stream.startedAt !== null) bits.push(`total: ${Math.round(performance.now() - stream.startedAt)} ms`);
  if (stream.finish && stream.finish.reason) bits.push(`reason: ${stream.finish.reason}`);
  if (stream.resumes) {
    const last = stream.lastResume;
    bits.push(last.closeCode === null
      ? `followed from seq ${last.afterSeq} (a reload, or another tab's answer)`
      : `resumed ${stream.resumes}× after a dropped connection (last: close ${last.closeCode}, after seq ${last.afterSeq})`);
  }
  if (stream.finish && stream.finish.error) bits.push(`error: ${stream.finish.error.code}: ${stream.finish.error.message}`);
  return bits.join(" · ");
}

function technicalDetails(text) {
  const details = el("details");
  details.append(el("summary", "", "details"), el("span", "", text));
  return details;
}

/** Follow `stream` into its pane; `data` (its stored record in conversation `chatId`) is
 * kept in step: text, seq, stream_key and the ending, saved as they change. */
async function follow(stream, parts, data, chatId) {
  running.set(stream, parts);
  live.set(data.pid, { stream, parts, data });
  updateButtons();
  try {
    for await (const frame of stream) {
      drawSoon(parts, stream);
      record(data, stream);
      saveProgress(chatId, frame.type !== "token" && frame.type !== "reasoning");
    }
    draw(parts, stream);
    parts.meta.textContent = describeEnd(stream);
    const finish = stream.finish;
    if (finish && finish.status !== "completed" && finish.status !== "cancelled") {
      const code = finish.error ? finish.error.code : finish.reason;
      parts.notice.textContent = humanEnding(finish.status === "timeout" ? "upstream_timeout" : code, { partial: Boolean(stream.text), finish, frame: finish.error });
    }
  } catch (err) {
    draw(parts, stream);
    const code = err instanceof StreamError ? (err.closeCode === 1009 ? "frame_too_large" : err.code) : "error";
    setStatus(parts, "error");
    parts.status.dataset.error = code;
    parts.notice.textContent = humanEnding(code, { partial: Boolean(stream.text), frame: err.frame });
    const close = err.closeCode !== undefined && err.closeCode !== null ? ` · close ${err.closeCode}` : "";
    parts.meta.replaceChildren(technicalDetails(`${code}${close} · ${err.message}`));
    data.error = code;
  } finally {
    running.delete(stream);
    if (live.get(data.pid)?.stream === stream) live.delete(data.pid);
    record(data, stream);
    data.status = parts.status.dataset.status;
    data.notice = parts.notice.textContent;
    data.meta = parts.meta.textContent;
    saveProgress(chatId, true, [data]);
    updateButtons();
    afterContentChange();
  }
  return stream;
}

// ------------------------------------------------------------------ stored conversations

const INDEX_KEY = "llm-relay.chats.v1"; // [{id, title, updated}], newest first
const CHAT_PREFIX = "llm-relay.chat.v1."; // + id: {id, title, updated, turns}
const CURRENT_KEY = "llm-relay.current-chat"; // sessionStorage: this tab's chat across reloads
const RUNNING = new Set(["pending", "streaming", "resuming"]);

// The conversation shown: {id, title, updated, turns: [{prompt, notice, current,
// versions: [{panes: [pane record]}]}]}; a pane record: see paneRecord().
let chat = null;

function newId() {
  return Math.random().toString(36).slice(2, 10) + Date.now().toString(36);
}

function readJSON(storage, key) {
  try {
    const raw = storage.getItem(key);
    return raw ? JSON.parse(raw) : null;
  } catch (_) {
    return null; // unreadable (or storage disabled): as if absent
  }
}

function chatIndex() {
  const list = readJSON(localStorage, INDEX_KEY);
  return Array.isArray(list) ? list.filter((e) => e && typeof e.id === "string") : [];
}

function loadChat(id) {
  const stored = id ? readJSON(localStorage, CHAT_PREFIX + id) : null;
  return stored && Array.isArray(stored.turns) ? stored : null;
}

function freshChat() {
  return { id: newId(), title: "New chat", updated: Date.now(), turns: [] };
}

function paneRecord(model, label) {
  return { pid: newId(), model, label, status: "pending", text: "", reasoning: "", refusal: "",
    toolCalls: [], streamKey: null, lastSeq: -1, notice: "", meta: "", error: null };
}

/** Copy what the stream has into its record: the text and the seq it includes go together. */
function record(data, stream) {
  data.text = stream.text;
  data.reasoning = stream.reasoning;
  data.refusal = stream.refusal;
  data.toolCalls = stream.toolCalls.map((call) => ({ ...call }));
  data.streamKey = stream.streamKey;
  data.lastSeq = stream.lastSeq;
  data.status = stream.status;
}

function* panesOf(c) {
  for (const turn of c.turns) for (const version of turn.versions) yield* version.panes;
}

function writeChat(c) {
  c.updated = Date.now();
  const text = JSON.stringify(c);
  for (;;) {
    try {
      localStorage.setItem(CHAT_PREFIX + c.id, text);
      break;
    } catch (_) {
      // Full (or disabled): forget the oldest other conversation and try again.
      const oldest = chatIndex().filter((e) => e.id !== c.id).pop();
      if (!oldest) return;
      localStorage.removeItem(CHAT_PREFIX + oldest.id);
      writeIndex(chatIndex().filter((e) => e.id !== oldest.id));
    }
  }
  const entry = { id: c.id, title: c.title, updated: c.updated };
  writeIndex([entry, ...chatIndex().filter((e) => e.id !== c.id)]);
}

function writeIndex(list) {
  try {
    localStorage.setItem(INDEX_KEY, JSON.stringify(list));
  } catch (_) {
    /* best effort: the conversations themselves are stored */
  }
  fillChatList();
}

/** Save the shown conversation as it is (this tab changed its shape: a turn, a version). */
function saveStructure() {
  if (chat.turns.length) writeChat(chat);
}

const progressTimers = new Map(); // chat id -> timer of a pending progress save

/**
 * Save the answers this tab follows in conversation `chatId` (`extra`: records that just
 * stopped being followed), into the stored record as it is now: another tab may have
 * added a turn meanwhile, which this must not undo. `now`: at once, else within 300 ms.
 */
function saveProgress(chatId, now = false, extra = []) {
  const run = () => {
    progressTimers.delete(chatId);
    const stored = loadChat(chatId) || (chat && chat.id === chatId ? chat : null);
    if (!stored) return;
    const mine = new Map(extra.map((d) => [d.pid, d]));
    for (const { data } of live.values()) mine.set(data.pid, data);
    for (const turn of stored.turns) {
      for (const version of turn.versions) {
        version.panes = version.panes.map((p) => mine.get(p.pid) || p);
      }
    }
    if (stored.turns.length) writeChat(stored);
  };
  if (now) {
    clearTimeout(progressTimers.get(chatId));
    run();
  } else if (!progressTimers.has(chatId)) {
    progressTimers.set(chatId, setTimeout(run, 300));
  }
}

function fillChatList() {
  if (!ui.chatSelect || !chat) return;
  const entries = chatIndex();
  if (!entries.some((e) => e.id === chat.id)) entries.unshift({ id: chat.id, title: chat.title });
  ui.chatSelect.replaceChildren(...entries.map((e) => {
    const option = document.createElement("option");
    option.value = e.id;
    option.textContent = e.title || "Untitled";
    return option;
  }));
  ui.chatSelect.value = chat.id;
}

function showChat(c) {
  chat = c;
  sessionStorage.setItem(CURRENT_KEY, c.id);
  fillChatList();
  renderChat();
  followStoredAnswers();
}

/** The messages before turn `index`: each turn's prompt and its shown answer, when that
 * completed with text (as the relay's models expect a conversation). */
function historyBefore(index) {
  const history = [];
  for (const turn of chat.turns.slice(0, index)) {
    const version = turn.versions[turn.current];
    const first = version && version.panes[0];
    if (first && first.status === "completed" && first.text && !first.toolCalls.length) {
      history.push({ role: "user", content: turn.prompt }, { role: "assistant", content: first.text });
    }
  }
  return history;
}

// ------------------------------------------------------------------ rendering a conversation

function renderChat() {
  ui.answers.replaceChildren(ui.empty);
  ui.empty.hidden = chat.turns.length > 0;
  chat.turns.forEach((turn) => {
    const node = el("article", "turn");
    ui.answers.append(node);
    renderTurn(turn, node);
  });
  updateButtons();
  scrollToLatest();
}

function renderTurn(turn, node) {
  node.turnData = turn;
  const row = el("div", "answers-row");
  const actions = el("div", "answer-actions");
  node.replaceChildren(el("div", "user", turn.prompt));
  if (turn.notice) node.append(el("div", "context-notice", turn.notice));
  node.append(row, actions);
  const version = turn.versions[turn.current];
  if (version) for (const data of version.panes) row.append(paneFor(data).pane);
  if (turn.versions.length > 1) {
    const older = el("button", "version-prev", "‹");
    const newer = el("button", "version-next", "›");
    older.type = newer.type = "button";
    older.title = "Previous version of this answer";
    newer.title = "Next version of this answer";
    older.disabled = turn.current === 0;
    newer.disabled = turn.current === turn.versions.length - 1;
    older.addEventListener("click", () => showVersion(turn, node, turn.current - 1));
    newer.addEventListener("click", () => showVersion(turn, node, turn.current + 1));
    actions.append(older, el("span", "version-label", `${turn.current + 1}/${turn.versions.length}`), newer);
  }
  if (turn === chat.turns[chat.turns.length - 1]) {
    const regenerate = el("button", "regenerate", "Regenerate");
    regenerate.type = "button";
    regenerate.title = "Ask the same question again (the current answer stays as a version)";
    regenerate.addEventListener("click", () => regenerateLast());
    actions.append(regenerate);
  }
  updateButtons();
}

function showVersion(turn, node, index) {
  if (index < 0 || index >= turn.versions.length) return;
  turn.current = index;
  saveStructure();
  renderTurn(turn, node);
}

/** The pane of a record: the live one while this tab follows its stream, else drawn from
 * the record. */
function paneFor(data) {
  const followed = live.get(data.pid);
  if (followed) return followed.parts;
  const view = { id: data.pid, text: data.text, reasoning: data.reasoning, refusal: data.refusal,
    toolCalls: data.toolCalls, status: data.status };
  const parts = renderPane(view, data.label);
  parts.pane.dataset.pid = data.pid;
  draw(parts, view);
  parts.notice.textContent = data.notice || "";
  parts.meta.textContent = data.meta || "";
  if (data.error) parts.status.dataset.error = data.error;
  return parts;
}

/** Watch every stored answer still running that this tab does not follow yet: after a
 * reload (from the seq its stored text includes), or one another tab runs. */
function followStoredAnswers() {
  if (!chat || !client || client.state === "closed") return;
  for (const data of panesOf(chat)) {
    if (RUNNING.has(data.status) && data.streamKey && !live.has(data.pid)) watchStored(data, chat.id);
  }
}

function watchStored(data, chatId) {
  let stream;
  try {
    stream = client.watch(data.streamKey, { afterSeq: Math.max(0, data.lastSeq) });
  } catch (_) {
    return; // the client is closed: shown as stored
  }
  // What the record holds is the text through lastSeq; the relay sends what follows.
  stream.model = data.model;
  stream.text = data.text;
  stream.reasoning = data.reasoning;
  stream.refusal = data.refusal;
  stream.toolCalls = data.toolCalls.map((call) => ({ ...call }));
  const parts = renderPane(stream, data.label);
  parts.pane.dataset.pid = data.pid;
  draw(parts, stream);
  const shown = ui.answers.querySelector(`.answer[data-pid="${CSS.escape(data.pid)}"]`);
  if (shown) shown.replaceWith(parts.pane);
  follow(stream, parts, data, chatId);
}

// Another tab changed a conversation: show it (answers this tab follows keep their own
// records), and watch what runs there.
window.addEventListener("storage", (event) => {
  if (event.key === INDEX_KEY) {
    fillChatList();
    return;
  }
  if (!chat || event.key !== CHAT_PREFIX + chat.id) return;
  const incoming = loadChat(chat.id);
  if (!incoming) return;
  for (const turn of incoming.turns) {
    for (const version of turn.versions) {
      version.panes = version.panes.map((p) => (live.has(p.pid) ? live.get(p.pid).data : p));
    }
  }
  const before = shapeOf(chat);
  chat = incoming;
  if (shapeOf(incoming) !== before) renderChat();
  followStoredAnswers();
});

/** What decides whether another tab's change needs a redraw: turns, versions, shown
 * versions, and the records not followed here (their status and stream). */
function shapeOf(c) {
  return JSON.stringify(c.turns.map((t) => [t.prompt, t.current, t.notice || "",
    t.versions.map((v) => v.panes.map((p) => (live.has(p.pid) ? p.pid : [p.pid, p.status, p.streamKey, p.text.length])))]));
}

// ------------------------------------------------------------------ actions

/** Send while idle; while an answer streams Send becomes Stop (both with Compare on). */
function updateButtons() {
  const open = Boolean(client) && client.state === "open";
  const busy = running.size > 0;
  const canSendMore = !busy || ui.compare.checked;
  ui.send.hidden = !canSendMore;
  ui.send.disabled = !open || !canSendMore;
  ui.stop.hidden = !busy;
  ui.stop.disabled = !busy;
  for (const button of ui.answers.querySelectorAll(".regenerate")) {
    button.disabled = busy || !open;
  }
}

/**
 * Start a new version of `turn`'s answers (shown in `node`), or return null when the prompt
 * alone is more than the relay takes (said in the turn; nothing is sent). The oldest
 * history that does not fit in one start is left out (and the turn says so).
 */
function startTurn(turn, node) {
  const tools = ui.useTool.checked ? [SAMPLE_TOOL] : undefined;
  const models = ui.compare.checked ? [ui.model.value, ui.model2.value] : [ui.model.value];
  const longestModel = models.reduce((a, b) => (b.length > a.length ? b : a), "");
  const history = historyBefore(chat.turns.indexOf(turn));
  const fit = fitMessages([...history, { role: "user", content: turn.prompt }], client.limits,
    { model: longestModel, tools, maxFrameBytes: frameCap });
  if (!fit.fits) {
    node.replaceChildren(el("div", "user", turn.prompt),
      el("div", "context-notice", "This message is too long for the relay to accept: shorten it and send it again."));
    return null;
  }
  const messages = fit.messages;
  lastStartBytes = fit.frameBytes;
  if (fit.dropped) {
    const earlier = fit.dropped === 1 ? "1 earlier message was" : `${fit.dropped} earlier messages were`;
    turn.notice = `${earlier} left out of this request: the conversation is longer than the relay accepts at once.`;
  } else {
    turn.notice = "";
  }
  const version = { panes: [] };
  turn.versions.push(version);
  turn.current = turn.versions.length - 1;
  const follows = models.map((model, i) => {
    const stream = client.start({ model, messages, tools });
    const label = models.length > 1 ? `${model} (${"AB"[i]})` : model;
    const data = paneRecord(model, label);
    version.panes.push(data);
    const parts = renderPane(stream, label);
    parts.pane.dataset.pid = data.pid;
    return follow(stream, parts, data, chat.id); // (registers it as live at once)
  });
  for (const old of ui.answers.querySelectorAll(".regenerate")) old.remove(); // only the last turn
  renderTurn(turn, node);
  saveStructure();
  scrollToLatest();
  updateButtons();
  return Promise.all(follows);
}

async function send(event) {
  event.preventDefault();
  const prompt = ui.prompt.value.trim();
  if (!prompt || !client || client.state !== "open") return;
  if (running.size && !ui.compare.checked) return; // one answer at a time (Stop first)
  ui.prompt.value = "";
  ui.empty.hidden = true;
  const node = el("article", "turn");
  ui.answers.append(node);
  const turn = { prompt, notice: "", current: 0, versions: [] };
  chat.turns.push(turn);
  if (chat.turns.length === 1) chat.title = prompt.length > 60 ? prompt.slice(0, 57) + "…" : prompt;
  if (!startTurn(turn, node)) {
    chat.turns.pop(); // nothing was sent: keep the prompt to shorten, not the turn
    ui.prompt.value = prompt;
  }
}

async function regenerateLast() {
  const turn = chat.turns[chat.turns.length - 1];
  if (!turn || running.size || !client || client.state !== "open") return;
  const node = [...ui.answers.querySelectorAll(".turn")].find((n) => n.turnData === turn);
  if (node) startTurn(turn, node);
}

function stopAll() {
  for (const stream of running.keys()) stream.cancel();
}

ui.composer.addEventListener("submit", send);
ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    if (!ui.send.hidden && !ui.send.disabled) ui.composer.requestSubmit();
  }
});
ui.stop.addEventListener("click", stopAll);
ui.clear.addEventListener("click", () => {
  // Forget this conversation (its running answers are stopped) and start an empty one.
  stopAll();
  localStorage.removeItem(CHAT_PREFIX + chat.id);
  writeIndex(chatIndex().filter((e) => e.id !== chat.id));
  showChat(freshChat());
});
ui.newChat.addEventListener("click", () => {
  // The current conversation stays in the list (its running answers go on and are saved).
  if (chat.turns.length) showChat(freshChat());
});
ui.chatSelect.addEventListener("change", () => {
  const picked = loadChat(ui.chatSelect.value);
  if (picked && picked.id !== chat.id) showChat(picked);
});
ui.compare.addEventListener("change", () => {
  ui.model2.disabled = !ui.compare.checked;
  updateButtons();
});
ui.answers.addEventListener("click", copyCodeFromClick);
ui.reconnect.addEventListener("click", connect);
ui.token.addEventListener("keydown", (e) => {
  if (e.key === "Enter") {
    e.preventDefault();
    connect();
  }
});
// Leaving (a reload, a closed tab): write the answers' progress now, not 300 ms later, so
// the next page resumes from where this one was.
window.addEventListener("pagehide", () => {
  for (const chatId of [...progressTimers.keys()]) saveProgress(chatId, true);
});
// Back online: reconnect now rather than after the backoff wait.
window.addEventListener("online", () => {
  if (client) client.reconnectNow();
});

takeTokenFromFragment();
showChat(loadChat(sessionStorage.getItem(CURRENT_KEY)) || loadChat(chatIndex()[0]?.id) || freshChat());
connect();
