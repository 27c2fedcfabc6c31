// loopd web chat: the reference client of /api/v1, with the session cookie.
// Plain JavaScript, no build step. Model output is rendered as Markdown and
// sanitized with DOMPurify; everything else goes in as text.
"use strict";

const view = document.getElementById("view");
const banner = document.getElementById("banner");
const nav = document.getElementById("nav");

// ---------- small helpers ----------

/** Makes an element; strings become text nodes, never HTML. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function showError(message) {
  banner.textContent = message;
  banner.hidden = !message;
}

class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code;
  }
}

async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const text = await res.text();
  const data = text ? JSON.parse(text) : null;
  if (!res.ok) {
    if (res.status === 401 && !path.startsWith("/api/auth/login")) {
      go("#/login");
    }
    throw new ApiError(res.status, data);
  }
  return data;
}

function go(hash) {
  if (location.hash !== hash) location.hash = hash;
  else route();
}

function escapeHtml(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

let markedReady = false;

/** Model output as Markdown: raw HTML in it shows as text, and the result is sanitized. */
function markdown(text) {
  if (!markedReady) {
    marked.use({ renderer: { html: (token) => escapeHtml(token.text ?? token.raw ?? "") } });
    markedReady = true;
  }
  return DOMPurify.sanitize(marked.parse(text, { gfm: true, breaks: true }));
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

/** Parses an SSE byte stream; calls onEvent({name, id, data}) per frame. */
async function readSse(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const frame = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let name = "message", id = null, data = "";
      for (const line of frame.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("id: ")) id = Number(line.slice(4));
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (name !== "ping") onEvent({ name, id, data: JSON.parse(data || "{}") });
    }
  }
}

// ---------- routing ----------

let leaving = () => {};

async function route() {
  leaving();
  leaving = () => {};
  showError("");
  const hash = location.hash || "#/loops";
  try {
    if (hash === "#/login") return renderLogin();
    const me = await api("GET", "/api/auth/me").catch(() => null);
    if (!me) return go("#/login");
    nav.hidden = false;
    refreshWaiting();
    if (hash.startsWith("#/loop/")) return await renderChat(decodeURIComponent(hash.slice(7)));
    if (hash === "#/settings") return await renderSettings();
    return await renderLoops();
  } catch (e) {
    showError(e.message);
  }
}

window.addEventListener("hashchange", route);
document.getElementById("logout").addEventListener("click", async () => {
  await api("POST", "/api/auth/logout").catch(() => {});
  nav.hidden = true;
  go("#/login");
});

// ---------- login ----------

function renderLogin() {
  nav.hidden = true;
  const user = h("input", { type: "text", id: "username", name: "username", autocomplete: "username", required: true });
  const pass = h("input", { type: "password", id: "password", name: "password", autocomplete: "current-password", required: true });
  const form = h("form", { class: "card login", "aria-label": "Log in" },
    h("h1", {}, "Log in to loopd"),
    h("div", { class: "field" }, h("label", { for: "username" }, "Username"), user),
    h("div", { class: "field" }, h("label", { for: "password" }, "Password"), pass),
    h("button", { type: "submit", class: "primary" }, "Log in"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await api("POST", "/api/auth/login", { username: user.value, password: pass.value });
      go("#/loops");
    } catch (e) {
      showError(e.message);
    }
  });
  view.replaceChildren(form);
  user.focus();
}

// ---------- loops ----------

async function renderLoops() {
  const input = (id, label, hint) => h("div", { class: "field" },
    h("label", { for: id }, label), h("input", { type: "text", id, name: id, placeholder: hint || "" }));
  const form = h("form", { class: "card", "aria-label": "New loop" },
    h("div", { class: "row" },
      input("title", "Title", "untitled"),
      input("profiles", "Profiles", "comma-separated"),
      input("vault", "Vault", "default"),
      input("repo", "Repo", "none"),
      h("button", { type: "submit", class: "primary" }, "Create loop")));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(form);
    const body = { title: f.get("title") || undefined };
    const profiles = String(f.get("profiles") || "").split(",").map((s) => s.trim()).filter(Boolean);
    if (profiles.length) body.profiles = profiles;
    if (f.get("vault")) body.vault = f.get("vault");
    if (f.get("repo")) body.repo = f.get("repo");
    try {
      const created = await api("POST", "/api/v1/loops", body);
      go(`#/loop/${encodeURIComponent(created.id)}`);
    } catch (e) {
      showError(e.message);
    }
  });
  const loops = new LoopList({ archive: true });
  view.replaceChildren(h("h1", {}, "Loops"), form, h("h2", {}, "Most recently active"), loops.el);
  await loops.load();
  leaving = () => loops.close();
}

/** The user's loops: search by title, archived ones on demand, paging;
 * each with a busy dot and a badge when it waits on a choice. */
class LoopList {
  constructor({ current = null, archive = false } = {}) {
    Object.assign(this, { current, archive, after: null });
    this.search = h("input", { type: "search", name: "q", placeholder: "Search titles", "aria-label": "Search loops" });
    this.archived = h("input", { type: "checkbox", name: "archived", id: `archived-${Math.random().toString(36).slice(2)}` });
    this.list = h("ul", { class: "plain loops", "aria-label": "Loops" });
    this.more = h("button", { type: "button", hidden: true, onclick: () => this.load(true) }, "More loops");
    this.el = h("div", { class: "looplist" },
      h("div", { class: "row" }, this.search,
        h("label", { class: "small", for: this.archived.id }, this.archived, " Archived")),
      this.list, this.more);
    let typing = null;
    this.search.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(() => this.load(), 200); });
    this.archived.addEventListener("change", () => this.load());
    this.timer = setInterval(() => { if (!this.after) this.load(); }, 10000);
  }

  close() { clearInterval(this.timer); }

  async load(more = false) {
    const q = new URLSearchParams({ limit: "50" });
    if (this.search.value.trim()) q.set("q", this.search.value.trim());
    if (this.archived.checked) q.set("archived", "true");
    if (more && this.after) q.set("after", this.after);
    try {
      const page = await api("GET", `/api/v1/loops?${q}`);
      const rows = page.data.map((l) => this.row(l));
      if (more) this.list.append(...rows); else this.list.replaceChildren(...rows);
      if (!more && !rows.length) this.list.replaceChildren(h("li", { class: "muted" }, "No loops."));
      this.after = page.has_more ? page.last_id : null;
      this.more.hidden = !page.has_more;
    } catch (e) { showError(e.message); }
  }

  row(l) {
    const state = l.pending_choice_id ? "waits for you" : l.busy ? "running" : l.archived ? "archived" : "idle";
    return h("li", { class: l.id === this.current ? "current" : "" },
      h("span", { class: l.busy ? "dot busy" : "dot", role: "img", title: state, "aria-label": state }),
      h("a", { class: "title", href: `#/loop/${encodeURIComponent(l.id)}`, "aria-current": l.id === this.current ? "page" : null }, l.title),
      l.pending_choice_id ? h("span", { class: "badge" }, "prompt") : null,
      h("span", { class: "muted small" }, when(l.last_active_at)),
      this.archive && !l.archived ? h("button", {
        type: "button", class: "danger", "aria-label": `Archive ${l.title}`,
        onclick: async () => {
          try { await api("DELETE", `/api/v1/loops/${l.id}`); this.load(); } catch (e) { showError(e.message); }
        },
      }, "Archive") : null);
  }
}

// ---------- chat ----------

async function renderChat(loopId) {
  const loop = await api("GET", `/api/v1/loops/${encodeURIComponent(loopId)}`);
  const page = await api("GET", `/api/v1/loops/${encodeURIComponent(loopId)}/turns?limit=50`);
  const chat = new Chat(loop);
  // Beside the conversation on a wide screen (hidden on a phone by the CSS).
  const side = new LoopList({ current: loop.id });
  view.replaceChildren(h("div", { class: "split" },
    h("nav", { class: "side", "aria-label": "Your loops" }, side.el), chat.el));
  side.load();
  for (const t of page.data) chat.addHistory(t);
  // The latest turns in view; older ones load when scrolled up to.
  window.scrollTo(0, document.body.scrollHeight);
  chat.olderFrom(page.has_more ? page.first_id : null);
  chat.follow(page.last_seq);
  leaving = () => { chat.close(); side.close(); };
  chat.input.focus();
}

class Chat {
  constructor(loop) {
    this.loop = loop;
    this.turns = new Map();
    this.seen = new Set();
    this.sentContents = [];
    this.older = h("div", { class: "older muted small", hidden: true }, "Loading older turns…");
    this.log = h("div", { class: "log", role: "log", "aria-label": "Conversation" }, this.older);
    this.input = h("textarea", { id: "message", name: "message", rows: 2, "aria-label": "Message",
      placeholder: "Message (Enter sends, Shift+Enter for a new line, Esc interrupts)" });
    this.sendBtn = h("button", { type: "submit", class: "primary" }, "Send");
    this.mode = h("select", { id: "turn-mode", name: "turn-mode", "aria-label": "Permission mode of this message" },
      h("option", { value: "" }, "loop's mode"), ...MODES.map((m) => h("option", { value: m }, m)));
    this.stopBtn = h("button", { type: "button", "aria-label": "Interrupt the running turn", hidden: true, onclick: () => this.interrupt() }, "Interrupt");
    const composer = h("form", { class: "composer", "aria-label": "Send a message" },
      h("div", { class: "field" }, this.input),
      this.mode, this.stopBtn, this.sendBtn);
    composer.addEventListener("submit", (ev) => { ev.preventDefault(); this.send(); });
    this.input.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); this.send(); }
    });
    this.onKey = (ev) => { if (ev.key === "Escape") this.interrupt(); };
    document.addEventListener("keydown", this.onKey);
    this.files = new FilesPanel(loop);
    const filesBtn = h("button", { type: "button", "aria-expanded": "false", onclick: () => {
      const shown = this.files.toggle();
      filesBtn.setAttribute("aria-expanded", String(shown));
    } }, "Files");
    this.el = h("section", { class: "chat" },
      h("div", { class: "chat-head" }, h("h1", {}, loop.title), filesBtn, h("a", { href: "#/loops", class: "small" }, "All loops")),
      this.files.el, this.log, composer);
  }

  close() {
    if (this.es) this.es.close();
    if (this.watchingTop) this.watchingTop.disconnect();
    document.removeEventListener("keydown", this.onKey);
  }

  /** Watches the loop from `after` on; EventSource resumes with Last-Event-ID by itself. */
  follow(after) {
    this.es = new EventSource(`/api/v1/loops/${encodeURIComponent(this.loop.id)}/events?after=${after}`);
    const names = ["user_message", "queued", "started", "snapshot", "assistant_delta", "thinking_delta",
      "tool_call", "tool_result", "requires_choice", "choice_resolved", "done", "interrupted", "error"];
    for (const name of names) {
      this.es.addEventListener(name, (ev) => {
        this.apply({ name, id: ev.lastEventId ? Number(ev.lastEventId) : null, data: JSON.parse(ev.data) });
      });
    }
  }

  turn(id, origin, prepend = false) {
    let t = this.turns.get(id);
    if (!t) {
      t = new TurnView(this, id, origin || "user");
      this.turns.set(id, t);
      if (prepend) this.log.insertBefore(t.el, this.older.nextSibling); else this.log.append(t.el);
    }
    return t;
  }

  /** Loads the turns before `before` when the top of the conversation comes into view. */
  olderFrom(before) {
    this.before = before;
    this.older.hidden = !before;
    if (!before || this.watchingTop) return;
    this.watchingTop = new IntersectionObserver(async (seen) => {
      if (!seen.some((e) => e.isIntersecting) || !this.before || this.loadingOlder) return;
      this.loadingOlder = true;
      try {
        const page = await api("GET", `/api/v1/loops/${encodeURIComponent(this.loop.id)}/turns?limit=50&before=${encodeURIComponent(this.before)}`);
        const height = document.body.scrollHeight;
        for (const t of [...page.data].reverse()) this.addHistory(t, true);
        window.scrollBy(0, document.body.scrollHeight - height); // stay where the reader was
        this.before = page.has_more ? page.first_id : null;
        this.older.hidden = !this.before;
      } catch (e) { showError(e.message); } finally { this.loadingOlder = false; }
    });
    this.watchingTop.observe(this.older);
  }

  addHistory(r, prepend = false) {
    const t = this.turn(r.turn_id, r.origin, prepend);
    Object.assign(t, {
      content: r.content, text: r.assistant_text, thinking: r.thinking_text, status: r.status,
      usage: r.usage, error: r.error,
    });
    for (const c of r.tool_calls) {
      t.tools.set(c.tool_use_id, { tool: c.tool, summary: c.input_summary, input: c.input, ok: c.ok,
        output: c.output, truncated: c.truncated, open: false });
    }
    for (const c of r.choices) t.choices.set(c.choice_id, { ...c, resolved: c.answer !== null });
    t.render();
  }

  /** One event, from either stream; the seq makes sure it is applied once. */
  apply(ev) {
    if (ev.id !== null) {
      if (this.seen.has(ev.id)) return;
      this.seen.add(ev.id);
    }
    const d = ev.data;
    if (!d.turn_id && ev.name === "error") return showError(`${d.code}: ${d.message}`);
    const t = this.turn(d.turn_id, d.origin);
    switch (ev.name) {
      case "user_message": t.content = d.content; t.status = t.status || "queued"; break;
      case "queued": t.status = "queued"; t.position = d.position; break;
      case "started": t.status = "running"; t.origin = d.origin || t.origin; break;
      case "snapshot":
        t.status = "running"; t.text = d.assistant_text_so_far;
        if (d.pending_choice) t.choices.set(d.pending_choice.choice_id, { ...d.pending_choice, resolved: false });
        break;
      case "assistant_delta": t.text += d.text; break;
      case "thinking_delta": t.thinking += d.text; break;
      case "tool_call":
        t.tools.set(d.tool_use_id, { tool: d.tool, summary: d.input_summary, input: d.input, ok: null, open: false });
        break;
      case "tool_result": {
        const c = t.tools.get(d.tool_use_id);
        if (c) Object.assign(c, { ok: d.ok, output: d.output, truncated: !!d.truncated });
        break;
      }
      case "requires_choice":
        t.choices.set(d.choice_id, { choice_id: d.choice_id, kind: d.kind, payload: d.payload, resolved: false });
        refreshWaiting();
        break;
      case "choice_resolved": {
        const c = t.choices.get(d.choice_id);
        if (c) Object.assign(c, { resolved: true, source: d.source, answer: d.answer });
        refreshWaiting();
        break;
      }
      case "done": t.status = "done"; t.usage = d.usage; break;
      case "interrupted": t.status = "interrupted"; break;
      case "error": t.status = "error"; t.error = { code: d.code, message: d.message }; break;
    }
    // The sender's own stream carries no user_message: it fills the words in.
    if (!t.content && t.origin === "user" && this.sentContents.length && ev.name !== "user_message") {
      t.content = this.sentContents.shift();
    }
    t.schedule();
    this.updateBusy();
  }

  updateBusy() {
    const busy = [...this.turns.values()].some((t) => t.status === "running" || t.status === "queued");
    this.stopBtn.hidden = !busy;
  }

  async send() {
    const content = this.input.value;
    if (!content.trim()) return;
    this.input.value = "";
    this.sentContents.push(content);
    try {
      const res = await fetch(`/api/v1/loops/${encodeURIComponent(this.loop.id)}/messages`, {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() },
        body: JSON.stringify(this.mode.value ? { content, permission_mode: this.mode.value } : { content }),
      });
      if (!res.ok) {
        this.sentContents.pop();
        throw new ApiError(res.status, await res.json().catch(() => null));
      }
      await readSse(res.body, (ev) => this.apply(ev));
    } catch (e) {
      showError(e.message);
    }
  }

  async interrupt() {
    try {
      await api("POST", `/api/v1/loops/${encodeURIComponent(this.loop.id)}/interrupt`);
    } catch (e) {
      showError(e.message);
    }
  }

  async answer(choiceId, body) {
    try {
      await api("POST", `/api/v1/loops/${encodeURIComponent(this.loop.id)}/choices/${encodeURIComponent(choiceId)}`, body);
    } catch (e) {
      showError(e.message);
    }
  }
}

class TurnView {
  constructor(chat, id, origin) {
    Object.assign(this, { chat, id, origin, content: "", text: "", thinking: "", status: "", position: 0,
      usage: null, error: null, tools: new Map(), choices: new Map(), choiceEls: new Map(), pending: false });
    this.userEl = h("div", { class: "user" });
    this.thinkingEl = h("details", { class: "thinking", hidden: true }, h("summary", {}, "Thinking"), h("pre"));
    this.toolsEl = h("div", { class: "tools" });
    this.textEl = h("div", { class: "md" });
    this.choicesEl = h("div", { class: "choices" });
    this.statusEl = h("div", { class: "status" });
    this.el = h("article", { class: "turn", "data-turn": id },
      this.userEl, h("div", { class: "agent" }, this.thinkingEl, this.toolsEl, this.textEl, this.choicesEl, this.statusEl));
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      // Follow new output, unless the reader scrolled up to read something.
      const atBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 80;
      this.render();
      if (atBottom) window.scrollTo(0, document.body.scrollHeight);
    });
  }

  render() {
    this.userEl.hidden = !this.content;
    this.userEl.textContent = this.content;
    this.thinkingEl.hidden = !this.thinking;
    this.thinkingEl.querySelector("pre").textContent = this.thinking;
    // A row is made again only when its tool's state changed, so one being
    // opened or read is left alone while the turn streams on.
    this.toolEls = this.toolEls || new Map();
    this.toolsEl.replaceChildren(...[...this.tools.entries()].map(([id, c]) => {
      const key = `${c.ok}|${c.output == null ? "" : c.output.length}|${c.truncated}`;
      const kept = this.toolEls.get(id);
      if (kept && kept.key === key) return kept.el;
      if (kept && kept.el.open) c.open = true; // opened, its toggle not yet told
      const row = h("details", { class: `tool ${c.ok === true ? "ok" : c.ok === false ? "bad" : ""}`, open: c.open },
        h("summary", {}, h("span", { class: "name" }, c.tool), h("span", { class: "sum" }, c.summary || ""),
          h("span", { "aria-label": "outcome" }, c.ok === true ? "✓" : c.ok === false ? "✗" : "…")),
        toolInput(c.tool, c.input),
        c.output != null ? h("div", { class: "tool-output" }, h("div", { class: "small muted" }, "Output"),
          h("pre", {}, c.output), c.truncated ? h("div", { class: "small muted" }, "(cut at 16 KiB)") : null) : null);
      row.querySelector("summary").addEventListener("click", () => { c.open = !row.open; });
      row.addEventListener("toggle", () => { c.open = row.open; });
      this.toolEls.set(id, { key, el: row });
      return row;
    }));
    this.textEl.innerHTML = this.text ? markdown(this.text) : "";
    for (const [id, c] of this.choices) this.renderChoice(id, c);
    const s = this.statusEl;
    s.className = `status ${this.status}`;
    const usage = this.usage ? [
      this.usage.input_tokens != null ? `in ${this.usage.input_tokens}` : null,
      this.usage.output_tokens != null ? `out ${this.usage.output_tokens}` : null,
      this.usage.cost_usd != null ? `$${Number(this.usage.cost_usd).toFixed(4)}` : null,
      this.usage.duration_ms != null ? `${this.usage.duration_ms} ms` : null,
    ].filter(Boolean).join(" · ") : "";
    switch (this.status) {
      case "queued": s.replaceChildren(`Queued${this.position ? ` (position ${this.position})` : ""}`); break;
      case "running": s.replaceChildren(h("span", { class: "spinner", "aria-hidden": "true" }), " Working…"); break;
      case "done": s.replaceChildren(h("span", { class: "usage" }, usage)); break;
      case "interrupted": s.replaceChildren("Interrupted"); break;
      case "error": s.replaceChildren(`Error ${this.error.code}: ${this.error.message}`); break;
      default: s.replaceChildren();
    }
  }

  renderChoice(id, c) {
    let el = this.choiceEls.get(id);
    if (el && el.dataset.resolved === String(c.resolved)) return;
    const next = c.resolved ? this.resolvedChoice(c) : c.kind === "question" ? this.questionForm(c) : this.permissionCard(c);
    next.dataset.resolved = String(c.resolved);
    if (el) el.replaceWith(next); else this.choicesEl.append(next);
    this.choiceEls.set(id, next);
  }

  resolvedChoice(c) {
    const a = c.answer || {};
    const what = a.allow === true ? "Allowed" : a.allow === false ? "Denied" : a.answers ? "Answered" : "Resolved";
    const who = c.source ? ` (from the ${c.source === "web" ? "web" : "API"})` : "";
    const subject = c.kind === "permission" ? `${c.payload.tool}: ${c.payload.input_summary || ""}` : "Question";
    return h("div", { class: "choice resolved small" }, `${what}${who} — ${subject}`);
  }

  permissionCard(c) {
    const p = c.payload;
    return h("div", { class: "choice", role: "group", "aria-label": `Permission for ${p.tool}` },
      h("div", {}, h("strong", {}, p.tool), " wants to run:"),
      p.title ? h("div", {}, p.title) : null,
      h("pre", {}, p.input_summary || JSON.stringify(p.input, null, 2)),
      h("details", {}, h("summary", { class: "small" }, "Full input"), h("pre", {}, JSON.stringify(p.input, null, 2))),
      h("div", { class: "row" },
        h("button", { type: "button", class: "primary", onclick: () => this.chat.answer(c.choice_id, { allow: true }) }, "Allow"),
        h("button", { type: "button", class: "danger", onclick: () => this.chat.answer(c.choice_id, { allow: false }) }, "Deny")));
  }

  questionForm(c) {
    const form = h("form", { class: "choice", "aria-label": "Questions" });
    c.payload.questions.forEach((q, qi) => {
      const name = `${c.choice_id}-${qi}`;
      form.append(h("fieldset", {}, h("legend", {}, q.question),
        q.options.map((o, oi) => {
          const id = `${name}-${oi}`;
          return h("label", { class: "opt", for: id },
            h("input", { type: q.multi_select ? "checkbox" : "radio", id, name, value: o.label }),
            h("span", {}, o.label, o.description ? h("span", { class: "muted small" }, ` — ${o.description}`) : null));
        })));
    });
    form.append(h("button", { type: "submit", class: "primary" }, "Answer"));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const answers = {};
      c.payload.questions.forEach((q, qi) => {
        const picked = [...form.querySelectorAll(`input[name="${CSS.escape(`${c.choice_id}-${qi}`)}"]:checked`)].map((i) => i.value);
        if (picked.length) answers[q.question] = q.multi_select ? picked : picked[0];
      });
      if (!Object.keys(answers).length) return showError("Pick an answer first.");
      this.chat.answer(c.choice_id, { answers });
    });
    return form;
  }
}

// ---------- tools, files, waiting prompts ----------

/** A tool's input as a person reads it: a command as code, an edit as a diff, a path as a path. */
function toolInput(tool, input) {
  if (!input || typeof input !== "object") return null;
  const pre = (text, cls) => h("pre", { class: cls || "" }, text);
  if (tool === "Bash" && typeof input.command === "string") return pre(input.command, "command");
  if ((tool === "Edit" || tool === "MultiEdit") && input.file_path) {
    const edits = tool === "Edit" ? [input] : input.edits || [];
    return h("div", {}, h("div", { class: "path" }, input.file_path), ...edits.map((e) => diffView(
      [...String(e.old_string ?? "").split("\n").map((l) => `-${l}`), ...String(e.new_string ?? "").split("\n").map((l) => `+${l}`)].join("\n"))));
  }
  if (tool === "Write" && input.file_path) {
    return h("div", {}, h("div", { class: "path" }, input.file_path), pre(String(input.content ?? "")));
  }
  if ((tool === "Read" || tool === "NotebookEdit") && (input.file_path || input.notebook_path)) {
    return h("div", { class: "path" }, input.file_path || input.notebook_path);
  }
  return pre(JSON.stringify(input, null, 2));
}

/** A unified diff, each line classed by what it does (as text, never HTML). */
function diffView(text) {
  return h("pre", { class: "diff" }, ...text.split("\n").map((line) => h("span", {
    class: line.startsWith("+") && !line.startsWith("+++") ? "add" : line.startsWith("-") && !line.startsWith("---") ? "del"
      : line.startsWith("@@") ? "hunk" : "",
  }, `${line}\n`)));
}

/** A file's text, highlighted by its extension when highlight.js knows the
 * language (it escapes the text; the result is sanitized all the same). */
function highlighted(path, text) {
  const code = h("code", {}, text);
  const pre = h("pre", { class: "file", "aria-label": `Content of ${path}` }, code);
  const ext = path.includes(".") ? path.split(".").pop().toLowerCase() : "";
  const language = ext && window.hljs && window.hljs.getLanguage(ext) ? ext : null;
  if (language && text.length <= 256 * 1024) {
    const html = window.hljs.highlight(text, { language, ignoreIllegals: true }).value;
    code.innerHTML = window.DOMPurify.sanitize(html, { ALLOWED_TAGS: ["span"], ALLOWED_ATTR: ["class"] });
    code.className = `hljs language-${language}`;
  }
  return pre;
}

/** The workspace beside the conversation: its tree, a file, the repo's diff. */
class FilesPanel {
  constructor(loop) {
    this.loop = loop;
    this.el = h("aside", { class: "files card", "aria-label": "Workspace files", hidden: true });
  }

  toggle() {
    this.el.hidden = !this.el.hidden;
    if (!this.el.hidden) this.open("");
    return !this.el.hidden;
  }

  base() { return `/api/v1/loops/${encodeURIComponent(this.loop.id)}`; }

  async open(path) {
    try {
      const l = await api("GET", `${this.base()}/files?path=${encodeURIComponent(path)}`);
      const up = path ? path.split("/").slice(0, -1).join("/") : null;
      const items = l.entries.map((e) => h("li", {}, h("button", { type: "button", class: "link", onclick: () => {
        const p = path ? `${path}/${e.name}` : e.name;
        if (e.kind === "dir") this.open(p); else this.show(p);
      } }, e.kind === "dir" ? `${e.name}/` : e.name), h("span", { class: "small muted" }, e.kind === "file" ? ` ${e.size} B` : "")));
      this.el.replaceChildren(
        h("div", { class: "row" }, h("strong", {}, `/${path}`),
          up !== null ? h("button", { type: "button", onclick: () => this.open(up) }, "Up") : null,
          this.loop.repo ? h("button", { type: "button", onclick: () => this.diff() }, "Diff") : null),
        h("ul", { class: "plain", "aria-label": "Files" }, items),
        l.truncated ? h("p", { class: "small muted" }, "(the first 1000 entries)") : null);
    } catch (e) { showError(e.message); }
  }

  async show(path) {
    try {
      const f = await api("GET", `${this.base()}/files/content?path=${encodeURIComponent(path)}`);
      const body = f.encoding === "utf-8" ? highlighted(path, f.content)
        : h("p", { class: "muted" }, `A binary file (${f.mime}, ${f.size} bytes).`);
      const dir = path.split("/").slice(0, -1).join("/");
      this.el.replaceChildren(h("div", { class: "row" }, h("strong", {}, path),
        h("button", { type: "button", onclick: () => this.open(dir) }, "Back")), body,
        f.truncated ? h("p", { class: "small muted" }, "(the first 1 MiB)") : null);
    } catch (e) { showError(e.message); }
  }

  async diff() {
    try {
      const d = await api("GET", `${this.base()}/diff`);
      this.el.replaceChildren(h("div", { class: "row" }, h("strong", {}, `Changes since ${d.base.slice(0, 8)}`),
        h("button", { type: "button", onclick: () => this.open("") }, "Back")),
        d.diff ? diffView(d.diff) : h("p", { class: "muted" }, "No changes to tracked files."),
        d.untracked.length ? h("p", { class: "small" }, `New files: ${d.untracked.join(", ")}`) : null);
    } catch (e) { showError(e.message); }
  }
}

/** The page's title says how many prompts wait, across every loop. */
let waitingTimer = null;
async function refreshWaiting() {
  clearTimeout(waitingTimer);
  try {
    const { data } = await api("GET", "/api/v1/choices?status=pending");
    document.title = data.length ? `(${data.length}) loopd` : "loopd";
  } catch { /* logged out: the login page says so */ }
  waitingTimer = setTimeout(refreshWaiting, 15000);
}

// ---------- settings ----------

const SCOPES = [
  ["loops:read", "read loops, turns, events and choices"],
  ["loops:write", "create and archive loops"],
  ["messages:write", "send messages and interrupt"],
  ["choices:write", "answer prompts"],
  ["webhooks:write", "manage webhooks"],
];
const MODES = ["plan", "dontAsk", "default", "acceptEdits", "auto", "bypassPermissions"];

async function renderSettings() {
  const { tokens } = await api("GET", "/api/v1/me/tokens");
  const label = h("input", { type: "text", id: "label", name: "label", placeholder: "e.g. slack bot" });
  const scopeBoxes = SCOPES.map(([name, what]) => h("label", { class: "check" },
    h("input", { type: "checkbox", name: "scope", value: name }), ` ${name} `, h("span", { class: "muted small" }, what)));
  const days = h("input", { type: "number", id: "expires-days", name: "expires-days", min: "1", max: "3650", placeholder: "never" });
  const mode = h("select", { id: "max-mode", name: "max-mode" },
    h("option", { value: "" }, "any the server allows"), ...MODES.map((m) => h("option", { value: m }, m)));
  const shown = h("div");
  const showToken = (t, what) => {
    const copy = h("button", { type: "button", onclick: async () => {
      await navigator.clipboard.writeText(t.token).catch(() => {});
      copy.textContent = "Copied";
    } }, "Copy");
    shown.replaceChildren(h("p", {}, `${what} — it is shown only this once:`),
      h("div", { class: "row" }, h("code", { class: "token", id: "new-token" }, t.token), copy));
  };
  const form = h("form", { class: "card", "aria-label": "New API token" },
    h("div", { class: "row" }, h("div", { class: "field" }, h("label", { for: "label" }, "Label"), label),
      h("button", { type: "submit", class: "primary" }, "Create token")),
    h("fieldset", { class: "scopes" }, h("legend", {}, "Scopes (none ticked: everything you can do)"), ...scopeBoxes),
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: "expires-days" }, "Expires after (days)"), days),
      h("div", { class: "field" }, h("label", { for: "max-mode" }, "Most permissive mode"), mode)),
    shown);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = {};
    if (label.value) body.label = label.value;
    const scopes = scopeBoxes.map((l) => l.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
    if (scopes.length) body.scopes = scopes;
    if (days.value) body.expires_at = new Date(Date.now() + Number(days.value) * 86400e3).toISOString();
    if (mode.value) body.max_permission_mode = mode.value;
    try {
      showToken(await api("POST", "/api/v1/me/tokens", body), "Your new token");
      form.reset();
      await refresh();
    } catch (e) {
      showError(e.message);
    }
  });
  const limits = (t) => [
    t.scopes ? t.scopes.join(", ") : "all scopes",
    t.expiresAt ? `expires ${when(t.expiresAt)}` : null,
    t.maxPermissionMode ? `modes up to ${t.maxPermissionMode}` : null,
  ].filter(Boolean).join(" · ");
  const name = (t) => t.label || t.tokenId;
  const row = (t) => h("li", {},
    h("span", { class: "title" }, t.label || "(no label)"),
    h("span", { class: "muted small" }, `${t.tokenId} · created ${when(t.createdAt)} · ${t.lastUsedAt ? `used ${when(t.lastUsedAt)}` : "never used"}`),
    h("span", { class: "muted small" }, limits(t)),
    h("button", { type: "button", "aria-label": `Rotate ${name(t)}`, onclick: async () => {
      try {
        showToken(await api("POST", `/api/v1/me/tokens/${t.tokenId}/rotate`, { grace_seconds: 3600 }),
          `The new token for ${name(t)}; the old one works for one more hour`);
        await refresh();
      } catch (e) { showError(e.message); }
    } }, "Rotate"),
    h("button", { type: "button", class: "danger", "aria-label": `Revoke ${name(t)}`, onclick: async () => {
      try { await api("DELETE", `/api/v1/me/tokens/${t.tokenId}`); renderSettings(); } catch (e) { showError(e.message); }
    } }, "Revoke"));
  const list = h("ul", { class: "plain loops", "aria-label": "API tokens" }, tokens.map(row));
  const refresh = async () => list.replaceChildren(...(await api("GET", "/api/v1/me/tokens")).tokens.map(row));
  view.replaceChildren(h("h1", {}, "Settings"), h("h2", {}, "API tokens"),
    h("p", { class: "muted" }, "Bots use these with Authorization: Bearer …. Without scopes they can do everything you can, except manage other tokens."),
    form, list);
}

route();
