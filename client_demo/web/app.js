// The chat page: UI only; the protocol lives in relay-client.js, Markdown in markdown.js.
// Model text is untrusted: it reaches the DOM only as sanitised Markdown (markdown.js) or
// through textContent (reasoning, refusals, tool calls, the user's own messages).

import { RelayClient, StreamError, fitMessages } from "./relay-client.js";
import { MarkdownView, copyCodeFromClick } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const ui = {
  state: $("conn-state"), message: $("conn-message"), details: $("conn-details"), detail: $("conn-detail"),
  tokenGroup: $("token-group"), token: $("token"), reconnect: $("reconnect"),
  model: $("model"), compare: $("compare"), model2: $("model2"), useTool: $("use-tool"),
  answers: $("answers"), empty: $("empty-state"), emptyModels: $("empty-models"),
  composer: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"), clear: $("clear"),
  jump: $("jump-latest"),
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
const chatHistory = []; // earlier turns: user + first answer, when it completed with text
let lastTurn = null; // {turn, prompt, historyLength}: what Regenerate asks again
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
  const c = new RelayClient(undefined, { token: () => ui.token.value.trim() });
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
    bits.push(`resumed ${stream.resumes}× after a dropped connection (last: close ${last.closeCode}, after seq ${last.afterSeq})`);
  }
  if (stream.finish && stream.finish.error) bits.push(`error: ${stream.finish.error.code}: ${stream.finish.error.message}`);
  return bits.join(" · ");
}

function technicalDetails(text) {
  const details = el("details");
  details.append(el("summary", "", "details"), el("span", "", text));
  return details;
}

async function follow(stream, parts) {
  running.set(stream, parts);
  updateButtons();
  try {
    for await (const frame of stream) {
      void frame; // the stream keeps text/toolCalls/usage; draw from them
      drawSoon(parts, stream);
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
  } finally {
    running.delete(stream);
    updateButtons();
    afterContentChange();
  }
  return stream;
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
 * Start the turn's answers, or return null when the prompt alone is more than the relay
 * takes (said in the turn; nothing is sent). The oldest history that does not fit in one
 * start is left out (and the turn says so).
 */
function startTurn(prompt, history, turn) {
  const tools = ui.useTool.checked ? [SAMPLE_TOOL] : undefined;
  const models = ui.compare.checked ? [ui.model.value, ui.model2.value] : [ui.model.value];
  const longestModel = models.reduce((a, b) => (b.length > a.length ? b : a), "");
  const fit = fitMessages([...history, { role: "user", content: prompt }], client.limits,
    { model: longestModel, tools, maxFrameBytes: frameCap });
  if (!fit.fits) {
    turn.replaceChildren(el("div", "user", prompt),
      el("div", "context-notice", "This message is too long for the relay to accept: shorten it and send it again."));
    return null;
  }
  const messages = fit.messages;
  lastStartBytes = fit.frameBytes;
  const row = el("div", "answers-row");
  const actions = el("div", "answer-actions");
  turn.replaceChildren(el("div", "user", prompt), row, actions);
  if (fit.dropped) {
    const earlier = fit.dropped === 1 ? "1 earlier message was" : `${fit.dropped} earlier messages were`;
    turn.insertBefore(el("div", "context-notice",
      `${earlier} left out of this request: the conversation is longer than the relay accepts at once.`), row);
  }
  const follows = models.map((model, i) => {
    const stream = client.start({ model, messages, tools });
    const parts = renderPane(stream, models.length > 1 ? `${model} (${"AB"[i]})` : model);
    row.append(parts.pane);
    return follow(stream, parts);
  });
  for (const old of ui.answers.querySelectorAll(".regenerate")) old.remove(); // only the last answer
  const regenerate = el("button", "regenerate", "Regenerate");
  regenerate.type = "button";
  regenerate.title = "Ask the same question again";
  regenerate.addEventListener("click", () => regenerateLast());
  actions.append(regenerate);
  lastTurn = { turn, prompt, historyLength: history.length };
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
  const turn = el("article", "turn");
  ui.answers.append(turn);
  const history = [...chatHistory];
  const follows = startTurn(prompt, history, turn);
  if (!follows) {
    ui.prompt.value = prompt; // nothing was sent: keep it to shorten
    return;
  }
  const [first] = await follows;
  remember(prompt, first);
}

function remember(prompt, first) {
  if (first.status === "completed" && first.text && !first.toolCalls.length) {
    chatHistory.push({ role: "user", content: prompt }, { role: "assistant", content: first.text });
  }
}

async function regenerateLast() {
  if (!lastTurn || running.size || !client || client.state !== "open") return;
  const { turn, prompt, historyLength } = lastTurn;
  chatHistory.length = historyLength; // forget the answer being replaced
  const follows = startTurn(prompt, [...chatHistory], turn);
  if (!follows) return;
  const [first] = await follows;
  remember(prompt, first);
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
  stopAll();
  ui.answers.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  chatHistory.length = 0;
  lastTurn = null;
  scrollToLatest();
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

takeTokenFromFragment();
connect();
