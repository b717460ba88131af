// markdown.js: model text -> safe, incrementally rendered Markdown (marked + DOMPurify).
//
//   import { MarkdownView, renderMarkdown } from "./markdown.js";
//   const view = new MarkdownView(element);
//   view.update(stream.text);        // as often as you like: the work is done once per frame
//   view.flush();                    // render now (e.g. when the stream ends)
//
// Safety: the model's text is untrusted. Raw HTML in it is shown as text (never parsed),
// and everything marked produces goes through DOMPurify before it touches the DOM (no
// script, no event handlers, no javascript: URLs). Links open in a new tab without a
// referrer; images are shown as links (the page's CSP would block remote images anyway).
//
// Speed: re-rendering the whole answer for every token is O(n^2) over an answer. Instead the
// text is split into top-level blocks (paragraphs, lists, code blocks, tables...). A block is
// *committed* (rendered once, appended, never touched again) when the lexer sees another
// block after it within the complete lines received so far; only the last, still-growing
// block is re-rendered, at most once per animation frame. Looking at complete lines only
// matters: a half-received line ("2" of "2. item") can look like a paragraph that later
// joins the list above it. One known difference from rendering the whole text at once:
// a reference-style link ("[text][ref]") whose definition is in another block stays literal
// (marked resolves references while lexing, and blocks are lexed apart).

import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";

const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

const marked = new Marked({
  gfm: true,
  breaks: false,
  renderer: {
    // Raw HTML in model output is text, block or inline.
    html({ text }) {
      return escapeHtml(text);
    },
    image({ href, title, text }) {
      const label = escapeHtml(text || href || "image");
      const titleAttr = title ? ` title="${escapeHtml(title)}"` : "";
      return href ? `<a href="${escapeHtml(href)}"${titleAttr}>[image: ${label}]</a>` : label;
    },
  },
});

const purifier = DOMPurify(window);
purifier.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});
const PURIFY = {
  RETURN_DOM_FRAGMENT: true,
  FORBID_TAGS: ["style", "img", "svg", "math", "form", "iframe", "video", "audio", "source"],
  FORBID_ATTR: ["style", "id", "name"],
};

/** Sanitised DOM nodes for marked tokens, with the page's touches (copy buttons, table scroll). */
function tokensToFragment(tokens) {
  const fragment = purifier.sanitize(marked.parser(tokens).trim(), PURIFY);
  decorate(fragment);
  return fragment;
}

/** Code blocks get a header with the language and a Copy button; tables scroll sideways. */
function decorate(root) {
  for (const pre of root.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    const language = code && [...code.classList].find((c) => c.startsWith("language-"));
    const block = document.createElement("div");
    block.className = "code-block";
    const head = document.createElement("div");
    head.className = "code-head";
    const lang = document.createElement("span");
    lang.className = "code-lang";
    lang.textContent = language ? language.slice("language-".length) : "";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy-code";
    copy.textContent = "Copy";
    copy.title = "Copy this code";
    head.append(lang, copy);
    pre.replaceWith(block);
    block.append(head, pre);
  }
  for (const table of root.querySelectorAll("table")) {
    const wrap = document.createElement("div");
    wrap.className = "table-wrap";
    table.replaceWith(wrap);
    wrap.append(table);
  }
}

/** The whole of `text`, rendered at once (used for short texts and by the benchmark). */
export function renderMarkdown(text) {
  return tokensToFragment(marked.lexer(text));
}

/** Renders a growing Markdown text into `element`; see the header comment. */
export class MarkdownView {
  constructor(element, { schedule = defaultSchedule } = {}) {
    this.element = element;
    this.schedule = schedule;
    this.text = "";
    this.committed = 0; // characters of `text` whose blocks are rendered for good
    this.tail = document.createElement("div");
    this.tail.className = "md-tail";
    this.element.replaceChildren(this.tail);
    this.renders = 0; // how many times the growing block was rendered (for the benchmark)
    this._pending = false;
  }

  /** Show `text`: the answer so far, which only ever grows (a shorter text starts over).
   *  Rendered by the next `schedule` callback (the next animation frame by default). */
  update(text) {
    // Only lengths are compared: a startsWith() per token would copy the whole text (V8
    // flattens a string built by +=), which is the O(n^2) this module exists to avoid.
    if (text.length === this.text.length) return;
    if (text.length < this.text.length) this._reset();
    this.text = text;
    if (!this._pending) {
      this._pending = true;
      this.schedule(() => this.flush());
    }
  }

  /** Render whatever has not been rendered yet, now. */
  flush() {
    this._pending = false;
    const rest = this.text.slice(this.committed);
    this._commitFinishedBlocks(rest);
    this.tail.replaceChildren(tokensToFragment(marked.lexer(this.text.slice(this.committed))));
    this.renders += 1;
  }

  _commitFinishedBlocks(rest) {
    const lastNewline = rest.lastIndexOf("\n");
    if (lastNewline < 0) return;
    const lines = rest.slice(0, lastNewline + 1);
    const tokens = marked.lexer(lines);
    let last = tokens.length - 1;
    while (last >= 0 && tokens[last].type === "space") last -= 1;
    if (last <= 0) return; // at most one block so far: it may still grow
    const done = tokens.slice(0, last);
    const raw = done.map((t) => t.raw).join("");
    // marked normalises \r\n; commit only when its tokens cover our text exactly.
    if (!lines.startsWith(raw)) return;
    this.element.insertBefore(tokensToFragment(done), this.tail);
    this.committed += raw.length;
  }

  _reset() {
    this.committed = 0;
    this.element.replaceChildren(this.tail);
  }
}

function defaultSchedule(callback) {
  // One render per animation frame while the page is visible; the timer covers hidden tabs,
  // where requestAnimationFrame does not run.
  let done = false;
  const run = () => {
    if (done) return;
    done = true;
    callback();
  };
  requestAnimationFrame(run);
  setTimeout(run, 250);
}

/** Click handler for Copy buttons (install once on a container; works for re-rendered blocks). */
export async function copyCodeFromClick(event) {
  const button = event.target.closest && event.target.closest("button.copy-code");
  if (!button) return;
  const code = button.closest(".code-block").querySelector("pre code, pre");
  const text = code.textContent;
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch (_) {
    // Clipboard API unavailable (plain http on a LAN address is not a secure context).
    const range = document.createRange();
    range.selectNodeContents(code);
    const selection = getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    try {
      ok = document.execCommand("copy");
    } catch (_) {
      ok = false;
    }
    selection.removeAllRanges();
  }
  button.textContent = ok ? "Copied" : "Copy failed";
  button.dataset.copied = ok ? "yes" : "no";
  setTimeout(() => {
    button.textContent = "Copy";
    delete button.dataset.copied;
  }, 1500);
}
