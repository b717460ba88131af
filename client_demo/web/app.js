// The chat page: UI only; the protocol lives in relay-client.js.
// Model text is untrusted: it only ever reaches the DOM through textContent.

import { RelayClient, StreamError } from "./relay-client.js";

const $ = (id) => document.getElementById(id);
const ui = {
  state: $("conn-state"), detail: $("conn-detail"), token: $("token"), reconnect: $("reconnect"),
  model: $("model"), compare: $("compare"), model2: $("model2"), useTool: $("use-tool"),
  answers: $("answers"), composer: $("composer"), prompt: $("prompt"), send: $("send"),
  stop: $("stop"), clear: $("clear"),
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

function showState(state, detail = {}) {
  ui.state.textContent = state;
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
  ui.send.disabled = state !== "open";
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
    showState(state, detail);
    if (state === "open") fillModels(c.models);
    // A drop changes running streams without a frame (e.g. to "resuming"): redraw them.
    for (const [stream, parts] of running) update(parts, stream);
  };
  showState(c.state);
}

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
  head.append(el("span", "answer-model", label), el("span", "answer-status", "pending"));
  const parts = {
    pane,
    status: head.lastChild,
    reasoning: el("div", "answer-reasoning"),
    text: el("div", "answer-text"),
    tools: el("ul", "tool-calls"),
    meta: el("div", "answer-meta"),
  };
  parts.status.dataset.status = "pending";
  pane.append(head, parts.reasoning, parts.text, parts.tools, parts.meta);
  return parts;
}

function update(parts, stream) {
  parts.text.textContent = stream.text;
  parts.reasoning.textContent = stream.reasoning;
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
}

function setStatus(parts, status) {
  parts.status.textContent = status;
  parts.status.dataset.status = status;
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

async function follow(stream, parts) {
  running.set(stream, parts);
  ui.stop.disabled = false;
  try {
    for await (const frame of stream) {
      void frame; // the stream keeps text/toolCalls/usage; draw from them
      update(parts, stream);
    }
    update(parts, stream);
    parts.meta.textContent = describeEnd(stream);
  } catch (err) {
    update(parts, stream);
    const code = err instanceof StreamError ? err.code : "error";
    setStatus(parts, `error: ${code}`);
    parts.status.dataset.status = "error";
    parts.status.dataset.error = code;
    parts.meta.textContent = `${err.message}${stream.text ? " · partial text kept above" : ""}`;
  } finally {
    running.delete(stream);
    ui.stop.disabled = running.size === 0;
  }
  return stream;
}

// ------------------------------------------------------------------ actions

async function send(event) {
  event.preventDefault();
  const prompt = ui.prompt.value.trim();
  if (!prompt || !client || client.state !== "open") return;
  ui.prompt.value = "";
  const messages = [...chatHistory, { role: "user", content: prompt }];
  const tools = ui.useTool.checked ? [SAMPLE_TOOL] : undefined;
  const models = ui.compare.checked ? [ui.model.value, ui.model2.value] : [ui.model.value];

  const turn = el("article", "turn");
  turn.append(el("div", "user", prompt));
  const row = el("div", "answers-row");
  turn.append(row);
  ui.answers.append(turn);

  const follows = models.map((model, i) => {
    const stream = client.start({ model, messages, tools });
    const parts = renderPane(stream, models.length > 1 ? `${model} (${"AB"[i]})` : model);
    row.append(parts.pane);
    return follow(stream, parts);
  });
  turn.scrollIntoView({ block: "end" });
  const [first] = await Promise.all(follows);
  if (first.status === "completed" && first.text && !first.toolCalls.length) {
    chatHistory.push({ role: "user", content: prompt }, { role: "assistant", content: first.text });
  }
}

function stopAll() {
  for (const stream of running.keys()) stream.cancel();
}

ui.composer.addEventListener("submit", send);
ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.stop.addEventListener("click", stopAll);
ui.clear.addEventListener("click", () => {
  ui.answers.replaceChildren();
  chatHistory.length = 0;
});
ui.compare.addEventListener("change", () => { ui.model2.disabled = !ui.compare.checked; });
ui.reconnect.addEventListener("click", connect);
ui.token.addEventListener("keydown", (e) => {
  if (e.key === "Enter") {
    e.preventDefault();
    connect();
  }
});

takeTokenFromFragment();
connect();
